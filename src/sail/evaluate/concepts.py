"""Concept grounding (beyond the paper): which label does each feature track, and how well?

Every feature is scored by ROC-AUC against every ``has_<structure>`` flag and every metadata value
(``modality=ct``, ``institute=B``...) on the train split, where the best feature per label is
chosen; that feature's ROC-AUC is then reported on valid and test. The AUCs of all features against
all labels come from one rank transform of the sparse codes and two sparse-dense products (no loop
over features): with r the tie-averaged ranks, AUC = (sum of positive ranks - P(P+1)/2) / (P N),
where the implicit zeros of a column share one average rank. Metadata labels are scored on rows
where that column is known; a null structure flag counts as absent.

Every concept row stands beside three controls, each with the same selection on train and
report on valid/test: the best single *raw embedding dimension* of the same encoder (either sign),
a *shuffled-label null* (labels permuted between whole volumes within each split, because slices
of one volume are not independent), and, where the workspace has one, the *random-init control
encoder's* figure (``random-<encoder>``, its own rank-1 SAE config).

Also here: test-split metrics per institute / modality / plane with volume-clustered bootstrap
intervals (resampling whole volumes, because slices of one volume are not independent).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.stats import rankdata

from sail.evaluate.probes import age_groups, kvp_values, roc_auc, string_values

REPORT_COLUMNS = ["valid_roc_auc", "test_roc_auc"]
NULL_COLUMNS = ["null_valid_roc_auc", "null_test_roc_auc"]
# per (encoder, label), from the dense unit
RAW_COLUMNS = [
    "raw_dimension",
    "raw_sign",
    "raw_train_roc_auc",
    "raw_valid_roc_auc",
    "raw_test_roc_auc",
]
# per (encoder, label), from the control encoder's rank-1 SAE config (added when the tables merge)
CONTROL_COLUMNS = [
    "control_encoder",
    "control_sae_config",
    "control_best_feature",
    "control_test_roc_auc",
]
UNIT_CONCEPT_COLUMNS = [
    "encoder",
    "variant",
    "sae_config",
    "label",
    "n_positive_train",
    "best_feature",
    "train_roc_auc",
    *REPORT_COLUMNS,
    *NULL_COLUMNS,
]
CONCEPT_COLUMNS = [*UNIT_CONCEPT_COLUMNS, *RAW_COLUMNS, *CONTROL_COLUMNS]
CONTROL_PREFIX = "random-"
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
    """(family, rows where known, label names, 0/1 matrix): structures and each metadata column."""
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
    """ROC-AUC of each (label name, feature) pair on ``rows`` (NaN where a label has one class)."""
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


def _select_features(
    codes: sp.csr_matrix, slices: pd.DataFrame, train: np.ndarray
) -> tuple[list[dict], list[str], list[str], list[np.ndarray]]:
    """Best live feature per label on ``train`` rows: (rows, label names, families, AUC blocks)."""
    alive = np.diff(sp.csc_matrix(codes[train]).indptr) > 0
    rows, label_names, label_family, aucs = [], [], [], []
    for family, fam_rows, names, y in label_families(slices, train):
        a = auc_matrix(codes[fam_rows], y)
        a[:, ~alive] = np.nan
        for j, name in enumerate(names):
            ok = np.isfinite(a[j])
            best = int(np.nanargmax(a[j])) if ok.any() else -1
            rows.append(
                {
                    "label": name,
                    "n_positive_train": int(y[:, j].sum()),
                    "best_feature": best,
                    "train_roc_auc": float(a[j, best]) if best >= 0 else np.nan,
                }
            )
        label_names += names
        label_family += [family] * len(names)
        aucs.append(a)
    return rows, label_names, label_family, aucs


def volume_permutation(
    volume: np.ndarray, split_rows: dict[str, np.ndarray], seed: int
) -> np.ndarray:
    """Source row of each row's labels under a shuffled-label null that permutes whole volumes.

    Within each split the volumes are permuted; the slices of a volume take, in order, the labels
    of the volume it is mapped to (stretched to its length), circularly shifted by a random offset.
    Each volume keeps a realistic run of labels (slices of one volume are not independent) while
    the link between a slice's image and its labels, position included, is broken.
    """
    src = np.arange(len(volume))
    rng = np.random.default_rng([seed, 15])
    for split in sorted(split_rows):
        rows = np.sort(split_rows[split])
        if not len(rows):
            continue
        _, inv, counts = np.unique(volume[rows], return_inverse=True, return_counts=True)
        order = np.argsort(inv, kind="stable")
        starts = np.r_[0, np.cumsum(counts)[:-1]]
        pos = np.empty(len(rows))
        pos[order] = np.arange(len(rows)) - np.repeat(starts, counts)
        target = rng.permutation(len(counts))[inv]
        shift = rng.integers(0, np.iinfo(np.int32).max, len(counts))[target]
        stretched = np.rint(pos / np.maximum(counts[inv] - 1, 1) * (counts[target] - 1))
        target_pos = (stretched.astype(np.int64) + shift) % counts[target]
        src[rows] = rows[order[starts[target] + target_pos]]
    return src


def _null_aucs(
    codes: sp.csr_matrix,
    slices: pd.DataFrame,
    split_rows: dict[str, np.ndarray],
    volume: np.ndarray,
    seed: int,
) -> dict[str, dict[str, float]]:
    """Valid/test ROC-AUC per label of the best train feature under volume-shuffled labels."""
    shuffled = slices.iloc[volume_permutation(volume, split_rows, seed)].reset_index(drop=True)
    rows, *_ = _select_features(codes, shuffled, split_rows["train"])
    pairs = [(r["label"], r["best_feature"]) for r in rows]
    out: dict[str, dict[str, float]] = {r["label"]: {} for r in rows}
    for split in ("valid", "test"):
        for (label, _), auc in zip(
            pairs, _single_aucs(codes, shuffled, split_rows[split], pairs), strict=True
        ):
            out[label][f"null_{split}_roc_auc"] = float(auc)
    return out


def ground_concepts(
    codes: sp.csr_matrix,
    slices: pd.DataFrame,
    split_rows: dict[str, np.ndarray],
    ids: dict[str, str],
    confound_labels: list[str],
    confound_min_auc: float,
    volume: np.ndarray | None = None,
    seed: int = 42,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Best feature per label (concepts) and features whose best label is an acquisition confound.

    The best feature of a label (and the best label of a feature) is selected on the train split;
    its ROC-AUC is reported on valid and test, because the maximum over thousands of features on
    the split that chose it is biased upwards. A confound must clear ``confound_min_auc`` on valid.
    With ``volume`` (volume code per row) the same procedure on volume-shuffled labels fills the
    null columns.
    """
    concept_rows, label_names, label_family, aucs = _select_features(
        codes, slices, split_rows["train"]
    )
    concepts = pd.DataFrame(
        [{**ids, **r} for r in concept_rows],
        columns=[c for c in UNIT_CONCEPT_COLUMNS if c not in REPORT_COLUMNS + NULL_COLUMNS],
    )
    pairs = list(zip(concepts["label"], concepts["best_feature"].astype(int), strict=True))
    for split in ("valid", "test"):
        concepts[f"{split}_roc_auc"] = _single_aucs(codes, slices, split_rows[split], pairs)
    null = _null_aucs(codes, slices, split_rows, volume, seed) if volume is not None else {}
    for col in NULL_COLUMNS:
        concepts[col] = [null.get(label, {}).get(col, np.nan) for label in concepts["label"]]
    concepts["best_feature"] = (
        concepts["best_feature"].astype("Int64").where(concepts["best_feature"] >= 0)
    )
    concepts = concepts[UNIT_CONCEPT_COLUMNS]
    if not aucs:
        return concepts, pd.DataFrame(columns=CONFOUND_COLUMNS)
    return concepts, _confounds(
        codes,
        slices,
        split_rows,
        ids,
        (label_names, label_family, aucs),
        confound_labels,
        confound_min_auc,
    )


