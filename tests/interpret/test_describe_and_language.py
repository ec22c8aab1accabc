from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from sail.config import SailConfig
from sail.interpret.language import PUBLISHED_QUERIES, load_queries, parse_query, rank_per_volume
from sail.interpret.stage import run_autointerp, run_language

from .conftest import STRUCTURES, make_codes, synthetic_slices

OUT = "toyenc/matryoshka/D_16_64_K_4_8"


def test_parse_published_queries():
    qs = {q.name: q for q in load_queries(True, [], STRUCTURES)}
    assert len(qs) == len(PUBLISHED_QUERIES) == 12
    q = qs["ct_thorax_female"]
    assert (q.modality, q.plane, q.sex) == ("ct", "axial", "f") and "heart" in q.structures
    assert qs["mri_pelvis"].modality == "mri" and "urinary_bladder" in qs["mri_pelvis"].structures
    assert qs["ct_abdomen_elderly"].age_min == 65 and "liver" in qs["ct_abdomen_elderly"].structures
    assert parse_query("x", "urinary bladder", STRUCTURES).structures == ["urinary_bladder"]


def test_metadata_describer_names_structure_and_demographics_only_when_enriched(toy_ws):
    cfg = SailConfig(
        workspace=toy_ws.root,
        interpret={"judge": "none", "autointerp": {"selection": "all", "n_features": 40}},
    )
    run_autointerp(cfg, toy_ws)
    desc = pd.read_csv(toy_ws.interpret_dir / "autointerp" / OUT / "descriptions.csv").set_index(
        "feature"
    )
    _, names = make_codes(synthetic_slices())
    from sail.interpret.backends.metadata_describer import display_name

    for f, name in enumerate(names[: len(STRUCTURES)]):
        assert display_name(name) in desc.loc[f, "description"], (name, desc.loc[f, "description"])
    # sex in this data is a coin flip per volume: a structure feature must not claim a sex
    # unless its top slices really are enriched for it
    for f in range(len(STRUCTURES)):
        enr = json.loads(desc.loc[f, "enrichment"])
        claims = any(w in desc.loc[f, "description"] for w in ("female", "male"))
        top_sex = enr["sex"][0]
        assert claims == (
            top_sex["share"] >= 0.7 and top_sex["lift"] >= 1.2 and top_sex["p"] < 0.01
        )
    assert desc.loc[names.index("mri"), "description"].startswith("MRI")


def test_language_embedding_matcher_precision_and_ties(toy_ws):
    queries = [
        {"name": s, "text": s.replace("_", " ")} for s in ("liver", "urinary_bladder", "brain")
    ]
    cfg = SailConfig(
        workspace=toy_ws.root,
        interpret={
            "judge": "none",
            "autointerp": {"n_features": 30},
            "language": {"queries": queries, "n_features": 1},
        },
    )
    run_autointerp(cfg, toy_ws)
    run_language(cfg, toy_ws)
    out = toy_ws.interpret_dir / "language" / OUT
    metrics = pd.read_csv(out / "metrics.csv")
    hits = pd.read_csv(out / "hits.csv")
    for s in ("liver", "urinary_bladder", "brain"):
        m = metrics[(metrics["query"] == s) & (metrics.scoring == "published_cosine")].iloc[0]
        assert m.precision >= 0.8 and m.chance < 0.5, (s, m.precision)
        h = hits[(hits["query"] == s) & (hits.scoring == "published_cosine")]
        assert (
            len(h) == 10 and not h.slice_id.str.rsplit("/", n=2).str[0].duplicated().any()
        )  # one hit per volume
    assert {"published_cosine", "weighted_sum", "soft_and"} == set(metrics.scoring)
    assert {"n_tied_hits", "boundary_tie"} <= set(metrics.columns)
    # one matched feature: published_cosine is the published 1/(1+|a - q|) rule, and says so (issue
    # 12 item 11)
    rule = metrics.set_index("scoring").scoring_rule
    assert set(rule["published_cosine"]) == {"published_single_feature"} and set(
        rule["soft_and"]
    ) == {"soft_and"}
    assert set(hits[hits.scoring == "published_cosine"].scoring_rule) == {
        "published_single_feature"
    }
    published = metrics.merge(pd.read_csv(out / "queries.csv"), on="query")
    assert len(published) == 3 * 15


