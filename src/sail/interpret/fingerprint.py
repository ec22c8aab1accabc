"""Sparse fingerprint retrieval: find other volumes' slices whose top-K SAE features agree.

A reference's fingerprint is its K largest activations (always-on features excluded; fewer than
K when the slice has fewer active features, never zero-padded). Every slice is scored by the
cosine between its values and the fingerprint's on those K features (one feature: the published
1/(1+|a - a_ref|)), then the best slice per other volume is kept. Baselines: the full dense
cosine and a dense fingerprint (the K largest-|value| embedding dimensions, signs kept). Keys
carry the plane (slice_id), so no two references collide and each gets its own dense baseline.
Tests against chance run over volumes (each volume's mean over its references), not references.
All references of a batch are scored with a few sparse/dense matrix products.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats

from sail.config import FingerprintSettings
from sail.interpret.data import SplitData
from sail.slice_ids import volume_ids

log = logging.getLogger(__name__)

CATEGORICAL = ("modality", "plane", "sex", "age_group")
METRICS = ("quality", *(f"p_{a}" for a in CATEGORICAL), "jaccard_structures")


def draw_references(n: int, cfg: FingerprintSettings) -> np.ndarray:
    """Seeded sample of reference rows, without replacement, sorted."""
    rng = np.random.default_rng(cfg.seed)
    return np.sort(rng.choice(n, size=min(cfg.n_references, n), replace=False))


def sparse_fingerprints(
    codes: sp.csr_matrix, rows: np.ndarray, k: int, exclude: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(feature ids, values) of the top-k active, non-excluded features of each row (desc, ties by
    id)."""
    out = []
    for r in rows:
        lo, hi = codes.indptr[r], codes.indptr[r + 1]
        idx, val = codes.indices[lo:hi], codes.data[lo:hi]
        keep = (val > 0) & ~exclude[idx]
        idx, val = idx[keep], val[keep]
        order = np.lexsort((idx, -val))[:k]
        out.append((idx[order], val[order]))
    return out


def dense_fingerprints(x_BD: np.ndarray, k: int) -> np.ndarray:
    """(B, D) matrix holding each row's k largest-|value| dimensions (signs kept), zeros
    elsewhere."""
    k = min(k, x_BD.shape[1])
    top = np.argsort(-np.abs(x_BD), axis=1, kind="stable")[:, :k]
    q = np.zeros_like(x_BD)
    np.put_along_axis(q, top, np.take_along_axis(x_BD, top, axis=1), axis=1)
    return q


def restricted_cosine(
    dot_NB: np.ndarray,
    sq_NB: np.ndarray,
    q_norm_B: np.ndarray,
    single_B: np.ndarray,
    q_single_B: np.ndarray,
) -> np.ndarray:
    """Cosine over each query's own support; one-feature queries use 1/(1+|a - a_ref|)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = dot_NB / (np.sqrt(sq_NB) * q_norm_B[None, :])
    cos = np.where(sq_NB > 0, cos, 0.0)
    if single_B.any():
        a_NB = dot_NB[:, single_B] / q_single_B[single_B][None, :]
        cos[:, single_B] = 1.0 / (1.0 + np.abs(a_NB - q_single_B[single_B][None, :]))
    cos[:, q_norm_B == 0] = np.nan
    return cos


SINGLE_FEATURE_RULE = "published_single_feature"


def similarity_rule(method: str, fp_size_B: np.ndarray) -> np.ndarray:
    """How each reference's similarities were computed: ``cosine`` over its fingerprint, or the
    published one-feature rule 1/(1+|a - a_ref|), under which a slice where the feature is
    inactive still scores 1/(1+a_ref) (labelled wherever the similarity is shown)."""
    single = (np.asarray(fp_size_B) == 1) & (method != "dense_full")
    return np.where(single, SINGLE_FEATURE_RULE, "cosine")


def best_per_volume(
    S_NB: np.ndarray, data: SplitData, own_vol_B: np.ndarray, top: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top ``top`` other volumes per column by their best slice: (rows (B, top), scores), -1
    padded."""
    S = np.where(np.isnan(S_NB), -np.inf, S_NB)
    vmax_VB = np.maximum.reduceat(S, data.vol_start, axis=0)
    vmax_VB[own_vol_B, np.arange(S.shape[1])] = -np.inf
    order_BV = np.argsort(-vmax_VB.T, axis=1, kind="stable")[:, :top]
    rows = np.full(order_BV.shape, -1, dtype=np.int64)
    scores = np.full(order_BV.shape, np.nan)
    for b in range(S.shape[1]):
        for t, v in enumerate(order_BV[b]):
            if not np.isfinite(vmax_VB[v, b]):
                break
            lo, hi = data.vol_start[v], data.vol_end[v]
            rows[b, t] = lo + int(np.argmax(S[lo:hi, b]))
            scores[b, t] = vmax_VB[v, b]
    return rows, scores


