"""Which features the report pages: one rule, shared by the feature browser and the maps stage.

The maps stage computes spatial maps for exactly the feature pages the report shows, so the rule
lives here once: per config, the ``report.max_features`` best features by selection score
(monosemanticity at top-10 where evaluated, else activation rate) among those active on the
report's rows (valid, else all), plus the planted labels' best features (eval/concepts.csv) of
the ranking's chosen config.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sail.artifacts import read_ranking, read_table
from sail.config import SailConfig
from sail.evaluate.concepts import CONTROL_PREFIX, chosen_configs
from sail.evaluate.inputs import EvalData
from sail.workspace import Workspace

LABEL_COLUMNS = ["modality", "plane", "sex", "age_group", "institute"]


def unit_key(encoder: str, variant: str, config: str) -> str:
    """A config's key in report file names (``<encoder>__<variant>__<config>``)."""
    return f"{encoder}__{variant}__{config}"


def report_rows(data: EvalData) -> np.ndarray:
    """The rows the feature pages describe: the valid split, else every row."""
    valid = data.split_rows["valid"]
    return valid if len(valid) else np.arange(len(data.slices))


def report_label_columns(cfg: SailConfig, slices: pd.DataFrame) -> list[str]:
    """The attributes the pages' enrichment tables test: the fixed ones plus the metadata columns
    named as probe targets (e.g. a manifest's diagnosis); other free columns never reach them."""
    extra = [c for c in cfg.evaluate.extra_tasks if c in slices.columns and c not in LABEL_COLUMNS]
    return LABEL_COLUMNS + extra


def feature_scores(
    ws: Workspace, key: tuple[str, str, str], n_features: int, active_counts: np.ndarray
) -> tuple[np.ndarray, dict]:
    """Selection score per feature of the config ``key`` (encoder, variant, config):
    monosemanticity (top-10) where evaluated, else activation rate."""
    encoder, variant, config = key
    score = active_counts.astype(float) / max(active_counts.max(), 1) * 1e-3
    mono = read_table(ws.eval.table("monosemanticity_features"))
    extra: dict[int, dict] = {}
    if mono is not None:
        m = mono[
            (mono.encoder == encoder)
            & (mono.variant == variant)
            & (mono.sae_config == config)
            & (mono.top_n == 10)
        ]
        for row in m.itertuples():
            if 0 <= row.feature < n_features and np.isfinite(row.monosemanticity):
                score[row.feature] += row.monosemanticity
                extra.setdefault(int(row.feature), {})["monosemanticity"] = float(
                    row.monosemanticity
                )
    return score, extra


def paged_features(
    ws: Workspace,
    key: tuple[str, str, str],
    active: np.ndarray,
    planted: list[int],
    max_features: int,
) -> tuple[np.ndarray, dict]:
    """The features that get a page (in page order) and the per-feature extras of the score.

    ``active``: per feature, its active count on :func:`report_rows`; ``planted``: this config's
    planted-label features (:func:`planted_by_unit`), appended when active and not chosen.
    """
    n_features = len(active)
    score, extra = feature_scores(ws, key, n_features, active)
    score[active == 0] = -np.inf
    chosen = np.argsort(-score, kind="stable")[:max_features]
    chosen = chosen[np.isfinite(score[chosen])]
    planted = [f for f in planted if f < n_features and active[f]]
    return np.concatenate([chosen, np.setdiff1d(planted, chosen)]).astype(np.int64), extra


def planted_labels(cfg: SailConfig) -> list[str]:
    """The labels a demo plants and claims: modality, the three planes, the probe structures."""
    planes = [f"plane={p}" for p in ("axial", "coronal", "sagittal")]
    return ["modality=mri", *planes, *[f"has_{s}" for s in cfg.evaluate.probe_structures]]


def planted_rows(cfg: SailConfig, ws: Workspace, concepts: pd.DataFrame | None) -> list[dict]:
    """Per pretrained encoder, its ranking's chosen config's concept row for each planted label."""
    ranking = read_ranking(ws.eval.ranking)
    if concepts is None or ranking is None or "raw_test_roc_auc" not in concepts.columns:
        return []
    chosen = chosen_configs(ranking.astype({"sae_config": str}), cfg.train.variants)
    labels = planted_labels(cfg)
    rows = []
    for encoder, (variant, config) in chosen.items():
        if encoder.startswith(CONTROL_PREFIX):
            continue
        c = concepts[
            (concepts.encoder == encoder)
            & (concepts.variant == variant)
            & (concepts.sae_config.astype(str) == config)
        ].set_index("label")
        for label in labels:
            if label not in c.index:
                continue
            r = c.loc[label]
            feature = r["best_feature"]
            rows.append(
                {
                    "encoder": encoder,
                    "variant": variant,
                    "sae_config": config,
                    "label": label,
                    "feature": int(feature) if pd.notna(feature) else None,
                    "sae": _num(r["test_roc_auc"]),
                    "raw": _num(r["raw_test_roc_auc"]),
                    "raw_dimension": int(r["raw_dimension"])
                    if pd.notna(r["raw_dimension"])
                    else None,
                    "control": _num(r["control_test_roc_auc"]),
                    "control_encoder": r["control_encoder"],
                    "null": _num(r["null_test_roc_auc"]),
                }
            )
    return rows


def planted_by_unit(rows: list[dict]) -> dict[str, list[int]]:
    """:func:`planted_rows` grouped by :func:`unit_key`: each config's planted features."""
    out: dict[str, list[int]] = {}
    for r in rows:
        features = out.setdefault(unit_key(r["encoder"], r["variant"], r["sae_config"]), [])
        if r["feature"] is not None:
            features.append(r["feature"])
    return out


def _num(v) -> float | None:
    return float(v) if v is not None and pd.notna(v) else None