def test_lexical_matcher_runs(toy_ws):
    cfg = SailConfig(
        workspace=toy_ws.root,
        interpret={"judge": "none", "matcher": "lexical", "autointerp": {"n_features": 30}},
    )
    run_autointerp(cfg, toy_ws)
    run_language(cfg, toy_ws)
    matches = pd.read_csv(toy_ws.interpret_dir / "language" / OUT / "matches.csv")
    assert set(matches.matcher) == {"lexical"} and matches["query"].nunique() == 12


def test_rank_per_volume_reports_boundary_tie(toy_ws):
    from sail.interpret.data import load_split, read_slices, select_targets

    cfg = SailConfig(workspace=toy_ws.root)
    data = load_split(toy_ws, select_targets(cfg, toy_ws)[0], "test", read_slices(toy_ws))
    rows, scores, tie = rank_per_volume(np.ones(data.n), data, 3)
    assert tie and len(set(data.volume[rows])) == 3


def test_metadata_describer_names_only_structures_most_top_slices_hold():
    from sail.interpret.backends.metadata_describer import describe
    from sail.interpret.enrichment import Enrichment

    def ev(structures):  # rows: (value, share, base, lift, p)
        e = Enrichment(
            n_top=200,
            categorical={
                "modality": [("ct", 1.0, 0.8, 1.25, 1e-9)],
                "plane": [("axial", 0.5, 0.33, 1.5, 1e-3)],
            },
        )
        e.structures = e.regions = structures
        return e

    # enriched (lift 1.8, p tiny) but in only 56% of the top slices: not offered as the concept
    assert (
        describe(ev([("liver", 0.56, 0.31, 1.8, 1e-9)])) == "CT slices with no specific structure"
    )
    assert (
        describe(ev([("liver", 0.87, 0.31, 2.8, 1e-9), ("spleen", 0.6, 0.15, 4.0, 1e-9)]))
        == "CT of the liver"
    )


def test_embedding_judge_gives_ties_their_mean_rank_and_drops_same_description_distractors(toy_ws):
    """Issue 12 item 7: identical descriptions get identical vectors; the old order-based rank put
    the
    target first among them (success 1.0 for an uninformative judgement)."""
    from sail.config import AutointerpSettings
    from sail.interpret import autointerp as ai
    from sail.interpret.backends.base import CallBudget, CallCache
    from sail.interpret.data import Target, load_split, read_slices
    from sail.interpret.enrichment import EnrichmentTable

    assert ai.tied_rank(np.array([0.9, 0.9, 0.9, 0.9, 0.1])) == 2.5
    assert ai.tied_rank(np.array([0.5, 0.9, 0.5, 0.1])) == 2.5
    assert ai.tied_rank(np.array([0.9, 0.5, 0.1])) == 1.0
    data = load_split(toy_ws, Target(*OUT.split("/")), "valid", read_slices(toy_ws))
    table = EnrichmentTable(data.meta, data.H_NS, data.structures)
    cfg = AutointerpSettings()
    roles = ai.Roles("metadata", None, "embedding", None, CallCache(None), CallBudget(None), cfg)
    same = "Axial CT of the liver"
    concepts = {
        0: same,
        1: same,
        2: "axial CT of the  liver.",
        3: same,
        4: same,
        5: "Sagittal MRI of the brain",
    }
    judged = ai.judge_all(
        toy_ws,
        data,
        table,
        [0, 5],
        concepts,
        {0: np.array([1, 2, 3, 4]), 5: np.array([0, 1, 3, 4])},
        roles,
    ).set_index("feature")
    assert judged.loc[0, "status"] == "skipped" and pd.isna(judged.loc[0, "true_rank"])
    assert judged.loc[5, "status"] == "ok" and judged.loc[5, "n_candidates"] == 5
    # the four identical distractor descriptions tie with each other, never with the target
    assert judged.loc[5, "true_rank"] in (1.0, 5.0)
    metrics = ai.judge_metrics(judged.reset_index(), 5, "embedding")
    assert metrics["n_judged"] == 1 and metrics["n_judge_skipped"] == 1
    assert metrics["chance_success_rate"] == pytest.approx(2 / 5)


