"""Trainer: splits, schedule, clipping, family training, determinism, resume, AuxK, recovery."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sail.config import TrainingSettings
from sail.errors import SailError
from sail.sae.grid import GridEntry
from sail.sae.model import SAESpec
from sail.sae.train import (
    Runtime,
    clip_per_model,
    epoch_permutation,
    lr_at,
    seeded_split,
    split_labels,
    train_family,
)
from tests.sae.conftest import planted

CPU = Runtime(
    torch.device("cpu"), "fp32", "sparse", log_every=5, checkpoint_every=1, show_progress=False
)


def entries(specs, **settings):
    st = TrainingSettings(
        **{"epochs": 3, "batch_size": 64, "lr": 3e-3, "dead_window": 200, "auxk_k": 8, **settings}
    )
    return [GridEntry(s, st) for s in specs]


def test_split_labels_join_on_modality_and_image_id():
    split = pd.DataFrame(
        {
            "modality": ["ct", "mri", "ct"],
            "image_id": ["s0001", "s0001", "s0002"],
            "split": ["train", "test", "valid"],
        }
    )
    ids = np.array(
        ["mri/s0001/axial/0003", "ct/s0001/coronal/0010", "ct/s0002/axial/0000"], dtype=object
    )
    assert split_labels(ids, split).tolist() == ["test", "train", "valid"]
    with pytest.raises(SailError, match="ct/s0009/axial/0001"):
        split_labels(np.array(["ct/s0009/axial/0001"], dtype=object), split)
    with pytest.raises(SailError, match="line 3"):
        split_labels(ids, split.assign(split=["train", "bogus", "valid"]))


def test_seeded_split_is_reproducible_and_keeps_groups_together():
    a = seeded_split(1000, None, 7)
    assert (a == seeded_split(1000, None, 7)).all()
    assert [int((a == s).sum()) for s in ("train", "valid", "test")] == [800, 100, 100]
    groups = np.repeat(np.arange(50), 4).astype(object)
    b = seeded_split(200, groups, 1)
    assert all(len(set(b[groups == g])) == 1 for g in range(50))


def test_lr_schedule_warmup_then_cosine():
    st = TrainingSettings(lr=1e-4, lr_min=1e-6)
    total = 39_100  # published: 391 batches x 100 epochs, warmup 1000
    assert lr_at(0, total, st) == pytest.approx(1e-5)
    assert lr_at(500, total, st) == pytest.approx(1e-4 * (0.1 + 0.9 * 0.5))
    assert lr_at(1000, total, st) == pytest.approx(1e-4)
    assert lr_at(1000 + 38_100 // 2, total, st) == pytest.approx((1e-4 + 1e-6) / 2)
    assert lr_at(total, total, st) == pytest.approx(1e-6)


def test_clip_per_model_matches_clip_grad_norm_of_each_model():
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(3, 4, 5)), torch.nn.Parameter(torch.zeros(3, 4))]
    grads = [torch.randn(3, 4, 5, generator=g) * s for s in (1.0,)] + [
        torch.randn(3, 4, generator=g) * 0.01
    ]
    grads[0][1] *= 0.001  # model 1 is below the limit and must stay untouched
    for p, gr in zip(params, grads, strict=True):
        p.grad = gr.clone()
    clip_per_model(params, 3, 0.5)
    for m in range(3):
        single = [torch.nn.Parameter(p[m].detach().clone()) for p in params]
        for s, gr in zip(single, grads, strict=True):
            s.grad = gr[m].clone()
        torch.nn.utils.clip_grad_norm_(single, 0.5)
        for s, p in zip(single, params, strict=True):
            torch.testing.assert_close(p.grad[m], s.grad)


def test_epoch_permutations_fresh_or_fixed():
    assert not torch.equal(epoch_permutation(50, 1, 0, False), epoch_permutation(50, 1, 1, False))
    assert torch.equal(epoch_permutation(50, 1, 0, True), epoch_permutation(50, 1, 5, True))


@pytest.fixture(scope="module")
def data():
    x, atoms = planted(700, 16, 24, 3, seed=1)
    return x[:600], x[600:], atoms


def _train(data, tmp_path, specs, tag, rt=CPU, on_epoch_end=None, **settings):
    x, xv, _ = data
    dirs = [tmp_path / tag / str(i) for i in range(len(specs))]
    return train_family(entries(specs, **settings), x, xv, dirs, rt, on_epoch_end), dirs


@pytest.mark.parametrize("variant", ["matryoshka", "sail"])
def test_cpu_training_is_deterministic_and_family_equals_single(data, tmp_path, variant):
    specs = [SAESpec(variant, (8, 32), (2, 4)), SAESpec(variant, (8, 32), (3, 6))]
    a, _ = _train(data, tmp_path, specs, "a")
    b, _ = _train(data, tmp_path, specs, "b")
    for name, p in a.model.named_parameters():
        assert torch.equal(p, dict(b.model.named_parameters())[name]), name
    assert a.metrics[0].equals(b.metrics[0])
    single, _ = _train(data, tmp_path, specs[1:], "c")
    for name, p in single.model.named_parameters():
        torch.testing.assert_close(
            p[0], dict(a.model.named_parameters())[name][1], atol=1e-5, rtol=1e-4
        )


def test_resume_after_a_crash_gives_identical_weights_and_metrics(data, tmp_path):
    specs = [SAESpec("matryoshka", (8, 32), (2, 4)), SAESpec("matryoshka", (8, 32), (3, 6))]
    full, _ = _train(data, tmp_path, specs, "full")

    def crash(epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(data, tmp_path, specs, "resumed", on_epoch_end=crash)
    assert (tmp_path / "resumed" / "0" / "train_state.pt").is_file()
    resumed, _ = _train(data, tmp_path, specs, "resumed")
    for name, p in full.model.named_parameters():
        assert torch.equal(p, dict(resumed.model.named_parameters())[name]), name
    pd.testing.assert_frame_equal(full.metrics[1], resumed.metrics[1])


def test_metrics_are_long_format_per_level(data, tmp_path):
    result, _ = _train(data, tmp_path, [SAESpec("matryoshka", (8, 32), (2, 4))], "m")
    df = result.metrics[0]
    assert list(df.columns) == [
        "step",
        "epoch",
        "split",
        "level",
        "fvu",
        "r2_published",
        "l0",
        "dead_frac",
        "auxk_loss",
        "lr",
        "mode",
    ]
    assert set(df["split"]) == {"train", "valid"}
    assert set(df["level"]) == {0, 1}
    train = df[df["split"] == "train"]
    assert train.groupby("step").size().eq(2).all()
    first, last = train["fvu"].iloc[0], train["fvu"].iloc[-1]
    assert 0 <= last < first <= 1.5
    final = df[df["mode"] == "inference"]
    assert final["epoch"].tolist() == [3, 3] and set(final["split"]) == {"valid"}
    # the stored code is the last level's selection: L0 = K_last, level 0 is its prefix
    assert (
        final["l0"].iloc[-1] == pytest.approx(4, rel=0.15)
        and final["l0"].iloc[0] < final["l0"].iloc[-1]
    )
    assert (
        result.final[0]["mode"] == "inference"
        and result.final[0]["dead_frac_source"] == "stored codes"
    )


def test_auxk_lowers_the_dead_fraction(tmp_path):
    # A large shared offset and b_dec = 0 make a few latents win every top-k; AuxK trains the
    # positive-but-losing ones on the residual so they fire again.
    x, _ = planted(4000, 32, 48, 3, seed=0)
    mu = torch.nn.functional.normalize(
        torch.randn(32, generator=torch.Generator().manual_seed(5)), dim=0
    )
    x = torch.nn.functional.normalize(x + 2.0 * mu, dim=1)
    dead = {}
    for alpha in (0.0, 1 / 32):
        st = TrainingSettings(
            epochs=8,
            batch_size=256,
            lr=3e-3,
            dead_window=1000,
            auxk_alpha=alpha,
            auxk_k=16,
            seed=0,
            b_dec_init="zeros",
        )
        r = train_family(
            [GridEntry(SAESpec("matryoshka", (32, 128), (3,), "global"), st)],
            x,
            x[:500],
            [tmp_path / str(alpha)],
            CPU,
        )
        df = r.metrics[0]
        dead[alpha] = df[(df["split"] == "train") & (df["level"] == 1)]["dead_frac"].iloc[-1]
    assert dead[1 / 32] < dead[0.0] - 0.05, dead


def test_matryoshka_recovers_a_planted_dictionary(tmp_path):
    x, atoms = planted(5000, 32, 32, 3, seed=0)
    st = TrainingSettings(epochs=30, batch_size=256, lr=1e-2, dead_window=2000, auxk_k=16, seed=0)
    r = train_family(
        [GridEntry(SAESpec("matryoshka", (8, 48), (3,), "global"), st)],
        x[:4000],
        x[4000:],
        [tmp_path / "r"],
        CPU,
    )
    cos = (atoms @ r.model.W_dec[0].detach().T).max(1).values
    assert (cos >= 0.9).float().mean().item() >= 0.9
    assert r.final[0]["fvu"][-1] < 0.1
