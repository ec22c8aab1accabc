"""A small workspace with data, split, embeddings and planted activations for report tests."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from sail.config import PhantomConfig, SailConfig
from sail.data.phantom import write_phantom_dataset
from sail.data.prepare import run_prepare
from sail.data.split import run_split
from sail.encoders.table import write_embeddings
from sail.evaluate.inputs import load_eval_data, load_sparse
from sail.evaluate.top_slices import top_per_volume
from sail.sae.activations_io import write_activations
from sail.workspace import Workspace, write_csv_atomic

ENCODER, VARIANT, CONFIG = "toy", "matryoshka", "D_8_32_K_2_4"
MAPPED = (0, 1, 2, 3, 5)  # features the maps fixture gives maps (feature 4 has none)
GRID = 4


def write_contract_maps(ws: Workspace, method: str = "exact", top: int = 12) -> None:
    """maps.npz, maps.json and eval/spatial_grounding.csv in the issue-17 contract format (as the
    maps stage writes them): per mapped feature, a map for each of its top validation slices
    (one per volume, the report's own rule), feature 1's last slice without one, the rest
    padding. Each map peaks in a known cell: feature 0 at the top-left, the others bottom-right."""
    data = load_eval_data(ws)
    codes = load_sparse(ws, ENCODER, VARIANT, CONFIG, data)
    valid = data.split_rows["valid"]
    sub = codes[valid].tocsc()
    sub.sort_indices()
    rng = np.random.default_rng(3)
    K = len(MAPPED)
    slice_id_KT = np.full((K, top), "", dtype=object)
    maps_KThw = np.zeros((K, top, GRID, GRID), np.float16)
    pre_KT = np.full((K, top), np.nan, np.float32)
    for k, f in enumerate(MAPPED):
        rows, _ = top_per_volume(sub, f, data.volume[valid], top)
        n = max(len(rows) - (f == 1), 0)  # feature 1's last tile gets no map
        slice_id_KT[k, :n] = data.slices.slice_id.to_numpy()[valid[rows[:n]]]
        m = rng.normal(0, 0.2, (n, GRID, GRID))
        peak = (0, 0) if f == 0 else (GRID - 1, GRID - 1)
        m[:, peak[0], peak[1]] = 2.0
        m[:, 1, 1] = -1.0  # a cell that argues against the feature
        maps_KThw[k, :n] = m
        pre_KT[k, :n] = maps_KThw[k, :n].astype(np.float32).mean(axis=(1, 2))
    folder = ws.maps(ENCODER, VARIANT, CONFIG)
    folder.path.mkdir(parents=True, exist_ok=True)
    np.savez(
        folder.arrays,
        feature_K=np.array(MAPPED, np.int64),
        slice_id_KT=slice_id_KT.astype(str),
        maps_KThw=maps_KThw,
        pre_KT=pre_KT,
    )
    provenance = {"method": method, "approximate": method == "approximate", "encoder": ENCODER,
                  "grid": [GRID, GRID], "image_size": 32, "split": "valid"}  # fmt: skip
    folder.provenance.write_text(json.dumps(provenance))
    grounding = pd.DataFrame(
        {
            "encoder": ENCODER,
            "variant": VARIANT,
            "sae_config": CONFIG,
            "feature": list(MAPPED),
            "method": method,
            "structure": ["liver", "brain", "", "skull", "kidney_left"],
            "mass_share": [0.62, 0.55, np.nan, 0.3, 0.2],
            "hit_rate": [0.9, 0.25, np.nan, 0.5, 0.75],
            "null_hit_rate": [0.1, 0.2, np.nan, 0.3, 0.05],
            "n_slices": [4, 3, 0, 2, 4],
            "n_holding": [4, 3, 0, 2, 4],
            "located_rate": [0.9, 0.25, np.nan, 0.5, 0.75],
            "located_null_rate": [0.4, 0.3, np.nan, 0.5, 0.2],
            "enrichment_structure": ["liver", "brain", "", "", "kidney_left"],
            "enrichment_hit_rate": [0.9, 0.25, np.nan, np.nan, 0.75],
            "enrichment_null_hit_rate": [0.1, 0.2, np.nan, np.nan, 0.05],
            "enrichment_n_holding": [4, 3, 0, 0, 4],
            "enrichment_located_rate": [0.9, 0.25, np.nan, np.nan, 0.75],
            "enrichment_located_null_rate": [0.4, 0.3, np.nan, np.nan, 0.2],
        }
    )
    ws.eval_dir.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(ws.eval.spatial_grounding, grounding)


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
    write_contract_maps(ws)
    return cfg, ws