def _volumes_split(n_vol: int = 40, per_volume: int = 40):
    """n_vol CT volumes (even = male), per_volume axial slices each; liver in the middle half."""
    import scipy.sparse as sp

    from sail.interpret.data import SplitData

    v = np.repeat(np.arange(n_vol), per_volume)
    i = np.tile(np.arange(per_volume), n_vol)
    meta = pd.DataFrame(
        {
            "slice_id": [f"ct/s{a:03d}/axial/{b:04d}" for a, b in zip(v, i, strict=True)],
            "modality": "ct",
            "image_id": [f"s{a:03d}" for a in v],
            "plane": "axial",
            "slice_idx": i,
            "sex": np.where(v % 2 == 0, "m", "f"),
            "age": 50.0,
            "age_group": "40-59",
            "has_liver": (i >= per_volume // 4) & (i < 3 * per_volume // 4),
        }
    )
    codes = np.zeros((len(meta), 3), dtype=np.float32)
    codes[np.isin(v, [0, 2, 4]), 0] = (
        1.0 + i[np.isin(v, [0, 2, 4])] / 100
    )  # every slice of 3 male volumes
    codes[v % 2 == 0, 1] = 1.0 + i[v % 2 == 0] / 100  # every slice of every male volume
    codes[meta.has_liver.to_numpy(), 2] = (
        1.0 + v[meta.has_liver.to_numpy()] / 100
    )  # liver, any volume
    return SplitData("train", sp.csr_matrix(codes), meta, ["liver"], None)


def test_enrichment_counts_volumes_not_slices():
    """Issue 12 item 8: 120 top slices from 3 male volumes made "male" pass p < 0.01 (0.5^120); the
    p-value counts volumes, so 3 volumes cannot, 20 can (and 10 liver volumes name the liver).
    Shares stay those of the top slices."""
    from sail.config import AutointerpSettings
    from sail.interpret.autointerp import gather
    from sail.interpret.backends.metadata_describer import describe
    from sail.interpret.enrichment import EnrichmentTable

    data = _volumes_split()
    table = EnrichmentTable(data.meta, data.H_NS, data.structures)
    cfg = AutointerpSettings()
    three = gather(data, table, 0, cfg).enrichment
    assert three.enriched_value("sex") is None and "male" not in describe(three)
    assert three.n_volumes == 3 and three.n_top == 120
    sex = dict((v, (share, base, p)) for v, share, base, _, p in three.categorical["sex"])
    assert (
        sex["m"][0] == 1.0
        and sex["m"][1] == pytest.approx(0.5)
        and sex["m"][2] == pytest.approx(0.125)
    )
    twenty = gather(data, table, 1, cfg).enrichment
    assert (
        twenty.n_volumes == 20
        and twenty.enriched_value("sex") == "m"
        and "in male patients" in describe(twenty)
    )
    liver = gather(data, table, 2, cfg).enrichment
    assert liver.n_volumes == 10 and [r[0] for r in liver.enriched_structures()] == ["liver"]
    assert liver.enriched_value("sex") is None


def test_features_are_not_selected_on_the_split_that_judges_them(toy_ws):
    """Review of issue 12: eval/'s monosemanticity is on valid, the judge's split; selecting by it
    chose and scored features on one split. The selection now uses the concept split (train)."""
    from sail.config import AutointerpSettings
    from sail.interpret.autointerp import select_features
    from sail.interpret.data import Target, load_split, read_slices

    _, names = make_codes(synthetic_slices())
    noise = names.index("noise0")
    liver = names.index("liver")
    n = len(names)
    mono = pd.DataFrame(
        {
            "encoder": "toyenc",
            "variant": "matryoshka",
            "sae_config": "D_16_64_K_4_8",
            "split": "valid",
            "top_n": 50,
            "feature": np.arange(n),
            "monosemanticity": 0.0,
        }
    )
    mono.loc[noise, "monosemanticity"] = 0.99  # a valid-split fluke
    toy_ws.eval_dir.mkdir(parents=True, exist_ok=True)
    mono.to_csv(toy_ws.eval_dir / "monosemanticity_features.csv", index=False)
    target = Target(*OUT.split("/"))
    data = load_split(toy_ws, target, "train", read_slices(toy_ws))
    cfg = AutointerpSettings(n_features=5, monosemanticity_top_n=10)
    table = select_features(toy_ws, target, data, cfg)
    assert noise not in table.feature.tolist()[:1]
    assert (table.monosemanticity_split == "train").all()
    assert liver in table.feature.tolist()
    # judged on train instead: the valid table is then another split, and is used
    table = select_features(toy_ws, target, data, cfg.model_copy(update={"judge_split": "train"}))
    assert table.feature.iloc[0] == noise and (table.monosemanticity_split == "valid").all()
