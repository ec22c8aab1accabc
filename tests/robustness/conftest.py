"""One small workspace run through every stage once per session; each case damages a private copy.

The copy shares the PNG folder with the golden workspace through a symlink (cases never write
PNGs), so a case costs a copy of a few hundred small files and one in-process CLI call.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from sail.config import PhantomConfig, load_config
from sail.data.phantom import write_phantom_dataset
from sail.encoders.imported import import_embeddings
from sail.encoders.table import write_embeddings
from sail.pipeline import run_pipeline
from sail.workspace import Workspace
from tests.sae.conftest import one_torch_thread

TINY = {
    "prepare": {"image_size": 32, "ct_spacing_mm": 8.0, "workers": 1},
    "train": {
        "grid": [{"variant": "matryoshka", "dict_sizes": [8, 16], "k_values": [2, 4]}],
        "training": {"epochs": 1, "batch_size": 64},
    },
    "evaluate": {
        "probe": {"max_iter": 50, "train_samples": 200},
        "recovery": {
            "n_features": [1, 2],
            "thresholds": [0.5],
            "max_iter": 20,
            "train_samples": 100,
        },
        "monosemanticity": {"null_draws": 5},
        "concepts": {"bootstrap": 0},
    },
}
# Run bookkeeping, not artifacts: config.yaml records the last command's settings; locks, their
# holder.
NOT_ARTIFACTS = ("config.yaml", ".locks")


@pytest.fixture(autouse=True)
def _one_thread():
    """The SAE tests' setting for these runs too: one torch thread."""
    yield from one_torch_thread()


@pytest.fixture(scope="session")
def golden(tmp_path_factory):
    """(phantom source, workspace after prepare .. interpret fingerprint + report, config file)."""
    root = tmp_path_factory.mktemp("robust")
    src = root / "src"
    write_phantom_dataset(src, PhantomConfig(n_ct=8, n_mri=4, size=32, seed=7))
    cfg_yaml = root / "tiny.yaml"
    cfg_yaml.write_text(
        yaml.safe_dump({**TINY, "prepare": {**TINY["prepare"], "source": str(src)}})
    )
    ws = Workspace(root / "ws")
    cfg = load_config(cfg_yaml, {"workspace": ws.root})
    torch.set_num_threads(1)
    run_pipeline(cfg, "prepare", "split")
    slices = pd.read_parquet(ws.slices_table)
    x = np.random.default_rng(0).normal(size=(len(slices), 16)).astype(np.float32)
    write_embeddings(root / "emb.parquet", slices.slice_id, x)
    import_embeddings(ws, root / "emb.parquet", "toy")
    run_pipeline(cfg, "train", "interpret")
    run_pipeline(cfg, "report", "report")
    return src, ws.root, cfg_yaml


def copy_workspace(golden_ws: Path, dst: Path) -> Path:
    shutil.copytree(
        golden_ws, dst, ignore=lambda d, names: ["slices"] if Path(d) == golden_ws / "data" else []
    )
    os.symlink(golden_ws / "data" / "slices", dst / "data" / "slices")
    return dst


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every artifact under ``root`` (symlinked folders not followed)."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            if rel.split("/")[0] in NOT_ARTIFACTS:
                continue
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out
