import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from sail.cli import app
from sail.config import load_config
from sail.evaluate.stage import run_evaluate, unit_dir
from sail.report.figures import run_figures
from sail.workspace import manifest_path

from .eval_builders import build_workspace, fast_overrides, write_sae

DESIGN_COLUMNS = {
    "probes.csv": [
        "encoder",
        "variant",
        "sae_config",
        "task",
        "target",
        "split",
        "n",
        "roc_auc",
        "f1",
        "balanced_accuracy",
    ],
    "monosemanticity_features.csv": [
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
    ],
    "monosemanticity_configs.csv": [
        "encoder",
        "variant",
        "sae_config",
        "m_config_top10",
        "m_config_top50",
        "n_scored_features",
        "n_dead_features",
    ],
    "recovery_curves.csv": [
        "encoder",
        "variant",
        "sae_config",
        "task",
        "target",
        "n_features",
        "valid_roc_auc",
        "dense_valid_roc_auc",
    ],
    "ranking.csv": [
        "encoder",
        "variant",
        "sae_config",
        "m_config",
        "mean_n_features",
        "rank_mono",
        "rank_perf",
        "rank_combined",
        "final_rank",
    ],
    "concepts.csv": [
        "encoder",
        "variant",
        "sae_config",
        "label",
        "n_positive_train",
        "best_feature",
        "train_roc_auc",
        "valid_roc_auc",
        "test_roc_auc",
    ],
}
CONFIGS = (("matryoshka", "D_16_64_K_4_8"), ("matryoshka", "D_8_32_128_K_2_4_8"))


def _cfg(ws, **extra):
    return load_config(None, {"workspace": str(ws.root), **fast_overrides(**extra)})


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    ws = build_workspace(tmp_path_factory.mktemp("ev") / "ws", configs=CONFIGS)
    run_evaluate(_cfg(ws), ws)
    return ws


def test_every_eval_artifact_is_written_with_the_design_columns(evaluated):
    e = evaluated.eval_dir
    for name, cols in DESIGN_COLUMNS.items():
        df = pd.read_csv(e / name)
        assert set(cols) <= set(df.columns), name
        assert len(df), name
    summary = pd.read_csv(e / "recovery_summary.csv")
    assert {f"n_features_{p}pct" for p in (50, 60, 70, 80, 90, 100)} <= set(summary.columns)
    coefs = pd.read_parquet(e / "probe_coefficients.parquet")
    assert list(coefs.columns) == [
        "encoder",
        "variant",
        "sae_config",
        "task",
        "target",
        "feature",
        "coef",
        "rank",
    ]
    for name in ("confounds.csv", "probes_breakdown.csv", "null_baselines.csv", "table1.md"):
        assert (e / name).stat().st_size > 0
    probes = pd.read_csv(e / "probes.csv")
    assert set(probes["sae_config"]) == {"dense", *[c for _, c in CONFIGS]}
    assert set(probes["task"]) == {"modality", "plane", "sex", "age_group", "structures"}
    dense_valid = probes[(probes.sae_config == "dense") & (probes.split == "valid")].set_index(
        "target"
    )["roc_auc"]
    assert dense_valid["ct"] > 0.95 and dense_valid["liver"] > 0.9
    ranking = pd.read_csv(e / "ranking.csv")
    assert (ranking["final_rank"] >= 1).all() and 1 in set(ranking["final_rank"])
    assert "| enc | matryoshka | 1 |" in (e / "table1.md").read_text()


def test_dict_level_follows_any_number_of_levels_without_cfg_json(tmp_path):
    """Published bug #13: config names were parsed by position assuming exactly 4 levels."""
    ws = build_workspace(tmp_path / "ws", configs=(("matryoshka", "D_8_32_128_K_2_4_8"),))
    (ws.sae_dir("enc", "matryoshka", "D_8_32_128_K_2_4_8") / "cfg.json").unlink()
    run_evaluate(_cfg(ws, tasks=["modality"]), ws)
    feats = pd.read_csv(ws.eval_dir / "monosemanticity_features.csv")
    expected = np.searchsorted([8, 32, 128], feats["feature"], side="right")
    np.testing.assert_array_equal(feats["dict_level"], expected)
    assert set(feats["split"]) == {"valid"}


def test_reruns_replace_rows_and_resume_keeps_every_config(tmp_path):
    """Published bugs #3 (appended duplicate rows) and #4 (resume truncated the recovery
    summary)."""
    ws = build_workspace(tmp_path / "ws", configs=CONFIGS[:1])
    cfg = _cfg(ws, tasks=["modality", "structures"])
    run_evaluate(cfg, ws)
    e = ws.eval_dir
    first = {n: pd.read_csv(e / n) for n in ("probes.csv", "recovery_summary.csv")}
    unit = manifest_path(unit_dir(ws, "enc", *CONFIGS[0]) / "probes.parquet")
    stamp = unit.stat().st_mtime_ns

    run_evaluate(cfg, ws, force=True)
    again = pd.read_csv(e / "probes.csv")
    assert len(again) == len(first["probes.csv"])
    assert not again.duplicated(
        ["encoder", "variant", "sae_config", "task", "target", "split"]
    ).any()
    pd.testing.assert_frame_equal(again, first["probes.csv"])  # deterministic

    # A new config appears: only it is computed; the summary still holds every config's targets.
    slices, split = pd.read_parquet(ws.slices_table), pd.read_csv(ws.split_csv)
    write_sae(ws, "enc", *CONFIGS[1], slices, split, seed=1)
    stamp = unit.stat().st_mtime_ns
    run_evaluate(cfg, ws)
    assert unit.stat().st_mtime_ns == stamp
    summary = pd.read_csv(e / "recovery_summary.csv")
    per_config = summary.groupby("sae_config")["target"].apply(set)
    assert per_config[CONFIGS[0][1]] == set(first["recovery_summary.csv"]["target"])
    assert per_config[CONFIGS[1][1]] == per_config[CONFIGS[0][1]]
    assert len(pd.read_csv(e / "ranking.csv")) == 2

    # A removed config leaves the tables.
    shutil.rmtree(ws.root / "activations" / "enc" / CONFIGS[1][0] / CONFIGS[1][1])
    run_evaluate(cfg, ws)
    assert set(pd.read_csv(e / "probes.csv")["sae_config"]) == {"dense", CONFIGS[0][1]}


