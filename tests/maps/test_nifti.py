"""Feature maps back in the volume's own geometry (issue 17, item 4).

The inverse of prepare's geometry is checked on prepare's real output: a bright structure, read
off the slice PNGs by a threshold and placed back with :func:`place_slices`, must overlap the
structure's voxel mask in the source volume (Dice), for both styles, CT resampling with a stride,
a permuted/flipped (LPS-like) affine, and an MRI resampled in-plane.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from sail.config import SailConfig, dump_config
from sail.data.prepare import run_prepare
from sail.data.slicing import PLANES
from sail.errors import SailError
from sail.maps.nifti import (
    find_volume,
    place_slices,
    plane_layout,
    prepared_axes,
    write_nifti,
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


# ---- the export, end to end, with the real EfficientNet-Lite0 ------------------------------------
ENCODER_SIZE = 96  # a 3 x 3 grid


def _tiny_sae(ws: Workspace, encoder: str = "efficientnet-lite0", d_in: int = 1280) -> str:
    from sail.sae.checkpoint import save_sae
    from sail.sae.model import SAESpec, StackedSAE

    stack = StackedSAE([SAESpec("sail", (8, 16), (2, 4))], d_in)
    stack.initialize([3])
    with torch.no_grad():
        stack.b_enc.copy_(
            0.1 * torch.randn(stack.b_enc.shape, generator=torch.Generator().manual_seed(1))
        )
    save_sae(ws.sae_dir(encoder, "sail", "tiny"), stack, 0, "tiny", {})
    return f"{encoder}/sail/tiny"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A cube CT stored permuted/flipped (square planes, no padding, no resampling), stride 2,
    encoded with the real EfficientNet-Lite0, one feature exported."""
    from sail.encoders.encode import run_encode
    from sail.maps.nifti import export_volume_maps

    tmp = tmp_path_factory.mktemp("export")
    manifest, image = _dataset(tmp / "src", "ct", (24, 24, 24), (2.0, 2.0, 2.0), permute=True)
    cfg = SailConfig(
        workspace=tmp / "ws",
        prepare={
            "source": manifest,
            "modalities": ["ct"],
            "workers": 1,
            "image_size": 64,
            "ct_spacing_mm": 2.0,
            "slice_stride": 2,
        },
        encode={
            "encoders": [{"encoder": "efficientnet-lite0", "image_size": ENCODER_SIZE}],
            "device": "cpu",
            "workers": 0,
        },
    )
    ws = Workspace(cfg.workspace)
    run_prepare(cfg, ws)
    run_encode(cfg, ws)
    sae = _tiny_sae(ws)
    t0 = time.perf_counter()
    written = export_volume_maps(cfg, ws, "vol1", 5, sae=sae)
    seconds = time.perf_counter() - t0
    print(f"export: {len(written)} files in {seconds:.2f} s")
    return cfg, ws, image, sae, written


def test_export_writes_one_nifti_per_plane_in_the_source_geometry(exported):
    _, ws, image, sae, written = exported
    src = nib.load(str(image))
    names = sorted(p.name for p in written)
    assert names == sorted(
        [f"ct_vol1_f00005_{p}{s}.nii.gz" for p in PLANES for s in ("", "_filled")]
        + ["ct_vol1_f00005.json"]
    )
    assert all(p.parent == ws.maps(*sae.split("/")).volumes for p in written)
    sidecar = json.loads((ws.maps(*sae.split("/")).volumes / "ct_vol1_f00005.json").read_text())
    for plane in PLANES:
        folder = ws.maps(*sae.split("/")).volumes
        img = nib.load(str(folder / f"ct_vol1_f00005_{plane}.nii.gz"))
        mask = nib.load(str(folder / f"ct_vol1_f00005_{plane}_filled.nii.gz"))
        for out in (img, mask):
            assert out.shape == src.shape
            np.testing.assert_allclose(out.affine, src.affine, atol=1e-6)
            for form in ("qform", "sform"):
                got, code = getattr(out, f"get_{form}")(coded=True)
                want, want_code = getattr(src, f"get_{form}")(coded=True)
                assert int(code) == int(want_code)
                np.testing.assert_allclose(got, want, atol=1e-5)
        assert img.get_data_dtype() == np.float32
        values, filled = img.get_fdata(), mask.get_fdata()
        assert set(np.unique(filled)) <= {0.0, 1.0}
        # display range: symmetric about 0 for the signed map, 0..1 for the mask (not the CT's)
        bound = np.abs(values).max()
        assert (img.header["cal_min"], img.header["cal_max"]) == pytest.approx((-bound, bound))
        assert (mask.header["cal_min"], mask.header["cal_max"]) == (0.0, 1.0)
        assert (values[filled == 0] == 0).all() and (values[filled == 1] != 0).any()
        # stride 2, no resampling: the kept range and one slice beyond each end (half a stride)
        kept = sidecar["planes"][plane]["slice_idx"]
        assert kept == list(range(kept[0], kept[-1] + 1, 2)) and len(kept) >= 3
        n_filled = min(23, kept[-1] + 1) - max(0, kept[0] - 1) + 1
        assert int(filled.sum()) == n_filled * 24 * 24
    assert sidecar["feature"] == 5 and sidecar["sae"] == sae and sidecar["method"] == "exact"
    assert set(sidecar["planes"]) == set(PLANES)


