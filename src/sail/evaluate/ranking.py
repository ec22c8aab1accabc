"""Config ranking (the paper's Table 1): monosemanticity rank + features-to-threshold rank.

Open choices, each a setting (``published: true`` selects the published ones):

- M_config: ``top50`` (mean M of the 50 best features; what the published table used) or ``top10``
  (what the published code says). Default and published: top50.
- Unreached thresholds: ``grid_max`` fills them with the largest N of the grid (as the published
  figure does) so every config pays the same penalty; the published ranking filled each config's
  column with that config's own maximum + 1 (100 if the whole column is empty), which rewards
  configs that rarely reach a threshold. Default grid_max.
- Two-class tasks: both targets have the same curve; by default they count once, the published
  ranking counted both.
- Variants: ranked separately per (encoder, variant) by default; ``variants_together`` ranks all
  variants of an encoder in one list.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from sail.config import RankingSettings
from sail.evaluate.recovery import threshold_column

log = logging.getLogger(__name__)

RANKING_COLUMNS = [
    "encoder",
    "variant",
    "sae_config",
    "m_config",
    "mean_n_features",
    "n_targets",
    "rank_mono",
    "rank_perf",
    "rank_combined",
    "final_rank",
]
SYMMETRIC_TASKS = ("modality", "sex", "age_group", "kvp")


def effective(s: RankingSettings) -> RankingSettings:
    if not s.published:
        return s
    return s.model_copy(
        update={
            "m_config": "top50",
            "fill_unreached": "column_max_plus_one",
            "count_both_binary_targets": True,
            "variants_together": False,
        }
    )


def mean_features_to_threshold(
    summary: pd.DataFrame, thresholds: list[float], grid_max: int, s: RankingSettings
) -> pd.DataFrame:
    """Per config: mean over (target x threshold) of the smallest N reaching the threshold."""
    cols = [threshold_column(t) for t in thresholds]
    keys = ["encoder", "variant", "sae_config"]
    df = summary[summary["dense_valid_roc_auc"] > s.min_dense_auc].copy()
    if not s.count_both_binary_targets:
        # Both targets of a two-class task share one curve: keep the first target of each.
        two = df.groupby([*keys, "task"])["target"].transform("nunique") == 2
        first = df.groupby([*keys, "task"])["target"].transform("first")
        df = df[~(two & df["task"].isin(SYMMETRIC_TASKS)) | (df["target"] == first)]
    rows = []
    for key, g in df.groupby(keys, sort=True):
        vals = g[cols].astype(float)
        if s.fill_unreached == "grid_max":
            vals = vals.fillna(float(grid_max))
        else:
            vals = vals.apply(lambda c: c.fillna(c.max() + 1 if c.notna().any() else 100.0))
        rows.append(
            {
                **dict(zip(keys, key, strict=True)),
                "mean_n_features": float(np.nanmean(vals.to_numpy())),
                "n_targets": len(g),
            }
        )
    return pd.DataFrame(rows, columns=[*keys, "mean_n_features", "n_targets"])


def rank_configs(
    mono: pd.DataFrame,
    summary: pd.DataFrame,
    thresholds: list[float],
    grid_max: int,
    settings: RankingSettings,
) -> pd.DataFrame:
    """Rank within each encoder (and variant): ties share the smaller rank (method ``min``)."""
    s = effective(settings)
    keys = ["encoder", "variant", "sae_config"]
    perf = mean_features_to_threshold(summary, thresholds, grid_max, s)
    m = mono[keys + [f"m_config_{s.m_config}"]].rename(
        columns={f"m_config_{s.m_config}": "m_config"}
    )
    df = m.merge(perf, on=keys, how="inner")
    # No scored feature (none reaches N volumes: a dead or collapsed SAE) means no monosemantic
    # feature: M_config 0, so the config ranks last on monosemanticity instead of leaving the table.
    unscored = df["m_config"].isna()
    if unscored.any():
        log.warning(
            "ranking: no scored feature in %s; M_config counted as 0",
            ", ".join(
                "/".join(map(str, r)) for r in df.loc[unscored, keys].itertuples(index=False)
            ),
        )
        df.loc[unscored, "m_config"] = 0.0
    df = df[df["mean_n_features"].notna()]
    group = ["encoder"] if s.variants_together else ["encoder", "variant"]
    if df.empty:
        return pd.DataFrame(columns=RANKING_COLUMNS)
    g = df.groupby(group, sort=False)
    df["rank_mono"] = g["m_config"].rank(ascending=False, method="min")
    df["rank_perf"] = g["mean_n_features"].rank(ascending=True, method="min")
    df["rank_combined"] = (df["rank_mono"] + df["rank_perf"]) / 2
    df["final_rank"] = df.groupby(group, sort=False)["rank_combined"].rank(
        ascending=True, method="min"
    )
    for c in ("rank_mono", "rank_perf", "final_rank"):
        df[c] = df[c].astype(int)
    return df.sort_values([*group, "final_rank", "sae_config"], kind="stable")[
        RANKING_COLUMNS
    ].reset_index(drop=True)


def _fmt(v, spec: str) -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def table1_markdown(
    ranking: pd.DataFrame,
    sae_metrics: dict[tuple[str, str, str], dict],
    settings: RankingSettings,
    top: int = 3,
    m_slices: int = 10,
    stability: pd.DataFrame | None = None,
) -> str:
    """Table 1 as Markdown: the best configs per encoder (and variant) with their SAE quality
    and, where seed replicates were trained, their seed stability (eval/stability.csv)."""
    s = effective(settings)
    fill = (
        "the grid maximum"
        if s.fill_unreached == "grid_max"
        else "the config column maximum + 1 (published)"
    )
    counted = "twice (published)" if s.count_both_binary_targets else "once"
    lines = [
        "# Table 1: SAE configuration ranking",
        "",
        f"M_config = mean monosemanticity of the {s.m_config[3:]} best features "
        f"(top {m_slices} slices each); mean_n_features = mean features needed to reach 50-100% "
        f"of the dense ROC-AUC over targets with dense AUC > {s.min_dense_auc}; unreached "
        f"thresholds filled with {fill}; two-class tasks counted {counted}. "
        "L0 and R² (published scalar) are the SAE's last validation values at the largest level. "
        "Stable = share of latents matched at decoder |cos| >= 0.9 in the seed replicates "
        "(number of seeds in brackets; – : one seed).",
        "",
        "| encoder | variant | final | config | rank mono / perf | M_config | mean_n_features "
        "| n_targets | L0 | R² | stable |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    stable = stability_labels(stability)
    group = ["encoder"] if s.variants_together else ["encoder", "variant"]
    for _, g in ranking.groupby(group, sort=True):
        for r in g[g["final_rank"] <= top].itertuples():
            met = sae_metrics.get((r.encoder, r.variant, r.sae_config), {})
            lines.append(
                f"| {r.encoder} | {r.variant} | {r.final_rank} | {r.sae_config} | "
                f"{r.rank_mono} / {r.rank_perf} | "
                f"{_fmt(r.m_config, '.4f')} | {_fmt(r.mean_n_features, '.2f')} | {r.n_targets} | "
                f"{_fmt(met.get('l0'), '.1f')} | {_fmt(met.get('r2_published'), '.3f')} | "
                f"{stable.get((r.encoder, r.variant, r.sae_config), '–')} |"
            )
    return "\n".join(lines) + "\n"


def stability_labels(stability: pd.DataFrame | None) -> dict[tuple[str, str, str], str]:
    """(encoder, variant, config) -> "0.82 (3 seeds)" for configs with seed replicates."""
    if stability is None or stability.empty:
        return {}
    return {
        (r.encoder, r.variant, str(r.sae_config)): f"{r.matched_share:.2f} ({int(r.n_seeds)} seeds)"
        for r in stability.itertuples()
        if r.n_seeds > 1 and pd.notna(r.matched_share)
    }
