"""BiomedParse v1 image backbone (FocalNet-L, FL4) built with timm: no detectron2, no BiomedParse
repository.

BiomedParse's backbone is FocalNet with embed 192, depths 2-2-18-2, focal levels 4, focal windows 3,
overlapping conv embedding (7x7/4 stem, 3x3/2 downsampling), post-LayerNorm blocks, layer scale
1e-4, and the modulator divided by (focal_level + 1) ("scaling_modulator"). timm's FocalNet with
``use_overlap_down``, ``use_post_norm``, ``normalize_modulator`` and ``layerscale_value=1e-4`` is
the same network with other parameter names and 1x1 convs where BiomedParse has Linear layers.
The published embedding is the output of ``backbone.norm3`` (the LayerNorm after the last stage)
averaged over its tokens; timm's final ``norm`` is that LayerNorm.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from sail.encoders.base import Encoder, Preprocess, get_spec, hub_or_local, missing_hub_weights
from sail.errors import SailError

HUB_REPO = "microsoft/BiomedParse"
HUB_FILE = "biomedparse_v1.pt"
_HOW = f"Pass the path of {HUB_FILE} (or of a folder holding it), or the hub id {HUB_REPO}."


@dataclass(frozen=True)
class FocalNetArch:
    """The shape of the backbone; tests use a tiny one through the same code as FocalNet-L."""

    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    focal_levels: tuple[int, ...] = (4, 4, 4, 4)
    focal_windows: tuple[int, ...] = (3, 3, 3, 3)
    mlp_ratio: float = 4.0
    layerscale_value: float = 1e-4

    @property
    def dim(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)


FOCALNET_L = FocalNetArch()


def build_focalnet(arch: FocalNetArch = FOCALNET_L) -> nn.Module:
    """timm FocalNet set up as BiomedParse's backbone (no classifier head, no stochastic depth)."""
    from timm.models.focalnet import FocalNet

    return FocalNet(
        num_classes=0,
        embed_dim=arch.embed_dim,
        depths=arch.depths,
        mlp_ratio=arch.mlp_ratio,
        focal_levels=arch.focal_levels,
        focal_windows=arch.focal_windows,
        use_overlap_down=True,
        use_post_norm=True,
        use_post_norm_in_modulation=False,
        normalize_modulator=True,
        layerscale_value=arch.layerscale_value,
        drop_path_rate=0.0,
    ).eval()


_OUT_NORM = re.compile(r"^norm(\d+)\.(.+)$")
_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.(.+)$")
_BLOCK = re.compile(r"^(layers\.\d+\.blocks\.\d+)\.(.+)$")
_BLOCK_RENAMES = {"gamma_1": "ls1.gamma", "gamma_2": "ls2.gamma"}
_BLOCK_PREFIX_RENAMES = {"norm1.": "norm1_post.", "norm2.": "norm2_post."}


def _timm_key(key: str, last_stage: int) -> str | None:
    """BiomedParse backbone key -> timm key; None for the unused outputs norm0..norm2."""
    if key.startswith("patch_embed."):
        return "stem." + key[len("patch_embed.") :]
    if m := _OUT_NORM.match(key):
        return f"norm.{m.group(2)}" if int(m.group(1)) == last_stage else None
    # BiomedParse downsamples at the end of stage i; timm at the start of stage i + 1.
    if m := _DOWNSAMPLE.match(key):
        return f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
    if m := _BLOCK.match(key):
        block, rest = m.groups()
        if rest in _BLOCK_RENAMES:
            return f"{block}.{_BLOCK_RENAMES[rest]}"
        for old, new in _BLOCK_PREFIX_RENAMES.items():
            if rest.startswith(old):
                return f"{block}.{new}{rest[len(old) :]}"
    return key


