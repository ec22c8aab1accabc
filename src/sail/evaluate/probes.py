"""Linear probes: the published elastic-net logistic regression on dense embeddings and sparse
codes.

Tasks follow the paper (modality, plane, sex, age group, structure presence) plus optional metadata
groups. Multiclass tasks with 3+ classes are multinomial, 2-class tasks one binary model, and
multilabel tasks one binary model per label. Probability columns are matched to targets through
``classes_``, so a class missing from training (institutes A/D/E) gets NaN, never another
class's column.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from sail.config import EvaluateConfig, ProbeSettings
from sail.data.labels import age_group as derive_age_group
from sail.evaluate.inputs import SPLITS, STRUCTURE_PREFIX, EvalData
from sail.evaluate.saga import SagaLogistic

log = logging.getLogger(__name__)

Kind = Literal["multiclass", "multilabel"]
_METADATA_COLUMN = {
    "modality": "modality",
    "plane": "plane",
    "sex": "sex",
    "age_group": "age_group",
    "kvp": "kvp",
    "institute": "institute",
    "manufacturer": "manufacturer",
    "scanner_model": "scanner_model",
    "pathology": "pathology",
}
_FIXED_TARGETS = {
    "modality": ("mri", "ct"),
    "plane": ("sagittal", "coronal", "axial"),
    "sex": ("f", "m"),
    "age_group": ("<40", ">=80"),
    "kvp": ("80", "120"),
}
PROBE_COLUMNS = [
    "encoder",
    "variant",
    "sae_config",
    "task",
    "target",
    "split",
    "n",
    "roc_auc",
    "f1",
    "balanced_accuracy",
]


@dataclass(frozen=True)
class Task:
    """One probe group. ``y``: multiclass (n,) int with -1 = unlabelled; multilabel (n, L) int8."""

    name: str
    kind: Kind
    targets: tuple[str, ...]
    y: np.ndarray

    def binary(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows with a label, 0/1 label of target ``t`` on them): a target's one-vs-rest view."""
        if self.kind == "multiclass":
            rows = np.flatnonzero(self.y >= 0)
            return rows, (self.y[rows] == t).astype(np.int8)
        return np.arange(len(self.y)), self.y[:, t].astype(np.int8)

    def strata(self) -> np.ndarray:
        """Stratification key per row: the class, or the label-combination code (multilabel)."""
        if self.kind == "multiclass":
            return self.y
        weights = (
            (1 << np.arange(self.y.shape[1], dtype=np.int64)) if self.y.shape[1] < 63 else None
        )
        if weights is None:
            return pd.MultiIndex.from_arrays(list(self.y.T)).factorize()[0]
        return self.y.astype(np.int64) @ weights

    def symmetric_pair(self) -> bool:
        """Two-class multiclass task: both targets share one model and one ROC-AUC."""
        return self.kind == "multiclass" and len(self.targets) == 2


def string_values(col: pd.Series) -> np.ndarray:
    out = col.astype(object).where(col.notna(), None).to_numpy()
    return np.array([None if v is None else str(v) for v in out], dtype=object)


def kvp_values(col: pd.Series) -> np.ndarray:
    num = pd.to_numeric(col, errors="coerce").to_numpy(dtype=float)
    out = np.full(len(num), None, dtype=object)
    ok = np.isfinite(num)
    out[ok] = [f"{v:g}" for v in num[ok]]
    return out


def age_groups(slices: pd.DataFrame) -> np.ndarray:
    """The ``age_group`` column, derived from ``age`` (canonical left-closed bins) where it is null.

    The published pipeline probed an ``age_bin`` column that no table contained; here the group is
    always available when the age is.
    """
    derived = (
        derive_age_group(slices["age"])
        if "age" in slices.columns
        else pd.Series([None] * len(slices))
    )
    derived = string_values(pd.Series(derived.to_numpy(), index=slices.index))
    if "age_group" not in slices.columns:
        return derived
    given = string_values(slices["age_group"])
    return np.where(pd.isna(given), derived, given)