class _Meta:
    """Integer codes of the compared attributes, and per-volume shares for chance baselines."""

    def __init__(self, data: SplitData):
        self.codes: dict[str, np.ndarray] = {}
        self.vol_share: dict[str, np.ndarray] = {}
        self.vol_known: dict[str, np.ndarray] = {}
        for a in CATEGORICAL:
            col = data.meta[a].astype("string")
            codes, _ = pd.factorize(col, use_na_sentinel=True)
            self.codes[a] = codes
            n_cat = max(int(codes.max()) + 1, 1)
            onehot = np.zeros((data.n, n_cat), dtype=np.float64)
            known = codes >= 0
            onehot[np.flatnonzero(known), codes[known]] = 1.0
            self.vol_share[a] = (
                np.add.reduceat(onehot, data.vol_start, axis=0)
                / np.diff(np.r_[data.vol_start, data.n])[:, None]
            )
            self.vol_known[a] = np.add.reduceat(known.astype(float), data.vol_start) > 0
        self.H = data.H_NS.astype(np.float32)
        self.h_count = self.H.sum(1)


def _jaccard(H: np.ndarray, h_count: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inter = (H[a] * H[b]).sum(-1)
    union = h_count[a] + h_count[b] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def _agreement(meta: _Meta, ref_B: np.ndarray, hits_BT: np.ndarray) -> dict[str, np.ndarray]:
    """Per reference: share of hits agreeing on each attribute (NaN where unknown) + mean
    Jaccard."""
    valid = hits_BT >= 0
    safe = np.where(valid, hits_BT, 0)
    out = {}
    for a in CATEGORICAL:
        c = meta.codes[a]
        ref_c, hit_c = c[ref_B][:, None], c[safe]
        known = valid & (hit_c >= 0) & (ref_c >= 0)
        agree = (hit_c == ref_c) & known
        with np.errstate(invalid="ignore"):
            out[f"p_{a}"] = np.where(
                known.any(1), agree.sum(1) / np.maximum(known.sum(1), 1), np.nan
            )
    jac = _jaccard(meta.H, meta.h_count, np.broadcast_to(ref_B[:, None], safe.shape), safe)
    with np.errstate(invalid="ignore"):
        out["jaccard_structures"] = np.where(
            valid.any(1), (jac * valid).sum(1) / np.maximum(valid.sum(1), 1), np.nan
        )
    return out


def _chance(meta: _Meta, data: SplitData, ref_B: np.ndarray) -> dict[str, np.ndarray]:
    """Expected agreement of one random slice from a random other volume (the one-hit-per-volume
    draw)."""
    own = data.volume[ref_B]
    out = {}
    for a in CATEGORICAL:
        c = meta.codes[a][ref_B]
        share = meta.vol_share[a][:, np.maximum(c, 0)]  # (V, B)
        known = meta.vol_known[a][:, None].astype(float) * np.ones_like(share)
        share[own, np.arange(len(ref_B))] = 0.0
        known[own, np.arange(len(ref_B))] = 0.0
        out[f"p_{a}"] = np.where(c >= 0, share.sum(0) / np.maximum(known.sum(0), 1), np.nan)
    h_ref = meta.H[ref_B]  # (B, S)
    inter = meta.H @ h_ref.T  # (N, B)
    union = meta.h_count[:, None] + meta.h_count[ref_B][None, :] - inter
    jac = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    per_vol = (
        np.add.reduceat(jac, data.vol_start, axis=0)
        / np.diff(np.r_[data.vol_start, data.n])[:, None]
    )
    per_vol[own, np.arange(len(ref_B))] = np.nan
    out["jaccard_structures"] = np.nanmean(per_vol, axis=0)
    return out


def _fingerprint_rows(method: str, reference: str, features, values) -> pd.DataFrame:
    """One reference's fingerprint as rows: its features (or dimensions) in rank order."""
    return pd.DataFrame(
        {
            "method": method,
            "reference": reference,
            "rank": np.arange(1, len(features) + 1),
            "feature": features,
            "value": values,
        }
    )


def run_fingerprint_retrieval(
    data: SplitData, x_ND: np.ndarray, cfg: FingerprintSettings
) -> dict[str, pd.DataFrame]:
    """Per-reference metrics (long), hits and fingerprints at ``k_main``, and the summary."""
    x_ND = np.asarray(x_ND, dtype=np.float32)
    xn_ND = x_ND / np.maximum(np.linalg.norm(x_ND, axis=1, keepdims=True), 1e-12)
    refs = draw_references(data.n, cfg)
    exclude = data.always_on
    csr = data.codes
    sq_csr = csr.multiply(csr).tocsr()
    x2_ND = x_ND * x_ND
    meta = _Meta(data)
    ids = data.meta["slice_id"].to_numpy()
    k_values = sorted(set(cfg.k_values) | {cfg.k_main})
    rows, hit_rows, fp_rows = [], [], []

    def record(method, k, ref_B, hits_BT, sims_BT, fp_size_B, dense_cos_NB, chance):
        agree = _agreement(meta, ref_B, hits_BT)
        valid = hits_BT >= 0
        qual = np.where(
            valid, dense_cos_NB[np.where(valid, hits_BT, 0), np.arange(len(ref_B))[:, None]], np.nan
        )
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            frame = pd.DataFrame(
                {
                    "method": method,
                    "k": k,
                    "reference": ids[ref_B],
                    "fp_size": fp_size_B,
                    "similarity_rule": similarity_rule(method, fp_size_B),
                    "n_hits": valid.sum(1),
                    "quality_mean": np.nanmean(qual, 1),
                    "quality_std": np.nanstd(qual, 1, ddof=1) if qual.shape[1] > 1 else np.nan,
                    "quality_min": np.nanmin(qual, 1),
                    "quality_max": np.nanmax(qual, 1),
                    **agree,
                    **{f"chance_{m}": v for m, v in chance.items()},
                }
            )
        frame.loc[
            frame.n_hits == 0, ["quality_mean", "quality_std", "quality_min", "quality_max"]
        ] = np.nan
        rows.append(frame)
        if method == "dense_full" or k == cfg.k_main:
            b_idx, t_idx = np.nonzero(valid)
            h = hits_BT[b_idx, t_idx]
            hit_rows.append(
                pd.DataFrame(
                    {
                        "method": method,
                        "k": k,
                        "reference": ids[ref_B[b_idx]],
                        "rank": t_idx + 1,
                        "hit": ids[h],
                        "similarity": sims_BT[b_idx, t_idx],
                        "similarity_rule": similarity_rule(method, np.asarray(fp_size_B)[b_idx]),
                        "dense_cosine": qual[b_idx, t_idx],
                        **{a: data.meta[a].to_numpy()[h] for a in CATEGORICAL},
                    }
                )
            )

    for start in range(0, len(refs), cfg.batch_size):
        ref_B = refs[start : start + cfg.batch_size]
        B = len(ref_B)
        own = data.volume[ref_B]
        dense_cos_NB = xn_ND @ xn_ND[ref_B].T
        chance = _chance(meta, data, ref_B)
        hits, sims = best_per_volume(dense_cos_NB, data, own, cfg.top_hits)
        record(
            "dense_full", None, ref_B, hits, sims, np.full(B, x_ND.shape[1]), dense_cos_NB, chance
        )
        for k in k_values:
            fps = sparse_fingerprints(csr, ref_B, k, exclude)
            fp_size = np.array([len(f) for f, _ in fps])
            q = sp.csr_matrix(
                (
                    np.concatenate([v for _, v in fps]).astype(np.float64),
                    np.concatenate([f for f, _ in fps]),
                    np.r_[0, np.cumsum(fp_size)],
                ),
                shape=(B, csr.shape[1]),
            )
            mask = q.copy()
            mask.data[:] = 1.0
            dot = (csr @ q.T).toarray()
            sq = (sq_csr @ mask.T).toarray()
            q_norm = np.sqrt(q.multiply(q).sum(1)).A1
            q_single = np.asarray(q.sum(1)).ravel()
            S = restricted_cosine(dot, sq, q_norm, fp_size == 1, q_single)
            hits, sims = best_per_volume(S, data, own, cfg.top_hits)
            record("sparse", k, ref_B, hits, sims, fp_size, dense_cos_NB, chance)
            qd = dense_fingerprints(x_ND[ref_B], k)
            md = (qd != 0).astype(np.float32)
            fp_size_d = md.sum(1).astype(int)
            Sd = restricted_cosine(
                x_ND @ qd.T, x2_ND @ md.T, np.linalg.norm(qd, axis=1), fp_size_d == 1, qd.sum(1)
            )
            hits, sims = best_per_volume(Sd, data, own, cfg.top_hits)
            record("dense_fp", k, ref_B, hits, sims, fp_size_d, dense_cos_NB, chance)
            if k == cfg.k_main:
                for b, (f, v) in enumerate(fps):
                    dims = np.flatnonzero(md[b])
                    dims = dims[np.argsort(-np.abs(qd[b, dims]), kind="stable")]
                    fp_rows.append(_fingerprint_rows("sparse", ids[ref_B[b]], f, v))
                    fp_rows.append(_fingerprint_rows("dense_fp", ids[ref_B[b]], dims, qd[b, dims]))
    per_ref = pd.concat(rows, ignore_index=True)
    per_ref["k"] = per_ref["k"].astype("Int64")
    per_ref = _add_relative(per_ref)
    hits = pd.concat(hit_rows, ignore_index=True)
    hits["k"] = hits["k"].astype("Int64")
    return {
        "per_reference": per_ref,
        "hits": hits,
        "fingerprints": pd.concat(fp_rows, ignore_index=True)
        if fp_rows
        else pd.DataFrame(columns=["method", "reference", "rank", "feature", "value"]),
        "summary": summarise(per_ref),
        "always_on": pd.DataFrame({"feature": np.flatnonzero(exclude)}),
    }


def _add_relative(per_ref: pd.DataFrame) -> pd.DataFrame:
    """Per-reference ratios to the dense baselines (matched on the slice_id, not a collapsed
    key)."""
    full = per_ref[per_ref.method == "dense_full"].set_index("reference")["quality_mean"]
    dfp = per_ref[per_ref.method == "dense_fp"].set_index(["k", "reference"])["quality_mean"]
    per_ref["relative_to_dense_full"] = (
        per_ref["quality_mean"] / per_ref["reference"].map(full).to_numpy()
    )
    key = pd.MultiIndex.from_arrays([per_ref["k"], per_ref["reference"]])
    per_ref["relative_to_dense_fp"] = (
        per_ref["quality_mean"].to_numpy() / dfp.reindex(key).to_numpy()
    )
    return per_ref


# Up to this many nonzero differences the signed-rank p-value is exact (every sign pattern).
EXACT_SIGNED_RANK_MAX_N = 20


def _one_sided_p(diff: np.ndarray) -> float:
    """Wilcoxon signed-rank p-value for 'retrieval agrees more often than chance' (zeros dropped,
    tied |differences| share their average rank).

    Per-volume means tie often; scipy then falls back to a permutation test that costs ~0.4 s a
    call and, beyond 13 values, draws random resamples (a p-value that changes run to run). Up to
    ``EXACT_SIGNED_RANK_MAX_N`` values every sign pattern is enumerated here instead (exact,
    deterministic, vectorised); beyond, the normal approximation with tie correction.
    """
    d = diff[np.isfinite(diff)]
    d = d[d != 0]
    if len(d) == 0:
        return 1.0
    if len(d) > EXACT_SIGNED_RANK_MAX_N:
        return float(stats.wilcoxon(d, alternative="greater", method="approx").pvalue)
    ranks = stats.rankdata(np.abs(d))
    observed = ranks[d > 0].sum()
    n = len(d)
    at_least = 0
    for start in range(0, 1 << n, 1 << 16):  # sign patterns in blocks of 65,536
        patterns = np.arange(start, min(start + (1 << 16), 1 << n), dtype=np.int64)
        positive = (patterns[:, None] >> np.arange(n)) & 1
        at_least += int((positive @ ranks >= observed - 1e-9).sum())
    return at_least / float(1 << n)


def per_volume_mean(diff: np.ndarray, volume: np.ndarray) -> np.ndarray:
    """Mean of the finite values per volume (volumes with none are dropped)."""
    ok = np.isfinite(diff)
    codes, _ = pd.factorize(volume[ok])
    if not len(codes):
        return np.zeros(0)
    return np.bincount(codes, weights=diff[ok]) / np.bincount(codes)


def summarise(per_ref: pd.DataFrame) -> pd.DataFrame:
    """Mean (std ddof=1) of every metric per method and K over references, with its chance mean and
    a one-sided p over volumes.

    References drawn from one volume are not independent (they share patient, scanner and the
    volume's other slices), so the Wilcoxon test runs on each volume's mean of metric - chance;
    ``n_volumes`` is its sample size, ``n`` the number of references behind the means.
    """
    out = []
    volume = pd.Series(volume_ids(per_ref["reference"]), index=per_ref.index)
    for (method, k), g in per_ref.groupby(["method", per_ref["k"].fillna(-1)], sort=True):
        vol = volume.loc[g.index].to_numpy()
        n_single = (
            int((g["similarity_rule"] == SINGLE_FEATURE_RULE).sum())
            if "similarity_rule" in g
            else 0
        )
        for m in (*METRICS, "relative_to_dense_full", "relative_to_dense_fp"):
            col = f"{m}_mean" if m == "quality" else m
            vals = g[col].to_numpy(dtype=float)
            chance_col = f"chance_{m}"
            chance = g[chance_col].to_numpy(dtype=float) if chance_col in g else None
            per_vol = per_volume_mean(vals - chance, vol) if chance is not None else np.zeros(0)
            out.append(
                {
                    "method": method,
                    "k": pd.NA if k == -1 else int(k),
                    "metric": m,
                    "mean": np.nanmean(vals) if np.isfinite(vals).any() else np.nan,
                    "std": np.nanstd(vals, ddof=1) if np.isfinite(vals).sum() > 1 else np.nan,
                    "n": int(np.isfinite(vals).sum()),
                    "n_volumes": int(len(np.unique(vol[np.isfinite(vals)]))),
                    "chance_mean": np.nanmean(chance)
                    if chance is not None and np.isfinite(chance).any()
                    else np.nan,
                    "p_vs_chance": _one_sided_p(per_vol) if chance is not None else np.nan,
                    "n_single_feature": n_single,
                }
            )
    return pd.DataFrame(out)


def plot_k_sweep(summary: pd.DataFrame, path, title: str) -> None:
    """Quality and metadata agreement against K, sparse vs dense fingerprint, dense full as a
    line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["quality", "p_modality", "p_plane", "jaccard_structures"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, metric in zip(axes, panels, strict=False):
        s = summary[summary.metric == metric]
        for method, color in (("sparse", "darkorange"), ("dense_fp", "steelblue")):
            d = s[s.method == method].sort_values("k")
            ax.errorbar(
                d.k.astype(float),
                d["mean"],
                yerr=d["std"],
                marker="o",
                ms=3,
                capsize=2,
                color=color,
                label=method,
            )
        full = s[s.method == "dense_full"]
        if len(full):
            ax.axhline(float(full["mean"].iloc[0]), color="k", ls="--", lw=1, label="dense_full")
        chance = s[s.method == "sparse"]["chance_mean"].dropna()
        if len(chance):
            ax.axhline(float(chance.mean()), color="grey", ls=":", lw=1, label="chance")
        ax.set_xscale("log")
        ax.set_xlabel("K")
        ax.set_title(metric)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
