"""Seed stability (eval/stability.csv): Hungarian matching of decoder rows across seeds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sail.evaluate.ranking import stability_labels
from sail.evaluate.stability import matched_cos, stability_summary


def test_matched_cos_is_one_to_one_sign_free_and_permutation_free():
    rng = np.random.default_rng(0)
    ref = np.linalg.qr(rng.standard_normal((16, 16)))[0][:8] * 3.0  # scale does not matter
    other = -ref[rng.permutation(8)]
    assert matched_cos(ref, other) == pytest.approx(np.ones(8))
    twice = np.stack([ref[0], ref[0] * 1.01, ref[1], ref[2]])  # latent 0 twice: one match only
    cos = matched_cos(ref[:3], twice)
    assert cos == pytest.approx(np.ones(3))
    assert matched_cos(ref, ref[:5]).tolist().count(0.0) == 3  # unmatched latents score 0


def test_stability_summary_per_seed_and_per_level():
    rng = np.random.default_rng(1)
    ref = np.linalg.qr(rng.standard_normal((64, 64)))[0][:32]
    coarse_kept = ref.copy()
    coarse_kept[8:] = rng.standard_normal((24, 64))  # the finer level comes out different
    noisy = ref + 0.01 * rng.standard_normal(ref.shape)  # every latent comes back
    out = stability_summary(ref, [coarse_kept, noisy], [8, 32])
    assert out["matched_share"] == pytest.approx((8 / 32 + 1) / 2)
    assert out["matched_share_all_seeds"] == pytest.approx(8 / 32)
    assert out["matched_share_by_level"] == "1.000;0.500"
    assert out["mean_matched_cos"] < (8 / 32 + 1) / 2 + 0.1 and out["mean_matched_cos"] > 0.5
    alone = stability_summary(ref, [], [8, 32])
    assert np.isnan(alone["matched_share"]) and alone["n_latents"] == 32


def test_table1_label_only_for_configs_with_replicates():
    df = pd.DataFrame(
        {
            "encoder": ["e", "e"],
            "variant": ["matryoshka", "sail"],
            "sae_config": ["A", "B"],
            "n_seeds": [3, 1],
            "matched_share": [0.8234, np.nan],
        }
    )
    assert stability_labels(df) == {("e", "matryoshka", "A"): "0.82 (3 seeds)"}
    assert stability_labels(None) == {}
