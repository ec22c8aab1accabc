import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.metrics import roc_auc_score

from sail.evaluate.concepts import (
    CONCEPT_COLUMNS,
    RAW_COLUMNS,
    UNIT_CONCEPT_COLUMNS,
    attach_controls,
    auc_matrix,
    breakdown,
    chosen_configs,
    ground_concepts,
    raw_dimension_concepts,
    volume_permutation,
    weighted_auc,
)

from .eval_builders import CT_FEATURE, INSTITUTE_B_FEATURE, PLANTED, make_slices, sparse_codes


def test_auc_matrix_matches_sklearn_with_ties_and_negative_codes():
    rng = np.random.default_rng(0)
    x = (rng.random((200, 15)) < 0.3) * rng.integers(-2, 4, size=(200, 15)).astype(float)
    x[:, 4] = 0  # constant feature
    y = (rng.random((200, 3)) < 0.4).astype(int)
    y[:, 2] = 0  # no positives
    got = auc_matrix(sp.csr_matrix(x), y)
    for j in range(2):
        for f in range(15):
            assert got[j, f] == pytest.approx(roc_auc_score(y[:, j], x[:, f])), (j, f)
    assert np.isnan(got[2]).all()


def _split_rows(slices, split):
    s = slices.merge(split, on=["modality", "image_id"], how="left")["split"].to_numpy()
    return {name: np.flatnonzero(s == name) for name in ("train", "valid", "test")}


def test_concept_grounding_finds_planted_features_and_confounds():
    slices, split = make_slices()
    codes = sparse_codes(slices, 40)
    ids = {"encoder": "e", "variant": "v", "sae_config": "c"}
    concepts, confounds = ground_concepts(
        codes, slices, _split_rows(slices, split), ids, ["institute", "scanner_model", "kvp"], 0.75
    )
    best = concepts.set_index("label")
    for s, f in PLANTED.items():
        assert best.loc[f"has_{s}", "best_feature"] == f
        assert (
            best.loc[f"has_{s}", ["train_roc_auc", "valid_roc_auc", "test_roc_auc"]].tolist()
            == [1.0] * 3
        )
    assert best.loc["modality=ct", "best_feature"] == CT_FEATURE
    assert best.loc["institute=B", "best_feature"] == INSTITUTE_B_FEATURE
    assert confounds["feature"].tolist() == [INSTITUTE_B_FEATURE]
    assert confounds["label"].iloc[0] == "institute=B" and confounds["best_structure"].iloc[
        0
    ].startswith("has_")


def test_concept_grounding_selects_on_train_and_reports_held_out_splits():
    """Issue 12 item 9: the best of many features, chosen and scored on one split, reports an
    optimistic AUC. A noise feature that happens to equal the label on valid must not be chosen:
    the feature chosen on train is reported on valid and test."""
    slices, split = make_slices()
    rows = _split_rows(slices, split)
    codes = sparse_codes(slices, 40).tolil()
    liver = slices["has_liver"].to_numpy(bool)
    lucky = np.zeros(len(slices))
    lucky[rows["valid"]] = np.where(liver[rows["valid"]], 2.0, 0.0)  # perfect on valid only
    truth = np.where(liver, 1.0, 0.0) + np.random.default_rng(0).normal(0.5, 0.3, len(slices)).clip(
        0.01
    )
    codes[:, 30], codes[:, PLANTED["liver"]] = lucky[:, None], truth[:, None]
    concepts, _ = ground_concepts(
        codes.tocsr(), slices, rows, {"encoder": "e"}, ["institute"], 0.75
    )
    row = concepts.set_index("label").loc["has_liver"]
    assert row["best_feature"] == PLANTED["liver"]
    assert row["valid_roc_auc"] < 1.0 and row["train_roc_auc"] > 0.9 and row["test_roc_auc"] > 0.9


def test_weighted_auc_matches_sklearn_sample_weights():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = rng.integers(0, 10, 300) / 10
    w = rng.integers(0, 3, size=(4, 300)).astype(float)
    got = weighted_auc(y, s, w)
    for b in range(4):
        assert got[b] == pytest.approx(roc_auc_score(y, s, sample_weight=w[b]))


def test_breakdown_bootstrap_is_volume_clustered_and_seeded():
    slices, _ = make_slices()
    volume = pd.MultiIndex.from_frame(slices[["modality", "image_id"]]).factorize()[0]
    rng = np.random.default_rng(0)
    rows = np.arange(len(slices))
    y = slices["has_liver"].to_numpy().astype(np.int8)
    score = y + rng.normal(0, 0.7, len(y))
    scores = {("structures", "liver"): (rows, y, score)}
    a = breakdown(scores, slices, volume, ["modality", "plane"], 50, 3, {"encoder": "e"})
    b = breakdown(scores, slices, volume, ["modality", "plane"], 50, 3, {"encoder": "e"})
    pd.testing.assert_frame_equal(a, b)
    ct = a[(a["by"] == "modality") & (a["group"] == "ct")].iloc[0]
    assert ct["n_volumes"] == 14 and ct["n"] == 14 * 24
    assert ct["roc_auc"] == pytest.approx(
        roc_auc_score(y[slices.modality == "ct"], score[slices.modality == "ct"])
    )
    assert ct["ci_low"] <= ct["roc_auc"] <= ct["ci_high"] and ct["ci_low"] < ct["ci_high"]
    assert set(a["by"]) == {"modality", "plane"}


