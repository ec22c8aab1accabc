"""Train + activations stages on a workspace, the CSR round trip, and the CLI verbs."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from sail.cli import app
from sail.config import load_config
from sail.sae.activations import encode_csr
from sail.sae.activations_io import read_activations
from sail.sae.checkpoint import load_sae
from sail.sae.train import run_train
from sail.sae.activations import run_activations
from sail.workspace import Workspace

GRID = [{"dict_sizes": [8, 32], "k_values": [2, 4]}, {"dict_sizes": [8, 32], "k_values": [3, 6]}]
TRAINING = {"epochs": 2, "batch_size": 64, "lr": 3e-3}


@pytest.fixture
def workspace(tmp_path, tiny_table):
    path, ids = tiny_table
    ws = Workspace(tmp_path / "ws").ensure()
    ws.embeddings("toy").parent.mkdir(parents=True)
    shutil.copy(path, ws.embeddings("toy"))
    vols = pd.Series(ids).str.split("/", expand=True)[[0, 1]].drop_duplicates()
    split = np.array(["train", "train", "train", "valid", "test"] * 4)[: len(vols)]
    ws.data_dir.mkdir()
    pd.DataFrame({"modality": vols[0], "image_id": vols[1], "split": split}).to_csv(ws.split_csv, index=False)
    return ws


def test_train_and_activations_stages(workspace, caplog):
    cfg = load_config(None, {"workspace": workspace.root, "train": {"grid": GRID, "variants": ["matryoshka", "sail"],
                                                                    "training": TRAINING}})
    run_train(cfg, workspace)
    dirs = sorted(p.parent for p in (workspace.root / "sae" / "toy").glob("*/*/cfg.json"))
    assert len(dirs) == 4
    assert not list((workspace.root / "sae").rglob("train_state.pt"))
    caplog.set_level("INFO")
    run_train(cfg, workspace)
    assert caplog.text.count("up to date") == 4

    run_activations(cfg, workspace)
    for sae_dir in dirs:
        model, sae_cfg = load_sae(sae_dir)
        assert sae_cfg["split"]["source"] == "split.csv" and sae_cfg["final_metrics"]["steps"] > 0
        total = 0
        for split in ("train", "valid", "test"):
            ids, csr, meta = read_activations(
                workspace.activations("toy", sae_dir.parent.name, sae_dir.name, split))
            total += len(ids)
            assert meta["n_features"] == 32 and meta["split"] == split
            if split == "valid" and sae_cfg["variant"] == "matryoshka":
                assert abs(csr.getnnz(axis=1).mean() - sae_cfg["k_values"][-1]) / sae_cfg["k_values"][-1] < 0.35
        assert total == 400


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
    grid.write_text("training: {epochs: 1, batch_size: 64}\nconfigs:\n  - {dict_sizes: [8, 32], k_values: [2, 4]}\n")
    runner = CliRunner()
    ws = tmp_path / "ws"
    res = runner.invoke(app, ["train", "--embeddings", str(tiny_table[0]), "--grid", str(grid), "--variant", "sail",
                              "--workspace", str(ws)])
    assert res.exit_code == 0, res.output
    sae = next((ws / "sae" / "tiny" / "sail").iterdir())
    _, cfg = load_sae(sae)
    assert cfg["split"]["source"] == "seeded" and cfg["split"]["counts"] == {"train": 320, "valid": 40, "test": 40}
    res = runner.invoke(app, ["activations", "--embeddings", str(tiny_table[0]), "--workspace", str(ws)])
    assert res.exit_code == 0, res.output
    assert len(list((ws / "activations" / "tiny" / "sail").rglob("*.parquet"))) == 3
    res = runner.invoke(app, ["train", "--encoder", "missing", "--grid", "demo", "--workspace", str(ws)])
    assert res.exit_code == 2 and "embeddings table not found" in res.output