def _multiclass(name: str, values: np.ndarray, targets: tuple[str, ...]) -> Task:
    lookup = {t: i for i, t in enumerate(targets)}
    y = np.array([lookup.get(v, -1) for v in values], dtype=np.int64)
    return Task(name, "multiclass", targets, y)


def build_tasks(data: EvalData, ecfg: EvaluateConfig) -> tuple[list[Task], list[str]]:
    """Tasks present in the data, and a list of human-readable reasons for those left out."""
    slices = data.slices
    tasks, skipped = [], []
    train = data.split_rows["train"]
    for name in [*ecfg.tasks, *ecfg.extra_tasks]:
        if name == "structures":
            names = [s for s in ecfg.probe_structures if f"{STRUCTURE_PREFIX}{s}" in slices.columns]
            skipped += [
                f"structures/{s}: no column {STRUCTURE_PREFIX}{s}"
                for s in ecfg.probe_structures
                if s not in names
            ]
            if names:
                y = np.stack(
                    [
                        slices[f"{STRUCTURE_PREFIX}{s}"].fillna(False).to_numpy(dtype=bool)
                        for s in names
                    ],
                    axis=1,
                )
                tasks.append(Task("structures", "multilabel", tuple(names), y.astype(np.int8)))
            continue
        column = _METADATA_COLUMN.get(
            name, name
        )  # any other name: a metadata column (e.g. from a manifest)
        if name == "age_group":
            if "age_group" not in slices.columns and "age" not in slices.columns:
                skipped.append("age_group: neither 'age_group' nor 'age' column")
                continue
            values = age_groups(slices)
        elif column not in slices.columns:
            skipped.append(f"{name}: no column '{column}'")
            continue
        elif name == "kvp":
            values = kvp_values(slices[column])
        else:
            values = string_values(slices[column])
            if name in ("modality", "sex"):
                values = np.array([None if v is None else v.lower() for v in values], dtype=object)
        if name in _FIXED_TARGETS:
            tasks.append(_multiclass(name, values, _FIXED_TARGETS[name]))
        elif name == "institute":
            targets = tuple(sorted({v for v in values if v is not None}))
            tasks.append(_multiclass(name, values, targets))
        else:
            # manufacturer, scanner_model, pathology, free columns: one binary label per value
            # seen in training
            targets = tuple(sorted({v for v in values[train] if v is not None}))
            if not targets:
                skipped.append(f"{name}: no values in the training split")
                continue
            y = np.stack([values == t for t in targets], axis=1).astype(np.int8)
            tasks.append(Task(name, "multilabel", targets, y))
    return tasks, skipped


