"""DINOv3 ViT through Hugging Face transformers (``AutoModel`` + ``AutoImageProcessor``).

Weights come from a local folder (``save_pretrained`` layout) or a hub id; the published model is
``facebook/dinov3-vitl16-pretrain-lvd1689m`` (gated). The embedding is ``pooler_output``: the CLS
token after the final LayerNorm (1024-d for ViT-L/16). The processor's settings (rescale, resample,
mean, std) are read from the loaded ``AutoImageProcessor`` and applied batched on the device, at
the configured input size (published: 1024). On GPU the published setup ran the model in bf16.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from sail.encoders.base import (
    Encoder,
    Precision,
    Preprocess,
    get_spec,
    hub_or_local,
    missing_hub_weights,
)
from sail.errors import SailError

log = logging.getLogger(__name__)

_HOW = "Pass a folder written by save_pretrained (config.json + model.safetensors) or a hub id."
_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL resampling codes the processors use


class DINOv3Encoder(Encoder):
    pooled_by = "its pooler output (the CLS token), not a mean over patch tokens"

    def __init__(self, model: nn.Module, preprocess: Preprocess, weights_id: str, name: str):
        super().__init__()
        self.model = model
        self.preprocess = preprocess
        self.weights_id = weights_id
        self.name = name
        config = model.config
        self.dim = int(getattr(config, "hidden_size", None) or config.hidden_sizes[-1])

    def to(self, device: str | torch.device, precision: Precision = "fp32") -> DINOv3Encoder:
        super().to(device, precision)
        # Published: the whole model in bf16 on GPU (not autocast), output cast back to float32.
        self.model.to(torch.bfloat16 if precision == "bf16" else torch.float32)
        return self

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x_B3HW).pooler_output

    @torch.inference_mode()
    def encode_patch_grid(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw 0-255 slices -> (pooled (B, dim), patch tokens as a (B, dim, h, w) grid), both
        float32 and after the final LayerNorm (register tokens dropped). The pooled vector is
        ``encode``'s; the grid is what the approximate spatial maps put through the SAE."""
        x_B3HW = self.preprocess(images_BCHW.to(self.device, non_blocking=True))
        with self._autocast():
            out = self.model(pixel_values=x_B3HW)
        config = self.model.config
        skip = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        tokens_BPD = out.last_hidden_state[:, skip:].float()
        h, w = (side // int(config.patch_size) for side in x_B3HW.shape[-2:])
        grid_BDhw = tokens_BPD.transpose(1, 2).reshape(len(x_B3HW), -1, h, w)
        return out.pooler_output.float(), grid_BDhw

    def metadata(self) -> dict:
        config = self.model.config
        arch = {
            k: getattr(config, k)
            for k in ("model_type", "hidden_size", "num_hidden_layers", "patch_size")
            if hasattr(config, k)
        }
        return {**super().metadata(), "architecture": arch}


def preprocess_from_processor(processor, image_size: int) -> Preprocess:
    """The processor's rescale/resample/normalise settings at our input size (checked, not
    assumed)."""
    rescale = (
        float(getattr(processor, "rescale_factor", 1 / 255))
        if getattr(processor, "do_rescale", True)
        else 1.0
    )
    if abs(rescale - 1 / 255) > 1e-9:
        raise SailError(
            f"image processor rescales by {rescale}; only 1/255 (8-bit input) is supported"
        )
    resample = getattr(processor, "resample", 2)
    interpolation = _RESAMPLE.get(int(getattr(resample, "value", resample)))
    if interpolation is None:
        raise SailError(
            f"image processor resample mode {resample!r} is not supported (bilinear or bicubic)"
        )
    if not getattr(processor, "do_normalize", True):
        return Preprocess(
            image_size=image_size,
            interpolation=interpolation,
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
        )
    mean = tuple(float(v) for v in processor.image_mean)
    std = tuple(float(v) for v in processor.image_std)
    return Preprocess(image_size=image_size, interpolation=interpolation, mean=mean, std=std)  # type: ignore[arg-type]


def build_dinov3(weights: str | None = None, image_size: int = 1024) -> DINOv3Encoder:
    from transformers import AutoImageProcessor, AutoModel

    spec = get_spec("dinov3")
    weights = weights or spec.default_weights
    location, local = hub_or_local(weights, "DINOv3", _HOW)
    try:
        model = AutoModel.from_pretrained(location)
    except Exception as exc:  # offline/gated/malformed all need one clear message
        if local:
            raise SailError(
                f"{location}: not a loadable transformers model folder ({type(exc).__name__}: "
                f"{exc}). {_HOW}"
            ) from None
        raise missing_hub_weights(location, "DINOv3", "", exc) from None
    try:
        processor = AutoImageProcessor.from_pretrained(location)
    except Exception as exc:  # any processor failure: warn, fall back to defaults
        log.warning(
            "%s: no usable image processor (%s); using DINOv3's defaults (ImageNet mean/std, "
            "bilinear)",
            location,
            exc,
        )
        processor = None
    preprocess = (
        preprocess_from_processor(processor, image_size)
        if processor is not None
        else Preprocess(image_size)
    )
    return DINOv3Encoder(model.eval(), preprocess, spec.weights_identity(weights), spec.name)
