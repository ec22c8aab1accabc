"""Concept grounding (beyond the paper): which label does each feature track, and how well?

Every feature is scored by ROC-AUC against every ``has_<structure>`` flag and every metadata value
(``modality=ct``, ``institute=B``...) on the train split, where the best feature per label is
chosen; that feature's ROC-AUC is then reported on valid and test. The AUCs of all features against
all labels come from one rank transform of the sparse codes and two sparse-dense products (no loop
over features): with r the tie-averaged ranks, AUC = (sum of positive ranks - P(P+1)/2) / (P N),
where the implicit zeros of a column share one average rank. Metadata labels are scored on rows where that column is
known; a null structure flag counts as absent.

Also here: test-split metrics per institute / modality / plane with volume-clustered bootstrap
intervals (resampling whole volumes, because slices of one volume are not independent).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sail.evaluate.probes import age_groups, kvp_values, roc_auc, string_values

REPORT_COLUMNS = ["valid_roc_auc", "test_roc_auc"]
CONCEPT_COLUMNS = [
    "encoder",
    "variant",
    "sae_config",
    "label",
    "n_positive_train",
    "best_feature",
    "train_roc_auc",
    *REPORT_COLUMNS,
]
CONFOUND_COLUMNS = [
    "encoder",
    "variant",
    "sae_config",
    "feature",
    "label",
    "train_roc_auc",
    "valid_roc_auc",
    "best_structure",
    "best_structure_valid_roc_auc",
]
BREAKDOWN_COLUMNS = [
    "encoder",
    "variant",
    "sae_config",
    "task",
    "target",
    "by",
    "group",
    "n",
    "n_volumes",
    "roc_auc",
    "ci_low",
    "ci_high",
]
METADATA_LABELS = [
    "modality",
    "plane",
    "sex",
    "age_group",
    "institute",
    "manufacturer",
    "scanner_model",
    "kvp",
    "pathology",
    "study_type",
]


def sparse_ranks(codes: sp.csr_matrix) -> tuple[sp.csc_matrix, np.ndarray]:
    """Tie-averaged 1-based ranks of each column's stored values among all n rows (implicit zeros
    included), as a CSC with the same pattern, plus the shared rank of each column's zeros."""
    csc = sp.csc_matrix(codes, dtype=np.float64, copy=True)
    csc.sum_duplicates()
    n = csc.shape[0]
    nnz_col = np.diff(csc.indptr)
    col = np.repeat(np.arange(csc.shape[1]), nnz_col)
    order = np.lexsort((csc.data, col))
    v, c = csc.data[order], col[order]
    new_run = np.ones(len(v), dtype=bool)
    new_run[1:] = (v[1:] != v[:-1]) | (c[1:] != c[:-1])
    run = np.cumsum(new_run) - 1
    run_first = np.flatnonzero(new_run)
    run_last = np.append(run_first[1:], len(v)) - 1
    pos_in_col = (run_first[run] + run_last[run]) / 2.0 - csc.indptr[c]  # 0-based, tie-averaged
    n_neg = np.bincount(c[v < 0], minlength=csc.shape[1])
    zeros = n - nnz_col
    rank = np.empty(len(v))
    rank[order] = pos_in_col + 1 + np.where(v > 0, zeros[c], 0)
    ranks = sp.csc_matrix((rank, csc.indices, csc.indptr), shape=csc.shape)
    zero_rank = n_neg + (zeros + 1) / 2.0
    return ranks, zero_rank


def auc_matrix(codes: sp.csr_matrix, labels_NL: np.ndarray) -> np.ndarray:
    """(L, F) ROC-AUC of every feature against every 0/1 label column (NaN if a class is absent)."""
    ranks, zero_rank = sparse_ranks(codes)
    y = labels_NL.astype(np.float64)
    pattern = ranks.copy()
    pattern.data = np.ones_like(pattern.data)
    pos_rank_sum = (
        np.asarray(ranks.T @ y).T
        + (y.sum(0)[:, None] - np.asarray(pattern.T @ y).T) * zero_rank[None, :]
    )
    p = y.sum(0)[:, None]
    q = len(y) - p
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (pos_rank_sum - p * (p + 1) / 2) / (p * q)
    auc[((p == 0) | (q == 0))[:, 0]] = np.nan
    return auc


