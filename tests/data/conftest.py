"""Tiny phantoms and helpers shared by the data-layer tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sail.config import PhantomConfig, SailConfig
from sail.data.phantom import write_phantom_dataset

REAL_EXAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "totalseg-example"


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """5 CT (head, neck, thorax, abdomen, pelvis) + 3 MRI (head, thorax, abdomen) at 32^3."""
    root = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(root, PhantomConfig(n_ct=5, n_mri=3, size=32, seed=7))
    return root


@pytest.fixture
def phantom_copy(phantom_root, tmp_path) -> Path:
    """A private copy a test may damage."""
    dst = tmp_path / "ts"
    shutil.copytree(phantom_root, dst)
    return dst


def make_cfg(source: Path, workspace: Path, **prepare) -> SailConfig:
    settings = {"source": source, "image_size": 32, "ct_spacing_mm": 8.0, "workers": 1} | prepare
    return SailConfig(workspace=workspace, prepare=settings)


def write_nifti(path: Path, data, affine, slope: float | None = None) -> None:
    import nibabel as nib
    import numpy as np

    img = nib.Nifti1Image(np.asarray(data), affine)
    if slope is not None:
        img.header.set_slope_inter(slope, 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


META_CT = (
    "image_id;age;gender;institute;study_type;split;manufacturer;scanner_model;kvp;pathology;"
    "pathology_location"
)


def write_ct_dataset(root: Path, scans: dict) -> Path:
    """scans: image_id -> (hu_array, affine, {structure: mask}, meta overrides)."""
    ct = root / "CT_Dataset_v201"
    lines = [META_CT]
    for image_id, (hu, affine, masks, meta) in scans.items():
        write_nifti(ct / image_id / "ct.nii.gz", hu, affine)
        for name, mask in masks.items():
            write_nifti(ct / image_id / "segmentations" / f"{name}.nii.gz", mask, affine)
        row = {
            "age": "50",
            "gender": "m",
            "institute": "B",
            "study_type": "ct abdomen",
            "split": "train",
        } | meta
        lines.append(
            ";".join(
                [
                    image_id,
                    row["age"],
                    row["gender"],
                    row["institute"],
                    row["study_type"],
                    row["split"],
                    "siemens",
                    "Force",
                    "120",
                    "no_pathology",
                    "no_location",
                ]
            )
        )
    (ct / "meta.csv").write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    return root
