"""The approximate (DINOv3 patch tokens) and occlusion map methods, and the rule choosing one."""

from __future__ import annotations

import pytest
import torch

from sail.encoders.base import Encoder, get_spec
from sail.encoders.random_init import build_random_dinov3
from sail.errors import SailError
from sail.maps.methods import (
    approximate_maps,
    occlusion_cells,
    occlusion_maps,
    pre_activations,
    resolve_method,
)

from ..encoders.conftest import TINY_DINOV3
from .test_decompose import tiny_sae


@pytest.fixture(scope="module")
def dino():
    return build_random_dinov3(image_size=64, config=TINY_DINOV3)


@pytest.fixture(scope="module")
def effnet():
    return get_spec("efficientnet-lite0").build(image_size=64)


def test_auto_is_exact_for_mean_pooled_and_approximate_for_dinov3(dino, effnet):
    assert resolve_method(effnet, "auto") == "exact"
    assert resolve_method(dino, "auto") == "approximate"
    assert resolve_method(dino, "occlusion") == "occlusion"
    with pytest.raises(SailError, match="maps.method exact: random-dinov3 pools by its pooler"):
        resolve_method(dino, "exact")
    with pytest.raises(SailError, match="efficientnet-lite0 has no patch tokens"):
        resolve_method(effnet, "approximate")


def test_auto_has_no_method_for_an_encoder_without_grid_or_tokens():
    """Such an encoder (e.g. timm: with its own pooling) gets no map unless occlusion is asked
    for; the stage skips it with a warning instead of failing the run."""

    class Pooled(Encoder):
        name = "pooled"

    assert resolve_method(Pooled(), "auto") is None
    assert resolve_method(Pooled(), "occlusion") == "occlusion"


def test_dinov3_approximate_maps_are_patch_tokens_through_the_sae(dino):
    images = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    sae = tiny_sae("sail", dino.dim)
    result = approximate_maps(dino, sae, images, [0, 3, 7])
    assert result.method == "approximate"
    assert result.maps_BKhw.shape == (2, 3, 4, 4)  # 64 px / patch 16
    # the pooled pre-activation is the CLS embedding's, as the activations stage stores it
    expected = pre_activations(sae, dino.encode(images), torch.tensor([0, 3, 7]))
    torch.testing.assert_close(result.pre_BK, expected, atol=1e-5, rtol=0)
    # each cell is one patch token (final LayerNorm, registers dropped) through the SAE
    x = dino.preprocess(images)
    with torch.inference_mode():
        hidden = dino.model(pixel_values=x).last_hidden_state
    token = hidden[1, 1 + TINY_DINOV3["num_register_tokens"] + 4 * 2 + 1]  # row 2, column 1
    one = pre_activations(sae, token[None], torch.tensor([3]))[0, 0]
    torch.testing.assert_close(result.maps_BKhw[1, 1, 2, 1], one, atol=1e-5, rtol=0)


def test_occlusion_map_is_positive_where_the_region_raising_the_feature_is(effnet):
    """A feature planted along the direction a bright top-left square adds to the embedding:
    blanking the cell holding the square lowers it most, so that cell is the map's peak."""
    plain = torch.full((1, 1, 64, 64), 40, dtype=torch.uint8)
    square = plain.clone()
    square[..., 4:12, 4:12] = 250  # inside cell (0, 0) of a 4 x 4 occlusion grid
    sae = tiny_sae("sail", effnet.dim)
    x_plain, x_square = effnet.encode(plain), effnet.encode(square)
    direction = torch.nn.functional.normalize(
        torch.nn.functional.normalize(x_square, dim=1)
        - torch.nn.functional.normalize(x_plain, dim=1),
        dim=1,
    )[0]
    with torch.no_grad():
        sae.stack.W_encoder[0, 2] = direction * 10
        sae.stack.b_dec.zero_()
    result = occlusion_maps(effnet, sae, square, [2], grid=4, batch_size=5)
    assert result.method == "occlusion" and result.maps_BKhw.shape == (1, 1, 4, 4)
    map_hw = result.maps_BKhw[0, 0]
    assert map_hw.argmax().item() == 0 and map_hw[0, 0] > 0
    assert map_hw[0, 0] > 2 * map_hw.flatten()[1:].mean()


def test_occlusion_cells_tile_the_image_once():
    cells = occlusion_cells(30, 20, 4)
    assert cells.shape == (16, 30, 20) and (cells.sum(0) == 1).all()
