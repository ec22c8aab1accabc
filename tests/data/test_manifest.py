"""Manifest input: TotalSegmentator's layout through a manifest (byte-identical), user manifests
with
free metadata, multi-label masks with a label table, cohorts without masks, and bad manifests."""

import hashlib

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sail.data.manifest import derive_image_id
from sail.data.prepare import run_prepare
from sail.data.totalseg import layout_manifest
from sail.errors import SailError
from sail.workspace import Workspace

from .conftest import REAL_EXAMPLE, make_cfg, write_nifti

# Digests of the phantom fixture's slices.parquet (content) and PNGs (pixels). First taken at main
# 3e0f9d4, before TotalSegmentator's layout went through the manifest path; retaken when the
# phantom itself changed (issue 15's anatomy: portal-venous CT, visceral fat, tissue texture), with
# the layout code unchanged since, so a change here still means prepare's output changed. The table
# digest was retaken once more when slice_position_mm moved to the resampled grid (PNGs unchanged).
GOLDEN_TABLE = "63905cd5372a4a65d4c2fdb3ec1039eb7a7c65f0450b33f402c1b507dfbcf626"
GOLDEN_PNGS = "625d60c799519ee723ebfcf69a75b69ffb1cb4468788be2784a0336b20e2eaf8"
needs_real = pytest.mark.skipif(
    not REAL_EXAMPLE.exists(), reason="../shared/data/totalseg-example not present"
)


def _prepare(source, root, **kw):
    ws = Workspace(root)
    run_prepare(make_cfg(source, ws.root, **kw), ws)
    return ws, pd.read_parquet(ws.slices_table), pd.read_csv(ws.skipped_csv)


def _digests(ws, table):
    h = hashlib.sha256()
    h.update(repr(list(zip(table.columns, map(str, table.dtypes), strict=True))).encode())
    h.update(pd.util.hash_pandas_object(table, index=False).values.tobytes())
    p = hashlib.sha256()
    for rel in table.png_path:
        p.update(rel.encode())
        p.update(np.asarray(Image.open(ws.root / rel)).tobytes())
    return h.hexdigest(), p.hexdigest()


@pytest.fixture(scope="module")
def layout_run(phantom_root, tmp_path_factory):
    return _prepare(phantom_root, tmp_path_factory.mktemp("layout"))


def test_totalsegmentator_layout_is_unchanged_by_the_manifest_path(layout_run):
    ws, table, _ = layout_run
    assert _digests(ws, table) == (GOLDEN_TABLE, GOLDEN_PNGS)


def test_layout_written_as_a_user_manifest_gives_identical_bytes(
    layout_run, phantom_root, tmp_path
):
    ws, _, _ = layout_run
    frames = [layout_manifest(phantom_root, m)[0] for m in ("ct", "mri")]
    manifest = tmp_path / "cohort" / "manifest.csv"
    manifest.parent.mkdir()
    table = pd.concat(frames, ignore_index=True)
    table["image"] = [str(phantom_root / p) for p in table.image]  # absolute paths work too
    table["segmentations"] = [str(phantom_root / p) for p in table.segmentations]
    table.to_csv(manifest, index=False)
    ws2, _, _ = _prepare(manifest, tmp_path / "w")
    assert ws2.slices_table.read_bytes() == ws.slices_table.read_bytes()
    assert ws2.skipped_csv.read_bytes() == ws.skipped_csv.read_bytes()
    pngs = sorted(p.relative_to(ws.root) for p in ws.slices_dir.rglob("*.png"))
    assert pngs == sorted(p.relative_to(ws2.root) for p in ws2.slices_dir.rglob("*.png"))
    assert all((ws.root / p).read_bytes() == (ws2.root / p).read_bytes() for p in pngs)


def _real_ct_files():
    scan = REAL_EXAMPLE / "CT_Dataset_v201" / "s0001"
    return scan / "ct.nii.gz", scan / "segmentations"