def test_exported_slices_hold_the_feature_maps(exported):
    """Independently of the export: the feature's maps on the slice PNGs, upsampled; every kept
    slice's voxels in the NIfTI hold exactly those values, and their mean is the
    pre-activation (an integer upsampling keeps the grid mean)."""
    from sail.encoders.base import get_spec
    from sail.maps.decompose import feature_maps
    from sail.sae.api import load_sae

    cfg, ws, image, sae, _ = exported
    src = nib.load(str(image))
    rows = pd.read_parquet(ws.slices_table).sort_values(["plane", "slice_idx"])
    encoder = get_spec("efficientnet-lite0").build(image_size=ENCODER_SIZE)
    images = torch.from_numpy(np.stack([np.array(Image.open(ws.root / p)) for p in rows.png_path]))[
        :, None
    ]
    result = feature_maps(encoder, load_sae(ws.sae_dir(*sae.split("/"))), images, [5])
    grid = result.maps_BKhw[:, 0]
    assert tuple(grid.shape[1:]) == (3, 3)
    folder = ws.maps(*sae.split("/")).volumes
    sidecar = json.loads((folder / "ct_vol1_f00005.json").read_text())
    for b, row in enumerate(rows.itertuples(index=False)):
        vol = nib.load(str(folder / f"ct_vol1_f00005_{row.plane}.nii.gz")).get_fdata()
        axis = prepared_axes(src.affine, src.shape, "ct", PLANES.index(row.plane), "canonical", 2.0)
        slice_ax = axis[PLANES.index(row.plane)]
        index = int(np.flatnonzero(slice_ax.coords == row.slice_idx)[0])
        placed = np.take(vol, index, axis=slice_ax.source_axis)
        expected = torch.nn.functional.interpolate(
            grid[b][None, None], size=placed.shape, mode="bilinear", align_corners=False
        )[0, 0].numpy()
        np.testing.assert_allclose(np.sort(placed.ravel()), np.sort(expected.ravel()), atol=1e-5)
        pre = float(result.pre_BK[b, 0])
        assert abs(placed.mean() - pre) <= 1e-4, (row.plane, row.slice_idx, placed.mean(), pre)
        stored = dict(
            zip(
                sidecar["planes"][row.plane]["slice_idx"],
                sidecar["planes"][row.plane]["pre_activation"],
                strict=True,
            )
        )
        assert abs(stored[row.slice_idx] - pre) <= 1e-4


def test_bad_volume_feature_and_sae_name_the_value(exported):
    from sail.maps.nifti import export_volume_maps

    cfg, ws, _, sae, _ = exported
    with pytest.raises(SailError, match=r"--volume 'vol2': no such volume .*close matches: vol1"):
        export_volume_maps(cfg, ws, "vol2", 5, sae=sae)
    with pytest.raises(
        SailError,
        match=r"--feature 16: SAE efficientnet-lite0/sail/tiny has "
        r"features 0..15",
    ):
        export_volume_maps(cfg, ws, "vol1", 16, sae=sae)
    with pytest.raises(SailError, match=r"--feature -1"):
        export_volume_maps(cfg, ws, "vol1", -1, sae=sae)
    with pytest.raises(SailError, match=r"--sae 'efficientnet-lite0/sail/nope': no trained SAE"):
        export_volume_maps(cfg, ws, "vol1", 5, sae="efficientnet-lite0/sail/nope")
    with pytest.raises(SailError, match=r"--sae 'tiny': give encoder/variant/config"):
        export_volume_maps(cfg, ws, "vol1", 5, sae="tiny")