def test_up_to_date_stage_is_skipped_and_ranking_change_only_reassembles(tmp_path, caplog):
    ws = build_workspace(tmp_path / "ws", configs=CONFIGS[:1])
    cfg = _cfg(ws, tasks=["modality", "structures"])
    run_evaluate(cfg, ws)
    unit = manifest_path(unit_dir(ws, "enc", *CONFIGS[0]) / "probes.parquet")
    stamp = unit.stat().st_mtime_ns
    with caplog.at_level("INFO"):
        run_evaluate(cfg, ws)
    assert "up to date" in caplog.text
    run_evaluate(_cfg(ws, tasks=["modality", "structures"], ranking={"published": True}), ws)
    assert unit.stat().st_mtime_ns == stamp
    assert "published" in (ws.eval_dir / "table1.md").read_text()


def test_cli_evaluate_and_figures(evaluated, tmp_path):
    ws = build_workspace(tmp_path / "ws", configs=CONFIGS[:1])
    cfg_file = tmp_path / "c.yaml"
    import yaml

    cfg_file.write_text(yaml.safe_dump(fast_overrides(tasks=["modality"])))
    runner = CliRunner()
    res = runner.invoke(
        app,
        ["evaluate", "--config", str(cfg_file), "--workspace", str(ws.root), "--encoder", "enc"],
    )
    assert res.exit_code == 0, res.output
    assert (ws.eval_dir / "ranking.csv").is_file()
    res = runner.invoke(app, ["evaluate", "--workspace", str(ws.root), "--encoder", "nope"])
    assert res.exit_code == 2 and "nope" in res.output
    res = runner.invoke(app, ["figures", "--workspace", str(evaluated.root)])
    assert res.exit_code == 0, res.output
    for stem in ("sae_quality", "recovery_curves"):
        for ext in ("png", "pdf"):
            assert (evaluated.figures_dir / f"{stem}.{ext}").stat().st_size > 5000


def test_figures_before_evaluate_is_a_clear_error(tmp_path):
    from sail.errors import SailError

    ws = build_workspace(tmp_path / "ws")
    with pytest.raises(SailError, match="sail evaluate"):
        run_figures(_cfg(ws), ws)


def test_encoder_without_sae_configs_gets_dense_probes_only(tmp_path):
    ws = build_workspace(tmp_path / "ws", configs=())
    cfg = _cfg(ws, tasks=["modality"])
    run_evaluate(cfg, ws)
    assert set(pd.read_csv(ws.eval_dir / "probes.csv")["sae_config"]) == {"dense"}
    assert pd.read_csv(ws.eval_dir / "ranking.csv").empty
    run_figures(cfg, ws)  # nothing to plot: a warning, not a crash
    assert not (ws.figures_dir / "sae_quality.png").exists()


def test_stability_and_hierarchy_tables_cover_every_config(evaluated):
    """No checkpoint in this workspace: stability rows say so (0 seeds) and the hierarchy keeps
    its co-activation parents, without decoder parents."""
    stability = pd.read_csv(evaluated.eval.table("stability"))
    assert sorted(stability.sae_config) == sorted(c for _, c in CONFIGS)
    assert (stability.n_seeds == 0).all() and stability.matched_share.isna().all()
    hierarchy = pd.read_csv(evaluated.eval.table("hierarchy"))
    rows = hierarchy.groupby("sae_config").size().to_dict()
    assert rows == {"D_16_64_K_4_8": 48, "D_8_32_128_K_2_4_8": 24 + 96}
    deep = hierarchy[hierarchy.sae_config == "D_8_32_128_K_2_4_8"]
    assert set(deep.level) == {2, 3}
    assert (deep[deep.level == 2].parent_coact < 8).all()
    assert (deep[deep.level == 3].parent_coact < 32).all()
    assert (hierarchy.parent_decoder == -1).all()
    assert "stable" in (evaluated.eval_dir / "table1.md").read_text()


def test_a_workspace_evaluated_before_the_new_tables_gets_them(tmp_path):
    """A finished evaluate from before stability/hierarchy existed is not 'up to date': the units
    lacking the new parts are recomputed and both tables written."""
    ws = build_workspace(tmp_path / "ws", configs=CONFIGS[:1])
    cfg = _cfg(ws, tasks=["modality"])
    run_evaluate(cfg, ws)
    ws.eval.table("stability").unlink()
    ws.eval.table("hierarchy").unlink()
    for part in ws.eval_dir.rglob("hierarchy.parquet"):
        part.unlink()
    run_evaluate(cfg, ws)
    assert (
        len(pd.read_csv(ws.eval.table("hierarchy"))) == 48 and ws.eval.table("stability").is_file()
    )
