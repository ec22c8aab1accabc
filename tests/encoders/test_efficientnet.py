from __future__ import annotations

import matplotlib.cbook as cbook
import numpy as np
import pytest
import torch
from PIL import Image

from sail.encoders.base import get_spec
from sail.encoders.efficientnet_lite0 import remap_to_timm
from sail.errors import SailError


@pytest.fixture(scope="module")
def lite0():
    return get_spec("efficientnet-lite0").build()


def test_shipped_weights_classify_a_real_photo(lite0):
    """matplotlib's grace_hopper.jpg is ImageNet's 'military uniform' with the real weights."""
    from torchvision.models import ResNet50_Weights  # class names only; no weights are fetched

    categories = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        rgb_HW3 = np.array(Image.open(f).convert("RGB"))
    x_13HW = torch.from_numpy(rgb_HW3).permute(2, 0, 1)[None]
    probs = lite0.logits(x_13HW).softmax(-1)[0]
    assert categories[int(probs.argmax())] == "military uniform"
    assert probs.max() > 0.3
    # The encoder path sees the same photo as one 1280-d pooled vector.
    emb = lite0.encode(x_13HW)
    assert emb.shape == (1, 1280) and emb.dtype == torch.float32 and torch.isfinite(emb).all()


def test_pooled_vector_is_the_classifier_input(lite0):
    x = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    emb = lite0.encode(x)
    logits = lite0.logits(x)
    with torch.inference_mode():
        torch.testing.assert_close(lite0.model.classifier(emb), logits, atol=1e-4, rtol=1e-4)


def test_remap_rejects_misaligned_weights():
    target = {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2)}
    with pytest.raises(
        SailError, match="'_x.weight' \\(3, 2\\) does not line up with timm 'a.weight'"
    ):
        remap_to_timm({"_x.weight": torch.zeros(3, 2), "_x.bias": torch.zeros(2)}, target)
    with pytest.raises(SailError, match="have 1 tensors, the timm model expects 2"):
        remap_to_timm({"_x.weight": torch.zeros(2, 3)}, target)