def test_a_volume_id_in_both_modalities_needs_the_modality():
    ids = pd.DataFrame({"modality": ["ct", "mri", "ct"], "image_id": ["s1", "s1", "s2"]})
    with pytest.raises(SailError, match=r"--volume 's1' is in several modalities; .*ct/s1, mri/s1"):
        find_volume(ids, "s1")
    assert find_volume(ids, "mri/s1") == ("mri", "s1")
    assert find_volume(ids, "s2") == ("ct", "s2")


def test_encoder_settings_other_than_the_encode_stage_are_refused(exported):
    from sail.maps.nifti import export_volume_maps

    cfg, ws, _, sae, _ = exported
    other = cfg.model_copy(
        update={
            "encode": cfg.encode.model_copy(
                update={"encoders": [cfg.encode.encoders[0].model_copy(update={"image_size": 128})]}
            )
        }
    )
    with pytest.raises(
        SailError, match=r"efficientnet-lite0 at 128 px.*\) differ from what the encode"
    ):
        export_volume_maps(other, ws, "vol1", 5, sae=sae)


def test_cli_exports_with_the_workspace_config_and_explains_its_options(exported, tmp_path):
    cfg, ws, _, sae, _ = exported
    from typer.testing import CliRunner

    from sail.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["maps", "--volume", "vol1", "-w", str(ws.root)])
    assert r.exit_code != 0 and "--volume needs --feature" in r.output
    r = runner.invoke(app, ["maps", "--feature", "3", "-w", str(ws.root)])
    assert r.exit_code != 0 and "--feature needs --volume" in r.output
    r = runner.invoke(app, ["maps", "--sae", sae, "-w", str(ws.root)])
    assert r.exit_code != 0 and "--sae and --out belong to an export" in r.output
    r = runner.invoke(app, ["maps", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "3D Slicer" in r.output and "--feature" in r.output
    out = tmp_path / "out"
    args = ["maps", "--volume", "ct/vol1", "--feature", "3", "--sae", sae, "--out", str(out)]
    # no --config: the defaults' prepare settings are not what prepare ran with ...
    r = runner.invoke(app, [*args, "-w", str(ws.root)])
    assert r.exit_code != 0 and "prepared with other prepare settings" in r.output
    # ... so the settings come from the workspace's config.yaml (as a pipeline run leaves it)
    ws.config_yaml.write_text(dump_config(cfg))
    try:
        r = runner.invoke(app, [*args, "-w", str(ws.root)])
        # --method reaches the export: EfficientNet-Lite0 has no patch tokens
        wrong = runner.invoke(app, [*args, "--method", "approximate", "-w", str(ws.root)])
    finally:
        ws.config_yaml.unlink()
    assert r.exit_code == 0, r.output
    assert wrong.exit_code != 0 and "efficientnet-lite0 has no patch tokens" in wrong.output
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"ct_vol1_f00003_{p}{s}.nii.gz" for p in PLANES for s in ("", "_filled")]
        + ["ct_vol1_f00003.json"]
    )


