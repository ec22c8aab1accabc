from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from sail.config import SailConfig
from sail.interpret.data import load_split, read_slices, select_targets
from sail.interpret.fingerprint import (
    best_per_volume,
    dense_fingerprints,
    restricted_cosine,
    sparse_fingerprints,
)
from sail.interpret.stage import run_fingerprint


def test_sparse_fingerprint_excludes_always_on_and_never_pads():
    codes = sp.csr_matrix(np.array([[0.9, 0.5, 0.0, 0.7], [0.2, 0.0, 0.0, 0.0]], np.float32))
    fps = sparse_fingerprints(
        codes, np.array([0, 1]), k=3, exclude=np.array([True, False, False, False])
    )
    assert fps[0][0].tolist() == [3, 1] and np.allclose(fps[0][1], [0.7, 0.5])
    assert len(fps[1][0]) == 0  # only an always-on feature: empty fingerprint, not zero-padded


def test_restricted_cosine_by_hand():
    # query on features (0, 1) = (3, 4); slice a = (3, 4) -> 1; slice b = (4, -3) -> 0; slice c = 0
    # -> 0
    X = np.array([[3, 4], [4, -3], [0, 0]], float)
    q = np.array([3, 4.0])
    cos = restricted_cosine(
        (X @ q)[:, None],
        (X**2).sum(1)[:, None],
        np.array([5.0]),
        np.array([False]),
        np.array([7.0]),
    )
    assert np.allclose(cos[:, 0], [1, 0, 0])
    # one feature: 1 / (1 + |a - a_ref|)
    one = restricted_cosine(
        (X[:, :1] * 3), X[:, :1] ** 2, np.array([3.0]), np.array([True]), np.array([3.0])
    )
    assert np.allclose(one[:, 0], [1, 1 / 2, 1 / 4])


def test_dense_fingerprint_keeps_signs():
    q = dense_fingerprints(np.array([[0.1, -0.9, 0.5, 0.0]], np.float32), 2)
    assert q.tolist() == [[0, pytest.approx(-0.9), 0.5, 0]]


def test_one_hit_per_volume_and_own_volume_excluded(toy_ws):
    cfg = SailConfig(workspace=toy_ws.root)
    t = select_targets(cfg, toy_ws)[0]
    data = load_split(toy_ws, t, "valid", read_slices(toy_ws))
    rng = np.random.default_rng(0)
    S = rng.random((data.n, 2))
    own = data.volume[[0, 5]]
    rows, scores = best_per_volume(S, data, own, top=4)
    for b in range(2):
        vols = data.volume[rows[b]]
        assert len(set(vols)) == 4 and own[b] not in vols
        assert np.allclose(scores[b], S[rows[b], b])
        assert np.all(np.diff(scores[b]) <= 0)


def test_fingerprint_beats_chance_on_toy_workspace(toy_ws):
    cfg = SailConfig(
        workspace=toy_ws.root,
        interpret={"fingerprint": {"split": "test", "n_references": 250, "k_values": [1, 5, 20]}},
    )
    run_fingerprint(cfg, toy_ws)
    out = toy_ws.interpret_dir / "fingerprint" / "toyenc" / "matryoshka" / "D_16_64_K_4_8"
    summary = pd.read_csv(out / "summary.csv")
    per_ref = pd.read_csv(out / "per_reference.csv")
    sparse5 = summary[(summary.method == "sparse") & (summary.k == 5)].set_index("metric")
    assert sparse5.loc["p_modality", "n"] >= 200
    for m in ("p_modality", "p_plane", "jaccard_structures"):
        assert sparse5.loc[m, "mean"] > sparse5.loc[m, "chance_mean"]
        assert sparse5.loc[m, "p_vs_chance"] < 0.01
    for m in ("p_sex", "p_age_group"):  # reported, whatever they are
        assert np.isfinite(sparse5.loc[m, "mean"]) and np.isfinite(sparse5.loc[m, "chance_mean"])
    # keys carry the plane: every reference is its own row, so the dense baseline is per reference
    full = per_ref[per_ref.method == "dense_full"]
    assert full.reference.is_unique and len(full) == 250
    # dense full is optimal for its own metric: no ratio above 1
    assert (per_ref[per_ref.method == "sparse"].relative_to_dense_full <= 1 + 1e-6).all()
    hits = pd.read_csv(out / "hits.csv")
    vol = hits.hit.str.rsplit("/", n=2).str[0]
    assert (
        not vol.groupby([hits.method, hits.k.fillna(-1), hits.reference])
        .apply(lambda v: v.duplicated().any())
        .any()
    )
    assert (out / "k_sweep.png").stat().st_size > 1000
    # a rerun with the same inputs is skipped
    before = (out / "summary.csv").stat().st_mtime_ns
    run_fingerprint(cfg, toy_ws)
    assert (out / "summary.csv").stat().st_mtime_ns == before


