"""Any timm or transformers vision model by name: ``timm:MODEL_NAME`` and ``hf:MODEL_ID_OR_DIR``.

- ``timm:NAME``: NAME is anything ``timm.create_model`` takes (a registry name such as
  ``vit_base_patch16_224.augreg_in21k``, ``hf-hub:org/repo`` or ``local-dir:/path``). ``--weights``
  is a folder written by ``timm.models.save_for_hf`` (config.json + model.safetensors; its
  architecture must be NAME) or a weights file (.safetensors/.pth/.bin) loaded into NAME.
- ``hf:ID_OR_DIR``: a transformers vision backbone (``AutoModel``: ViT, DINOv2/v3, Swin, ConvNeXt,
  ResNet, ...) from a local ``save_pretrained`` folder or a hub id; ``--weights DIR`` overrides
  where it loads from.

Offline by default: hub names resolve from the local Hugging Face cache only (set
``SAIL_ALLOW_DOWNLOADS=1`` to let timm/transformers download). The embedding dimension comes from
the model (timm ``num_features``; transformers ``hidden_size`` or ``hidden_sizes[-1]``) and the
preprocessing (input size, interpolation, mean, std) from the model's own config (timm's
``pretrained_cfg``, the transformers image processor). Pooling over the last feature map:
``cls`` (class token after the final norm), ``mean`` (patch tokens, or spatial mean for CNNs),
``gem`` (generalised mean, p = 3, over the same), ``auto`` = cls when the model has a class token,
else mean.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sail.encoders.base import Encoder, EncoderSpec, Preprocess, hub_or_local
from sail.errors import SailError

log = logging.getLogger(__name__)

PREFIXES = ("timm:", "hf:")
GEM_P = 3.0
_FALLBACK_SIZE = 224
_RESAMPLE = {2: "bilinear", 3: "bicubic", "bilinear": "bilinear", "bicubic": "bicubic"}


def is_named(name: str) -> bool:
    return name.startswith(PREFIXES)


def table_name(name: str) -> str:
    """A file-safe default table name: ``timm:vit_small.augreg`` -> ``timm-vit_small.augreg``."""
    prefix, _, ident = name.partition(":")
    ident = (
        Path(ident.rstrip("/")).name
        if prefix == "hf" and Path(ident).expanduser().exists()
        else ident
    )
    return f"{prefix}-" + re.sub(r"[^A-Za-z0-9._-]+", "-", ident).strip("-.")


def named_spec(name: str) -> EncoderSpec:
    """The registry entry of ``timm:NAME`` / ``hf:ID_OR_DIR``, made on demand (nothing is
    loaded)."""
    prefix, _, ident = name.partition(":")
    if not ident:
        raise SailError(
            f"encoder {name!r}: give a model after '{prefix}:', e.g. timm:resnet50 or "
            "hf:facebook/dinov2-small"
        )
    if prefix == "timm":
        return EncoderSpec(
            name=name,
            builder=functools.partial(build_timm, name=name, ident=ident),
            default_image_size=_FALLBACK_SIZE,
            fixed_weights=f"timm-pretrained:{ident}",
            description=f"timm model {ident}",
            extra={"model": ident, "image_size_for": _timm_size, "named": True},
        )
    return EncoderSpec(
        name=name,
        builder=functools.partial(build_hf, name=name, ident=ident),
        default_image_size=_FALLBACK_SIZE,
        default_weights=ident,
        description=f"transformers model {ident}",
        extra={"model": ident, "image_size_for": _hf_size, "named": True},
    )


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Resolve hub names from the local cache only, unless SAIL_ALLOW_DOWNLOADS=1."""
    if os.environ.get("SAIL_ALLOW_DOWNLOADS") == "1":
        yield
        return
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


