"""Spatial feature maps: the mean-pooled decomposition is exact (issue 17, item 2)."""

from __future__ import annotations

import pytest
import torch

from sail.encoders.base import get_spec
from sail.encoders.biomedparse import FocalNetArch
from sail.encoders.random_init import build_random_biomedparse, build_random_dinov3
from sail.errors import SailError
from sail.maps.decompose import feature_maps
from sail.sae.api import SAE
from sail.sae.model import SAESpec, StackedSAE

from ..encoders.conftest import TINY_DINOV3, TINY_FOCALNET

ENCODERS = {
    "biomedparse-tiny": lambda: build_random_biomedparse(
        image_size=64, arch=FocalNetArch(**TINY_FOCALNET)
    ),
    "efficientnet-lite0": lambda: get_spec("efficientnet-lite0").build(image_size=96),
}
SPECS = {
    "sail": SAESpec("sail", (8, 16), (2, 4)),
    "matryoshka": SAESpec("matryoshka", (8, 16), (2, 4)),
}


@pytest.fixture(scope="module", params=sorted(ENCODERS))
def encoder(request):
    return ENCODERS[request.param]()


@pytest.fixture(scope="module")
def images():
    """Three raw 0-255 grayscale slices with structure (not noise), at an odd size."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 70), torch.linspace(0, 1, 70), indexing="ij")
    rows = [
        127 + 120 * torch.sin(6 * a * xx + 4 * b * yy) for a, b in torch.rand(3, 2, generator=g)
    ]
    return torch.stack(rows)[:, None].round().to(torch.uint8)


def tiny_sae(variant: str, d: int) -> SAE:
    """A freshly initialised SAE with non-zero biases, so the bias terms are part of the check."""
    stack = StackedSAE([SPECS[variant]], d)
    stack.initialize([3])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        stack.b_dec.copy_(0.05 * torch.randn(stack.b_dec.shape, generator=g))
        stack.b_enc.copy_(0.1 * torch.randn(stack.b_enc.shape, generator=g))
    if variant == "matryoshka":  # its stored code needs JumpReLU thresholds
        stack.calibrate(torch.nn.functional.normalize(torch.randn(256, d, generator=g), dim=1))
    return SAE.from_stack(stack)


@pytest.mark.parametrize("variant", sorted(SPECS))
def test_map_mean_is_the_pre_activation_of_the_pooled_embedding(encoder, images, variant):
    sae = tiny_sae(variant, encoder.dim)
    features = [0, 5, 15, 9]
    result = feature_maps(encoder, sae, images, features)
    B, K = len(images), len(features)
    assert result.method == "exact"
    assert result.maps_BKhw.dtype == torch.float32 and result.maps_BKhw.shape[:2] == (B, K)
    assert result.maps_BKhw.shape[2] * result.maps_BKhw.shape[3] > 1  # a real grid, not one cell
    # The reference goes the way the activations stage does: pooled embedding, then the SAE.
    emb_BD = encoder.encode(images)
    pre_BF = sae.stack.pre_activations(sae.normalize(emb_BD))[0]
    expected_BK = pre_BF[:, features]
    err = (result.maps_BKhw.mean(dim=(2, 3)) - expected_BK).abs().max().item()
    print(f"{encoder.name} {variant}: max |mean(map) - pre| = {err:.2e}")
    assert err <= 1e-5
    torch.testing.assert_close(result.pre_BK, expected_BK, atol=1e-6, rtol=0)
    # The stored code is the variant's rule on this same pre-activation.
    codes_BK = sae.encode(emb_BD)[:, features]
    assert ((codes_BK > 0) <= (expected_BK > 0)).all()
    # Maps are not constant: positions differ, so the map says something about where.
    assert (result.maps_BKhw.flatten(2).std(dim=2) > 0).all()


def test_forward_is_the_mean_of_forward_grid(encoder, images):
    x_B3HW = encoder.preprocess(images)
    with torch.inference_mode():
        assert torch.equal(encoder.forward(x_B3HW), encoder.forward_grid(x_B3HW).mean(dim=(2, 3)))


def test_an_encoder_that_pools_by_cls_is_refused(images):
    dino = build_random_dinov3(image_size=64, config=TINY_DINOV3)
    sae = tiny_sae("sail", dino.dim)
    with pytest.raises(
        SailError,
        match="spatial maps need a mean-pooled encoder; random-dinov3 pools by its pooler output",
    ):
        feature_maps(dino, sae, images, [0])


def test_bad_feature_and_width_are_refused(encoder, images):
    with pytest.raises(SailError, match="feature 16 is not in 0..15"):
        feature_maps(encoder, tiny_sae("sail", encoder.dim), images, [1, 16])
    with pytest.raises(SailError, match=f"gives {encoder.dim}-d features, the SAE takes 7"):
        feature_maps(encoder, tiny_sae("sail", 7), images, [1])
