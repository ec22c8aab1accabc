import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from sail.data.labels import VOCABULARY
from sail.evaluate import monosemanticity as mono
from sail.evaluate.inputs import _make_eval_data


def test_hand_computed_coherence_specificity_monosemanticity():
    # Structure sets {a,b}, {a}, {a,b} over a vocabulary of 4.
    sets = np.array([[[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0]]], dtype=bool)
    c = mono.mean_pairwise_jaccard(sets)[0]
    assert c == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    s = mono.specificity(sets, vocabulary_size=4)[0]
    h = -(0.6 * math.log(0.6) + 0.4 * math.log(0.4))
    assert s == pytest.approx(1 - h / math.log(4))
    codes = sp.csr_matrix(np.array([[3.0], [2.0], [1.0], [0.0]]))  # a fourth, inactive slice
    structures = np.vstack([sets[0], np.ones((1, 4), dtype=bool)])
    feats = mono.score_features(codes, np.arange(4), structures, 4, [3], {3: 0.2}, [1])
    row = feats.iloc[0]
    assert row["coherence"] == pytest.approx(2 / 3)
    assert row["specificity"] == pytest.approx(1 - h / math.log(4))
    assert row["monosemanticity"] == pytest.approx((2 / 3 - 0.2) * (1 - h / math.log(4)))


def test_empty_sets_count_as_identical_and_no_structure_gives_zero_specificity():
    sets = np.zeros((1, 3, 5), dtype=bool)
    assert mono.mean_pairwise_jaccard(sets)[0] == 1.0
    assert mono.specificity(sets, 5)[0] == 0.0
    # Negative margin over the null is clipped to zero.
    codes = sp.csr_matrix(np.array([[3.0], [2.0], [1.0], [0.0]]))
    one_hot = np.eye(4, dtype=bool)
    feats = mono.score_features(codes, np.arange(4), one_hot, 4, [3], {3: 0.5}, [1])
    assert feats["coherence"].iloc[0] == 0.0 and feats["monosemanticity"].iloc[0] == 0.0


def test_null_baseline_hand_cases():
    own = np.arange(1000)  # every slice its own volume
    same = np.ones((50, 4), dtype=bool)
    assert mono.null_coherence(same, 5, draws=10, seed=0, volume=own[:50]) == (1.0, 0.0)
    disjoint = np.eye(50, dtype=bool)
    mean, std = mono.null_coherence(disjoint, 5, draws=10, seed=0, volume=own[:50])
    assert mean == 0.0 and std == 0.0
    # Half the rows hold {a}, half {b}: a random pair matches with probability ~ (k-1)/(2k-1).
    half = np.zeros((1000, 2), dtype=bool)
    half[:500, 0] = half[500:, 1] = True
    mean, _ = mono.null_coherence(half, 10, draws=400, seed=1, volume=own)
    assert mean == pytest.approx(499 / 999, abs=0.03)
    assert mono.null_coherence(half, 10, 20, 3, own) == mono.null_coherence(half, 10, 20, 3, own)


def test_null_draws_one_slice_per_volume_like_the_top_n():
    """Review of issue 12: the feature's top-N holds one slice per volume, so the null must too;
    with random slices, two slices of one volume (identical structures here) raised the null."""
    volume = np.repeat(np.arange(12), 50)
    structures = np.eye(12, dtype=bool)[
        volume
    ]  # every volume its own structure, all its slices alike
    mean, std = mono.null_coherence(structures, 10, draws=200, seed=0, volume=volume)
    assert (mean, std) == (0.0, 0.0)
    # fewer volumes than N: N shrinks to the number of volumes
    assert mono.null_coherence(structures[:100], 10, draws=5, seed=0, volume=volume[:100]) == (
        0.0,
        0.0,
    )


def _naive_top_volumes(codes, volume, n_max):
    dense = codes.toarray()
    tops, counts = [], []
    for f in range(dense.shape[1]):
        col = dense[:, f]
        order = sorted(np.flatnonzero(col > 0), key=lambda r: (-col[r], r))
        seen, rows = set(), []
        for r in order:
            if volume[r] not in seen:
                seen.add(volume[r])
                rows.append(r)
        counts.append(len(rows))
        tops.append((rows + [-1] * n_max)[:n_max])
    return np.array(tops), np.array(counts)