def write_label_map(seg_dir, out_dir):
    """The per-structure masks as one multi-label NIfTI + a value,name table (values in reverse
    name order, so the bit order differs from the value order)."""
    names = sorted(p.name[: -len(".nii.gz")] for p in seg_dir.glob("*.nii.gz"))
    first = nib.load(seg_dir / f"{names[0]}.nii.gz")
    labels = np.zeros(first.shape, dtype=np.int16)
    values = {n: len(names) - i for i, n in enumerate(names)}
    for name in names:
        mask = np.asanyarray(nib.load(seg_dir / f"{name}.nii.gz").dataobj) > 0
        assert not (labels[mask] > 0).any(), f"{name} overlaps another mask"
        labels[mask] = values[name]
    write_nifti(out_dir / "labels.nii.gz", labels, first.affine)
    pd.DataFrame({"value": list(values.values()), "name": list(values)}).to_csv(
        out_dir / "labels.csv", index=False
    )
    return out_dir / "labels.nii.gz", out_dir / "labels.csv"


@needs_real
@pytest.mark.parametrize("label_maps", [False, True])
def test_real_ct_as_nifti_and_as_multilabel_mask_give_the_same_slices(tmp_path, label_maps):
    image, seg_dir = _real_ct_files()
    kw = dict(ct_spacing_mm=3.0, image_size=64, label_maps=label_maps)
    ws_ref, ref, _ = _prepare(REAL_EXAMPLE, tmp_path / "ref", **kw)
    write_label_map(seg_dir, tmp_path / "cohort")
    meta = dict(
        modality="ct",
        image_id="s0001",
        age="63",
        sex="m",
        institute="B",
        study_type="ct abdomen",
        manufacturer="siemens",
        scanner_model="Somatom Definition Flash",
        kvp="120",
        pathology="no_pathology",
        official_split="train",
    )
    pd.DataFrame([dict(image=str(image), segmentations=str(seg_dir), **meta)]).to_csv(
        tmp_path / "a.csv", index=False
    )
    pd.DataFrame(
        [dict(image=str(image), segmentations="labels.nii.gz", labels="labels.csv", **meta)]
    ).to_csv(tmp_path / "cohort" / "b.csv", index=False)
    for manifest in (tmp_path / "a.csv", tmp_path / "cohort" / "b.csv"):
        ws, table, _ = _prepare(manifest, tmp_path / manifest.stem, **kw)
        pd.testing.assert_frame_equal(table, ref)
        written = [*table.png_path, *(table.label_path if label_maps else [])]
        assert all((ws.root / p).read_bytes() == (ws_ref.root / p).read_bytes() for p in written)
        if label_maps:  # the same ids whether masks come as files or as one multi-label map
            assert ws.structure_ids.read_bytes() == ws_ref.structure_ids.read_bytes()


def test_free_metadata_group_and_derived_ids_flow_into_slices(phantom_root, tmp_path):
    ct = phantom_root / "CT_Dataset_v201"
    rows = [
        dict(
            image=str(ct / "s0000" / "ct.nii.gz"),
            modality="CT",
            sex="Female",
            age="71",
            diagnosis="healthy",
            group="p1",
            score="1.5",
        ),
        dict(
            image=str(ct / "s0001" / "ct.nii.gz"),
            modality="ct",
            sex="",
            age="",
            diagnosis="tumour",
            group="p1",
            score="2",
        ),
    ]
    # Same file name in two folders -> derived ids collide; an image_id column resolves it.
    manifest = tmp_path / "m.parquet"
    pd.DataFrame(rows).to_parquet(manifest)
    with pytest.raises(SailError, match=r"rows 1 and 2 both give ct image_id 'ct'"):
        _prepare(manifest, tmp_path / "w0")
    pd.DataFrame(rows).assign(image_id=["pat1 a", "b"]).to_parquet(manifest)
    with pytest.raises(SailError, match=r"m.parquet row 1: image_id 'pat1 a' may hold only"):
        _prepare(manifest, tmp_path / "w1")
    pd.DataFrame(rows).assign(image_id=["a", "b"]).to_parquet(manifest)
    ws, table, skipped = _prepare(manifest, tmp_path / "w")
    free = ["diagnosis", "group", "score"]
    assert table.columns[31:34].tolist() == free
    assert not any(c.startswith("has_") for c in table.columns)  # no masks: no structure flags
    a = table[table.image_id == "a"]
    assert (a.sex == "f").all() and (a.age == 71.0).all() and (a.age_group == "60-80").all()
    assert (
        (a.diagnosis == "healthy").all()
        and (table.group == "p1").all()
        and set(table.score) == {1.5, 2.0}
    )
    assert table[table.image_id == "b"].sex.isna().all()
    assert set(table.plane) == {"axial", "coronal", "sagittal"}
    # no masks: every slice that shows anything is kept, blank ones are recorded
    assert not (skipped.action == "skip_scan").any()
    for rel in table.png_path:
        px = np.asarray(Image.open(ws.root / rel))
        assert px.max() > px.min()