class NamedEncoder(Encoder):
    """A timm or transformers backbone: last feature map -> pooled (B, dim)."""

    def __init__(
        self,
        name: str,
        model: nn.Module,
        preprocess: Preprocess,
        weights_id: str,
        dim: int,
        pooling: str,
        class_token: bool,
        prefix_tokens: int,
        architecture: dict[str, Any],
        features,
    ):
        super().__init__()
        self.name, self.model, self.preprocess, self.weights_id, self.dim = (
            name,
            model,
            preprocess,
            weights_id,
            dim,
        )
        self.prefix_tokens = prefix_tokens  # class + register tokens, left out of mean/gem
        self.pooling = ("cls" if class_token else "mean") if pooling == "auto" else pooling
        if self.pooling == "cls" and not class_token:
            raise SailError(
                f"encoder {name}: pooling 'cls' needs a model with a class token; use mean or gem"
            )
        self.architecture = architecture
        self.features = features  # (model, x) -> (B, N, D) tokens or (B, C, H, W) maps

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        out = self.features(self.model, x_B3HW)
        if out.ndim == 4:  # CNN map (B, C, H, W) -> (B, HW, C)
            out = out.flatten(2).transpose(1, 2)
        elif out.ndim != 3:
            raise SailError(f"encoder {self.name}: unexpected feature shape {tuple(out.shape)}")
        if self.pooling == "cls":
            return out[:, 0]
        tokens_BND = out[:, self.prefix_tokens :] if out.shape[1] > self.prefix_tokens else out
        if self.pooling == "mean":
            return tokens_BND.mean(dim=1)
        return tokens_BND.float().clamp(min=1e-6).pow(GEM_P).mean(dim=1).pow(1.0 / GEM_P)

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "pooling": self.pooling, "architecture": self.architecture}


# ---------------------------------------------------------------- timm


def _timm_size(spec: EncoderSpec, weights: str | None) -> int:
    """Input side from the weights folder's or the registry's pretrained_cfg, without building the
    model."""
    ident = spec.extra["model"]
    folder = Path(weights).expanduser() if weights else None
    if ident.startswith("local-dir:"):
        folder = Path(ident[len("local-dir:") :]).expanduser()
    if folder is not None and folder.is_dir():
        config = _read_json(folder / "config.json")
        size = config.get("model_args", {}).get("img_size") or config.get("pretrained_cfg", {}).get(
            "input_size"
        )
        if isinstance(size, (list, tuple)):
            size = size[-1]
        return int(size) if size else _FALLBACK_SIZE
    try:
        import timm

        cfg = timm.get_pretrained_cfg(ident)
    except Exception:  # an unknown name is reported when the model is built
        cfg = None
    return int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else _FALLBACK_SIZE


def _create_timm(ident: str, weights: str | None, name: str) -> nn.Module:
    import timm

    if weights is None:
        with hub_offline():
            try:
                return timm.create_model(ident, pretrained=True)
            except Exception as exc:  # unknown name, offline, missing cache: one message
                raise SailError(
                    f"encoder {name}: cannot load pretrained timm weights for {ident!r} "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). Offline by "
                    "default: pass --weights (a save_for_hf folder or a weights file), fetch them "
                    "into the Hugging Face cache, or set SAIL_ALLOW_DOWNLOADS=1"
                ) from None
    path = Path(weights).expanduser()
    if not path.exists():
        raise SailError(f"encoder {name}: weights not found: {path}")
    try:
        if path.is_dir():
            arch = _read_json(path / "config.json").get("architecture")
            if arch is None:
                raise SailError(
                    f"{path}: no config.json with an 'architecture' "
                    "(write the folder with timm.models.save_for_hf)"
                )
            if arch != ident.split(".")[0]:
                raise SailError(f"{path}: holds a timm {arch!r}, not {ident!r}")
            return timm.create_model(f"local-dir:{path}", pretrained=True)
        return timm.create_model(ident, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    except SailError:
        raise
    except Exception as exc:  # timm/torch fail in many ways on a bad file
        raise SailError(
            f"encoder {name}: cannot load {path} into timm {ident!r} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:300]})"
        ) from None


def _timm_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model.forward_features(x)
    if out.ndim == 4 and str(getattr(model, "output_fmt", "NCHW")) == "NHWC":  # Swin and friends
        out = out.permute(0, 3, 1, 2)
    return out


def build_timm(
    weights: str | None, image_size: int, pooling: str = "auto", *, name: str = "", ident: str = ""
) -> NamedEncoder:
    import timm

    model = _create_timm(ident, weights, name).eval()
    data = timm.data.resolve_data_config({}, model=model)
    if data["input_size"][0] != 3:
        raise SailError(
            f"encoder {name}: the model takes {data['input_size'][0]} channels; "
            "only 3-channel models are supported"
        )
    interpolation = _RESAMPLE.get(data.get("interpolation", "bicubic"))
    if interpolation is None:
        raise SailError(
            f"encoder {name}: interpolation {data.get('interpolation')!r} unsupported "
            "(bilinear or bicubic)"
        )
    preprocess = Preprocess(
        image_size=image_size,
        interpolation=interpolation,
        mean=tuple(float(v) for v in data["mean"]),
        std=tuple(float(v) for v in data["std"]),
    )
    class_token = getattr(model, "cls_token", None) is not None
    arch = {
        "library": "timm",
        "model": ident,
        "num_features": int(model.num_features),
        "class_token": class_token,
    }
    return NamedEncoder(
        name,
        model,
        preprocess,
        named_spec(name).weights_identity(weights),
        int(model.num_features),
        pooling,
        class_token,
        int(getattr(model, "num_prefix_tokens", 0) or 0),
        arch,
        _timm_features,
    )


# ---------------------------------------------------------------- transformers


def _processor_size(cfg: dict[str, Any]) -> int | None:
    for key in ("crop_size", "size"):
        value = cfg.get(key)
        if isinstance(value, int):
            return value
        if isinstance(value, dict):
            for k in ("height", "shortest_edge", "width"):
                if isinstance(value.get(k), int):
                    return int(value[k])
    return None


def _hf_size(spec: EncoderSpec, weights: str | None) -> int:
    location = Path(weights or spec.extra["model"]).expanduser()
    if location.is_dir():
        size = _processor_size(_read_json(location / "preprocessor_config.json"))
        size = size or _read_json(location / "config.json").get("image_size")
        return int(size) if isinstance(size, int) else _FALLBACK_SIZE
    try:
        from transformers import AutoImageProcessor

        with hub_offline():
            processor = AutoImageProcessor.from_pretrained(str(location), local_files_only=True)
        return _processor_size(processor.to_dict()) or _FALLBACK_SIZE
    except Exception:  # the build reports a missing model properly
        return _FALLBACK_SIZE


def _hf_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=x).last_hidden_state