def label_families(
    slices: pd.DataFrame, rows: np.ndarray
) -> list[tuple[str, np.ndarray, list[str], np.ndarray]]:
    """(family, rows where known, label names, 0/1 matrix) for structures and each metadata column."""
    sub = slices.iloc[rows]
    out = []
    has = [c for c in sub.columns if c.startswith("has_")]
    if has:
        y = np.stack([sub[c].fillna(False).to_numpy(dtype=bool) for c in has], axis=1)
        out.append(("structure", rows, has, y))
    for name in METADATA_LABELS:
        if name == "age_group":
            if "age_group" not in sub.columns and "age" not in sub.columns:
                continue
            values = age_groups(sub)
        elif name not in sub.columns:
            continue
        elif name == "kvp":
            values = kvp_values(sub[name])
        else:
            values = string_values(sub[name])
        known = np.array([v is not None for v in values])
        uniq = sorted({v for v in values[known]})
        if len(uniq) < 2:
            continue
        y = np.stack([values[known] == u for u in uniq], axis=1)
        out.append((name, rows[known], [f"{name}={u}" for u in uniq], y))
    return out


def _single_aucs(
    codes: sp.csr_matrix, slices: pd.DataFrame, rows: np.ndarray, pairs: list[tuple[str, int]]
) -> np.ndarray:
    """ROC-AUC of each (label name, feature) pair on ``rows`` (NaN where the label has one class there)."""
    out = np.full(len(pairs), np.nan)
    feats = sorted({f for _, f in pairs if f >= 0})
    if not feats:
        return out
    col_of = {f: j for j, f in enumerate(feats)}
    cols = sp.csc_matrix(codes[:, feats]).tocsr()  # only the chosen features, every row
    where: dict[str, list[int]] = {}
    for i, (name, feature) in enumerate(pairs):
        if feature >= 0:
            where.setdefault(name, []).append(i)
    for _, fam_rows, names, y in label_families(slices, rows):
        wanted = [(j, i) for j, name in enumerate(names) for i in where.get(name, [])]
        if not wanted:
            continue
        x = cols[fam_rows].toarray()
        for j, i in wanted:
            out[i] = roc_auc(y[:, j].astype(np.int8), x[:, col_of[pairs[i][1]]])
    return out


