"""Hand-computed behaviour of both variants on tiny weights."""

from __future__ import annotations

import math

import pytest
import torch

from sail.errors import SailError
from sail.sae.model import SAESpec, StackedSAE, topk_flat_sorted

X = torch.tensor([[0.9, 0.1, -0.3, 0.5], [0.2, 0.8, 0.4, -0.1]])


def identity_sae(variant: str, k=(1, 2), mode="per_level") -> StackedSAE:
    """d = D = 4 with W = I and zero biases, so pre-activations equal the input."""
    model = StackedSAE([SAESpec(variant, (2, 4), k, mode)], 4)
    with torch.no_grad():
        for name in ("W",) if variant == "sail" else ("W_enc", "W_dec"):
            getattr(model, name).copy_(torch.eye(4)[None])
    return model


@pytest.mark.parametrize("impl", ["dense", "sparse"])
def test_batch_topk_budget_and_reconstructions_per_level(impl):
    model = identity_sae("sail")
    out = model.forward_train(X, impl)
    # level 0: top 1*2 of the first two latents = 0.9 (row 0) and 0.8 (row 1);
    # level 1: top 2*2 of all = 0.9, 0.8, 0.5, 0.4 (row 0 uses 2 latents, row 1 uses 2).
    assert out.l0_LM.tolist() == [[2], [4]]
    mse0 = (0.01 + 0.09 + 0.25 + 0.04 + 0.16 + 0.01) / 8
    mse1 = (0.01 + 0.09 + 0.04 + 0.01) / 8
    assert out.loss.item() == pytest.approx((mse0 + mse1) / 2, abs=1e-7)
    assert out.sse_LM[:, 0].tolist() == pytest.approx([mse0 * 8, mse1 * 8], abs=1e-6)