def test_vectorised_top_volumes_matches_a_naive_walk():
    rng = np.random.default_rng(0)
    dense = (rng.random((300, 40)) < 0.2) * rng.integers(1, 6, size=(300, 40)).astype(
        float
    )  # many ties
    dense[:, 5] = 0  # dead feature
    volume = rng.integers(0, 25, size=300)
    top, n_vol = mono.top_volumes(sp.csr_matrix(dense), volume, 7)
    ref_top, ref_n = _naive_top_volumes(sp.csr_matrix(dense), volume, 7)
    np.testing.assert_array_equal(n_vol, ref_n)
    np.testing.assert_array_equal(top, ref_top)


def test_volumes_are_keyed_by_modality_and_image_id():
    """Published bug #11: CT s0001 and MRI s0001 were treated as one image."""
    slices = pd.DataFrame(
        {
            "slice_id": ["ct/s0001/axial/0000", "ct/s0001/axial/0001", "mri/s0001/axial/0000"],
            "modality": ["ct", "ct", "mri"],
            "image_id": ["s0001"] * 3,
            "split": ["valid"] * 3,
        }
    )
    data = _make_eval_data(slices)
    assert len(set(data.volume)) == 2
    codes = sp.csr_matrix(np.array([[3.0], [2.0], [1.0]]))
    top, n_vol = mono.top_volumes(codes, data.volume, 3)
    assert n_vol[0] == 2
    assert list(top[0]) == [0, 2, -1]  # the second CT slice is the same volume; the MRI one is not


def test_features_with_too_few_volumes_or_always_on_are_excluded():
    codes = sp.csr_matrix(
        np.array([[1.0, 1.0, 0.0], [2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [0.0, 1.0, 0.0]])
    )
    sets = np.eye(4, dtype=bool)
    feats = mono.score_features(codes, np.arange(4), sets, 4, [2, 3], {2: 0.0, 3: 0.0}, [2, 3])
    assert set(feats.loc[feats.top_n == 2, "feature"]) == {
        0
    }  # feature 1 is always on, 2 has 1 volume
    assert feats.loc[feats.top_n == 3].empty
    assert feats["dict_level"].iloc[0] == 0


def test_structure_matrix_counts_each_modality_vocabulary_only():
    slices = pd.DataFrame(
        {
            "modality": ["ct", "mri"],
            "has_lung_left": [True, True],
            "has_lung_upper_lobe_left": [True, False],
            "has_liver": [True, True],
        }
    )
    o, names, v = mono.structure_matrix(slices, VOCABULARY)
    assert v == len(set(VOCABULARY["ct"]) | set(VOCABULARY["mri"])) == 121
    got = {n: list(o[:, i]) for i, n in enumerate(names)}
    assert got["lung_left"] == [False, True]  # CT's harmonised flag would double-count the lobe
    assert got["lung_upper_lobe_left"] == [True, False]
    assert got["liver"] == [True, True]


def test_config_scores_top10_and_top50_means():
    m = np.linspace(1.0, 0.01, 100)
    feats = pd.DataFrame({"top_n": 10, "monosemanticity": m[::-1]})
    out = mono.config_scores(feats, n_dead=7)
    assert out["m_config_top10"] == pytest.approx(m[:10].mean())
    assert out["m_config_top50"] == pytest.approx(m[:50].mean())
    assert out["n_scored_features"] == 100 and out["n_dead_features"] == 7


def test_one_feature_top_slices_are_the_batched_rule_on_one_column():
    """Issue 13: monosemanticity, autointerp and the report share one top-slices rule."""
    from sail.evaluate.top_slices import ranked_rows, top_per_volume

    rng = np.random.default_rng(1)
    dense = (rng.random((200, 12)) < 0.3) * rng.integers(1, 4, size=(200, 12)).astype(float)
    volume = rng.integers(0, 15, size=200)
    csc = sp.csc_matrix(dense)
    ref_top, _ = _naive_top_volumes(sp.csr_matrix(dense), volume, 5)
    for f in range(12):
        rows, vals = top_per_volume(csc, f, volume, 5)
        np.testing.assert_array_equal(rows, ref_top[f][ref_top[f] >= 0])
        np.testing.assert_array_equal(vals, dense[rows, f])
        all_rows, all_vals = ranked_rows(csc, f)
        assert sorted(all_rows) == sorted(np.flatnonzero(dense[:, f] > 0))
        assert all(
            (a > b) or (a == b and r < s)
            for a, b, r, s in zip(all_vals, all_vals[1:], all_rows, all_rows[1:], strict=False)
        )
