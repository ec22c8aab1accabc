"""Random-init controls: the same architectures with no learned weights (no download).

Published control (``biomedparse_random``): seed 42 before the model is built, then every Linear
and Conv2d weight ~ truncated normal (std 0.02) with zero bias, every LayerNorm weight 1 and bias
0; other parameters (layer-scale gammas, tokens) keep their constructor values. ``random-dinov3``
applies the same rule to a DINOv3 ViT-L/16. Run these in fp32: a deep random network amplifies
bf16 rounding until fp32 and bf16 embeddings disagree completely.

``random-efficientnet-lite0`` (the demo's control) keeps timm's own initialisation of
``tf_efficientnet_lite0`` (fan-out normal convolutions, BatchNorm at 1/0 with running statistics
0/1), seeded 42: a convolutional network with no LayerNorm does not fit the rule above, and with
trunc-normal(0.02) weights its activations shrink to nothing within a few blocks, which would make
the control trivially weak instead of an honest "architecture without learning" baseline.
"""

from __future__ import annotations

import torch
from torch import nn

from sail.encoders.base import Preprocess, get_spec
from sail.encoders.biomedparse import (
    FOCALNET_L,
    BiomedParseEncoder,
    FocalNetArch,
    biomedparse_preprocess,
    build_focalnet,
)
from sail.encoders.dinov3 import DINOv3Encoder
from sail.encoders.efficientnet_lite0 import EfficientNetLite0Encoder, lite0_preprocess

SEED = 42
INIT_STD = 0.02

# DINOv3 ViT-L/16 (transformers' conversion script values, current field names).
VITL16 = dict(
    patch_size=16,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_register_tokens=4,
    layerscale_value=1.0,
    use_gated_mlp=False,
    query_bias=True,
    key_bias=False,
    value_bias=True,
    proj_bias=True,
    layer_norm_eps=1e-5,
    rope_theta=100.0,
    pos_embed_rescale=2.0,
    image_size=224,
)


def reinit_published(model: nn.Module) -> nn.Module:
    """Linear/Conv2d: trunc-normal(0.02) weights, zero bias; LayerNorm: 1 and 0 (module order)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                if module.weight is not None:
                    nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    return model


def build_random_biomedparse(
    weights: str | None = None, image_size: int = 1024, arch: FocalNetArch = FOCALNET_L
) -> BiomedParseEncoder:
    spec = get_spec("random-biomedparse")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = reinit_published(build_focalnet(arch))
    return BiomedParseEncoder(
        model.eval(),
        arch,
        biomedparse_preprocess(image_size),
        spec.weights_identity(None),
        spec.name,
    )


def build_random_dinov3(
    weights: str | None = None, image_size: int = 1024, config: dict | None = None
) -> DINOv3Encoder:
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    spec = get_spec("random-dinov3")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = reinit_published(DINOv3ViTModel(DINOv3ViTConfig(**(config or VITL16))))
    # DINOv3's processor defaults: rescale 1/255, bilinear antialiased resize, ImageNet mean/std.
    return DINOv3Encoder(
        model.eval(), Preprocess(image_size=image_size), spec.weights_identity(None), spec.name
    )


def build_random_efficientnet_lite0(
    weights: str | None = None, image_size: int = 224
) -> EfficientNetLite0Encoder:
    import timm

    spec = get_spec("random-efficientnet-lite0")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    return EfficientNetLite0Encoder(
        model.eval(), lite0_preprocess(image_size), spec.weights_identity(None), spec.name
    )
