import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sail.data.prepare import _slice_and_store, run_prepare
from sail.data.slicing import SliceOptions, slice_scan
from sail.data.totalseg import discover
from sail.workspace import Workspace

from .conftest import REAL_EXAMPLE, make_cfg, write_ct_dataset, write_nifti


@pytest.fixture(scope="module")
def prepared(phantom_root, tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("ws"))
    run_prepare(make_cfg(phantom_root, ws.root), ws)
    return ws, pd.read_parquet(ws.slices_table), pd.read_csv(ws.skipped_csv)


def test_ct_slice_count_per_plane_equals_resampled_ras_shape(prepared, phantom_root):
    ws, table, skipped = prepared
    truth = {
        (s["modality"], s["image_id"]): s
        for s in json.loads((phantom_root / "phantom_truth.json").read_text())["scans"]
    }
    for (modality, image_id), scan in truth.items():
        if modality != "ct":
            continue
        for axis, plane in enumerate(("sagittal", "coronal", "axial")):
            expected = int(round(scan["shape"][axis] * scan["spacing_mm"][axis] / 8.0))
            kept = (
                (table.image_id == image_id) & (table.modality == "ct") & (table.plane == plane)
            ).sum()
            drops = skipped[
                (skipped.image_id == image_id)
                & (skipped.modality == "ct")
                & (skipped.plane == plane)
            ]
            dropped = int((drops.slice_to - drops.slice_from + 1).sum())
            assert kept + dropped == expected, (image_id, plane)


def test_mri_gives_its_acquisition_plane_only(prepared, phantom_root):
    _, table, _ = prepared
    truth = json.loads((phantom_root / "phantom_truth.json").read_text())["scans"]
    for scan in truth:
        if scan["modality"] == "mri":
            planes = set(
                table[(table.modality == "mri") & (table.image_id == scan["image_id"])].plane
            )
            assert planes == {scan["acquisition_plane"]}


def test_table_schema_and_png_files(prepared):
    ws, table, _ = prepared
    assert table.slice_id.is_unique and table.slice_id.is_monotonic_increasing
    row = table.iloc[0]
    assert row.slice_id == f"{row.modality}/{row.image_id}/{row.plane}/{row.slice_idx:04d}"
    assert table.columns[:6].tolist() == [
        "slice_id",
        "modality",
        "image_id",
        "plane",
        "slice_idx",
        "png_path",
    ]
    for col in (
        "official_split",
        "age_group",
        "window_center",
        "crop_size",
        "has_liver",
        "has_lung_left",
    ):
        assert col in table.columns
    assert "split" not in table.columns
    img = Image.open(ws.root / row.png_path)
    assert img.mode == "L" and img.size == (32, 32)
    # CT-only structures are null for MRI rows; harmonised lung flags defined for both
    mri = table[table.modality == "mri"]
    assert mri["has_sternum"].isna().all() and mri["has_lung_left"].notna().all()
    ct = table[table.modality == "ct"]
    lobes = ct[["has_lung_upper_lobe_left", "has_lung_lower_lobe_left"]].any(axis=1)
    assert (ct["has_lung_left"] == lobes).all()


def _ct_scan(phantom_root, image_id):
    scans, _ = discover(phantom_root, ["ct"])
    ref = next(s for s in scans if s.image_id == image_id)
    spacing = float(nib.load(ref.image_path).header.get_zooms()[0])
    return ref, spacing


def test_flags_agree_with_masks(phantom_root, tmp_path):
    ref, spacing = _ct_scan(phantom_root, "s0003")  # abdomen
    result = slice_scan(ref, SliceOptions(image_size=32, ct_spacing_mm=spacing), tmp_path)
    rows = result.rows
    for name in ("liver", "kidney_left", "spleen", "aorta"):
        mask = np.asanyarray(nib.load(ref.seg_dir / f"{name}.nii.gz").dataobj).astype(bool)
        for axis, plane in enumerate(("sagittal", "coronal", "axial")):
            expect = mask.any(axis=tuple(a for a in range(3) if a != axis))
            view = rows[rows.plane == plane]
            assert (view[f"has_{name}"].to_numpy() == expect[view.slice_idx.to_numpy()]).all(), (
                name,
                plane,
            )


