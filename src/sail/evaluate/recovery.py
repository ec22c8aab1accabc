"""Performance recovery: how many of the sparse probe's top features recover the dense probe?

For each target the features are ranked by the sparse probe's |coefficient| for that target. A
binary probe is fitted on the top-N *columns only* (a zeroed column keeps exactly zero weight under
the elastic net, so slicing fits the same model as the published full-width masking at a fraction
of the cost), warm-started from the previous N. Two-class tasks are fitted once: both targets share
the model and the ROC-AUC.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sail.config import ProbeSettings, RecoverySettings
from sail.evaluate.inputs import EvalData
from sail.evaluate.probes import Task, fit_quiet, make_classifier, roc_auc, stratified_subsample

log = logging.getLogger(__name__)

CURVE_COLUMNS = [
    "encoder",
    "variant",
    "sae_config",
    "task",
    "target",
    "n_features",
    "valid_roc_auc",
    "dense_valid_roc_auc",
]


def threshold_column(t: float) -> str:
    return f"n_features_{round(t * 100)}pct"


def n_grid(grid: list[int], n_ranked: int) -> list[int]:
    """The grid values the ranking covers, plus ``n_ranked`` itself when it lies inside the grid."""
    ns = sorted({n for n in grid if n <= n_ranked})
    if 0 < n_ranked < max(grid) and n_ranked not in ns:
        ns.append(n_ranked)
    return sorted(ns)


def features_to_threshold(
    ns: list[int], aucs: list[float], dense_auc: float, thresholds: list[float]
) -> dict[str, float]:
    """Smallest N whose valid ROC-AUC reaches ``t`` x the dense valid ROC-AUC, per threshold (NaN
    if never)."""
    ratio = np.asarray(aucs, dtype=float) / dense_auc
    out = {}
    for t in thresholds:
        hit = np.flatnonzero(ratio >= t - 1e-12)
        out[threshold_column(t)] = ns[hit[0]] if len(hit) else np.nan
    return out


def recovery_curve(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_valid,
    y_valid: np.ndarray,
    ns: list[int],
    p: ProbeSettings,
    max_iter: int,
    warm_start: bool = True,
) -> tuple[list[float], int]:
    """Valid ROC-AUC of a binary probe on the first n columns, for each n in ``ns``.

    ``x_train`` / ``x_valid`` hold only the ranked columns, best first. Returns the AUCs and the
    number of fits that hit ``max_iter``.
    """
    aucs, unconverged, prev = [], 0, None
    for n in ns:
        clf = make_classifier(p, max_iter=max_iter, warm_start=warm_start)
        if warm_start and prev is not None:
            clf.coef_ = np.hstack([prev.coef_, np.zeros((1, n - prev.coef_.shape[1]))])
            clf.intercept_ = prev.intercept_.copy()
        clf, converged = fit_quiet(clf, x_train[:, :n], y_train)
        unconverged += not converged
        aucs.append(roc_auc(y_valid, np.asarray(x_valid[:, :n] @ clf.coef_[0]).ravel()))
        prev = clf
    return aucs, unconverged


def _summary_row(
    ids: dict[str, str],
    task: str,
    target: str,
    dense: float,
    ns: list[int],
    aucs: list[float],
    n_ranked: int,
    thresholds: list[float],
) -> dict:
    """One summary row; with no ranked feature, every threshold is unreached (NaN), max AUC NaN."""
    row = {
        **ids,
        "task": task,
        "target": target,
        "dense_valid_roc_auc": dense,
        **features_to_threshold(ns, aucs, dense, thresholds),
    }
    row["max_valid_roc_auc"] = float(np.nanmax(aucs)) if np.isfinite(aucs).any() else np.nan
    row["n_ranked"] = n_ranked
    return row


def run_recovery(
    tasks: list[Task],
    codes: sp.csr_matrix,
    data: EvalData,
    coefs: dict[tuple[str, str], np.ndarray],
    dense_valid_auc: dict[tuple[str, str], float],
    p: ProbeSettings,
    r: RecoverySettings,
    ids: dict[str, str],
) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Curves and threshold summary for every target with a usable dense baseline."""
    csc = sp.csc_matrix(codes)
    train_rows, valid_rows = data.split_rows["train"], data.split_rows["valid"]
    curves, summary, unconverged = [], [], 0
    max_n = max(r.n_features)
    for task in tasks:
        strata = task.strata()
        labelled = train_rows[strata[train_rows] >= 0] if task.kind == "multiclass" else train_rows
        sub = stratified_subsample(strata, labelled, r.train_samples, p.seed)
        done: dict[str, tuple[list[int], list[float], int]] = {}
        for t, target in enumerate(task.targets):
            key = (task.name, target)
            dense = dense_valid_auc.get(key, float("nan"))
            coef = coefs.get(key)
            if not np.isfinite(dense) or dense < r.min_dense_auc:
                continue  # no usable dense baseline: the same for every config of the encoder
            if task.symmetric_pair() and done:
                ns, aucs, n_ranked = next(iter(done.values()))
            else:
                rows_t, y_t = task.binary(t)
                on_sub = np.isin(sub, rows_t)
                y_tr = y_t[np.searchsorted(rows_t, sub[on_sub])]
                if len(np.unique(y_tr)) < 2:
                    log.warning(
                        "recovery %s/%s: one class in the training subsample; target left out",
                        task.name,
                        target,
                    )
                    continue  # depends on the data and seed only, so every config leaves it out
                nz = np.flatnonzero(coef) if coef is not None else np.array([], dtype=np.int64)
                ranked = nz[np.lexsort((nz, -np.abs(coef[nz])))][:max_n] if len(nz) else nz
                n_ranked = len(ranked)
                ns = n_grid(r.n_features, n_ranked)
                if not ns:
                    # The sparse probe kept no feature for this target: the config fails it. The row
                    # stays, every threshold unreached, so ranking charges the unreached penalty.
                    done[target] = ([], [], 0)
                    summary.append(
                        _summary_row(ids, task.name, target, dense, [], [], 0, r.thresholds)
                    )
                    continue
                cols = csc[:, ranked]
                x_tr = cols[sub[on_sub]].toarray().astype(np.float64)
                valid_labelled = np.isin(valid_rows, rows_t)
                v_rows = valid_rows[valid_labelled]
                y_va = y_t[np.searchsorted(rows_t, v_rows)]
                x_va = sp.csr_matrix(cols[v_rows], dtype=np.float64)
                aucs, bad = recovery_curve(x_tr, y_tr, x_va, y_va, ns, p, r.max_iter)
                unconverged += bad
                done[target] = (ns, aucs, n_ranked)
            for n, auc in zip(ns, aucs, strict=True):
                curves.append(
                    {
                        **ids,
                        "task": task.name,
                        "target": target,
                        "n_features": n,
                        "valid_roc_auc": auc,
                        "dense_valid_roc_auc": dense,
                    }
                )
            summary.append(
                _summary_row(ids, task.name, target, dense, ns, aucs, n_ranked, r.thresholds)
            )
    summary_cols = [
        *ids,
        "task",
        "target",
        "dense_valid_roc_auc",
        *[threshold_column(t) for t in r.thresholds],
        "max_valid_roc_auc",
        "n_ranked",
    ]
    curves_df = pd.DataFrame(curves, columns=CURVE_COLUMNS)
    summary_df = pd.DataFrame(summary, columns=summary_cols)
    for th in r.thresholds:
        summary_df[threshold_column(th)] = summary_df[threshold_column(th)].astype("Int64")
    return curves_df, summary_df, unconverged