def _confounds(
    codes: sp.csr_matrix,
    slices: pd.DataFrame,
    split_rows: dict[str, np.ndarray],
    ids: dict[str, str],
    selection: tuple[list[str], list[str], list[np.ndarray]],
    confound_labels: list[str],
    confound_min_auc: float,
) -> pd.DataFrame:
    """Features whose best train label is an acquisition confound that holds on valid."""
    label_names, label_family, aucs = selection
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
    return conf.sort_values("valid_roc_auc", ascending=False, kind="stable").reset_index(drop=True)


def dense_auc_matrix(x_NF: np.ndarray, labels_NL: np.ndarray) -> np.ndarray:
    """(L, F) ROC-AUC of every dense column against every 0/1 label (NaN if a class is absent)."""
    ranks = rankdata(x_NF, axis=0)
    y = labels_NL.astype(np.float64)
    p = y.sum(0)[:, None]
    q = len(y) - p
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (y.T @ ranks - p * (p + 1) / 2) / (p * q)
    auc[((p == 0) | (q == 0))[:, 0]] = np.nan
    return auc


def raw_dimension_concepts(
    x_ND: np.ndarray, slices: pd.DataFrame, split_rows: dict[str, np.ndarray], encoder: str
) -> pd.DataFrame:
    """The raw-dimension control: per label, the single embedding dimension (either sign) with the
    best train ROC-AUC, reported on valid and test (the same protocol as the SAE features)."""
    rows = []
    for _, fam_rows, names, y in label_families(slices, split_rows["train"]):
        a = dense_auc_matrix(x_ND[fam_rows], y)
        strength = np.where(np.isfinite(a), np.abs(a - 0.5), -np.inf)
        for j, name in enumerate(names):
            best = int(strength[j].argmax())
            ok = np.isfinite(a[j, best])
            sign = 1 if not ok or a[j, best] >= 0.5 else -1
            rows.append(
                {
                    "encoder": encoder,
                    "label": name,
                    "raw_dimension": best if ok else -1,
                    "raw_sign": sign,
                    "raw_train_roc_auc": 0.5 + float(strength[j, best]) if ok else np.nan,
                }
            )
    table = pd.DataFrame(rows, columns=["encoder", "label", *RAW_COLUMNS[:3]])
    for split in ("valid", "test"):
        lookup = {  # label -> (rows where known, 0/1) on this split
            name: (fam_rows, y[:, j])
            for _, fam_rows, names, y in label_families(slices, split_rows[split])
            for j, name in enumerate(names)
        }
        table[f"raw_{split}_roc_auc"] = [
            roc_auc(
                lookup[r.label][1].astype(np.int8),
                r.raw_sign * x_ND[lookup[r.label][0], r.raw_dimension],
            )
            if r.label in lookup and r.raw_dimension >= 0
            else np.nan
            for r in table.itertuples()
        ]
    table["raw_dimension"] = (
        table["raw_dimension"].astype("Int64").where(table["raw_dimension"] >= 0)
    )
    return table[["encoder", "label", *RAW_COLUMNS]]


