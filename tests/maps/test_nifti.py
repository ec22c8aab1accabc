"""Feature maps back in the volume's own geometry (issue 17, item 4).

The inverse of prepare's geometry is checked on prepare's real output: a bright structure, read
off the slice PNGs by a threshold and placed back with :func:`place_slices`, must overlap the
structure's voxel mask in the source volume (Dice), for both styles, CT resampling with a stride,
a permuted/flipped (LPS-like) affine, and an MRI resampled in-plane.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sail.config import SailConfig
from sail.data.prepare import run_prepare
from sail.maps.nifti import (
    place_slices,
    plane_layout,
    prepared_axes,
)
from sail.workspace import Workspace

HU_BODY, HU_ORGAN = 0.0, 300.0


def _volume(shape, spacing, seed=0):
    """An air background, a body ellipsoid and an off-centre organ ellipsoid (in mm)."""
    idx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    mm = [(i - (n - 1) / 2) * s for i, n, s in zip(idx, shape, spacing, strict=True)]
    extent = [n * s / 2 for n, s in zip(shape, spacing, strict=True)]
    body = sum((x / (0.9 * e)) ** 2 for x, e in zip(mm, extent, strict=True)) <= 1
    centre = [0.2 * extent[0], -0.15 * extent[1], 0.1 * extent[2]]
    organ = sum(((x - c) / (0.4 * e)) ** 2 for x, c, e in zip(mm, centre, extent, strict=True)) <= 1
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[body] = HU_BODY
    hu[organ] = HU_ORGAN
    return hu, organ.astype(np.uint8)


def _affine(spacing, permute=False):
    """Diagonal RAS, or axes stored permuted and flipped (array axis 0 = -y, 1 = z, 2 = -x)."""
    a = np.eye(4)
    if not permute:
        a[:3, :3] = np.diag(spacing)
    else:
        a[:3, :3] = 0.0
        a[1, 0], a[2, 1], a[0, 2] = -spacing[0], spacing[1], -spacing[2]
    a[:3, 3] = [10.0, -20.0, 30.0]
    return a


def _dataset(root: Path, modality: str, shape, spacing, permute=False) -> tuple[Path, Path]:
    """A one-volume manifest dataset (image + one structure mask); returns (manifest, image)."""
    hu, organ = _volume(shape, spacing)
    if modality == "mri":
        hu = np.where(hu > -1000, hu + 400.0, 0.0).astype(np.float32)
    affine = _affine(spacing, permute)
    image = root / "vol1.nii.gz"
    seg = root / "vol1_seg"
    seg.mkdir(parents=True)
    for path, data in ((image, hu), (seg / "liver.nii.gz", organ)):
        img = nib.Nifti1Image(data, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=2)
        nib.save(img, str(path))
    manifest = root / "manifest.csv"
    pd.DataFrame(
        [
            {
                "image": image.name,
                "image_id": "vol1",
                "modality": modality,
                "segmentations": seg.name,
                "study_type": "ct abdomen",
            }
        ]
    ).to_csv(manifest, index=False)
    return manifest, image


def _prepare(tmp_path: Path, modality, shape, spacing, permute=False, **prepare):
    manifest, image = _dataset(tmp_path / "src", modality, shape, spacing, permute)
    settings = {"source": manifest, "modalities": [modality], "workers": 1} | prepare
    cfg = SailConfig(workspace=tmp_path / "ws", prepare=settings)
    ws = Workspace(cfg.workspace)
    run_prepare(cfg, ws)
    return cfg, ws, image


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def _round_trip(cfg, ws, image, mirror=False):
    """Per plane: organ threshold on the PNGs -> volume; Dice with the source mask inside the
    filled voxels, and the share of the mask that was filled. ``mirror``: place with the image
    columns the wrong way round (a control: the check must see it)."""
    src = nib.load(str(image))
    organ = nib.load(str(image.parent / "vol1_seg" / "liver.nii.gz")).get_fdata() > 0
    slices = pd.read_parquet(ws.slices_table)
    pc = cfg.prepare
    out = {}
    for plane, part in slices.groupby("plane"):
        part = part.sort_values("slice_idx")
        pngs = np.stack([np.array(Image.open(ws.root / p)) for p in part.png_path])
        # organ vs body: both styles map intensity monotonically to 0-255, the organ is brightest
        threshold = (np.percentile(pngs[pngs > 10], 50) + pngs.max()) / 2
        masks = (pngs > threshold).astype(np.float32)
        layout = plane_layout(part, plane, pc.style, pc.slice_stride)
        if mirror:
            layout = replace(layout, flip_cols=not layout.flip_cols)
        axes = prepared_axes(
            src.affine, src.shape, part.modality.iloc[0], layout.axis, pc.style, pc.ct_spacing_mm
        )
        values, filled = place_slices(axes, layout, masks)
        placed = values >= 0.5
        out[plane] = (
            _dice(placed & filled, organ & filled),
            float((organ & filled).sum() / organ.sum()),
            filled,
        )
    return out


CASES = {
    # canonical CT: permuted + flipped storage, anisotropic voxels resampled, stride 2
    "ct-canonical-lps-resampled-stride2": (
        "ct",
        (48, 26, 40),
        (1.1, 2.5, 0.9),
        True,
        {"style": "canonical", "ct_spacing_mm": 1.5, "slice_stride": 2, "image_size": 48},
    ),
    # published CT: isotropic, no reorientation, central crop, mirrored axial
    "ct-published": (
        "ct",
        (36, 30, 26),
        (1.5, 1.5, 1.5),
        False,
        {"style": "published", "slice_stride": 1, "image_size": 40},
    ),
    # canonical MRI: anisotropic in-plane pixels resampled to square, one plane
    "mri-canonical-inplane": (
        "mri",
        (30, 40, 12),
        (1.6, 1.0, 4.0),
        True,
        {"style": "canonical", "slice_stride": 1, "image_size": 48},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_structure_read_off_the_pngs_lands_on_its_voxels(tmp_path, case):
    modality, shape, spacing, permute, prepare = CASES[case]
    cfg, ws, image = _prepare(tmp_path, modality, shape, spacing, permute, **prepare)
    result = _round_trip(cfg, ws, image)
    assert set(result) == ({"axial", "coronal", "sagittal"} if modality == "ct" else set(result))
    for plane, (dice, covered, filled) in result.items():
        print(f"{case} {plane}: Dice {dice:.3f}, organ voxels filled {covered:.3f}")
        assert dice >= 0.9, (plane, dice)
        # with stride 2 every voxel is within half a stride of a kept slice
        assert covered >= (0.99 if prepare["style"] == "canonical" else 0.9), (plane, covered)
        assert filled.shape == shape
    for plane, (dice, _, _) in _round_trip(cfg, ws, image, mirror=True).items():
        print(f"{case} {plane} mirrored (control): Dice {dice:.3f}")
        assert dice < 0.75, (plane, dice)