def test_budget_is_shared_across_the_batch():
    model = StackedSAE([SAESpec("matryoshka", (4, 8), (2, 3))], 8)
    model.initialize([0])
    x = torch.nn.functional.normalize(
        torch.randn(16, 8, generator=torch.Generator().manual_seed(1)), dim=1
    )
    acts = model.activations(model.pre_activations(x))
    sels = model.train_selections(acts)
    counts = {s.level: s.flat.numel() for s in sels}
    positives = {0: int((acts[0, :, :4] > 0).sum()), 1: int((acts[0] > 0).sum())}
    assert counts == {0: min(2 * 16, positives[0]), 1: min(3 * 16, positives[1])}
    assert counts[1] == 48
    rows = (sels[1].flat // 8) % 16
    assert (
        torch.bincount(rows, minlength=16).sum() == 48
    )  # per sample it varies; the batch total does not


@pytest.mark.parametrize("impl", ["dense", "sparse"])
def test_zero_valued_picks_neither_fire_nor_count_towards_l0(impl):
    # Row 0 has one positive value in the level-0 prefix and row 1 none: BatchTopK's budget of
    # 2 * 2 entries is filled with zeros, which must not count as fired or active.
    x = torch.tensor([[0.5, -0.2, -0.3, 0.1], [-0.4, -0.1, 0.6, 0.2]])
    model = identity_sae("matryoshka", k=(2, 2))
    out = model.forward_train(x, impl)
    assert out.l0_LM[:, 0].tolist() == [1, 4]
    assert out.fired_MF[0].tolist() == [True, False, True, True]
    sail = identity_sae("sail", k=(2, 2))  # published: no ReLU, the budget is always spent
    assert sail.forward_train(x, impl).l0_LM[:, 0].tolist() == [4, 4]


def test_auxk_sees_latents_that_only_won_zero_valued_picks_as_dead():
    x = torch.nn.functional.normalize(
        torch.randn(64, 8, generator=torch.Generator().manual_seed(2)), dim=1
    )
    model = StackedSAE([SAESpec("matryoshka", (4, 8), (3, 6))], 8)
    model.initialize([0])
    with torch.no_grad():
        model.b_enc[0, :4] = -10.0  # the level-0 prefix never has a positive value
    out = model.forward_train(x, "sparse")
    assert not out.fired_MF[0, :4].any()
    assert out.l0_LM[0, 0] == 0


def test_sail_keeps_negative_values_matryoshka_applies_relu():
    x = torch.tensor([[-0.1, -0.2, -0.3, -0.4]])
    sail = identity_sae("sail")
    out = sail.forward_train(x)
    # no ReLU: level 0 keeps -0.1, level 1 keeps -0.1 and -0.2 (budget 2)
    mse0 = (0.0 + 0.04 + 0.09 + 0.16) / 4
    mse1 = (0.09 + 0.16) / 4
    assert out.loss.item() == pytest.approx((mse0 + mse1) / 2, abs=1e-7)
    mat = identity_sae("matryoshka")
    assert mat.forward_train(x).loss.item() == pytest.approx((0.30 / 4 + 0.30 / 4) / 2, abs=1e-7)


def test_sail_decoder_is_stop_gradient_matryoshka_decoder_trains():
    sail = identity_sae("sail")
    sail.forward_train(X).loss.backward()
    # The residual is zero at every selected coordinate, so the encoder path gives no gradient,
    # and the decoder path gives none either (stop-gradient): W.grad is exactly zero.
    assert torch.equal(sail.W.grad, torch.zeros_like(sail.W))
    # b_dec: only the output add, (2 / (L*B*d)) * sum of (R - x) over levels and rows
    assert sail.b_dec.grad[0].tolist() == pytest.approx([-0.05, -0.025, 0.025, -0.0375], abs=1e-7)

    mat = identity_sae("matryoshka")
    mat.forward_train(X).loss.backward()
    assert torch.equal(mat.W_enc.grad, torch.zeros_like(mat.W_enc))
    # latent 0 decodes 0.9 (row 0) at both levels: 0.9 * 2/16 * ([0,-.1,.3,-.5] + [0,-.1,.3,0])
    assert mat.W_dec.grad[0, 0].tolist() == pytest.approx(
        [0.0, -0.0225, 0.0675, -0.05625], abs=1e-7
    )


def test_published_threshold_update():
    sail = identity_sae("sail")
    sail.forward_train(X)
    assert sail.theta_sum.item() == pytest.approx(
        0.4
    )  # smallest positive value kept at the last level
    assert sail.theta_count.item() == 1
    sail.forward_train(torch.tensor([[-0.1, -0.2, -0.3, -0.4]]))  # nothing positive: no update
    assert sail.theta_count.item() == 1


def test_inference_soft_threshold_vs_jumprelu():
    sail = identity_sae("sail")
    with torch.no_grad():
        sail.theta_sum.fill_(0.6)
        sail.theta_count.fill_(2)
    assert sail.inference_codes(X[:1])[0, 0].tolist() == pytest.approx([0.6, 0.0, 0.0, 0.2])
    mat = identity_sae("matryoshka")
    with torch.no_grad():
        mat.thresholds.copy_(torch.tensor([[0.5, 0.3]]))
        mat.calibrated.fill_(True)
    # latents [0,2) need > 0.5, latents [2,4) need > 0.3; kept values are not shrunk
    torch.testing.assert_close(
        mat.inference_codes(X)[0], torch.tensor([[0.9, 0.0, 0.0, 0.5], [0.0, 0.8, 0.4, 0.0]])
    )


def test_uncalibrated_matryoshka_refuses_inference():
    with pytest.raises(SailError, match="calibrated"):
        identity_sae("matryoshka").inference_codes(X)


def test_global_mode_levels_are_prefixes_of_one_code():
    model = StackedSAE([SAESpec("matryoshka", (3, 6, 12), (4,), "global")], 5)
    model.initialize([2])
    x = torch.nn.functional.normalize(
        torch.randn(7, 5, generator=torch.Generator().manual_seed(3)), dim=1
    )
    acts = model.activations(model.pre_activations(x))
    sels = model.train_selections(acts)
    full = sels[-1].flat
    assert full.numel() == 4 * 7
    for s, size in zip(sels, (3, 6, 12), strict=True):
        assert torch.equal(s.flat, full[full % 12 < size])
    vals = [acts.reshape(-1)[s.flat] for s in sels]
    R = model.decode(sels, vals, 7)
    codes = torch.zeros(7 * 12).index_put((full,), acts.reshape(-1)[full]).view(7, 12)
    for li, size in enumerate((3, 6, 12)):
        expect = codes[:, :size] @ model.W_dec[0, :size] + model.b_dec[0]
        torch.testing.assert_close(R[li, 0], expect)


@pytest.mark.parametrize(
    "variant,mode,ks",
    [
        ("sail", "per_level", [(2, 3, 4), (1, 2, 5)]),
        ("matryoshka", "per_level", [(2, 3, 4), (1, 2, 5)]),
        ("matryoshka", "global", [(4,), (6,)]),
    ],
)
@pytest.mark.parametrize(
    "shape", [(10, 6, (4, 8, 16)), (256, 32, (64, 256, 1024))], ids=["tiny", "sampled_topk"]
)
def test_sparse_and_dense_paths_agree(variant, mode, ks, shape):
    B, d, sizes = shape
    if B * sizes[-1] >= 1 << 16:  # large enough that BatchTopK takes the sampled-threshold path
        assert B * sizes[-1] >= 1 << 17
    x = torch.nn.functional.normalize(
        torch.randn(B, d, generator=torch.Generator().manual_seed(0)), dim=1
    )
    dead = torch.zeros(2, sizes[-1], dtype=torch.bool)
    dead[:, sizes[-1] * 5 // 8 :] = True
    results = []
    for impl in ("dense", "sparse"):
        model = StackedSAE([SAESpec(variant, sizes, k, mode) for k in ks], d)
        model.initialize([0] * model.n_models, x, "mean")
        with torch.no_grad():
            model.b_enc.normal_(generator=torch.Generator().manual_seed(1))
        out = model.forward_train(x, impl, dead, 3, 1 / 32)
        out.loss.backward()
        results.append((out.loss, {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", ["continuous", "mostly_zero", "ties", "small"])
def test_sampled_threshold_topk_equals_plain_topk(case):
    g = torch.Generator().manual_seed(7)
    n, k = (1 << 18, 5000) if case != "small" else (1000, 30)
    v = torch.randn(n, generator=g)
    if case == "mostly_zero":  # after ReLU with fewer positives than k: zeros fill the budget
        v = torch.where(torch.rand(n, generator=g) < 0.01, v.abs(), torch.zeros(()))
    if case == "ties":  # the k-th largest value is shared by many entries
        v = torch.round(v * 4) / 4
    got = topk_flat_sorted(v, k)
    assert got.numel() == k and bool((got[1:] > got[:-1]).all())
    expect = v.topk(k).values
    torch.testing.assert_close(v[got].sort(descending=True).values, expect)
    if case == "continuous":
        assert torch.equal(got, v.topk(k).indices.sort().values)


def test_stacked_models_do_not_interact():
    x = torch.nn.functional.normalize(
        torch.randn(9, 6, generator=torch.Generator().manual_seed(4)), dim=1
    )
    specs = [SAESpec("matryoshka", (4, 8), (2, 3)), SAESpec("matryoshka", (4, 8), (1, 4))]
    both = StackedSAE(specs, 6)
    both.initialize([0, 1])
    both.forward_train(x, "sparse").loss.backward()
    alone = StackedSAE(specs[1:], 6)
    alone.load_model_state(0, both.model_state(1))
    alone.forward_train(x, "sparse").loss.backward()
    torch.testing.assert_close(alone.W_dec.grad[0], both.W_dec.grad[1])
    torch.testing.assert_close(alone.W_enc.grad[0], both.W_enc.grad[1])


def _last_level_share(model: StackedSAE, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Share of the last level's BatchTopK picks per threshold range, over batches of x."""
    bounds = torch.tensor([hi for _, hi in model.threshold_ranges()])
    counts = torch.zeros(len(bounds))
    for start in range(0, x.shape[0], batch_size):
        sels = model.train_selections(
            model.activations(model.pre_activations(x[start : start + batch_size]))
        )
        latent = sels[-1].flat % model.n_latents
        counts += torch.bincount(torch.bucketize(latent, bounds, right=True), minlength=len(bounds))
    return counts / counts.sum()


@pytest.mark.parametrize("ks", [(3, 3, 3), (2, 5, 9)], ids=["flat", "doubling"])
def test_calibrated_code_is_the_last_levels_selection(ks):
    """Stored code: full dictionary, L0 = K_last on held-out rows, each range at its train share."""
    from tests.sae.conftest import planted

    x, _ = planted(4000, 16, 40, 3, seed=5)
    model = StackedSAE([SAESpec("matryoshka", (8, 32, 64), ks)], 16)
    model.initialize([0] * model.n_models, x, "mean")
    cals = model.calibrate(x[:2000], batch_size=512)
    codes = model.inference_codes(x[2000:])[0]
    l0 = (codes != 0).sum(1).float().mean().item()
    assert abs(l0 - ks[-1]) / ks[-1] < 0.10, l0
    stored = torch.tensor(
        [(codes[:, lo:hi] != 0).sum().item() for lo, hi in model.threshold_ranges()]
    )
    torch.testing.assert_close(
        stored / stored.sum(), _last_level_share(model, x[2000:], 512), atol=0.03, rtol=0
    )
    assert bool(torch.isfinite(model.thresholds).all()) and cals[0].dead_ranges == []
    assert cals[0].share == pytest.approx(
        _last_level_share(model, x[:2000], 512).tolist(), abs=1e-6
    )


def test_global_calibration_keeps_k_over_the_dictionary():
    from tests.sae.conftest import planted

    x, _ = planted(4000, 16, 40, 3, seed=5)
    model = StackedSAE([SAESpec("matryoshka", (8, 64), (6,), "global")], 16)
    model.initialize([0], x, "mean")
    model.calibrate(x[:2000])
    l0 = (model.inference_codes(x[2000:])[0] != 0).sum(1).float().mean().item()
    assert abs(l0 - 6) / 6 < 0.10


def test_a_range_that_never_fired_gets_inf_and_is_reported():
    from tests.sae.conftest import planted

    x, _ = planted(500, 16, 40, 3, seed=5)
    model = StackedSAE([SAESpec("matryoshka", (8, 32, 64), (3, 3, 3))], 16)
    model.initialize([0], x, "mean")
    with torch.no_grad():
        model.b_enc[0, 8:32] = -10.0  # the second range can never be selected
    [cal] = model.calibrate(x)
    assert cal.dead_ranges == [[8, 32]] and cal.selected[1] == 0
    assert math.isinf(model.thresholds[0, 1].item()) and math.isfinite(
        model.thresholds[0, 0].item()
    )
    assert not (model.inference_codes(x)[0, :, 8:32] != 0).any()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"variant": "other", "dict_sizes": (2, 4), "k_values": (1, 1)}, "variant"),
        ({"variant": "sail", "dict_sizes": (4, 2), "k_values": (1, 1)}, "strictly increasing"),
        ({"variant": "sail", "dict_sizes": (2, 4), "k_values": (1,)}, "k_values"),
        (
            {"variant": "sail", "dict_sizes": (2, 4), "k_values": (1,), "topk_mode": "global"},
            "per_level",
        ),
    ],
)
def test_spec_validation(kwargs, match):
    with pytest.raises(SailError, match=match):
        SAESpec(**kwargs)


def test_published_name_and_validity():
    spec = SAESpec("sail", (16, 64, 256, 1024), (20, 20, 20, 20))
    assert spec.published_name == "D_16_64_256_1024_K_20_20_20_20"
    assert not spec.valid
    uncalibrated = StackedSAE([SAESpec("matryoshka", (2, 4), (1, 1))], 3)
    assert math.isnan(uncalibrated.thresholds[0, 0].item()) and not uncalibrated.calibrated.any()


def test_bf16_selection_matches_fp64_with_a_large_shared_offset():
    """x - b_dec is formed in fp32 before the bf16 GEMM, so a shared offset does not cancel
    (folding b_dec into the bias: median error 1.3e-4, overlap 98.0% on this data)."""
    g = torch.Generator().manual_seed(0)
    d, D, B, K = 256, 2048, 256, 32
    offset = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0) * 30.0
    x = torch.nn.functional.normalize(offset + 0.1 * torch.randn(B, d, generator=g), dim=1)
    model = StackedSAE([SAESpec("matryoshka", (D,), (K,))], d)
    model.initialize([1], x, "mean")
    with torch.no_grad():
        model.b_enc.normal_(0, 0.01, generator=g)
    ref = (x.double() - model.b_dec[0].double()) @ model.W_enc[0].double().T + model.b_enc[
        0
    ].double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pre = model.pre_activations(x)[0].double()
    assert (pre - ref).abs().median().item() < 4e-5
    pick_ref = set(ref.relu().reshape(-1).topk(K * B).indices.tolist())
    pick = set(pre.relu().reshape(-1).topk(K * B).indices.tolist())
    assert len(pick & pick_ref) / len(pick_ref) >= 0.99