def backbone_state_dict(
    checkpoint: Mapping[str, object], source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """The ``backbone.*`` tensors of a BiomedParse checkpoint, prefix removed."""
    for wrapper in ("model", "state_dict"):
        if isinstance(checkpoint.get(wrapper), Mapping):
            checkpoint = checkpoint[wrapper]  # type: ignore[assignment]
            break
    for prefix in ("backbone.", "model.backbone.", "module.backbone."):
        found = {
            k[len(prefix) :]: v
            for k, v in checkpoint.items()
            if isinstance(k, str) and k.startswith(prefix)
        }
        if found:
            return found
    raise SailError(
        f"{source}: no 'backbone.*' keys; is this a BiomedParse checkpoint ({HUB_FILE})?"
    )


def remap_backbone(
    backbone: Mapping[str, torch.Tensor], model: nn.Module, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Map every BiomedParse backbone tensor onto ``model``; unknown, missing or misshapen keys
    are errors."""
    target = model.state_dict()
    last_stage = len(model.layers) - 1
    out: dict[str, torch.Tensor] = {}
    unexpected, misshapen = [], []
    for key, value in backbone.items():
        new = _timm_key(key, last_stage)
        if new is None:
            continue
        if new not in target:
            unexpected.append(key)
            continue
        expected = target[new]
        if value.shape != expected.shape:
            # BiomedParse's Linear (out, in) is timm's 1x1 conv (out, in, 1, 1).
            if (
                value.ndim == 2
                and expected.ndim == 4
                and value.shape == expected.shape[:2]
                and expected.shape[2:] == (1, 1)
            ):
                value = value.reshape(expected.shape)
            else:
                misshapen.append(f"{key} {tuple(value.shape)} vs {tuple(expected.shape)}")
                continue
        out[new] = value
    missing = [k for k in target if k not in out]
    problems = []
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected backbone keys (e.g. "
            f"backbone.{', backbone.'.join(unexpected[:3])})"
        )
    if misshapen:
        problems.append(
            f"{len(misshapen)} keys with the wrong shape (e.g. backbone.{misshapen[0]})"
        )
    if missing:
        problems.append(
            f"{len(missing)} model tensors without a checkpoint key (e.g. {', '.join(missing[:3])})"
        )
    if problems:
        raise SailError(f"{source}: does not match the FocalNet backbone: " + "; ".join(problems))
    return out


class BiomedParseEncoder(Encoder):
    """Mean over the tokens of the last stage after its LayerNorm (1536-d for FocalNet-L)."""

    pooled_by = "a mean over the tokens of its last stage"

    def __init__(
        self,
        model: nn.Module,
        arch: FocalNetArch,
        preprocess: Preprocess,
        weights_id: str,
        name: str,
    ):
        super().__init__()
        self.model = model
        self.arch = arch
        self.dim = arch.dim
        self.preprocess = preprocess
        self.weights_id = weights_id
        self.name = name

    def forward_grid(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        """The last stage's normalised token grid (B, dim, h, w), before the mean."""
        return self.model.forward_features(x_B3HW)

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        return self.forward_grid(x_B3HW).mean(dim=(2, 3))

    def metadata(self) -> dict:
        return {**super().metadata(), "architecture": {"family": "focalnet", **asdict(self.arch)}}


def biomedparse_preprocess(image_size: int) -> Preprocess:
    """Published: bilinear antialiased resize, ImageNet mean/std on the 0-255 scale
    (123.675/58.395, ...)."""
    return Preprocess(image_size=image_size, interpolation="bilinear")


def _checkpoint_path(weights: str) -> Path:
    location, local = hub_or_local(weights, "BiomedParse", _HOW)
    if local:
        path = Path(location)
        if path.is_dir():
            path = path / HUB_FILE
            if not path.is_file():
                raise SailError(
                    f"BiomedParse weights folder {location} holds no {HUB_FILE}. {_HOW}"
                )
        return path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(location, HUB_FILE))
    except Exception as exc:  # offline, gated, missing: one actionable message
        raise missing_hub_weights(location, "BiomedParse", f" {HUB_FILE}", exc) from None


def load_checkpoint(path: Path) -> Mapping[str, object]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load fails in many ways on a bad file
        raise SailError(
            f"{path}: not a readable PyTorch checkpoint of tensors ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(checkpoint, Mapping):
        raise SailError(f"{path}: expected a state dict, got {type(checkpoint).__name__}")
    return checkpoint


def build_biomedparse(
    weights: str | None = None, image_size: int = 1024, arch: FocalNetArch = FOCALNET_L
) -> BiomedParseEncoder:
    spec = get_spec("biomedparse")
    weights = weights or spec.default_weights
    path = _checkpoint_path(weights)
    model = build_focalnet(arch)
    model.load_state_dict(
        remap_backbone(backbone_state_dict(load_checkpoint(path), str(path)), model, str(path)),
        strict=True,
    )
    return BiomedParseEncoder(
        model, arch, biomedparse_preprocess(image_size), spec.weights_identity(weights), spec.name
    )
