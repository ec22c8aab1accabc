from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from sail.config import EvaluateConfig, ProbeSettings
from sail.evaluate.inputs import _make_eval_data
from sail.evaluate.probes import (
    Task,
    age_groups,
    binary_metrics,
    build_tasks,
    coefficient_table,
    fit_quiet,
    make_classifier,
    run_probes,
    stratified_subsample,
)

P = ProbeSettings(max_iter=300, tol=1e-3)


def _data(n_per_split=(300, 200, 200), seed=0):
    rng = np.random.default_rng(seed)
    split = np.repeat(["train", "valid", "test"], n_per_split)
    n = len(split)
    slices = pd.DataFrame(
        {
            "slice_id": [f"ct/s{i:04d}/axial/0000" for i in range(n)],
            "modality": "ct",
            "image_id": [f"s{i:04d}" for i in range(n)],
            "split": split,
        }
    )
    return _make_eval_data(slices), rng


def _metric(out, target, split, col="roc_auc"):
    rows = [r for r in out.rows if r["target"] == target and r["split"] == split]
    assert len(rows) == 1
    return rows[0][col]


@pytest.mark.parametrize("sparse", [False, True])
def test_separable_labels_reach_auc_one_and_shuffled_labels_stay_near_half(sparse):
    data, rng = _data()
    n = len(data.slices)
    y = rng.integers(0, 2, n)
    x = np.abs(rng.normal(size=(n, 20))) * (rng.random((n, 20)) < 0.3)
    x[:, 3] = y * 2.0  # the label is one feature
    design = sp.csr_matrix(x) if sparse else x
    task = Task("sex", "multiclass", ("f", "m"), y)
    out = run_probes([task], design, data, P, {"encoder": "e"})
    for split in ("train", "valid", "test"):
        assert _metric(out, "m", split) == 1.0
        assert _metric(out, "f", split) == 1.0  # both targets of a two-class task share the AUC
    shuffled = Task("sex", "multiclass", ("f", "m"), rng.permutation(y))
    x2 = np.abs(rng.normal(size=(n, 20)))
    out = run_probes([shuffled], sp.csr_matrix(x2) if sparse else x2, data, P, {"encoder": "e"})
    assert abs(_metric(out, "m", "valid") - 0.5) < 0.1
    assert abs(_metric(out, "m", "test") - 0.5) < 0.1


def test_classes_missing_from_training_are_nan_not_misaligned():
    """Published bug #2: probability columns follow classes_, not target positions."""
    data, rng = _data()
    n = len(data.slices)
    targets = ("A", "B", "C", "D")
    y = np.where(rng.random(n) < 0.5, 1, 2)  # B or C everywhere
    held_out = np.isin(np.arange(n), data.split_rows["test"]) & (rng.random(n) < 0.3)
    y[held_out] = np.where(rng.random(held_out.sum()) < 0.5, 0, 3)  # A and D only in test
    x = rng.normal(size=(n, 5))
    x[:, 0] += 3 * (y == 1) - 3 * (y == 2)
    out = run_probes([Task("institute", "multiclass", targets, y)], x, data, P, {"encoder": "e"})
    assert np.isnan(_metric(out, "A", "test")) and np.isnan(_metric(out, "D", "test"))
    # Indexing proba by target position would score B with C's column (AUC near 0).
    assert _metric(out, "B", "test") > 0.9 and _metric(out, "C", "test") > 0.9
    assert _metric(out, "A", "test", "f1") == 0.0
    assert ("institute", "A") not in out.coefs and ("institute", "B") in out.coefs


def test_multilabel_fits_one_model_per_label_and_coefficients_rank_by_magnitude():
    data, rng = _data()
    n = len(data.slices)
    y = (rng.random((n, 2)) < 0.4).astype(np.int8)
    x = rng.normal(size=(n, 6)) * 0.1
    x[:, 1] += 3 * y[:, 0]
    x[:, 4] -= 3 * y[:, 1]
    out = run_probes(
        [Task("structures", "multilabel", ("liver", "heart"), y)], x, data, P, {"encoder": "e"}
    )
    assert _metric(out, "liver", "valid") > 0.99 and _metric(out, "heart", "valid") > 0.99
    table = coefficient_table(out.coefs, {"encoder": "e"})
    top = table[table["rank"] == 1].set_index("target")["feature"]
    assert top["liver"] == 1 and top["heart"] == 4
    assert table.loc[(table.target == "heart") & (table["rank"] == 1), "coef"].iloc[0] < 0


def test_binary_coefficients_change_sign_with_the_target():
    data, rng = _data()
    y = rng.integers(0, 2, len(data.slices))
    x = rng.normal(size=(len(y), 3)) + 2 * y[:, None] * np.array([1, 0, 0])
    out = run_probes(
        [Task("modality", "multiclass", ("mri", "ct"), y)], x, data, P, {"encoder": "e"}
    )
    np.testing.assert_allclose(out.coefs[("modality", "ct")], -out.coefs[("modality", "mri")])
    assert out.coefs[("modality", "ct")][0] > 0


