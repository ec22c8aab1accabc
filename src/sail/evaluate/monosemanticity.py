"""Monosemanticity: do a feature's top-activating slices (one per volume) share their structures?

For each feature, the top-N slices are taken with at most one slice per volume (a volume is
(modality, image_id): CT and MRI reuse ids). Coherence C is the mean pairwise Jaccard index of the
slices' structure sets (two empty sets count 1), null is the same score for N random validation
slices drawn the same way (one from each of N random volumes; the published null drew N random
slices, which lets two slices of one volume raise it), specificity S = 1 - H(p)/ln(V) with p the
structure frequency distribution over the N slices and V the vocabulary size of the modalities
present, and M = max(0, C - null) * S.

Everything is vectorised: one segmented sort of the nonzeros finds all features' top volumes at
once (:func:`sail.evaluate.top_slices.top_volumes`, the rule autointerp and the report share),
and the Jaccard/entropy steps run as batched matrix products over feature chunks.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sail.evaluate.top_slices import top_volumes

FEATURE_COLUMNS = [
    "encoder",
    "variant",
    "sae_config",
    "split",
    "top_n",
    "feature",
    "dict_level",
    "n_volumes",
    "coherence",
    "null_coherence",
    "specificity",
    "monosemanticity",
]
CONFIG_COLUMNS = [
    "encoder",
    "variant",
    "sae_config",
    "m_config_top10",
    "m_config_top50",
    "n_scored_features",
    "n_dead_features",
]
_CHUNK_ELEMENTS = 1 << 24


def structure_matrix(
    slices: pd.DataFrame, vocabulary: dict[str, list[str]]
) -> tuple[np.ndarray, list[str], int]:
    """(rows x structures) bool matrix counting only each row's own modality vocabulary, the
    structure names, and V = size of the union vocabulary of the modalities present.

    A harmonised flag such as ``has_lung_left`` on CT (an OR of lobes) is not a CT structure, so
    it does not count twice; without a known vocabulary every ``has_`` column counts.
    """
    cols = [c[4:] for c in slices.columns if c.startswith("has_")]
    modality = (
        slices["modality"].astype(str).str.lower().to_numpy()
        if "modality" in slices.columns
        else None
    )
    known = modality is not None and set(np.unique(modality)) <= set(vocabulary)
    if known:
        present = sorted(set(np.unique(modality)))
        union = set().union(*(vocabulary[m] for m in present))
        names = [c for c in cols if c in union]
        o = np.zeros((len(slices), len(names)), dtype=bool)
        for j, s in enumerate(names):
            allowed = np.isin(modality, [m for m in present if s in vocabulary[m]])
            o[:, j] = slices[f"has_{s}"].fillna(False).to_numpy(dtype=bool) & allowed
        return o, names, len(union)
    o = (
        np.stack([slices[f"has_{c}"].fillna(False).to_numpy(dtype=bool) for c in cols], axis=1)
        if cols
        else np.zeros((len(slices), 0), bool)
    )
    return o, cols, len(cols)


def mean_pairwise_jaccard(sets_BNS: np.ndarray) -> np.ndarray:
    """Mean Jaccard index over the i<j pairs of each batch item's N sets (both empty -> 1)."""
    b, n, s = sets_BNS.shape
    out = np.empty(b, dtype=np.float64)
    step = max(1, _CHUNK_ELEMENTS // max(1, n * max(n, s)))
    for lo in range(0, b, step):
        a = sets_BNS[lo : lo + step].astype(np.float32)
        inter = a @ a.transpose(0, 2, 1)
        size = a.sum(axis=2)
        union = size[:, :, None] + size[:, None, :] - inter
        jac = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        out[lo : lo + step] = (jac.sum(axis=(1, 2), dtype=np.float64) - n) / (n * (n - 1))
    return out


def specificity(sets_BNS: np.ndarray, vocabulary_size: int) -> np.ndarray:
    """1 - entropy of the structure frequency over the N slices / ln(V); 0 when nothing occurs."""
    counts = sets_BNS.sum(axis=1, dtype=np.float64)
    total = counts.sum(axis=1, keepdims=True)
    p = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    s = 1.0 - h / np.log(vocabulary_size) if vocabulary_size > 1 else np.ones(len(p))
    return np.where(total[:, 0] > 0, s, 0.0)


def null_coherence(
    structures: np.ndarray, n: int, draws: int, seed: int, volume: np.ndarray
) -> tuple[float, float]:
    """Mean and std of the coherence of ``draws`` random sets of ``n`` slices, one slice from each
    of ``n`` distinct random volumes: drawn like a feature's top-N (one per volume), so two slices
    of one volume, which share most structures, cannot inflate the null."""
    rng = np.random.default_rng(seed)
    order = np.argsort(volume, kind="stable")
    vols, start, count = np.unique(volume[order], return_index=True, return_counts=True)
    n = min(n, len(vols))
    if n < 2:
        return float("nan"), float("nan")
    picks = np.stack([rng.choice(len(vols), size=n, replace=False) for _ in range(draws)])
    idx = order[start[picks] + np.floor(rng.random(picks.shape) * count[picks]).astype(np.int64)]
    c = mean_pairwise_jaccard(structures[idx])
    return float(c.mean()), float(c.std())


def score_features(
    codes: sp.csr_matrix,
    volume: np.ndarray,
    structures: np.ndarray,
    vocabulary_size: int,
    top_ns: list[int],
    nulls: dict[int, float],
    dict_sizes: list[int],
) -> pd.DataFrame:
    """One row per (N, feature) with at least N volumes; features active on every row are excluded
    (they rank nothing)."""
    n_rows, n_features = codes.shape
    top, n_vol = top_volumes(codes, volume, max(top_ns))
    always_on = np.diff(sp.csc_matrix(codes).indptr) >= n_rows
    level = np.searchsorted(np.asarray(dict_sizes), np.arange(n_features), side="right")
    frames = []
    for n in sorted(top_ns):
        feats = np.flatnonzero((n_vol >= n) & ~always_on)
        sets = structures[top[feats, :n]]
        c = mean_pairwise_jaccard(sets) if n > 1 else np.ones(len(feats))
        s = specificity(sets, vocabulary_size)
        frames.append(
            pd.DataFrame(
                {
                    "top_n": n,
                    "feature": feats,
                    "dict_level": level[feats],
                    "n_volumes": n_vol[feats],
                    "coherence": c,
                    "null_coherence": nulls[n],
                    "specificity": s,
                    "monosemanticity": np.maximum(0.0, c - nulls[n]) * s,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def config_scores(features: pd.DataFrame, n_dead: int) -> dict:
    """M_config as the mean M of the 10 and of the 50 best features, with M taken at the smallest
    scored N (N=10 with the default top_n [10, 50], as published)."""
    n = features["top_n"].min() if len(features) else 0
    m = np.sort(features.loc[features["top_n"] == n, "monosemanticity"].to_numpy())[::-1]
    return {
        "m_config_top10": float(m[:10].mean()) if len(m) else float("nan"),
        "m_config_top50": float(m[:50].mean()) if len(m) else float("nan"),
        "n_scored_features": int(len(m)),
        "n_dead_features": int(n_dead),
    }
