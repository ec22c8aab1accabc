"""A tiny real workspace for the maps stage: phantom slices, EfficientNet-Lite0 embeddings (real
weights, 64 px -> a 2 x 2 grid), a trained two-level SAE, its activations, and label maps in the
contract's format (written here from each slice's own pixels, so a structure is where its pixels
are)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sail.config import PhantomConfig, load_config
from sail.data.phantom import write_phantom_dataset
from sail.pipeline import run_pipeline
from sail.workspace import Workspace, manifest_path, write_csv_atomic, write_parquet_atomic

ENCODER = "efficientnet-lite0"
TINY_GRID = [  # two configs of one encoder: they share one encoder pass
    {"variant": "matryoshka", "dict_sizes": [8, 32], "k_values": [2, 4]},
    {"variant": "sail", "dict_sizes": [8, 32], "k_values": [2, 4]},
]
# label ids per modality (they differ on purpose: grounding must translate them)
STRUCTURE_IDS = pd.DataFrame(
    {
        "modality": ["ct", "ct", "mri", "mri"],
        "structure_id": [1, 2, 7, 3],
        "structure": ["soft_tissue", "bright_body", "soft_tissue", "bright_body"],
    }
)


def write_label_maps(ws: Workspace) -> pd.DataFrame:
    """Label maps beside each PNG from its own intensities (soft tissue 40-159, bright >= 160),
    recorded in slices.parquet's ``label_path`` with data/structure_ids.csv, and the structures'
    ``has_`` flags from the same maps, as prepare writes them."""
    slices = pd.read_parquet(ws.slices_table)
    ids = STRUCTURE_IDS.set_index(["modality", "structure"]).structure_id
    paths, soft, bright = [], [], []
    for row in slices.itertuples():
        img = np.asarray(Image.open(ws.root / row.png_path).convert("L"))
        label = np.zeros(img.shape, np.uint8)
        label[(img >= 40) & (img < 160)] = ids[(row.modality, "soft_tissue")]
        label[img >= 160] = ids[(row.modality, "bright_body")]
        rel = ws.slice_label_map(row.modality, row.image_id, row.plane, row.slice_idx)
        Image.fromarray(label).save(ws.root / rel)
        paths.append(rel)
        soft.append(bool((label == ids[(row.modality, "soft_tissue")]).any()))
        bright.append(bool((label == ids[(row.modality, "bright_body")]).any()))
    slices = slices.assign(label_path=paths, has_soft_tissue=soft, has_bright_body=bright)
    write_parquet_atomic(ws.slices_table, slices)
    manifest_path(ws.slices_table).unlink()  # the table changed on purpose
    write_csv_atomic(ws.structure_ids, STRUCTURE_IDS)
    return slices


@pytest.fixture(scope="session")
def maps_ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("maps")
    src = write_phantom_dataset(root / "ts", PhantomConfig(n_ct=6, n_mri=3, size=32, seed=1))
    cfg = load_config(
        None,
        {
            "workspace": root / "w",
            "prepare": {"source": src, "image_size": 64, "ct_spacing_mm": 8.0, "workers": 1},
            "split": {"test_institutes": ["B"]},
            "encode": {"encoders": [{"encoder": ENCODER, "image_size": 64}], "workers": 0},
            "train": {"grid": TINY_GRID, "training": {"epochs": 2, "batch_size": 64}},
            "report": {"max_features": 6, "top_slices": 3},
            "maps": {"null_permutations": 5, "batch_size": 8},
        },
    )
    ws = run_pipeline(cfg, "prepare", "activations")
    write_label_maps(ws)
    return cfg, ws