def test_derived_image_ids_are_sanitised():
    assert derive_image_id("scans/Patient 7 (arterial).nii.gz") == "Patient_7__arterial_"
    assert derive_image_id("/data/dicom/series.1.2/") == "series.1.2"
    assert derive_image_id("a/b.NII") == "b"


def _write(tmp_path, rows, name="m.csv"):
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_bad_manifests_are_one_line_errors_naming_the_culprit(phantom_root, tmp_path):
    image = str(phantom_root / "CT_Dataset_v201" / "s0000" / "ct.nii.gz")
    cases = [
        ([dict(path=image, modality="ct")], r"m.csv: missing required column 'image'"),
        ([dict(image=image, modality="pet")], r"m.csv row 1: modality 'pet' is not ct or mri"),
        ([dict(image=image)], r"m.csv row 1: no modality; add a 'modality' column"),
        ([dict(image=image, modality="ct", split="train")], r"column 'split' is reserved"),
        ([dict(image=image, modality="ct", has_liver="1")], r"column 'has_liver' is reserved"),
        (
            [dict(image=image, modality="ct", labels="l.csv")],
            r"row 1: 'labels' given without a 'segmentations'",
        ),
        (
            [dict(image=image, modality="ct", segmentations="x.nii.gz", labels="nope.csv")],
            r"label table not found: .*nope.csv",
        ),
    ]
    for rows, message in cases:
        with pytest.raises(SailError, match=message) as info:
            _prepare(_write(tmp_path, rows), tmp_path / "w")
        assert "\n" not in str(info.value)
    with pytest.raises(SailError, match=r"manifest not found: .*absent.csv"):
        _prepare(tmp_path / "absent.csv", tmp_path / "w")


def test_label_table_defects(phantom_root, tmp_path):
    scan = phantom_root / "CT_Dataset_v201" / "s0003"
    label_map, table = write_label_map(scan / "segmentations", tmp_path)
    base = dict(
        image=str(scan / "ct.nii.gz"),
        modality="ct",
        segmentations=str(label_map),
        labels=str(table),
    )
    labels = pd.read_csv(table)
    present = sorted(int(v) for v in np.unique(np.asanyarray(nib.load(label_map).dataobj)) if v)
    labels[labels.value != present[0]].to_csv(
        tmp_path / "short.csv", index=False
    )  # a value the map holds
    bad = labels.assign(value=labels.value.astype(str).where(labels.index != 2, "x"))
    bad.to_csv(tmp_path / "bad.csv", index=False)
    pd.concat([labels, labels.iloc[:1]]).to_csv(tmp_path / "dup.csv", index=False)
    for name, message in (
        ("bad.csv", r"bad.csv: label value 'x' \(row 3\) is not a positive integer"),
        ("dup.csv", r"dup.csv: name '.*' appears twice"),
    ):
        with pytest.raises(SailError, match=message):
            _prepare(_write(tmp_path, [base | {"labels": str(tmp_path / name)}]), tmp_path / "w")
    with pytest.raises(SailError, match="every scan was skipped"):
        _prepare(
            _write(tmp_path, [base | {"labels": str(tmp_path / "short.csv")}]), tmp_path / "w2"
        )
    skipped = pd.read_csv(tmp_path / "w2" / "data" / "skipped.csv")
    assert f"holds value(s) {present[0]} missing from its label table" in skipped.reason.iloc[0]


def test_missing_files_are_recorded_skips(phantom_root, tmp_path):
    ct = phantom_root / "CT_Dataset_v201"
    rows = [
        dict(image=str(ct / "s0000" / "ct.nii.gz"), modality="ct"),
        dict(image="missing/ct.nii.gz", modality="ct", image_id="gone"),
        dict(
            image=str(ct / "s0001" / "ct.nii.gz"),
            modality="ct",
            image_id="noseg",
            segmentations="nowhere",
        ),
    ]
    _, table, skipped = _prepare(_write(tmp_path, rows), tmp_path / "w")
    assert set(table.image_id) == {"ct"}
    reasons = skipped[skipped.action == "skip_scan"].set_index("image_id").reason
    assert "image file missing" in reasons["gone"] and str(tmp_path / "missing") in reasons["gone"]
    assert "noseg" in reasons.index
