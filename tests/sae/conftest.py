"""Fixtures for the SAE tests: planted-dictionary data and tiny embeddings tables."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from sail.encoders.table import write_embeddings
from sail.workspace import Workspace


def one_torch_thread():
    """Generator for an autouse fixture: torch on one thread for the test, then as before."""
    # Tiny tensors: extra threads only add contention on the shared CI cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_torch_thread()


def planted(n: int, d: int, n_atoms: int, k: int, seed: int = 0):
    """Unit-norm samples, each a positive mix of k of n_atoms random unit atoms."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(n_atoms, d, generator=g), dim=1)
    idx = torch.rand(n, n_atoms, generator=g).argsort(1)[:, :k]
    w = torch.rand(n, k, generator=g) + 0.5
    x = torch.einsum("nk,nkd->nd", w, atoms[idx])
    return torch.nn.functional.normalize(x, dim=1), atoms


def slice_ids(n: int, per_volume: int = 20) -> list[str]:
    mods = ["ct", "mri"]
    return [
        f"{mods[(i // per_volume) % 2]}/s{i // per_volume:04d}/axial/{i % per_volume:04d}"
        for i in range(n)
    ]


@pytest.fixture
def tiny_table(tmp_path):
    """A 400-row, 24-d embeddings table (planted atoms plus an offset) and its slice_ids."""
    x, _ = planted(400, 24, 32, 3, seed=3)
    x = x.numpy() * 5 + 1.0
    ids = slice_ids(400)
    path = tmp_path / "tiny.parquet"
    write_embeddings(path, ids, x)
    return path, np.asarray(sorted(ids), dtype=object)


@pytest.fixture
def workspace(tmp_path, tiny_table):
    """A workspace with the tiny table as embeddings/toy.parquet and a volume-level split."""
    path, ids = tiny_table
    ws = Workspace(tmp_path / "ws").ensure()
    ws.embeddings("toy").parent.mkdir(parents=True)
    shutil.copy(path, ws.embeddings("toy"))
    vols = pd.Series(ids).str.split("/", expand=True)[[0, 1]].drop_duplicates()
    split = np.array(["train", "train", "train", "valid", "test"] * 4)[: len(vols)]
    ws.data_dir.mkdir()
    pd.DataFrame({"modality": vols[0], "image_id": vols[1], "split": split}).to_csv(
        ws.split_csv, index=False
    )
    return ws
