"""Train + activations stages on a workspace, the CSR round trip, and the CLI verbs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from sail.cli import app
from sail.config import load_config
from sail.evaluate.stability import config_stability
from sail.sae.activations import encode_csr, run_activations
from sail.sae.activations_io import read_activations
from sail.sae.checkpoint import load_stack
from sail.sae.train import run_train
from sail.workspace import Workspace

GRID = [{"dict_sizes": [8, 32], "k_values": [2, 4]}, {"dict_sizes": [8, 32], "k_values": [3, 6]}]
TRAINING = {"epochs": 2, "batch_size": 64, "lr": 3e-3}


def test_train_and_activations_stages(workspace, caplog):
    cfg = load_config(
        None,
        {
            "workspace": workspace.root,
            "train": {"grid": GRID, "variants": ["matryoshka", "sail"], "training": TRAINING},
        },
    )
    run_train(cfg, workspace)
    dirs = sorted(p.parent for p in (workspace.root / "sae" / "toy").glob("*/*/cfg.json"))
    assert len(dirs) == 4
    assert not list((workspace.root / "sae").rglob("train_state.pt"))
    caplog.set_level("INFO")
    run_train(cfg, workspace)
    assert caplog.text.count("up to date") == 4

    run_activations(cfg, workspace)
    for sae_dir in dirs:
        model, sae_cfg = load_stack(sae_dir)
        assert sae_cfg["split"]["source"] == "split.csv" and sae_cfg["final_metrics"]["steps"] > 0
        total = 0
        for split in ("train", "valid", "test"):
            ids, csr, meta = read_activations(
                workspace.activations("toy", sae_dir.parent.name, sae_dir.name, split)
            )
            total += len(ids)
            assert meta["n_features"] == 32 and meta["split"] == split
            if split == "valid" and sae_cfg["variant"] == "matryoshka":
                assert (
                    abs(csr.getnnz(axis=1).mean() - sae_cfg["k_values"][-1])
                    / sae_cfg["k_values"][-1]
                    < 0.35
                )
        assert total == 400


@pytest.mark.parametrize("ks", [[3, 3, 3], [2, 4, 8]], ids=["flat", "doubling"])
def test_per_level_codes_use_every_range_on_held_out_rows(tmp_path, ks):
    """Calibrated on held-out training volumes; stored codes: every range that fired in training,
    L0 within 10% of K_last on valid, dead fraction from the codes."""
    from sail.encoders.table import write_embeddings
    from sail.sae.train import calibration_holdout, calibration_record
    from tests.sae.conftest import planted, slice_ids

    x, _ = planted(3000, 16, 48, 3, seed=2)
    ids = np.asarray(slice_ids(3000), dtype=object)
    ws = Workspace(tmp_path / "ws").ensure()
    write_embeddings(ws.embeddings("toy"), list(ids), x.numpy())
    vols = pd.Series(ids).str.rsplit("/", n=2).str[0].drop_duplicates().str.split("/", expand=True)
    split = np.array(["train"] * 8 + ["valid"] * 2)[np.arange(len(vols)) % 10]
    ws.data_dir.mkdir()
    pd.DataFrame({"modality": vols[0], "image_id": vols[1], "split": split}).to_csv(
        ws.split_csv, index=False
    )
    grid = [{"dict_sizes": [8, 32, 64], "k_values": ks}]
    cfg = load_config(
        None,
        {
            "workspace": ws.root,
            "train": {
                "grid": grid,
                "training": {
                    "epochs": 4,
                    "batch_size": 128,
                    "lr": 3e-3,
                    "auxk_k": 8,
                    "dead_window": 1000,
                },
            },
        },
    )
    run_train(cfg, ws)
    run_activations(cfg, ws)
    sae_dir = next((ws.root / "sae" / "toy" / "matryoshka").iterdir())
    _, sae_cfg = load_stack(sae_dir)

    train_ids = np.sort(ids)[
        np.isin(
            pd.Series(np.sort(ids)).str.rsplit("/", n=2).str[0],
            ["/".join(v) for v in vols[split == "train"].values],
        )
    ]
    held = calibration_holdout(train_ids, 0.1, 42)
    cal = sae_cfg["calibration"]
    assert cal["held_out"] and cal["rows"] == held.sum() == 240 and cal["volumes"] == 12
    assert (
        cal["slice_ids_sha256"] == calibration_record(train_ids[held], 0.1, 42)["slice_ids_sha256"]
    )
    _, codes, _ = read_activations(ws.activations("toy", "matryoshka", sae_dir.name, "valid"))
    fired_ranges = [r for r, n in zip(cal["ranges"], cal["selected"], strict=True) if n > 0]
    assert len(fired_ranges) == 3
    for lo, hi in fired_ranges:
        assert codes[:, lo:hi].nnz > 0, (lo, hi)
    assert abs(codes.getnnz(axis=1).mean() - ks[-1]) / ks[-1] < 0.10
    final = sae_cfg["final_metrics"]
    assert final["split"] == "valid" and final["rows"] == codes.shape[0]
    dead_from_codes = 1 - np.count_nonzero(codes.getnnz(axis=0)) / 64
    assert final["dead_frac"][-1] == pytest.approx(dead_from_codes)
    assert final["l0"][-1] == pytest.approx(codes.getnnz(axis=1).mean(), rel=1e-6)


def test_csr_export_equals_dense_codes_and_round_trips(tmp_path, tiny_table):
    from sail.encoders.table import read_embeddings
    from sail.sae.activations_io import write_activations
    from sail.sae.model import SAESpec, StackedSAE

    table = read_embeddings(tiny_table[0])
    model = StackedSAE([SAESpec("matryoshka", (8, 32), (3, 5))], 24)
    model.initialize([0], torch.tensor(table.x_ND), "mean")
    xn = torch.nn.functional.normalize(torch.tensor(table.x_ND), dim=1)
    model.calibrate(xn)
    dense = model.inference_codes(xn)[0].numpy()
    csr = encode_csr(model, table.x_ND, batch_size=37)
    np.testing.assert_array_equal(csr.toarray(), dense)
    write_activations(tmp_path / "a.parquet", table.slice_ids, csr, {"split": "train"})
    ids, back, _ = read_activations(tmp_path / "a.parquet")
    np.testing.assert_array_equal(back.toarray(), dense)
    assert list(ids) == list(table.slice_ids)


def test_cli_train_on_any_table_and_import(tmp_path, tiny_table):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "training: {epochs: 1, batch_size: 64}\nconfigs:\n  - "
        "{dict_sizes: [8, 32], k_values: [2, 4]}\n"
    )
    runner = CliRunner()
    ws = tmp_path / "ws"
    res = runner.invoke(
        app,
        [
            "train",
            "--embeddings",
            str(tiny_table[0]),
            "--grid",
            str(grid),
            "--variant",
            "sail",
            "--workspace",
            str(ws),
        ],
    )
    assert res.exit_code == 0, res.output
    sae = next((ws / "sae" / "tiny" / "sail").iterdir())
    _, cfg = load_stack(sae)
    assert cfg["split"]["source"] == "seeded" and cfg["split"]["counts"] == {
        "train": 320,
        "valid": 40,
        "test": 40,
    }
    res = runner.invoke(
        app, ["activations", "--embeddings", str(tiny_table[0]), "--workspace", str(ws)]
    )
    assert res.exit_code == 0, res.output
    assert len(list((ws / "activations" / "tiny" / "sail").rglob("*.parquet"))) == 3
    res = runner.invoke(
        app, ["train", "--encoder", "missing", "--grid", "demo", "--workspace", str(ws)]
    )
    assert res.exit_code == 2 and "embeddings table not found" in res.output


def test_cli_seed_replicates_of_the_tied_sail_variant(tmp_path, tiny_table):
    """`sail train --seed 42 --seed 3`: the sail variant's replicate, compared on its tied W."""
    grid = tmp_path / "grid.yaml"
    grid.write_text("training: {epochs: 1, batch_size: 64}\nconfigs:\n")
    grid.write_text(grid.read_text() + "  - {dict_sizes: [8, 32], k_values: [2, 4]}\n")
    ws = tmp_path / "ws"
    args = ["train", "--embeddings", str(tiny_table[0]), "--grid", str(grid)]
    args += ["--variant", "sail", "--seed", "42", "--seed", "3", "--workspace", str(ws)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    config = next((ws / "sae" / "tiny" / "sail").iterdir()).name
    workspace = Workspace(ws)
    assert list(workspace.replicate_dirs("tiny", "sail", config)) == [3]
    row = config_stability(workspace, "tiny", "sail", config, [8, 32]).iloc[0]
    assert row.n_seeds == 2 and row.seeds == "42;3" and 0 < row.mean_matched_cos <= 1
    res = CliRunner().invoke(app, [*args[:-2], "--seed", "3", "--workspace", str(ws)])
    assert res.exit_code == 2 and "repeat a seed" in res.output


def test_stale_checkpoints_rerun_or_recalibrate_without_retraining(workspace, caplog):
    """Artifact semantics: an old checkpoint is refused or retrained; --recalibrate keeps its
    weights."""
    import json
    import logging

    from safetensors.torch import load_file, save_file

    from sail.workspace import manifest_path

    grid = [{"dict_sizes": [8, 32], "k_values": [3, 3]}]
    cfg = load_config(
        None, {"workspace": workspace.root, "train": {"grid": grid, "training": TRAINING}}
    )
    run_train(cfg, workspace)
    sae_dir = next((workspace.root / "sae" / "toy" / "matryoshka").iterdir())
    weights = sae_dir / "model.safetensors"
    # what SAIL <= 3e0f9d4 wrote: per-prefix thresholds (inf after the first range), no semantics
    state = load_file(str(weights))
    state["thresholds"] = torch.tensor([0.1, float("inf")])
    save_file(
        state, str(weights), metadata={"sail": '{"schema_version": 1, "variant": "matryoshka"}'}
    )
    old_cfg = json.loads((sae_dir / "cfg.json").read_text())
    for key in ("artifact_semantics", "calibration", "weights_sha256"):  # none of them existed then
        old_cfg.pop(key)
    (sae_dir / "cfg.json").write_text(json.dumps(old_cfg))
    manifest = json.loads(manifest_path(weights).read_text())
    manifest.pop("semantics")
    manifest_path(weights).write_text(json.dumps(manifest))

    with pytest.raises(Exception, match="--recalibrate"):
        load_stack(sae_dir)
    res = CliRunner().invoke(
        app,
        [
            "train",
            "--grid",
            str(_grid_file(workspace, grid)),
            "--recalibrate",
            "--workspace",
            str(workspace.root),
        ],
    )
    assert res.exit_code == 0, res.output
    after = load_file(str(weights))
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(after[name], state[name]), name
    assert bool(torch.isfinite(after["thresholds"]).all())
    model, new_cfg = load_stack(sae_dir)
    assert new_cfg["artifact_semantics"] == 2 and new_cfg["calibration"]["recalibrated"]
    assert new_cfg["final_metrics"]["dead_frac_source"] == "stored codes"
    logging.getLogger().addHandler(
        caplog.handler
    )  # the CLI's logging setup replaced the root handlers
    caplog.set_level("INFO")
    run_train(
        load_config(
            None, {"workspace": workspace.root, "train": {"grid": grid, "training": TRAINING}}
        ),
        workspace,
    )
    assert "up to date" in caplog.text and "retraining" not in caplog.text


def _grid_file(ws: Workspace, grid: list[dict]):
    import yaml

    path = ws.root / "grid.yaml"
    path.write_text(yaml.safe_dump({"training": TRAINING, "configs": grid}))
    return path


def test_seed_replicates_live_under_their_config_and_are_not_activated(workspace, caplog):
    """train.seeds: the config folder holds the first seed's model, replicates of the selected
    config sit in <config>/seed-<n>/ with their own seed; downstream stages see only configs."""
    cfg = load_config(
        None,
        {
            "workspace": workspace.root,
            "train": {
                "grid": GRID,
                "variants": ["matryoshka"],
                "training": TRAINING,
                "seeds": [42, 7],
                "replicate_configs": ["matryoshka/D_8_32_K_2_4"],
            },
        },
    )
    run_train(cfg, workspace)
    root = workspace.root / "sae" / "toy" / "matryoshka"
    configs = sorted(p.parent.name for p in root.glob("*/cfg.json"))
    assert len(configs) == 2
    replicated = next(c for c in configs if c.startswith("D_8_32_K_2_4"))
    assert workspace.replicate_dirs("toy", "matryoshka", replicated).keys() == {7}
    for other in configs:
        if other != replicated:
            assert workspace.replicate_dirs("toy", "matryoshka", other) == {}
    main, main_cfg = load_stack(root / replicated)
    rep, rep_cfg = load_stack(workspace.replicate_dir("toy", "matryoshka", replicated, 7))
    assert main_cfg["training"]["seed"] == 42 and rep_cfg["training"]["seed"] == 7
    assert not torch.equal(main.W_decoder, rep.W_decoder)
    row = config_stability(workspace, "toy", "matryoshka", replicated, [8, 32]).iloc[0]
    assert row.n_seeds == 2 and row.seeds == "42;7" and row.n_latents == 32
    assert 0 <= row.matched_share_all_seeds <= row.matched_share <= 1
    assert 0 < row.mean_matched_cos <= 1 and len(row.matched_share_by_level.split(";")) == 2
    caplog.set_level("INFO")
    run_train(cfg, workspace)
    assert caplog.text.count("up to date") == 3

    run_activations(cfg, workspace)
    activated = sorted(
        p.parent.name for p in (workspace.root / "activations").rglob("valid.parquet")
    )
    assert activated == configs
