from __future__ import annotations

import pytest
import torch
from torch import nn

from sail.encoders.biomedparse import FocalNetArch
from sail.encoders.random_init import build_random_biomedparse, build_random_dinov3
from sail.errors import SailError

from .conftest import TINY_DINOV3, TINY_FOCALNET

ARCH = FocalNetArch(**TINY_FOCALNET)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_random_biomedparse_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_random_biomedparse(image_size=32, arch=ARCH)
    after = torch.rand(1)
    assert torch.equal(before, after), "building the control must not consume the caller's RNG"
    b = build_random_biomedparse(image_size=32, arch=ARCH)
    assert _same_weights(a.model, b.model)
    x = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(a.encode(x), b.encode(x), rtol=0, atol=0)
    assert a.name == "random-biomedparse" and a.weights_id.startswith("random-init:seed42")


def test_random_biomedparse_follows_the_published_init():
    enc = build_random_biomedparse(image_size=32, arch=ARCH)
    weights = []
    for m in enc.model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            weights.append(m.weight.detach().flatten())
            assert m.bias is None or not m.bias.any()
        elif isinstance(m, nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any()
    w = torch.cat(weights)
    assert w.std().item() == pytest.approx(0.02, rel=0.05)
    gammas = [p for n, p in enc.model.named_parameters() if n.endswith(".gamma")]
    assert gammas and all(
        torch.allclose(g, torch.full_like(g, 1e-4)) for g in gammas
    )  # constructor value kept


def test_random_dinov3_is_deterministic():
    a = build_random_dinov3(image_size=32, config=TINY_DINOV3)
    b = build_random_dinov3(image_size=32, config=TINY_DINOV3)
    assert _same_weights(a.model, b.model)
    x = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    out = a.encode(x)
    assert out.shape == (2, 32) and a.dim == 32
    torch.testing.assert_close(out, b.encode(x), rtol=0, atol=0)
    lin = [m.weight.detach().flatten() for m in a.model.modules() if isinstance(m, nn.Linear)]
    assert torch.cat(lin).std().item() == pytest.approx(0.02, rel=0.1)


def test_random_efficientnet_lite0_is_a_seeded_untrained_lite0():
    """Same architecture and input convention as the pretrained encoder, none of its weights."""
    from sail.encoders.base import get_spec
    from sail.encoders.random_init import build_random_efficientnet_lite0

    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    a = build_random_efficientnet_lite0(image_size=64)
    assert torch.equal(before, torch.rand(1)), "building the control must not consume the RNG"
    b = build_random_efficientnet_lite0(image_size=64)
    assert _same_weights(a.model, b.model)
    pretrained = get_spec("efficientnet-lite0").build(image_size=64)
    assert a.model.state_dict().keys() == pretrained.model.state_dict().keys()
    assert a.preprocess == pretrained.preprocess
    stem = "conv_stem.weight"
    assert not torch.allclose(a.model.state_dict()[stem], pretrained.model.state_dict()[stem])
    x = torch.randint(0, 256, (3, 1, 64, 64), dtype=torch.uint8)
    out = a.encode(x)
    assert out.shape == (3, 1280) and torch.isfinite(out).all()
    assert out.std(0).mean() > 0, "a random control must still vary with its input"
    torch.testing.assert_close(out, b.encode(x), rtol=0, atol=0)
    assert a.name == "random-efficientnet-lite0" and a.weights_id.startswith("random-init:seed42")
    with pytest.raises(SailError, match="takes no --weights"):
        get_spec("random-efficientnet-lite0").build(weights="x.pt")
