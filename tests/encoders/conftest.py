"""A tiny prepared workspace (PNGs + slices.parquet) and tiny model configs for encoder tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sail.workspace import Workspace

TINY_FOCALNET = dict(
    embed_dim=8, depths=(1, 1, 2, 1), focal_levels=(2, 2, 3, 2), focal_windows=(3, 3, 3, 3)
)
TINY_DINOV3 = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_register_tokens=4,
    patch_size=16,
    image_size=64,
)


def make_workspace(root: Path, n: int = 10, size: int = 32, seed: int = 0) -> Workspace:
    """``n`` grayscale slices with distinct smooth content, in DESIGN's slice_id/png_path layout."""
    ws = Workspace(root).ensure()
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    rows = []
    for i in range(n):
        modality = "ct" if i % 2 == 0 else "mri"
        image_id, plane, idx = f"s{i // 4:04d}", "axial", i % 4
        slice_id = f"{modality}/{image_id}/{plane}/{idx:04d}"
        a, b, c = rng.uniform(0.5, 3.0, size=3)
        img = (
            127.5
            * (1 + np.sin(a * 6.28 * xx + b * 6.28 * yy + c))
            * (0.5 + 0.5 * rng.random((size, size)))
        )
        rel = Path("data/slices") / modality / image_id / f"{plane}_{idx:04d}.png"
        (ws.root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.clip(0, 255).astype(np.uint8), mode="L").save(ws.root / rel)
        rows.append(
            dict(
                slice_id=slice_id,
                modality=modality,
                image_id=image_id,
                plane=plane,
                slice_idx=idx,
                png_path=rel.as_posix(),
            )
        )
    # Rows deliberately not in slice_id order: the encoder must sort.
    pd.DataFrame(rows[::-1]).to_parquet(ws.slices_table, index=False)
    return ws


@pytest.fixture
def tiny_ws(tmp_path: Path) -> Workspace:
    return make_workspace(tmp_path / "ws")
