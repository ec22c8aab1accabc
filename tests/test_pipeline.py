"""Bad inputs across stages end in one clear error naming the culprit (no traceback, no loss)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sail.config import ConfigError, load_config
from sail.encoders.table import write_embeddings
from sail.errors import SailError
from sail.pipeline import run_pipeline
from sail.workspace import Workspace, write_csv_atomic, write_parquet_atomic

TINY_GRID = [{"variant": "matryoshka", "dict_sizes": [4, 8], "k_values": [1, 2]}]


@pytest.fixture
def tiny_ws(tmp_path):
    """slices + split + 16-d embeddings for 12 volumes x 5 slices, no images needed for train."""
    rows = []
    for v in range(12):
        for i in range(5):
            rows.append(
                {
                    "slice_id": f"ct/s{v:04d}/axial/{i:04d}",
                    "modality": "ct",
                    "image_id": f"s{v:04d}",
                    "plane": "axial",
                    "slice_idx": i,
                    "png_path": f"data/slices/ct/s{v:04d}/axial_{i:04d}.png",
                    "sex": "mf"[v % 2],
                    "age": 30.0,
                    "age_group": "<40",
                    "institute": "B",
                    "has_liver": bool(i % 2),
                }
            )
    slices = pd.DataFrame(rows)
    ws = Workspace(tmp_path / "w")
    write_parquet_atomic(ws.slices_table, slices)
    split = ["train"] * 8 + ["valid"] * 2 + ["test"] * 2
    write_csv_atomic(
        ws.split_csv,
        pd.DataFrame(
            {"modality": "ct", "image_id": [f"s{v:04d}" for v in range(12)], "split": split}
        ),
    )
    x = np.random.default_rng(0).normal(size=(len(slices), 16)).astype(np.float32)
    write_embeddings(ws.embeddings("toy"), slices.slice_id, x)
    cfg = load_config(
        None,
        {
            "workspace": ws.root,
            "train": {"grid": TINY_GRID, "training": {"epochs": 1, "batch_size": 16}},
        },
    )
    return cfg, ws, slices, x


def test_nan_embedding_is_named_at_train(tiny_ws):
    cfg, ws, slices, x = tiny_ws
    x = x.copy()
    x[7, 3] = np.nan
    write_embeddings(ws.embeddings("toy"), slices.slice_id, x)
    with pytest.raises(SailError, match=r"toy.parquet: row 7 \(ct/s0001/axial/0002\) holds NaN"):
        run_pipeline(cfg, "train", "train")


def test_embedding_width_change_is_caught_at_activations(tiny_ws):
    cfg, ws, slices, x = tiny_ws
    run_pipeline(cfg, "train", "train")
    write_embeddings(ws.embeddings("toy"), slices.slice_id, np.hstack([x, x]))
    with pytest.raises(SailError, match="d_in 16 does not match toy embeddings of width 32"):
        run_pipeline(cfg, "activations", "activations", force=True)


def test_nested_config_typo_names_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  training: {epoch: 3}\n")
    with pytest.raises(ConfigError, match=r"train.training.*epoch"):
        load_config(path)
    path.write_text("evaluate:\n  probe: {C: -1}\n")
    with pytest.raises(ConfigError, match=r"evaluate.probe.C"):
        load_config(path)


def test_stage_range_backwards_is_an_error(tiny_ws):
    cfg, *_ = tiny_ws
    with pytest.raises(SailError, match="--from train comes after --to split"):
        run_pipeline(cfg, "train", "split")


def test_report_before_prepare_names_the_missing_table(tmp_path):
    cfg = load_config(None, {"workspace": tmp_path / "empty"})
    with pytest.raises(SailError, match=r"slices.parquet not found"):
        run_pipeline(cfg, "report", "report")


def test_interpret_without_activations_says_what_to_run(tiny_ws):
    cfg, *_ = tiny_ws
    with pytest.raises(SailError, match="run `sail activations` first"):
        run_pipeline(cfg, "interpret", "interpret")


def test_split_with_unknown_value_is_named(tiny_ws):
    cfg, ws, *_ = tiny_ws
    split = pd.read_csv(ws.split_csv)
    split.loc[3, "split"] = "val"
    write_csv_atomic(ws.split_csv, split)
    with pytest.raises(SailError, match=r"split.csv.*val"):
        run_pipeline(cfg, "train", "train")
