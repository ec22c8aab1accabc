"""A small synthetic workspace for evaluation tests: slices.parquet, split.csv, embeddings,
activations, SAE cfg.json + metrics.csv, with known planted structure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sail.encoders.table import write_embeddings
from sail.sae.activations_io import write_activations
from sail.workspace import Workspace

STRUCTURES = {  # structure -> (lo, hi) of the normalised slice position where it is present
    "prostate": (0.0, 0.15),
    "liver": (0.2, 0.6),
    "gallbladder": (0.3, 0.5),
    "spleen": (0.3, 0.6),
    "kidney_left": (0.4, 0.7),
    "heart": (0.6, 0.9),
    "sternum": (0.65, 0.95),
    "clavicula_left": (0.85, 1.0),
    "clavicula_right": (0.85, 1.0),
    "brain": (0.92, 1.0),
    "lung_upper_lobe_left": (0.6, 0.9),
    "lung_left": (0.6, 0.9),
}
INSTITUTES = list("ABCDEFGHIJ")
PLANTED = {s: i for i, s in enumerate(STRUCTURES)}  # structure -> feature that tracks it
CT_FEATURE, INSTITUTE_B_FEATURE = 12, 13


def make_slices(
    n_ct: int = 14, n_mri: int = 6, per_plane: int = 8, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    rows, split_rows = [], []
    for modality, n_vol in (("ct", n_ct), ("mri", n_mri)):
        for v in range(n_vol):
            image_id = f"s{v:04d}"  # CT and MRI reuse ids on purpose
            institute = (
                INSTITUTES[v % len(INSTITUTES)]
                if modality == "ct"
                else INSTITUTES[(v * 3 + 1) % len(INSTITUTES)]
            )
            split = "test" if institute in "ADE" else ("valid" if v % 3 == 2 else "train")
            split_rows.append({"modality": modality, "image_id": image_id, "split": split})
            sex = "f" if v % 2 else "m"
            age = float([30, 45, 70, 85, 40, 80][v % 6])
            planes = ["axial", "coronal", "sagittal"] if modality == "ct" else ["axial"]
            for plane in planes:
                for i in range(per_plane):
                    u = i / (per_plane - 1)
                    row = {
                        "slice_id": f"{modality}/{image_id}/{plane}/{i:04d}",
                        "modality": modality,
                        "image_id": image_id,
                        "plane": plane,
                        "slice_idx": i,
                        "png_path": "x.png",
                        "sex": sex,
                        "age": age,
                        "institute": institute,
                        "manufacturer": "ge" if v % 2 else "siemens",
                        "scanner_model": "Skyra" if v % 2 else "Achieva",
                        "kvp": 120.0
                        if modality == "ct" and v % 2
                        else (80.0 if modality == "ct" else None),
                        "pathology": None,
                    }
                    for s, (lo, hi) in STRUCTURES.items():
                        present = lo <= u + rng.normal(0, 0.03) <= hi
                        if s == "lung_upper_lobe_left" and modality == "mri":
                            present = False
                        if s in ("sternum", "prostate") and modality == "mri":
                            present = present and modality == "ct"
                        row[f"has_{s}"] = bool(present)
                    rows.append(row)
    return pd.DataFrame(rows), pd.DataFrame(split_rows)


def dense_embeddings(slices: pd.DataFrame, d: int = 24, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    parts = [
        (slices["modality"] == "ct").to_numpy(float)[:, None],
        pd.get_dummies(slices["plane"])
        .reindex(columns=["axial", "coronal", "sagittal"], fill_value=0)
        .to_numpy(float),
        (slices["sex"] == "f").to_numpy(float)[:, None] * 0.6,
        slices["age"].to_numpy(float)[:, None] / 100,
        slices[[f"has_{s}" for s in STRUCTURES]].to_numpy(float),
    ]
    z = np.concatenate(parts, axis=1)
    w = rng.normal(size=(z.shape[1], d))
    return (z @ w + rng.normal(0, 0.3, size=(len(slices), d))).astype(np.float32)


def sparse_codes(
    slices: pd.DataFrame, n_features: int, seed: int = 0, density: float = 0.05
) -> sp.csr_matrix:
    """Features 0..11 track one structure each, 12 tracks CT, 13 institute B; the rest is noise."""
    rng = np.random.default_rng(seed)
    n = len(slices)
    x = (rng.random((n, n_features)) < density) * rng.random((n, n_features)) * 0.3
    for s, f in PLANTED.items():
        on = slices[f"has_{s}"].to_numpy(bool)
        x[:, f] = np.where(on, 1.0 + rng.random(n), 0.0)
    x[:, CT_FEATURE] = np.where(slices["modality"] == "ct", 0.5 + rng.random(n), 0.0)
    x[:, INSTITUTE_B_FEATURE] = np.where(slices["institute"] == "B", 2.0 + rng.random(n), 0.0)
    return sp.csr_matrix(x.astype(np.float32))


def write_sae(
    ws: Workspace,
    encoder: str,
    variant: str,
    config: str,
    slices: pd.DataFrame,
    split: pd.DataFrame,
    seed: int = 0,
    write_cfg: bool = True,
) -> None:
    from sail.evaluate.inputs import parse_config_name

    dict_sizes, k_values = parse_config_name(config)
    merged = slices.merge(split, on=["modality", "image_id"])
    codes = sparse_codes(merged, dict_sizes[-1], seed)
    for s in ("train", "valid", "test"):
        m = (merged["split"] == s).to_numpy()
        write_activations(
            ws.activations(encoder, variant, config, s), merged["slice_id"][m], codes[m]
        )
    sae_dir = ws.sae_dir(encoder, variant, config)
    sae_dir.mkdir(parents=True, exist_ok=True)
    if write_cfg:
        (sae_dir / "cfg.json").write_text(
            json.dumps(
                {
                    "schema_version": 1,
                    "variant": variant,
                    "dict_sizes": dict_sizes,
                    "k_values": k_values,
                    "d_in": 16,
                }
            )
        )
    levels = range(len(dict_sizes))
    metrics = pd.DataFrame(
        [
            {
                "step": step,
                "epoch": step // 10,
                "split": sp_,
                "level": lv,
                "fvu": 0.3 - 0.01 * step,
                "r2_published": 0.7 + 0.01 * step + 0.02 * seed,
                "l0": float(k_values[lv]) * (1 + seed),
                "dead_frac": 0.1,
                "auxk_loss": 0.0,
                "lr": 1e-4,
            }
            for step in (10, 20)
            for sp_ in ("train", "valid")
            for lv in levels
        ]
    )
    metrics.to_csv(sae_dir / "metrics.csv", index=False)


def build_workspace(
    root: Path,
    configs=(("matryoshka", "D_16_64_K_4_8"),),
    encoder: str = "enc",
    seed: int = 0,
    **slice_kw,
) -> Workspace:
    ws = Workspace(root).ensure()
    slices, split = make_slices(seed=seed, **slice_kw)
    ws.data_dir.mkdir(parents=True, exist_ok=True)
    slices.to_parquet(ws.slices_table, index=False)
    split.to_csv(ws.split_csv, index=False)
    write_embeddings(
        ws.embeddings(encoder), slices["slice_id"], dense_embeddings(slices, seed=seed)
    )
    for i, (variant, config) in enumerate(configs):
        write_sae(ws, encoder, variant, config, slices, split, seed=i)
    return ws


def fast_overrides(**extra) -> dict:
    """Evaluate settings that keep the tests quick (same code paths as the published defaults)."""
    ev = {
        "probe": {"max_iter": 300, "tol": 1e-3},
        "recovery": {"max_iter": 100},
        "concepts": {"bootstrap": 20},
        "monosemanticity": {"top_n": [3, 5], "null_draws": 20},
    }
    ev.update(extra)
    return {"evaluate": ev}