def build_hf(
    weights: str | None, image_size: int, pooling: str = "auto", *, name: str = "", ident: str = ""
) -> NamedEncoder:
    from transformers import AutoImageProcessor, AutoModel

    from sail.encoders.dinov3 import preprocess_from_processor

    how = (
        "Pass a folder written by save_pretrained (config.json + weights) or a hub id in the "
        "local cache."
    )
    location, local = hub_or_local(weights or ident, f"encoder {name}", how)
    try:
        with hub_offline():
            model = AutoModel.from_pretrained(
                location, local_files_only=os.environ.get("SAIL_ALLOW_DOWNLOADS") != "1"
            )
    except Exception as exc:  # offline, gated, malformed: one clear message
        where = (
            "not a loadable transformers model folder"
            if local
            else "not in the local Hugging Face cache"
        )
        raise SailError(
            f"encoder {name}: {location} is {where} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}). {how} Or set SAIL_ALLOW_DOWNLOADS=1"
        ) from None
    try:
        with hub_offline():
            processor = AutoImageProcessor.from_pretrained(location)
    except Exception as exc:  # any processor failure: warn, fall back to defaults
        log.warning(
            "%s: no usable image processor (%s); using ImageNet mean/std, bilinear", location, exc
        )
        processor = None
    preprocess = (
        preprocess_from_processor(processor, image_size)
        if processor is not None
        else Preprocess(image_size)
    )
    config = model.config
    dim = (
        getattr(config, "hidden_size", None)
        or (getattr(config, "hidden_sizes", None) or [None])[-1]
    )
    if not isinstance(dim, int):
        raise SailError(
            f"encoder {name}: cannot read the embedding size from {location} "
            "(no hidden_size/hidden_sizes)"
        )
    embeddings = getattr(model, "embeddings", None)
    has_cls = getattr(embeddings, "cls_token", None) is not None
    registers = int(getattr(config, "num_register_tokens", 0) or 0)
    arch = {
        "library": "transformers",
        "model_type": getattr(config, "model_type", None),
        "dim": dim,
        "class_token": has_cls,
    }
    return NamedEncoder(
        name,
        model.eval(),
        preprocess,
        named_spec(name).weights_identity(weights),
        dim,
        pooling,
        has_cls,
        int(has_cls) + registers,
        arch,
        _hf_features,
    )
