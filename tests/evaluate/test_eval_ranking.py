import numpy as np
import pandas as pd

from sail.config import RankingSettings
from sail.evaluate.ranking import (
    effective,
    mean_features_to_threshold,
    rank_configs,
    table1_markdown,
)

TH = [0.5, 1.0]
KEYS = {"encoder": "e", "variant": "matryoshka"}


def _summary(rows):
    """rows: (config, task, target, dense_auc, n50, n100)."""
    return pd.DataFrame(
        [
            {
                **KEYS,
                "sae_config": c,
                "task": t,
                "target": g,
                "dense_valid_roc_auc": d,
                "n_features_50pct": a,
                "n_features_100pct": b,
            }
            for c, t, g, d, a, b in rows
        ]
    )


def _mono(values):
    return pd.DataFrame(
        [
            {**KEYS, "sae_config": c, "m_config_top10": m10, "m_config_top50": m50}
            for c, (m10, m50) in values.items()
        ]
    )


def test_ranking_hand_case_with_ties():
    summary = _summary(
        [
            ("c1", "structures", "liver", 0.9, 1, 9),
            ("c2", "structures", "liver", 0.9, 1, 19),
            ("c3", "structures", "liver", 0.9, 1, 19),
        ]
    )
    mono = _mono({"c1": (0.9, 0.5), "c2": (0.9, 0.5), "c3": (0.9, 0.3)})
    r = rank_configs(mono, summary, TH, 100, RankingSettings()).set_index("sae_config")
    assert r["mean_n_features"].to_dict() == {"c1": 5.0, "c2": 10.0, "c3": 10.0}
    assert r["rank_mono"].to_dict() == {"c1": 1, "c2": 1, "c3": 3}
    assert r["rank_perf"].to_dict() == {"c1": 1, "c2": 2, "c3": 2}
    assert r["rank_combined"].to_dict() == {"c1": 1.0, "c2": 1.5, "c3": 2.5}
    assert r["final_rank"].to_dict() == {"c1": 1, "c2": 2, "c3": 3}
    # A tie in the combined rank shares the smaller final rank.
    mono = _mono({"c1": (0.9, 0.3), "c2": (0.9, 0.5), "c3": (0.9, 0.1)})
    r = rank_configs(mono, summary, TH, 100, RankingSettings()).set_index("sae_config")
    assert r["final_rank"].to_dict() == {"c1": 1, "c2": 1, "c3": 3}


def test_m_config_choice_top10_vs_top50():
    summary = _summary(
        [("c1", "structures", "liver", 0.9, 1, 1), ("c2", "structures", "liver", 0.9, 1, 1)]
    )
    mono = _mono({"c1": (0.9, 0.1), "c2": (0.5, 0.4)})
    assert rank_configs(mono, summary, TH, 100, RankingSettings()).iloc[0]["sae_config"] == "c2"
    assert (
        rank_configs(mono, summary, TH, 100, RankingSettings(m_config="top10")).iloc[0][
            "sae_config"
        ]
        == "c1"
    )


def test_unreached_thresholds_cost_every_config_the_same():
    """Published bug #5: filling NaN with the config's own column max + 1 rewards a config that
    rarely reaches a threshold (here c_bad, which never reaches 100% on two targets)."""
    rows = [
        ("c_good", "structures", s, 0.9, 1, n)
        for s, n in (("liver", 20), ("heart", 30), ("brain", 40))
    ]
    rows += [
        ("c_bad", "structures", s, 0.9, 1, n)
        for s, n in (("liver", np.nan), ("heart", np.nan), ("brain", 2))
    ]
    summary = _summary(rows)
    ours = mean_features_to_threshold(summary, TH, 100, RankingSettings()).set_index("sae_config")
    assert ours.loc["c_bad", "mean_n_features"] == (3 + 100 + 100 + 2) / 6
    assert ours.loc["c_bad", "mean_n_features"] > ours.loc["c_good", "mean_n_features"]
    pub = mean_features_to_threshold(
        summary, TH, 100, effective(RankingSettings(published=True))
    ).set_index("sae_config")
    assert pub.loc["c_bad", "mean_n_features"] == (3 + 3 + 3 + 2) / 6  # the published artefact
    assert pub.loc["c_bad", "mean_n_features"] < pub.loc["c_good", "mean_n_features"]


def test_two_class_targets_count_once_unless_published_and_dense_filter():
    summary = _summary(
        [
            ("c1", "sex", "f", 0.8, 1, 10),
            ("c1", "sex", "m", 0.8, 1, 10),
            ("c1", "plane", "axial", 0.9, 1, 4),
            ("c1", "plane", "coronal", 0.9, 1, 6),
            ("c1", "institute", "B", 0.6, 1, 1),
            ("c1", "structures", "brain", np.nan, 1, 1),
        ]
    )
    ours = mean_features_to_threshold(summary, TH, 100, RankingSettings())
    assert ours["n_targets"].iloc[0] == 3  # sex once, two planes; dense AUC must be > 0.6
    pub = mean_features_to_threshold(summary, TH, 100, effective(RankingSettings(published=True)))
    assert pub["n_targets"].iloc[0] == 4


def test_variants_rank_separately_by_default():
    summary = pd.concat(
        [
            _summary([("c1", "structures", "liver", 0.9, 1, 5)]),
            _summary([("c2", "structures", "liver", 0.9, 1, 9)]).assign(variant="sail"),
        ]
    )
    mono = pd.concat([_mono({"c1": (0.5, 0.5)}), _mono({"c2": (0.9, 0.9)}).assign(variant="sail")])
    sep = rank_configs(mono, summary, TH, 100, RankingSettings())
    assert sep["final_rank"].tolist() == [1, 1]
    together = rank_configs(mono, summary, TH, 100, RankingSettings(variants_together=True))
    assert sorted(together["final_rank"]) == [1, 1]  # rank mono 2/1, rank perf 1/2 -> tie
    assert sorted(together["rank_mono"]) == [1, 2]


def test_table1_lists_rank_one_first_with_sae_metrics():
    summary = _summary(
        [("c1", "structures", "liver", 0.9, 1, 5), ("c2", "structures", "liver", 0.9, 1, 9)]
    )
    ranking = rank_configs(
        _mono({"c1": (0.9, 0.6), "c2": (0.5, 0.2)}), summary, TH, 100, RankingSettings()
    )
    md = table1_markdown(
        ranking, {("e", "matryoshka", "c1"): {"l0": 41.2, "r2_published": 0.716}}, RankingSettings()
    )
    body = [line for line in md.splitlines() if line.startswith("| e ")]
    assert body[0].startswith(
        "| e | matryoshka | 1 | c1 | 1 / 1 | 0.6000 | 3.00 | 1 | 41.2 | 0.716 |"
    )
    assert "| – | – |" in body[1]


def test_a_config_without_scored_features_ranks_last_not_absent():
    """Review of issue 12: a config whose features never reach N volumes has M_config NaN; it was
    dropped from the ranking (silently) instead of ranking last on monosemanticity."""
    summary = _summary([(c, "structures", "liver", 0.9, 1, 5) for c in ("c1", "c2", "dead")])
    mono = _mono({"c1": (0.9, 0.5), "c2": (0.8, 0.4), "dead": (np.nan, np.nan)})
    r = rank_configs(mono, summary, TH, 100, RankingSettings()).set_index("sae_config")
    assert "dead" in r.index and r.loc["dead", "m_config"] == 0.0
    assert r.loc["dead", "rank_mono"] == 3 and r.loc["dead", "final_rank"] == 3
