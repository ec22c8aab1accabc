"""A small workspace with data, split, embeddings and planted activations for report tests."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from sail.config import PhantomConfig, SailConfig
from sail.data.phantom import write_phantom_dataset
from sail.data.prepare import run_prepare
from sail.data.split import run_split
from sail.encoders.table import write_embeddings
from sail.sae.activations_io import write_activations
from sail.workspace import Workspace, write_csv_atomic

ENCODER, VARIANT, CONFIG = "toy", "matryoshka", "D_8_32_K_2_4"


@pytest.fixture(scope="session")
def report_ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    src = write_phantom_dataset(root / "ts", PhantomConfig(n_ct=6, n_mri=3, size=32, seed=1))
    ws = Workspace(root / "w")
    cfg = SailConfig(
        workspace=ws.root,
        prepare={"source": src, "image_size": 32, "ct_spacing_mm": 8.0, "workers": 1},
        split={"test_institutes": ["B"]},
    )  # head + pelvis CT held out; two abdomens in valid
    run_prepare(cfg, ws)
    run_split(cfg, ws)
    slices = pd.read_parquet(ws.slices_table)
    split = pd.read_csv(ws.split_csv)
    rng = np.random.default_rng(0)
    write_embeddings(
        ws.embeddings(ENCODER),
        slices.slice_id,
        rng.normal(size=(len(slices), 8)).astype(np.float32),
    )
    # planted features: 0 = liver, 1 = brain, 2 = axial plane, 3 = MRI; the rest random
    n = len(slices)
    dense = np.zeros((n, 32), np.float32)
    dense[:, 0] = slices.has_liver.fillna(False).to_numpy() * rng.uniform(1, 2, n)
    dense[:, 1] = slices.has_brain.fillna(False).to_numpy() * rng.uniform(1, 2, n)
    dense[:, 2] = (slices.plane == "axial").to_numpy() * rng.uniform(0.5, 1, n)
    dense[:, 3] = (slices.modality == "mri").to_numpy() * rng.uniform(0.5, 1, n)
    noise = rng.random((n, 28)) < 0.1
    dense[:, 4:] = noise * rng.uniform(0.1, 0.5, (n, 28))
    merged = slices[["slice_id", "modality", "image_id"]].merge(split, on=["modality", "image_id"])
    for name in ("train", "valid", "test"):
        rows = merged.index[merged.split == name].to_numpy()
        write_activations(
            ws.activations(ENCODER, VARIANT, CONFIG, name),
            slices.slice_id.to_numpy()[rows],
            sp.csr_matrix(dense[rows]),
        )
    autointerp = ws.interpret_dir / "autointerp" / ENCODER / VARIANT / CONFIG / "descriptions.csv"
    write_csv_atomic(
        autointerp,
        pd.DataFrame(
            {
                "feature": [0, 1],
                "description": ["liver <script>window.__pwned = 1</script> & co", "brain"],
                "judge_score": [1.0, 0.5],
            }
        ),
    )
    return cfg, ws