def _side_dataset(root, flip_lps: bool):
    """A block of soft tissue on the patient's right, anterior and superior."""
    hu = np.full((20, 20, 20), -1000, np.int16)
    mask = np.zeros((20, 20, 20), np.uint8)
    mask[13:18, 12:17, 12:17] = 1  # +x (right), +y (anterior), +z (superior) in RAS
    hu[mask.astype(bool)] = 500  # bone-bright: maps near 255 in the abdomen window
    body = np.zeros_like(mask)
    body[2:18, 2:18, 2:18] = 1
    hu[(body == 1) & (mask == 0)] = 20
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    if (
        flip_lps
    ):  # store as LPS: axes 0 and 1 reversed, affine adjusted so world coords are unchanged
        hu, mask, body = (a[::-1, ::-1].copy() for a in (hu, mask, body))
        affine = np.array([[-2.0, 0, 0, 38.0], [0, -2.0, 0, 38.0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    return write_ct_dataset(root, {"s0000": (hu, affine, {"liver": mask, "skin": body}, {})})


@pytest.mark.parametrize("flip_lps", [False, True])
def test_one_sided_structure_lands_on_correct_image_side(tmp_path, flip_lps):
    src = _side_dataset(tmp_path / "ts", flip_lps)
    ws = Workspace(tmp_path / "w")
    run_prepare(make_cfg(src, ws.root, ct_spacing_mm=2.0, image_size=20), ws)
    table = pd.read_parquet(ws.slices_table)

    def bright_centroid(plane):
        row = table[(table.plane == plane) & table.has_liver].iloc[2]
        img = np.asarray(Image.open(ws.root / row.png_path)).astype(float)
        r, c = np.nonzero(img > 200)
        return r.mean() / img.shape[0], c.mean() / img.shape[1]

    r, c = bright_centroid("axial")
    assert c < 0.5 and r < 0.5  # patient right on image left, anterior up
    r, c = bright_centroid("coronal")
    assert c < 0.5 and r < 0.5  # patient right on image left, superior up
    r, c = bright_centroid("sagittal")
    assert c < 0.5 and r < 0.5  # anterior on image left, superior up


def _resave(src_root, dst_root, image_id, transform):
    """Copy one CT scan with every volume re-stored by ``transform(data, affine)``."""
    src = src_root / "CT_Dataset_v201" / image_id
    dst = dst_root / "CT_Dataset_v201" / image_id
    shutil.copy(
        src_root / "CT_Dataset_v201" / "meta.csv",
        (dst_root / "CT_Dataset_v201").mkdir(parents=True, exist_ok=True)
        or dst_root / "CT_Dataset_v201" / "meta.csv",
    )
    for path in [src / "ct.nii.gz", *sorted((src / "segmentations").glob("*.nii.gz"))]:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
        if path.name == "ct.nii.gz":
            data = (data // 2 * 2).astype(np.int16)  # even HU so a slope-2 copy is exact
        out, affine, slope = transform(data, img.affine, path.name == "ct.nii.gz")
        write_nifti(dst / path.relative_to(src), out, affine, slope)


def test_lps_permuted_and_scaled_storage_gives_identical_slices(phantom_root, tmp_path):
    def keep(d, a, is_img):
        return d, a, None

    def lps_permuted_scaled(d, a, is_img):
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[0, 3], flip[1, 3] = d.shape[0] - 1, d.shape[1] - 1
        d2, a2 = d[::-1, ::-1], a @ flip  # LPS storage
        d3 = np.transpose(d2, (2, 0, 1))  # stored as (z, x, y): a non-diagonal affine
        perm = np.zeros((4, 4))
        perm[0, 1] = perm[1, 2] = perm[2, 0] = perm[3, 3] = 1
        a3 = a2 @ perm
        if is_img:
            return (d3 // 2).astype(np.int16), a3, 2.0
        return d3.copy(), a3, None

    for name, fn in (("ras", keep), ("lps", lps_permuted_scaled)):
        _resave(phantom_root, tmp_path / name, "s0003", fn)
    assert nib.aff2axcodes(nib.load(tmp_path / "lps/CT_Dataset_v201/s0003/ct.nii.gz").affine) == (
        "S",
        "L",
        "P",
    )
    out = {}
    for name in ("ras", "lps"):
        ws = Workspace(tmp_path / f"w_{name}")
        run_prepare(make_cfg(tmp_path / name, ws.root), ws)
        t = pd.read_parquet(ws.slices_table)
        t["png"] = [(ws.root / p).read_bytes() for p in t.png_path]
        out[name] = t.drop(columns=["png_path"])
    pd.testing.assert_frame_equal(out["ras"].drop(columns="png"), out["lps"].drop(columns="png"))
    assert (out["ras"].png == out["lps"].png).all()


def test_published_style_mirrors_axial_and_crops(phantom_root, tmp_path):
    src = _side_dataset(tmp_path / "ts", flip_lps=False)
    ref = discover(src, ["ct"])[0][0]
    for style, expect_left in (("canonical", True), ("published", False)):
        rows = slice_scan(
            ref, SliceOptions(style=style, image_size=20, ct_spacing_mm=2.0), tmp_path / style
        ).rows
        row = rows[(rows.plane == "axial") & rows.has_liver].iloc[2]
        img = np.asarray(Image.open(tmp_path / style / row.png_path)).astype(float)
        _, c = np.nonzero(img > 200)
        assert (c.mean() < 10) == expect_left, (
            style
        )  # published axial is neurological (patient left on left)
        assert set(rows.plane) == {"sagittal", "coronal", "axial"}
    ref, _ = _ct_scan(phantom_root, "s0003")
    shape = nib.load(ref.image_path).shape
    publ = slice_scan(ref, SliceOptions(style="published", image_size=32), tmp_path / "p").rows
    canon = slice_scan(
        ref,
        SliceOptions(
            style="canonical",
            image_size=32,
            ct_spacing_mm=float(nib.load(ref.image_path).header.get_zooms()[0]),
        ),
        tmp_path / "c",
    ).rows
    assert (
        publ[publ.plane == "coronal"].crop_size == min(shape[0], shape[2])
    ).all()  # central crop
    assert (
        canon[canon.plane == "coronal"].crop_size == max(shape[0], shape[2])
    ).all()  # pad, nothing lost


def test_interrupted_prepare_resumes_to_identical_table(phantom_root, tmp_path):
    full = Workspace(tmp_path / "full")
    run_prepare(make_cfg(phantom_root, full.root), full)
    part = Workspace(tmp_path / "part")
    cfg = make_cfg(phantom_root, part.root)
    # simulate a run killed after two scans: their part files exist, nothing else
    from sail.data.prepare import SliceOptions as Opts
    from sail.data.prepare import prepare_hash

    scans, _ = discover(phantom_root, ["ct", "mri"])
    parts = part.data_dir / ".parts" / prepare_hash(cfg.prepare)
    parts.mkdir(parents=True)
    opts = Opts(style="canonical", image_size=32, slice_stride=1, ct_spacing_mm=8.0)
    for ref in scans[:2]:
        _slice_and_store(ref, opts, part.root, parts)
    run_prepare(cfg, part)
    a, b = pd.read_parquet(full.slices_table), pd.read_parquet(part.slices_table)
    pd.testing.assert_frame_equal(a, b)
    assert all((full.root / p).read_bytes() == (part.root / p).read_bytes() for p in a.png_path)
    assert not parts.exists()


def test_rerun_is_skipped_and_force_reruns(phantom_root, tmp_path, caplog):
    ws = Workspace(tmp_path / "w")
    cfg = make_cfg(phantom_root, ws.root, max_scans=1)
    run_prepare(cfg, ws)
    stamp = ws.slices_table.stat().st_mtime_ns
    caplog.set_level("INFO")
    run_prepare(cfg, ws)
    assert "up to date" in caplog.text and ws.slices_table.stat().st_mtime_ns == stamp
    run_prepare(
        cfg.model_copy(update={"prepare": cfg.prepare.model_copy(update={"image_size": 24})}), ws
    )
    assert ws.slices_table.stat().st_mtime_ns != stamp


def test_slice_stride_keeps_every_nth(phantom_root, tmp_path):
    ws = Workspace(tmp_path / "w")
    run_prepare(make_cfg(phantom_root, ws.root, slice_stride=3), ws)
    table = pd.read_parquet(ws.slices_table)
    assert (table.slice_idx % 3 == 0).all() and len(table) > 0


@pytest.mark.skipif(not REAL_EXAMPLE.exists(), reason="../shared/data/totalseg-example not present")
def test_real_totalsegmentator_subject(tmp_path):
    ws = Workspace(tmp_path / "w")
    run_prepare(make_cfg(REAL_EXAMPLE, ws.root, ct_spacing_mm=1.5, image_size=64), ws)
    table = pd.read_parquet(ws.slices_table)
    skipped = pd.read_csv(ws.skipped_csv)
    assert set(table.image_id) == {"s0001"} and (table.institute == "B").all()
    axial = table[table.plane == "axial"]
    drops = skipped[skipped.plane == "axial"]
    assert (
        len(axial) + int((drops.slice_to - drops.slice_from + 1).sum()) == 60
    )  # 30 slices at 3 mm -> 1.5 mm
    liver = (
        np.asanyarray(
            nib.load(REAL_EXAMPLE / "CT_Dataset_v201/s0001/segmentations/liver.nii.gz").dataobj
        )
        > 0
    )
    per_z = liver.any(axis=(0, 1))
    nearest = np.clip(np.rint((axial.slice_idx.to_numpy() + 0.5) * 0.5 - 0.5), 0, 29).astype(int)
    assert (axial.has_liver.to_numpy() == per_z[nearest]).all()
    assert table.has_liver.any() and not table.has_brain.any()
    assert table.has_vertebrae.any() and table.has_lung_right.any()


def test_slice_position_is_read_in_the_resampled_grid(prepared, phantom_root):
    """A resampled CT slice k lies at source index (k + 0.5) * 8 mm / s_in - 0.5 along its axis;
    its slice_position_mm is that point's world coordinate (not the source slice k's)."""
    _, table, _ = prepared
    refs, _ = discover(phantom_root, ["ct"])
    checked = 0
    for ref in refs:
        img = nib.as_closest_canonical(nib.load(ref.image_path))
        spacing_z = float(img.header.get_zooms()[2])
        rows = table[
            (table.modality == "ct") & (table.image_id == ref.image_id) & (table.plane == "axial")
        ]
        source_index = (rows.slice_idx.to_numpy() + 0.5) * 8.0 / spacing_z - 0.5
        expected = img.affine[2, 2] * source_index + img.affine[2, 3]
        np.testing.assert_allclose(rows.slice_position_mm.to_numpy(), expected, atol=1e-3)
        checked += abs(spacing_z - 8.0) > 0.1
    assert checked, "no CT in the phantom is resampled along z: the test would not bite"
