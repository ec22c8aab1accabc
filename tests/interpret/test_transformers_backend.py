"""The transformers backend with a tiny random-weight Llava built, saved and loaded here."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from sail.config import LocalModelSettings
from sail.interpret.backends.base import ChatRequest


def _tiny_llava(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    words = [
        "<pad>",
        "<unk>",
        "<s>",
        "</s>",
        "<image>",
        "system",
        "user",
        "assistant",
        ":",
        "ct",
        "of",
        "the",
        "liver",
        "concept",
        "{",
        "}",
        '"',
        "axial",
        "brain",
    ] + [f"w{i}" for i in range(40)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )
    template = (
        "{% for m in messages %}{{ m['role'] }} : {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% "
        "endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
    )
    text = LlamaConfig(
        vocab_size=len(words),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=4,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    import torch

    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(path)
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=fast,
        patch_size=16,
        vision_feature_select_strategy="default",
        chat_template=template,
        num_additional_image_tokens=1,
    )
    proc.save_pretrained(path)


@pytest.mark.filterwarnings("ignore")
def test_tiny_vlm_through_the_local_backend(tmp_path):
    from sail.interpret.backends.transformers_local import LocalVLM

    _tiny_llava(tmp_path / "tiny-llava")
    vlm = LocalVLM(
        LocalModelSettings(model=str(tmp_path / "tiny-llava"), device="cpu", max_new_tokens=6)
    )
    buf = io.BytesIO()
    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(buf, format="PNG")
    req = ChatRequest("system", "concept of the liver", [buf.getvalue(), buf.getvalue()])
    out1 = vlm.complete(req)
    assert isinstance(out1, str)
    assert vlm.complete(req) == out1  # greedy: reproducible
    assert vlm.identity == "transformers:tiny-llava"
    # a text-only request (the llm matcher) goes through the same path
    assert isinstance(vlm.complete(ChatRequest("system", "ct of the brain")), str)
