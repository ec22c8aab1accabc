"""Training recipes: the auto rule, key-by-key overrides, the schedules, cfg.json and the
too-short-run warning."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from sail.config import TrainingSettings, load_config
from sail.sae.checkpoint import read_cfg
from sail.sae.grid import GridEntry
from sail.sae.model import SAESpec
from sail.sae.recipe import (
    MIN_STEPS,
    auto_values,
    late_fvu_drop,
    lr_at,
    resolve,
    warn_if_unconverged,
)
from sail.sae.train import Runtime, run_train, train_family
from tests.sae.conftest import planted

CPU = Runtime(
    torch.device("cpu"), "fp32", "sparse", log_every=5, checkpoint_every=10**6, show_progress=False
)


def test_auto_recipe_scales_with_dictionary_and_data():
    small = resolve(TrainingSettings(batch_size=512), "matryoshka", 16_000, 1024)
    assert small.recipe == "auto" and small.schedule == "constant" and small.clip_norm is None
    assert small.lr == pytest.approx(1e-3, rel=0.02) and small.lr_min == 0
    assert (
        small.epochs == 100 and 0 < small.warmup_steps <= 1000
    )  # 32 steps/epoch: capped at 100 epochs
    big = resolve(TrainingSettings(), "matryoshka", 800_000, 8192)
    assert big.lr == pytest.approx(0.032 / math.sqrt(8192))
    assert big.epochs == math.ceil(MIN_STEPS / math.ceil(800_000 / 2048)) == 13
    assert auto_values(10**7, 8192, 2048)["epochs"] == 2


def test_explicit_settings_override_the_recipe_key_by_key():
    given = TrainingSettings.model_validate({"lr": 5e-4, "epochs": 7, "batch_size": 256})
    r = resolve(given, "matryoshka", 10_000, 1024)
    assert (r.lr, r.epochs, r.batch_size) == (5e-4, 7, 256)
    assert r.schedule == "constant" and r.clip_norm is None  # the rest still comes from the recipe
    assert r.warmup_steps == round(
        0.05 * 7 * math.ceil(10_000 / 256)
    )  # derived from the given epochs
    assert (
        resolve(
            TrainingSettings.model_validate({"clip_norm": 0.5}), "matryoshka", 10_000, 1024
        ).clip_norm
        == 0.5
    )


def test_sail_and_published_keep_the_paper_settings():
    for settings, variant in (
        (TrainingSettings(), "sail"),
        (TrainingSettings(recipe="published"), "matryoshka"),
    ):
        r = resolve(settings, variant, 799_241, 8192)
        assert r.recipe == "published"
        assert (r.lr, r.lr_min, r.epochs, r.clip_norm, r.schedule) == (
            1e-4,
            1e-6,
            100,
            0.5,
            "cosine",
        )
        assert r.warmup_steps == 1000
    assert resolve(TrainingSettings(recipe="auto"), "sail", 10_000, 1024).schedule == "constant"


def test_constant_schedule_has_warmup_and_a_linear_tail():
    st = TrainingSettings(lr=1e-3, lr_min=0.0, warmup_steps=10, schedule="constant")
    total = 100
    assert lr_at(0, total, st) == pytest.approx(1e-4)
    assert lr_at(10, total, st) == lr_at(79, total, st) == pytest.approx(1e-3)
    assert lr_at(90, total, st) == pytest.approx(0.5e-3)
    assert lr_at(100, total, st) == pytest.approx(0.0)


def test_late_fvu_drop_measures_the_window_before_the_tail():
    steps = list(range(0, 101, 10))
    flat = [1.0, 0.5, 0.3, 0.25, 0.21, 0.2, 0.2, 0.2, 0.2, 0.18, 0.17]
    falling = [1.0 - 0.08 * i for i in range(11)]
    assert late_fvu_drop(steps, flat) == pytest.approx(0.0)
    assert late_fvu_drop(steps, falling) == pytest.approx((0.52 - 0.36) / 0.8)
    assert late_fvu_drop(steps, falling[::-1]) is None  # never improved: nothing to judge
    assert late_fvu_drop([5], [1.0]) is None


def test_a_too_short_run_warns_and_a_converged_one_does_not(tmp_path, caplog):
    x, _ = planted(2000, 16, 12, 2, seed=0)
    spec = SAESpec("matryoshka", (8, 32), (2,), "global")
    short = TrainingSettings(
        epochs=2, batch_size=64, dead_window=500, seed=0
    )  # 64 steps: still learning
    caplog.set_level("WARNING")
    train_family([GridEntry(spec, short)], x, x[:200], [tmp_path / "a"], CPU)
    assert "too short to converge" in caplog.text
    caplog.clear()
    long = TrainingSettings(
        epochs=20, batch_size=64, dead_window=500, seed=0
    )  # measured: 0.4% of the decrease late
    train_family([GridEntry(spec, long)], x, x[:200], [tmp_path / "b"], CPU, x_calib=x[:200])
    assert caplog.text == ""
    metrics = pd.DataFrame(
        {
            "step": list(range(0, 101, 10)),
            "split": "train",
            "level": 0,
            "fvu": [1.0, 0.5, 0.3, 0.25, 0.21, 0.2, 0.2, 0.2, 0.2, 0.18, 0.17],
        }
    )
    assert warn_if_unconverged(["ok"], [metrics]) == [] and caplog.text == ""


def test_cfg_json_records_the_resolved_settings(workspace):
    cfg = load_config(
        None,
        {
            "workspace": workspace.root,
            "train": {
                "grid": [{"dict_sizes": [8, 32], "k_values": [4], "topk_mode": "global"}],
                "training": {"epochs": 2, "batch_size": 64},
            },
        },
    )
    run_train(cfg, workspace)
    (sae_dir,) = [p.parent for p in (workspace.root / "sae" / "toy").glob("*/*/cfg.json")]
    training = read_cfg(sae_dir)["training"]
    assert (
        training["recipe"] == "auto"
        and training["epochs"] == 2
        and training["schedule"] == "constant"
    )
    assert training["lr"] == pytest.approx(0.032 / math.sqrt(32)) and training["clip_norm"] is None
    assert read_cfg(sae_dir)["training_explicit"] == ["batch_size", "epochs"]
