"""A local transformers image-text-to-text model (a MedGemma checkpoint, Llava, ...).

Loaded with the Auto classes from a folder or a cached hub id; the chat template of the model's
own processor builds the inputs, and decoding is greedy so answers are reproducible.
"""

from __future__ import annotations

import io
import logging
import threading
from pathlib import Path
from typing import Any

from sail.config import LocalModelSettings
from sail.errors import SailError
from sail.interpret.backends.base import BackendError, ChatRequest

log = logging.getLogger(__name__)


class LocalVLM:
    def __init__(self, settings: LocalModelSettings, key: str = "interpret.transformers"):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if not settings.model:
            raise SailError(f"{key}.model is not set (a local folder or a cached hub id)")
        device = settings.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(settings.dtype)
        if dtype is None:
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        try:
            self.processor = AutoProcessor.from_pretrained(settings.model)
            self.model = (
                AutoModelForImageTextToText.from_pretrained(settings.model, dtype=dtype)
                .to(device)
                .eval()
            )
        except (OSError, ValueError) as exc:
            raise SailError(f"{key}.model {settings.model!r}: cannot load ({exc})") from None
        self.device = device
        name = Path(settings.model).name if Path(settings.model).exists() else settings.model
        self.identity = f"transformers:{name}"
        self.params: dict[str, Any] = {
            "max_new_tokens": settings.max_new_tokens,
            "do_sample": False,
            "dtype": str(dtype),
        }
        self._lock = threading.Lock()

    def _messages(self, req: ChatRequest) -> list[dict[str, Any]]:
        from PIL import Image

        content: list[dict[str, Any]] = [
            {"type": "image", "image": Image.open(io.BytesIO(b)).convert("RGB")} for b in req.images
        ]
        content.append({"type": "text", "text": req.text})
        messages = [
            {"role": "system", "content": [{"type": "text", "text": req.system}]},
            {"role": "user", "content": content},
        ]
        for answer, feedback in req.history:
            messages += [
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                {"role": "user", "content": [{"type": "text", "text": feedback}]},
            ]
        return messages

    def complete(self, req: ChatRequest) -> str:
        import torch

        with self._lock:
            try:
                inputs = self.processor.apply_chat_template(
                    self._messages(req),
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=True,
                    return_tensors="pt",
                ).to(self.device)
                with torch.inference_mode():
                    out = self.model.generate(
                        **inputs, max_new_tokens=self.params["max_new_tokens"], do_sample=False
                    )
            except (RuntimeError, ValueError, TypeError) as exc:
                raise BackendError(f"{self.identity}: generation failed ({exc})") from None
            new = out[0, inputs["input_ids"].shape[1] :]
            return self.processor.decode(new, skip_special_tokens=True).strip()