def test_stratified_subsample_never_fails_on_single_member_strata():
    """Published bug #14: train_test_split(stratify=...) raised on a one-member label combo."""
    strata = np.array([0] * 500 + [1] * 300 + [2] * 199 + [3])  # stratum 3 has one member
    rows = np.arange(len(strata))
    sub = stratified_subsample(strata, rows, 100, seed=42)
    assert len(sub) == 100 and len(set(sub)) == 100
    counts = np.bincount(strata[sub], minlength=4)
    assert list(counts[:3]) == [50, 30, 20] and counts[3] == 0
    np.testing.assert_array_equal(sub, stratified_subsample(strata, rows, 100, seed=42))
    assert not np.array_equal(sub, stratified_subsample(strata, rows, 100, seed=1))
    np.testing.assert_array_equal(stratified_subsample(strata, rows[:50], 100, 0), rows[:50])


def test_age_group_is_derived_from_age_with_left_closed_bins():
    """Published bug #1: the probed age_bin column never existed, and pandas' right-closed bins put
    age 40 in <40 and age 80 in 60-80."""
    slices = pd.DataFrame({"age": [39.9, 40.0, 79.9, 80.0, 85.0, np.nan]})
    assert list(age_groups(slices)) == ["<40", "40-60", "60-80", ">=80", ">=80", None]
    slices["age_group"] = [None, "40-60", None, ">=80", None, None]
    assert list(age_groups(slices)) == ["<40", "40-60", "60-80", ">=80", ">=80", None]
    df = pd.DataFrame(
        {
            "slice_id": [f"ct/s{i:04d}/axial/0000" for i in range(6)],
            "modality": "ct",
            "image_id": [f"s{i:04d}" for i in range(6)],
            "split": "train",
            "age": [39.9, 40.0, 79.9, 80.0, 85.0, np.nan],
        }
    )
    tasks, skipped = build_tasks(_make_eval_data(df), EvaluateConfig(tasks=["age_group"]))
    assert not skipped
    assert list(tasks[0].y) == [0, -1, -1, 1, 1, -1]


def test_build_tasks_records_missing_structures_and_columns():
    df = pd.DataFrame(
        {
            "slice_id": ["ct/s0001/axial/0000"],
            "modality": ["CT"],
            "image_id": ["s0001"],
            "split": ["train"],
            "has_liver": [True],
        }
    )
    tasks, skipped = build_tasks(_make_eval_data(df), EvaluateConfig(extra_tasks=["kvp"]))
    names = {t.name: t for t in tasks}
    assert names["structures"].targets == ("liver",)
    assert names["modality"].y.tolist() == [1]  # case-insensitive modality
    assert any("kidney_left" in s for s in skipped) and any(s.startswith("kvp") for s in skipped)
    assert any(s.startswith("sex") for s in skipped)


def test_binary_metrics_match_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = rng.integers(0, 5, 500).astype(float)
    pred = rng.integers(0, 2, 500)
    auc, f1, bacc = binary_metrics(y, s, pred)
    assert auc == pytest.approx(roc_auc_score(y, s))
    assert f1 == pytest.approx(f1_score(y, pred)) and bacc == pytest.approx(
        balanced_accuracy_score(y, pred)
    )
    auc, f1, bacc = binary_metrics(np.ones(5, int), s[:5], np.zeros(5, int))
    assert np.isnan(auc) and f1 == 0.0 and np.isnan(bacc)


def test_sklearn_solver_fits_the_elastic_net_not_pure_l2():
    """Issue 12 item 10: scikit-learn < 1.8 ignored l1_ratio without penalty='elasticnet' (pure L2:
    no coefficient is exactly zero). The floor is 1.8, and the fitted model must be sparse."""
    import sklearn
    from packaging.version import Version

    assert Version(sklearn.__version__) >= Version("1.8")
    assert '"scikit-learn>=1.8"' in (Path(__file__).parents[2] / "pyproject.toml").read_text()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 60))
    y = (x[:, 0] + 0.5 * x[:, 1] + rng.normal(0, 0.5, 400) > 0).astype(int)
    p = ProbeSettings(solver="sklearn", C=0.05, l1_ratio=0.5, tol=1e-6, max_iter=5000)
    clf, _ = fit_quiet(make_classifier(p), x, y)
    assert (clf.coef_[0] == 0).sum() >= 30  # L2 leaves every coefficient nonzero
    assert clf.coef_[0][0] != 0
    l2, _ = fit_quiet(make_classifier(p.model_copy(update={"l1_ratio": 0.0})), x, y)
    assert (l2.coef_[0] == 0).sum() == 0


def test_fit_quiet_absorbs_only_convergence_warnings():
    """Issue 12 item 10: fit_quiet swallowed all warnings; it must re-emit all but
    ConvergenceWarning."""
    import warnings

    from sklearn.exceptions import DataConversionWarning

    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 5))
    y = (x[:, 0] > 0).astype(int)
    p = ProbeSettings(solver="sklearn", tol=1e-12, max_iter=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, converged = fit_quiet(
            make_classifier(p), x, y.reshape(-1, 1)
        )  # a column vector: a data warning
    categories = [w.category for w in caught]
    assert not converged
    assert DataConversionWarning in categories
    assert not any(issubclass(c, ConvergenceWarning) for c in categories)
