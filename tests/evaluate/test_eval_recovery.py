import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.metrics import roc_auc_score

from sail.config import ProbeSettings, RecoverySettings
from sail.evaluate.inputs import _make_eval_data
from sail.evaluate.probes import Task, fit_quiet, make_classifier
from sail.evaluate.recovery import features_to_threshold, n_grid, recovery_curve, run_recovery

P = ProbeSettings(tol=1e-6)


def test_n_grid_stops_at_the_ranked_features():
    grid = [1, 2, 3, 5, 10, 20, 30, 50, 75, 100]
    assert n_grid(grid, 100) == grid
    assert n_grid(grid, 7) == [1, 2, 3, 5, 7]
    assert n_grid(grid, 10) == [1, 2, 3, 5, 10]
    assert n_grid(grid, 0) == []


def test_features_to_threshold_hand_case():
    out = features_to_threshold([1, 2, 5, 10], [0.5, 0.72, 0.8, 0.79], 0.8, [0.5, 0.9, 1.0])
    # ratios 0.625, 0.9, 1.0, 0.9875
    assert out == {"n_features_50pct": 1, "n_features_90pct": 2, "n_features_100pct": 5}
    assert np.isnan(features_to_threshold([1], [0.6], 0.9, [1.0])["n_features_100pct"])


def _problem(seed=0, n=800, f=120):
    rng = np.random.default_rng(seed)
    x = (rng.random((n, f)) < 0.08) * rng.random((n, f))
    w = np.zeros(f)
    w[:12] = np.linspace(3, 0.5, 12)
    y = (x @ w + rng.normal(0, 0.3, n) > np.median(x @ w)).astype(int)
    return x, y


def test_sliced_columns_fit_the_same_model_as_full_width_masking():
    """A zeroed column keeps zero weight under the elastic net: slicing equals published masking."""
    x, y = _problem()
    tr, va = slice(0, 500), slice(500, None)
    ranked = np.arange(30)
    for n in (1, 5, 20):
        masked = np.zeros_like(x)
        masked[:, ranked[:n]] = x[:, ranked[:n]]
        full, _ = fit_quiet(make_classifier(P, max_iter=5000), sp.csr_matrix(masked[tr]), y[tr])
        assert np.all(np.delete(full.coef_[0], ranked[:n]) == 0)
        auc_full = roc_auc_score(y[va], full.decision_function(masked[va]))
        aucs, _ = recovery_curve(
            x[tr][:, ranked], y[tr], sp.csr_matrix(x[va][:, ranked]), y[va], [n], P, 5000
        )
        assert aucs[0] == pytest.approx(auc_full, abs=0.002)


def test_warm_start_reaches_the_cold_start_solution():
    x, y = _problem(1)
    ns = [1, 2, 5, 10, 20]
    warm, _ = recovery_curve(
        x[:500, :20], y[:500], x[500:, :20], y[500:], ns, P, 5000, warm_start=True
    )
    cold, _ = recovery_curve(
        x[:500, :20], y[:500], x[500:, :20], y[500:], ns, P, 5000, warm_start=False
    )
    np.testing.assert_allclose(warm, cold, atol=0.003)


