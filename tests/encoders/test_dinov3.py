"""DINOv3 through the path users take: a folder from save_pretrained, loaded with
AutoModel/AutoImageProcessor offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sail.encoders.base import get_spec
from sail.errors import SailError

from .conftest import TINY_DINOV3


@pytest.fixture(scope="module")
def tiny_dinov3_dir(tmp_path_factory) -> Path:
    from transformers import DINOv3ViTConfig, DINOv3ViTImageProcessor, DINOv3ViTModel

    out = tmp_path_factory.mktemp("tiny-dinov3")
    torch.manual_seed(0)
    model = DINOv3ViTModel(DINOv3ViTConfig(**TINY_DINOV3)).eval()
    model.save_pretrained(out)
    DINOv3ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(out)
    return out


def test_tiny_folder_loads_and_pools_the_cls_token(tiny_dinov3_dir):
    from transformers import AutoImageProcessor, AutoModel

    enc = get_spec("dinov3").build(weights=str(tiny_dinov3_dir), image_size=64)
    assert enc.dim == 32 and enc.name == "dinov3" and enc.weights_id.startswith("local:")
    assert enc.preprocess.interpolation == "bilinear" and enc.preprocess.mean == pytest.approx(
        (0.485, 0.456, 0.406)
    )

    rng = np.random.default_rng(0)
    gray_HW = rng.integers(0, 256, size=(48, 48), dtype=np.uint8)
    x_11HW = torch.from_numpy(gray_HW)[None, None]
    got = enc.encode(x_11HW)

    # The published call: processor on float HWC 0-255 RGB at the set size, then pooler_output.
    processor = AutoImageProcessor.from_pretrained(tiny_dinov3_dir)
    rgb_HW3 = torch.from_numpy(np.repeat(gray_HW[..., None], 3, axis=2)).float()
    pixels = processor(images=[rgb_HW3], size={"height": 64, "width": 64}, return_tensors="pt")[
        "pixel_values"
    ]
    torch.testing.assert_close(enc.preprocess(x_11HW), pixels, atol=1e-4, rtol=1e-4)
    model = AutoModel.from_pretrained(tiny_dinov3_dir).eval()
    with torch.no_grad():
        out = model(pixel_values=pixels)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 0])
    torch.testing.assert_close(got, out.pooler_output, atol=1e-4, rtol=1e-4)


def test_hub_id_offline_names_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(SailError) as err:
        get_spec("dinov3").build(weights=None, image_size=64)
    msg = str(err.value)
    for needle in (
        "facebook/dinov3-vitl16-pretrain-lvd1689m",
        "gated",
        "hf download",
        "--weights",
        "HF_TOKEN",
    ):
        assert needle in msg


def test_folder_without_a_model_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SailError, match="not a loadable transformers model folder"):
        get_spec("dinov3").build(weights=str(tmp_path / "empty"), image_size=64)