def _volume(slices):
    return pd.factorize(slices["modality"] + "/" + slices["image_id"])[0]


def test_volume_permutation_moves_whole_volumes_within_each_split():
    slices, split = make_slices()
    rows, volume = _split_rows(slices, split), _volume(slices)
    src = volume_permutation(volume, rows, seed=3)
    np.testing.assert_array_equal(src, volume_permutation(volume, rows, seed=3))
    assert not np.array_equal(src, volume_permutation(volume, rows, seed=4))
    for r in rows.values():
        assert set(src[r]) <= set(r), "labels never cross splits"
        for v in np.unique(volume[r]):
            sources = volume[src[r][volume[r] == v]]
            assert len(set(sources)) == 1, "one volume takes the labels of exactly one volume"
        targets = [volume[src[r][volume[r] == v]][0] for v in np.unique(volume[r])]
        assert sorted(targets) == sorted(np.unique(volume[r])), "a permutation of the volumes"
    assert (volume[src] != volume).mean() > 0.5


def test_concept_table_carries_the_null_and_the_raw_dimension_control():
    """The null (volume-shuffled labels, same train selection) sits near 0.5 where the real
    planted feature scores 1.0; the raw-dimension control finds a planted dense column, either
    sign, chosen on train."""
    slices, split = make_slices(n_ct=30, n_mri=12)
    rows, volume = _split_rows(slices, split), _volume(slices)
    codes = sparse_codes(slices, 40)
    concepts, _ = ground_concepts(
        codes, slices, rows, {"encoder": "e"}, ["institute"], 0.75, volume=volume, seed=0
    )
    best = concepts.set_index("label")
    assert list(concepts.columns) == UNIT_CONCEPT_COLUMNS
    for s in PLANTED:
        assert best.loc[f"has_{s}", "test_roc_auc"] == 1.0
    null = best.loc[[f"has_{s}" for s in PLANTED], "null_test_roc_auc"]
    assert null.notna().all() and (null - 0.5).abs().median() < 0.15
    assert (best["null_test_roc_auc"].dropna() < 0.95).all()

    rng = np.random.default_rng(0)
    x = rng.normal(size=(len(slices), 12))
    liver = slices["has_liver"].to_numpy(bool)
    x[:, 7] = np.where(liver, -2.0, 0.0) + rng.normal(0, 0.3, len(slices))  # liver: low values
    raw = raw_dimension_concepts(x, slices, rows, "e")
    assert list(raw.columns) == ["encoder", "label", *RAW_COLUMNS]
    raw = raw.set_index("label")
    assert raw.loc["has_liver", "raw_dimension"] == 7 and raw.loc["has_liver", "raw_sign"] == -1
    assert raw.loc["has_liver", ["raw_train_roc_auc", "raw_test_roc_auc"]].min() > 0.95


def test_controls_stand_beside_the_pretrained_rows():
    """concepts.csv: the random-init control's rank-1 config's figure per label beside each row of
    its pretrained encoder; the control's own rows stay, named by their encoder."""
    ids = dict(n_positive_train=5, train_roc_auc=0.9, valid_roc_auc=0.9, null_valid_roc_auc=0.5)
    null = {"null_test_roc_auc": 0.5}
    concepts = pd.DataFrame(
        [
            dict(encoder="enc", variant="matryoshka", sae_config="a", label="x", best_feature=1,
                 test_roc_auc=0.95, **ids, **null),
            dict(encoder="random-enc", variant="matryoshka", sae_config="b", label="x",
                 best_feature=4, test_roc_auc=0.6, **ids, **null),
            dict(encoder="random-enc", variant="matryoshka", sae_config="c", label="x",
                 best_feature=2, test_roc_auc=0.7, **ids, **null),
        ]
    )  # fmt: skip
    ranking = pd.DataFrame(
        {
            "encoder": ["enc", "random-enc", "random-enc", "random-enc"],
            "variant": ["matryoshka", "sail", "matryoshka", "matryoshka"],
            "sae_config": ["a", "z", "b", "c"],
            "final_rank": [1, 1, 1, 2],
        }
    )
    chosen = chosen_configs(ranking, ["matryoshka", "sail"])
    assert chosen == {"enc": ("matryoshka", "a"), "random-enc": ("matryoshka", "b")}
    raw = pd.DataFrame(
        [dict(encoder="enc", label="x", raw_dimension=3, raw_sign=1, raw_train_roc_auc=0.99,
              raw_valid_roc_auc=0.98, raw_test_roc_auc=0.97)]
    )  # fmt: skip
    out = attach_controls(concepts, raw, chosen)
    assert list(out.columns) == CONCEPT_COLUMNS
    row = out[out.encoder == "enc"].iloc[0]
    assert row["control_encoder"] == "random-enc"
    assert row["control_sae_config"] == "matryoshka/b" and row["control_test_roc_auc"] == 0.6
    assert row["raw_test_roc_auc"] == 0.97
    assert len(out) == 3 and out[out.encoder == "random-enc"]["control_encoder"].isna().all()