def test_p_vs_chance_counts_volumes_not_references():
    """Issue 12 item 11: 40 references from 2 volumes are 2 independent units, not 40: the one-sided
    Wilcoxon runs on per-volume means (with n = 2 its smallest p is 0.25)."""
    from sail.interpret.fingerprint import METRICS, summarise

    rng = np.random.default_rng(0)
    refs = [f"ct/s{v:03d}/axial/{i:04d}" for v in (1, 2) for i in range(20)]
    per_ref = pd.DataFrame(
        {"method": "sparse", "k": 5, "reference": refs, "fp_size": 5, "similarity_rule": "cosine"}
    )
    for m in (*METRICS, "relative_to_dense_full", "relative_to_dense_fp"):
        per_ref[f"{m}_mean" if m == "quality" else m] = 0.8 + rng.normal(0, 0.01, len(refs))
        per_ref[f"chance_{m}"] = 0.5
    summary = summarise(per_ref).set_index("metric")
    assert summary.loc["p_modality", "n"] == 40
    assert summary.loc["p_modality", "p_vs_chance"] >= 0.25
    assert summary.loc["p_modality", "n_volumes"] == 2
    # twenty volumes, one reference each: the same effect is significant
    per_ref["reference"] = [f"ct/s{v:03d}/axial/0000" for v in range(40)]
    assert summarise(per_ref).set_index("metric").loc["p_modality", "p_vs_chance"] < 1e-6


def test_single_feature_similarity_is_labelled(toy_ws):
    """Issue 12 item 11: K = 1 uses the published 1/(1+|a - a_ref|) rule (an inactive slice scores
    1/(1+a_ref)); per_reference.csv, hits.csv and the summary say so."""
    fp = {"n_references": 30, "k_values": [1, 5], "k_main": 1}
    cfg = SailConfig(workspace=toy_ws.root, interpret={"fingerprint": fp})
    run_fingerprint(cfg, toy_ws)
    out = toy_ws.interpret_dir / "fingerprint" / "toyenc" / "matryoshka" / "D_16_64_K_4_8"
    per_ref, hits = pd.read_csv(out / "per_reference.csv"), pd.read_csv(out / "hits.csv")
    summary = pd.read_csv(out / "summary.csv")
    one = per_ref[(per_ref.method == "sparse") & (per_ref.fp_size == 1)]
    assert len(one) and (one.similarity_rule == "published_single_feature").all()
    assert (per_ref[per_ref.fp_size > 1].similarity_rule == "cosine").all()
    assert (
        hits[(hits.method == "sparse") & (hits.k == 1)].similarity_rule
        == "published_single_feature"
    ).all()
    s1 = summary[(summary.method == "sparse") & (summary.k == 1)]
    assert (s1.n_single_feature == len(one)).all()


def test_signed_rank_p_is_scipys_exact_test_and_deterministic_beyond_it():
    """Per-volume means tie; the p-value must equal scipy's exact permutation test where scipy
    enumerates (<= 13 values) and stay exact and deterministic beyond, where scipy would draw
    random resamples."""
    from scipy import stats

    from sail.interpret.fingerprint import _one_sided_p

    rng = np.random.default_rng(1)
    for _ in range(25):
        d = np.round(rng.normal(0.05, 0.2, int(rng.integers(1, 14))), 1)  # ties and zeros
        nonzero = d[d != 0]
        expected = stats.wilcoxon(nonzero, alternative="greater").pvalue if len(nonzero) else 1.0
        assert _one_sided_p(d) == pytest.approx(expected, abs=1e-12)
    d = np.round(rng.normal(0.1, 0.2, 18), 1)
    assert _one_sided_p(d) == _one_sided_p(d.copy())
    assert _one_sided_p(np.ones(18)) == pytest.approx(2.0**-18)