def ground_concepts(
    codes: sp.csr_matrix,
    slices: pd.DataFrame,
    split_rows: dict[str, np.ndarray],
    ids: dict[str, str],
    confound_labels: list[str],
    confound_min_auc: float,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Best feature per label (concepts) and features whose best label is an acquisition confound.

    The best feature of a label (and the best label of a feature) is selected on the train split;
    its ROC-AUC is reported on valid and test, because the maximum over thousands of features on
    the split that chose it is biased upwards. A confound must clear ``confound_min_auc`` on valid.
    """
    train = split_rows["train"]
    alive = np.diff(sp.csc_matrix(codes[train]).indptr) > 0
    concept_rows, label_names, label_family, aucs = [], [], [], []
    for family, fam_rows, names, y in label_families(slices, train):
        a = auc_matrix(codes[fam_rows], y)
        a[:, ~alive] = np.nan
        for j, name in enumerate(names):
            ok = np.isfinite(a[j])
            best = int(np.nanargmax(a[j])) if ok.any() else -1
            concept_rows.append(
                {
                    **ids,
                    "label": name,
                    "n_positive_train": int(y[:, j].sum()),
                    "best_feature": best,
                    "train_roc_auc": float(a[j, best]) if best >= 0 else np.nan,
                }
            )
        label_names += names
        label_family += [family] * len(names)
        aucs.append(a)
    concepts = pd.DataFrame(
        concept_rows, columns=[c for c in CONCEPT_COLUMNS if c not in REPORT_COLUMNS]
    )
    pairs = list(zip(concepts["label"], concepts["best_feature"].astype(int)))
    for split in ("valid", "test"):
        concepts[f"{split}_roc_auc"] = _single_aucs(codes, slices, split_rows[split], pairs)
    concepts["best_feature"] = (
        concepts["best_feature"].astype("Int64").where(concepts["best_feature"] >= 0)
    )
    concepts = concepts[CONCEPT_COLUMNS]
    if not aucs:
        return concepts, pd.DataFrame(columns=CONFOUND_COLUMNS)
    a = np.concatenate(aucs, axis=0)
    family = np.asarray(label_family)
    names = np.asarray(label_names, dtype=object)
    filled = np.where(np.isfinite(a), a, -np.inf)
    best_label = filled.argmax(axis=0)
    best_auc = filled.max(axis=0)
    is_struct = family == "structure"
    struct_auc = np.where(is_struct[:, None], filled, -np.inf)
    best_struct = struct_auc.argmax(axis=0)
    feats = np.flatnonzero(np.isin(family[best_label], confound_labels) & np.isfinite(best_auc))
    valid_auc = _single_aucs(
        codes, slices, split_rows["valid"], [(names[best_label[f]], int(f)) for f in feats]
    )
    keep = valid_auc >= confound_min_auc
    feats, valid_auc = feats[keep], valid_auc[keep]
    has_struct = np.isfinite(struct_auc[best_struct[feats], feats])
    s_valid = _single_aucs(
        codes, slices, split_rows["valid"], [(names[best_struct[f]], int(f)) for f in feats]
    )
    conf = pd.DataFrame(
        {
            **{k: [v] * len(feats) for k, v in ids.items()},
            "feature": feats,
            "label": names[best_label[feats]],
            "train_roc_auc": best_auc[feats],
            "valid_roc_auc": valid_auc,
            "best_structure": np.where(has_struct, names[best_struct[feats]], None),
            "best_structure_valid_roc_auc": np.where(has_struct, s_valid, np.nan),
        },
        columns=CONFOUND_COLUMNS,
    )
    return concepts, conf.sort_values("valid_roc_auc", ascending=False, kind="stable").reset_index(
        drop=True
    )


def weighted_auc(y01: np.ndarray, score: np.ndarray, w_BN: np.ndarray) -> np.ndarray:
    """ROC-AUC under each row of sample weights ``w_BN`` (ties count one half), batched."""
    uniq, inv = np.unique(score, return_inverse=True)
    onehot = sp.csr_matrix(
        (np.ones(len(score)), (np.arange(len(score)), inv)), shape=(len(score), len(uniq))
    )
    pos = np.asarray((w_BN * (y01 == 1)) @ onehot)
    neg = np.asarray((w_BN * (y01 == 0)) @ onehot)
    below = np.cumsum(neg, axis=1) - neg
    num = (pos * (below + 0.5 * neg)).sum(axis=1)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / den, np.nan)


def breakdown(
    test_scores: dict,
    slices: pd.DataFrame,
    volume: np.ndarray,
    by: list[str],
    n_boot: int,
    seed: int,
    ids: dict[str, str],
) -> pd.DataFrame:
    """Test ROC-AUC per group of each ``by`` column, with a 95% volume-clustered bootstrap interval."""
    rows = []
    for (task, target), (r, y01, score) in test_scores.items():
        for col in by:
            if col not in slices.columns:
                continue
            values = string_values(slices[col].iloc[r])
            for g in sorted({v for v in values if v is not None}):
                m = values == g
                yg, sg = y01[m], score[m]
                _, vol = np.unique(volume[r[m]], return_inverse=True)
                auc = weighted_auc(yg, sg, np.ones((1, len(yg))))[0]
                lo = hi = np.nan
                if n_boot and np.isfinite(auc):
                    rng = np.random.default_rng([seed, len(rows)])
                    n_vol = vol.max() + 1
                    counts = rng.multinomial(n_vol, np.full(n_vol, 1.0 / n_vol), size=n_boot)
                    boot = weighted_auc(yg, sg, counts[:, vol].astype(np.float64))
                    boot = boot[np.isfinite(boot)]
                    if len(boot):
                        lo, hi = np.percentile(boot, [2.5, 97.5])
                rows.append(
                    {
                        **ids,
                        "task": task,
                        "target": target,
                        "by": col,
                        "group": g,
                        "n": int(m.sum()),
                        "n_volumes": int(vol.max() + 1),
                        "roc_auc": auc,
                        "ci_low": lo,
                        "ci_high": hi,
                    }
                )
    return pd.DataFrame(rows, columns=BREAKDOWN_COLUMNS)