def stratified_subsample(strata: np.ndarray, rows: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted subset of ``rows`` of size min(n, len(rows)), allocated to strata by largest
    remainder.

    Unlike a stratified train_test_split it never fails: a stratum with a single member simply gets
    its proportional share (zero or one row).
    """
    if len(rows) <= n:
        return np.sort(rows)
    keys, inv, counts = np.unique(strata[rows], return_inverse=True, return_counts=True)
    exact = counts * (n / len(rows))
    quota = np.floor(exact).astype(np.int64)
    short = n - int(quota.sum())
    if short:
        order = np.lexsort((np.arange(len(keys)), -(exact - quota)))
        quota[order[:short]] += 1
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(rows)), inv))
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(rows), dtype=np.int64)
    rank[order] = np.arange(len(rows)) - start[inv[order]]
    return np.sort(rows[rank < quota[inv]])


def make_classifier(
    p: ProbeSettings,
    max_iter: int | None = None,
    warm_start: bool = False,
    solver: str | None = None,
) -> LogisticRegression | SagaLogistic:
    """The published elastic-net probe (saga, balanced classes), fit by ``solver or p.solver``."""
    if (solver or p.solver) == "sail":
        return SagaLogistic(
            C=p.C,
            l1_ratio=p.l1_ratio,
            tol=p.tol,
            max_iter=max_iter or p.max_iter,
            random_state=p.seed,
            warm_start=warm_start,
        )
    # scikit-learn >= 1.8 (the floor in pyproject.toml): l1_ratio in (0, 1) with saga is the
    # elastic net; `penalty` is deprecated there. Older versions silently fitted pure L2 without
    # penalty='elasticnet'.
    return LogisticRegression(
        C=p.C,
        l1_ratio=p.l1_ratio,
        solver="saga",
        class_weight="balanced",
        tol=p.tol,
        max_iter=max_iter or p.max_iter,
        random_state=p.seed,
        warm_start=warm_start,
    )


def fit_quiet(clf, x, y):
    """Fit; report convergence instead of printing a ConvergenceWarning per fit.

    Only ConvergenceWarning is absorbed (and counted by the caller); every other warning the fit
    raises is re-emitted unchanged, so data or API problems stay visible.
    """
    if isinstance(clf, SagaLogistic):
        return clf.fit(x, y), clf.converged_
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(x, y)
    converged = True
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            converged = False
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    return clf, converged


def roc_auc(y01: np.ndarray, score: np.ndarray) -> float:
    """ROC-AUC from tie-averaged ranks (equal to sklearn's); NaN when a class is missing."""
    n_pos = int(y01.sum())
    n_neg = len(y01) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="stable")
    s = np.asarray(score)[order]
    new_run = np.r_[True, s[1:] != s[:-1]]
    first = np.flatnonzero(new_run)
    last = np.r_[first[1:], len(s)] - 1
    run = np.cumsum(new_run) - 1
    ranks = np.empty(len(s))
    ranks[order] = (first[run] + last[run]) / 2.0 + 1.0
    return float((ranks[y01 == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def binary_metrics(
    y01: np.ndarray, score: np.ndarray | None, pred01: np.ndarray
) -> tuple[float, float, float]:
    """(ROC-AUC, F1, balanced accuracy); NaN where the split lacks a class or no score exists.

    Computed from counts rather than sklearn.metrics, whose input validation dominated the cost
    of hundreds of small evaluations.
    """
    y = np.asarray(y01).astype(bool)
    pred = np.asarray(pred01).astype(bool)
    auc = roc_auc(y, score) if score is not None else float("nan")
    if len(y) == 0:
        return auc, float("nan"), float("nan")
    tp = int((y & pred).sum())
    fp = int((~y & pred).sum())
    fn = int((y & ~pred).sum())
    tn = len(y) - tp - fp - fn
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    bacc = (tp / (tp + fn) + tn / (tn + fp)) / 2 if (tp + fn) and (tn + fp) else float("nan")
    return auc, float(f1), float(bacc)


@dataclass
class ProbeOutput:
    """Metrics rows, per-target signed coefficients, and per-target test scores (for breakdowns)."""

    rows: list[dict] = field(default_factory=list)
    coefs: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    test_scores: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]] = field(
        default_factory=dict
    )
    n_unconverged: int = 0
    n_fits: int = 0


def _target_scores(clf, proba, t: int, n: int) -> tuple[np.ndarray | None, np.ndarray]:
    """Probability of class ``t`` and the hard one-vs-rest prediction, matched via ``classes_``."""
    if clf is None or proba is None:
        return None, np.zeros(n, dtype=np.int8)
    classes = list(clf.classes_)
    pred = (np.asarray(clf.classes_)[np.argmax(proba, axis=1)] == t).astype(np.int8)
    if t not in classes:
        return None, pred
    return proba[:, classes.index(t)], pred


def _target_coef(clf: LogisticRegression, t: int) -> np.ndarray | None:
    classes = list(clf.classes_)
    if t not in classes:
        return None
    if clf.coef_.shape[0] == 1:  # binary: coef_ belongs to classes_[1]
        return clf.coef_[0] if classes.index(t) == 1 else -clf.coef_[0]
    return clf.coef_[classes.index(t)]


def run_probes(
    tasks: list[Task], x, data: EvalData, p: ProbeSettings, ids: dict[str, str]
) -> ProbeOutput:
    """Fit every task on a stratified training subsample of ``x`` (dense array or CSR); evaluate
    on that subsample, the validation split and the test split."""
    out = ProbeOutput()
    train_rows = data.split_rows["train"]
    for task in tasks:
        strata = task.strata()
        labelled = train_rows[strata[train_rows] >= 0] if task.kind == "multiclass" else train_rows
        sub = stratified_subsample(strata, labelled, p.train_samples, p.seed)
        eval_rows = {
            "train": sub,
            "valid": data.split_rows["valid"],
            "test": data.split_rows["test"],
        }
        if task.kind == "multiclass":
            models = [(None, sub)]
        else:
            models = [(t, sub) for t in range(len(task.targets))]
        for label, rows in models:
            y_fit = task.y[rows] if label is None else task.y[rows, label]
            if len(np.unique(y_fit)) < 2:
                log.warning(
                    "%s%s: one class in the training subsample; not fitted",
                    task.name,
                    "" if label is None else f"/{task.targets[label]}",
                )
                clf = None
            else:
                clf, converged = fit_quiet(make_classifier(p), x[rows], y_fit)
                out.n_fits += 1
                out.n_unconverged += not converged
            targets = range(len(task.targets)) if label is None else [label]
            for split in SPLITS:
                r = eval_rows[split]
                if task.kind == "multiclass":
                    r = r[task.y[r] >= 0]
                proba = clf.predict_proba(x[r]) if clf is not None and len(r) else None
                for t in targets:
                    y01 = (task.y[r] == t) if task.kind == "multiclass" else task.y[r, t]
                    score, pred = _target_scores(clf, proba, t if label is None else 1, len(r))
                    auc, f1, bacc = binary_metrics(y01.astype(np.int8), score, pred)
                    out.rows.append(
                        {
                            **ids,
                            "task": task.name,
                            "target": task.targets[t],
                            "split": split,
                            "n": len(r),
                            "roc_auc": auc,
                            "f1": f1,
                            "balanced_accuracy": bacc,
                        }
                    )
                    if split == "test" and score is not None:
                        out.test_scores[(task.name, task.targets[t])] = (
                            r,
                            y01.astype(np.int8),
                            score,
                        )
            if clf is not None:
                for t in targets:
                    coef = _target_coef(clf, t) if label is None else clf.coef_[0]
                    if coef is not None:
                        out.coefs[(task.name, task.targets[t])] = np.asarray(coef, dtype=np.float64)
    return out


def coefficient_table(
    coefs: dict[tuple[str, str], np.ndarray], ids: dict[str, str]
) -> pd.DataFrame:
    """Nonzero coefficients per target, ranked by |coef| (1 = largest; ties by feature index)."""
    frames = []
    for (task, target), coef in coefs.items():
        nz = np.flatnonzero(coef)
        order = nz[np.lexsort((nz, -np.abs(coef[nz])))]
        frames.append(
            pd.DataFrame(
                {
                    **{k: [v] * len(order) for k, v in ids.items()},
                    "task": task,
                    "target": target,
                    "feature": order.astype(np.int64),
                    "coef": coef[order],
                    "rank": np.arange(1, len(order) + 1, dtype=np.int64),
                }
            )
        )
    cols = [*ids, "task", "target", "feature", "coef", "rank"]
    return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)


def as_design(x) -> np.ndarray | sp.csr_matrix:
    """Probe input as float64 (dense) or float64 CSR, the dtypes saga works in without copies."""
    if sp.issparse(x):
        return sp.csr_matrix(x, dtype=np.float64)
    return np.ascontiguousarray(x, dtype=np.float64)