def test_run_recovery_ranks_per_target_and_shares_two_class_curves():
    rng = np.random.default_rng(2)
    n = 600
    split = np.repeat(["train", "valid", "test"], [300, 200, 100])
    slices = pd.DataFrame(
        {
            "slice_id": [f"ct/s{i:04d}/axial/0000" for i in range(n)],
            "modality": "ct",
            "image_id": [f"s{i:04d}" for i in range(n)],
            "split": split,
        }
    )
    data = _make_eval_data(slices)
    y = rng.integers(0, 2, n)
    x = (rng.random((n, 40)) < 0.1) * rng.random((n, 40))
    x[:, 7] = y * (1 + rng.random(n))
    coef = np.zeros(40)
    coef[[7, 3, 9]] = [-2.0, 0.5, 0.1]
    task = Task("sex", "multiclass", ("f", "m"), y)
    coefs = {("sex", "m"): coef, ("sex", "f"): -coef}
    dense = {("sex", "m"): 0.99, ("sex", "f"): 0.99}
    ids = {"encoder": "e", "variant": "v", "sae_config": "c"}
    curves, summary, _ = run_recovery(
        [task], sp.csr_matrix(x), data, coefs, dense, P, RecoverySettings(max_iter=500), ids
    )
    assert list(summary["target"]) == ["f", "m"]
    assert summary["n_ranked"].tolist() == [3, 3]
    m = curves[curves.target == "m"]
    assert m["n_features"].tolist() == [1, 2, 3]
    assert m["valid_roc_auc"].iloc[0] == 1.0  # the top-ranked feature is the label
    np.testing.assert_array_equal(m["valid_roc_auc"], curves[curves.target == "f"]["valid_roc_auc"])
    assert summary["n_features_100pct"].tolist() == [1, 1]
    # Targets without a usable dense baseline (NaN or < 0.55) are skipped, NaN included.
    _, summary, _ = run_recovery(
        [task],
        sp.csr_matrix(x),
        data,
        coefs,
        {("sex", "m"): np.nan, ("sex", "f"): 0.5},
        P,
        RecoverySettings(),
        ids,
    )
    assert summary.empty


def test_a_target_the_sparse_probe_zeroes_stays_unreached_and_ranks_the_config_last():
    """Issue 12 item 6: an all-zero coefficient vector used to drop the target, so the config that
    failed the hard target was scored on the easy one only and ranked first."""
    from sail.config import RankingSettings
    from sail.evaluate.ranking import rank_configs

    rng = np.random.default_rng(3)
    n = 600
    split = np.repeat(["train", "valid", "test"], [300, 200, 100])
    slices = pd.DataFrame(
        {
            "slice_id": [f"ct/s{i:04d}/axial/0000" for i in range(n)],
            "modality": "ct",
            "image_id": [f"s{i:04d}" for i in range(n)],
            "split": split,
        }
    )
    data = _make_eval_data(slices)
    y = rng.integers(0, 2, (n, 2)).astype(np.int8)
    x = (rng.random((n, 40)) < 0.1) * rng.random((n, 40))
    x[:, 0] = y[:, 0] * (1 + rng.random(n))  # easy: one feature is the label
    x[:, 1:6] = y[:, 1:2] * rng.random((n, 5)) + rng.random((n, 5))  # hard: five noisy features
    task = Task("structures", "multilabel", ("easy", "hard"), y)
    dense = {("structures", "easy"): 0.99, ("structures", "hard"): 0.9}
    thresholds = RecoverySettings().thresholds
    grid_max = max(RecoverySettings().n_features)
    summaries, monos = [], []
    for cfg, hard_coef in (
        ("fails_hard", np.zeros(40)),
        ("solves_both", np.r_[0, [1.0] * 5, [0] * 34]),
    ):
        ids = {"encoder": "e", "variant": "v", "sae_config": cfg}
        coefs = {("structures", "easy"): np.r_[1.0, [0] * 39], ("structures", "hard"): hard_coef}
        _, summary, _ = run_recovery(
            [task], sp.csr_matrix(x), data, coefs, dense, P, RecoverySettings(max_iter=500), ids
        )
        summaries.append(summary)
        monos.append({**ids, "m_config_top10": 0.5, "m_config_top50": 0.5})
    summary = pd.concat(summaries, ignore_index=True)
    failed = summary[(summary.sae_config == "fails_hard") & (summary.target == "hard")]
    assert len(failed) == 1
    assert failed["n_ranked"].iloc[0] == 0
    assert failed[[f"n_features_{round(t * 100)}pct" for t in thresholds]].isna().all(axis=None)
    ranking = rank_configs(pd.DataFrame(monos), summary, thresholds, grid_max, RankingSettings())
    ranking = ranking.set_index("sae_config")
    assert ranking.loc["fails_hard", "n_targets"] == ranking.loc["solves_both", "n_targets"] == 2
    assert ranking.loc["fails_hard", "final_rank"] > ranking.loc["solves_both", "final_rank"]