def chosen_configs(ranking: pd.DataFrame, variants: list[str]) -> dict[str, tuple[str, str]]:
    """Per encoder, the (variant, config) the ranking puts first (chosen on valid); rank ties go to
    the earlier of ``variants`` (the config's variant order), then to the config name."""
    if ranking.empty:
        return {}
    order = {v: i for i, v in enumerate(variants)}
    r = ranking.assign(_v=ranking["variant"].map(order).fillna(len(order)))
    r = r.sort_values(["encoder", "final_rank", "_v", "sae_config"], kind="stable")
    first = r.groupby("encoder", sort=False).head(1)
    return {row.encoder: (row.variant, str(row.sae_config)) for row in first.itertuples()}


def attach_controls(
    concepts: pd.DataFrame, raw: pd.DataFrame, chosen: dict[str, tuple[str, str]]
) -> pd.DataFrame:
    """concepts.csv: each unit's rows with its encoder's raw-dimension control and, for an encoder
    ``E`` whose ``random-E`` control was evaluated, that control's rank-1 config figures."""
    if concepts.empty:
        return pd.DataFrame(columns=CONCEPT_COLUMNS)
    out = concepts.merge(raw, on=["encoder", "label"], how="left") if len(raw) else concepts
    for col in RAW_COLUMNS:
        if col not in out.columns:
            out[col] = np.nan
    controls = []
    for encoder in out["encoder"].unique():
        control = CONTROL_PREFIX + str(encoder)
        if control not in chosen:
            continue
        variant, config = chosen[control]
        c = concepts[
            (concepts.encoder == control)
            & (concepts.variant == variant)
            & (concepts.sae_config == config)
        ]
        controls.append(
            pd.DataFrame(
                {
                    "encoder": encoder,
                    "label": c["label"].to_numpy(),
                    "control_encoder": control,
                    "control_sae_config": f"{variant}/{config}",
                    "control_best_feature": c["best_feature"].to_numpy(),
                    "control_test_roc_auc": c["test_roc_auc"].to_numpy(),
                }
            )
        )
    if controls:
        out = out.merge(pd.concat(controls), on=["encoder", "label"], how="left")
    for col in CONTROL_COLUMNS:
        if col not in out.columns:
            out[col] = np.nan
    return out[CONCEPT_COLUMNS]


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
    """Test ROC-AUC per group of each ``by`` column, with a 95% volume-clustered bootstrap CI."""
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