def test_dinov3_exports_approximate_maps_labelled_so(exported, monkeypatch, tmp_path):
    """DINOv3 pools by its CLS token: the export writes its approximate maps (patch tokens
    through the SAE, the maps stage's rule), says so in the sidecar and every NIfTI header, and
    places the same values the method gives on the slice PNGs; an explicit maps.method exact is
    refused, naming the pooling."""
    from types import SimpleNamespace

    from sail.encoders.random_init import build_random_dinov3
    from sail.maps import nifti
    from sail.maps.methods import approximate_maps
    from sail.sae.api import load_sae

    from ..encoders.conftest import TINY_DINOV3

    cfg, ws, image, _, _ = exported
    dino = build_random_dinov3(image_size=64, config=TINY_DINOV3)
    job = SimpleNamespace(build=lambda: dino, device="cpu", batch_size=4)
    monkeypatch.setattr(nifti, "_encode_job", lambda *args: job)
    sae = _tiny_sae(ws, "random-dinov3", TINY_DINOV3["hidden_size"])
    written = nifti.export_volume_maps(cfg, ws, "vol1", 5, sae=sae, out=tmp_path)
    sidecar = json.loads(written[-1].read_text())
    assert sidecar["method"] == "approximate" and sidecar["approximate"] is True
    for path in written[:-1]:
        assert "approximate" in nib.load(str(path)).header["descrip"].tobytes().decode()

    rows = pd.read_parquet(ws.slices_table).sort_values(["plane", "slice_idx"])
    row = rows[rows.plane == "axial"].iloc[0]
    png = torch.from_numpy(np.array(Image.open(ws.root / row.png_path)))[None, None]
    grid = approximate_maps(dino, load_sae(ws.sae_dir(*sae.split("/"))), png, [5]).maps_BKhw
    assert tuple(grid.shape[2:]) == (4, 4)  # 64 px / patch 16
    src = nib.load(str(image))
    axis = prepared_axes(src.affine, src.shape, "ct", PLANES.index("axial"), "canonical", 2.0)[2]
    vol = nib.load(str(tmp_path / "ct_vol1_f00005_axial.nii.gz")).get_fdata()
    placed = np.take(vol, int(np.flatnonzero(axis.coords == row.slice_idx)[0]), axis.source_axis)
    expected = torch.nn.functional.interpolate(
        grid[:, :1], size=placed.shape, mode="bilinear", align_corners=False
    )[0, 0].numpy()
    np.testing.assert_allclose(np.sort(placed.ravel()), np.sort(expected.ravel()), atol=1e-5)

    exact = cfg.model_copy(update={"maps": cfg.maps.model_copy(update={"method": "exact"})})
    with pytest.raises(SailError, match=r"maps.method exact: random-dinov3 pools by its pooler"):
        nifti.export_volume_maps(exact, ws, "vol1", 5, sae=sae, out=tmp_path)


def test_a_dicom_source_gets_a_header_from_its_affine(tmp_path):
    """No NIfTI header to copy (a DICOM series): qform and sform both carry the RAS affine."""
    affine = _affine((0.7, 0.7, 3.0), permute=True)
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    path = write_nifti(tmp_path / "m.nii.gz", data, affine, None, "sail f1 axial exact x/y/z")
    img = nib.load(str(path))
    assert img.get_data_dtype() == np.float32 and img.shape == (2, 3, 4)
    np.testing.assert_array_equal(img.get_fdata(), data)
    for form in ("qform", "sform"):
        got, code = getattr(img, f"get_{form}")(coded=True)
        assert int(code) == 1
        np.testing.assert_allclose(got, affine, atol=1e-5)
    assert img.header["descrip"].tobytes().startswith(b"sail f1 axial exact")


def test_real_subject_label_maps_round_trip_to_the_voxel_masks(tmp_path):
    """The real TotalSegmentator CT with prepare's own label maps (same crop, orientation and
    size as the PNGs): each structure's per-slice label pixels, pulled back by place_slices,
    overlap the structure's voxel mask (Dice) in every plane."""
    from sail.artifacts import read_label_map, read_structure_ids

    from ..data.conftest import REAL_EXAMPLE, make_cfg

    cfg = make_cfg(
        REAL_EXAMPLE,
        tmp_path / "w",
        ct_spacing_mm=1.5,
        image_size=128,
        slice_stride=2,
        label_maps=True,
    )
    ws = Workspace(cfg.workspace)
    run_prepare(cfg, ws)
    scan = REAL_EXAMPLE / "CT_Dataset_v201" / "s0001"
    src = nib.load(str(scan / "ct.nii.gz"))
    ids = read_structure_ids(ws.structure_ids).set_index("structure").structure_id
    slices = pd.read_parquet(ws.slices_table)
    for structure in ("liver", "spleen", "vertebrae_L1"):
        mask = np.asanyarray(nib.load(str(scan / "segmentations" / f"{structure}.nii.gz")).dataobj)
        mask = mask > 0
        for plane, part in slices.groupby("plane"):
            part = part.sort_values("slice_idx")
            labels = np.stack([read_label_map(ws.root / p) for p in part.label_path])
            layout = plane_layout(part, plane, "canonical", 2)
            axes = prepared_axes(src.affine, src.shape, "ct", layout.axis, "canonical", 1.5)
            placed, filled = place_slices(axes, layout, labels == ids[structure])
            dice = _dice((placed >= 0.5) & filled, mask & filled)
            print(f"real s0001 {structure} {plane}: Dice {dice:.3f} ({int(mask.sum())} voxels)")
            assert dice >= 0.9, (structure, plane, dice)
            assert (mask & filled).sum() >= 0.95 * mask.sum()
