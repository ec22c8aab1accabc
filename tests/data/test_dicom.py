"""DICOM series through a manifest. The series are written here with pydicom (the reader is
SimpleITK/GDCM), from the real CT in ../shared/data and a phantom MRI, with shuffled file names,
rescale slopes and fake patient identifiers that must never reach an artifact."""

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sail.data.dicom import DicomDefect, read_dicom_series
from sail.data.prepare import run_prepare
from sail.errors import SailError
from sail.workspace import Workspace

from .conftest import REAL_EXAMPLE, make_cfg, write_nifti

pydicom = pytest.importorskip("pydicom")
needs_real = pytest.mark.skipif(
    not REAL_EXAMPLE.exists(), reason="../shared/data/totalseg-example not present"
)
_LPS = np.diag([-1.0, -1.0, 1.0])
PHI = {"PatientName": "Doe^Jane", "PatientID": "SECRET-4711", "PatientBirthDate": "19600101"}


def _ds(value: float) -> str:
    return f"{value:.10g}"  # DICOM decimal strings hold at most 16 characters


def write_series(
    folder, stored_IJK, affine, modality="CT", slope=1.0, intercept=0.0, seed=0, series_uid=None
):
    """One DICOM file per k-slice of ``stored_IJK`` (uint16), geometry from the RAS ``affine``."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    row_dir = _LPS @ affine[:3, 0] / spacing[0]  # along a row = increasing column index = i
    col_dir = _LPS @ affine[:3, 1] / spacing[1]
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    study, series, frame = generate_uid(), series_uid or generate_uid(), generate_uid()
    order = np.random.default_rng(seed).permutation(
        stored_IJK.shape[2]
    )  # file names say nothing about order
    for k in range(stored_IJK.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = (
            modality,
            study,
            series,
            frame,
        )
        for key, value in PHI.items():
            setattr(ds, key, value)
        ds.InstanceNumber = int(order[k]) + 1
        ds.ImagePositionPatient = [_ds(v) for v in _LPS @ (affine[:3, 3] + k * affine[:3, 2])]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # (between rows, between columns)
        ds.SliceThickness = _ds(spacing[2])
        ds.Rows, ds.Columns = stored_IJK.shape[1], stored_IJK.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = _ds(slope), _ds(intercept)
        ds.PixelData = np.ascontiguousarray(stored_IJK[:, :, k].T).astype("<u2").tobytes()
        ds.save_as(folder / f"IM{order[k]:04d}", enforce_file_format=True)
    return folder


def _ct_as_dicom(folder):
    img = nib.load(REAL_EXAMPLE / "CT_Dataset_v201" / "s0001" / "ct.nii.gz")
    hu = np.asanyarray(img.dataobj).astype(np.int32)
    intercept = float(min(-1024, hu.min()))
    return write_series(
        folder, ((hu - intercept) * 2).astype(np.uint16), img.affine, slope=0.5, intercept=intercept
    )


def _prepare(rows, tmp_path, name, **kw):
    manifest = tmp_path / f"{name}.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    ws = Workspace(tmp_path / name)
    run_prepare(make_cfg(manifest, ws.root, **kw), ws)
    return ws, pd.read_parquet(ws.slices_table), pd.read_csv(ws.skipped_csv)


GEOMETRY = ["pixel_spacing_mm", "slice_spacing_mm", "slice_position_mm"]


def assert_same_slices(ws_a, a, ws_b, b):
    """Same rows; geometry within DICOM's decimal-string precision; PNGs within 1 grey level."""
    rest = [c for c in a.columns if c not in GEOMETRY]
    pd.testing.assert_frame_equal(a[rest], b[rest])
    np.testing.assert_allclose(a[GEOMETRY].to_numpy(float), b[GEOMETRY].to_numpy(float), atol=1e-4)
    for rel in a.png_path:
        pa, pb = (np.asarray(Image.open(ws.root / rel), dtype=np.int16) for ws in (ws_a, ws_b))
        assert np.abs(pa - pb).max() <= 1, rel


@needs_real
def test_real_ct_as_dicom_equals_nifti(tmp_path):
    scan = REAL_EXAMPLE / "CT_Dataset_v201" / "s0001"
    series = _ct_as_dicom(tmp_path / "dicom" / "ct")
    meta = dict(
        modality="ct", image_id="s0001", age="63", sex="m", institute="B", study_type="ct abdomen"
    )
    kw = dict(ct_spacing_mm=3.0, image_size=64)
    ws_n, nifti, _ = _prepare(
        [dict(image=str(scan / "ct.nii.gz"), segmentations=str(scan / "segmentations"), **meta)],
        tmp_path,
        "nifti",
        **kw,
    )
    ws_d, dicom, _ = _prepare(
        [dict(image=str(series), segmentations=str(scan / "segmentations"), **meta)],
        tmp_path,
        "dicom",
        **kw,
    )
    assert dicom.has_liver.any() and len(dicom) == len(nifti) > 100
    assert_same_slices(ws_n, nifti, ws_d, dicom)
    # no header field leaks: the fake patient identifiers appear in no artifact
    text = dicom.astype(str).to_csv() + ws_d.skipped_csv.read_text()
    assert not any(v in text for v in PHI.values())
    assert not {"PatientName", "PatientID"} & set(dicom.columns)


@needs_real
def test_liver_is_on_the_image_left_in_axial_display_of_a_dicom_series(tmp_path):
    img = nib.load(REAL_EXAMPLE / "CT_Dataset_v201" / "s0001" / "segmentations" / "liver.nii.gz")
    liver = (np.asanyarray(img.dataobj) > 0).astype(np.uint16)
    series = write_series(tmp_path / "liver", liver, img.affine, slope=1000.0, intercept=-1000.0)
    ws, table, _ = _prepare(
        [dict(image=str(series), modality="ct", study_type="ct abdomen")],
        tmp_path,
        "w",
        ct_spacing_mm=3.0,
        image_size=64,
    )
    axial = table[table.plane == "axial"]
    assert len(axial) > 5
    cols = np.concatenate(
        [np.nonzero(np.asarray(Image.open(ws.root / p)) > 60)[1] for p in axial.png_path]
    )
    # patient right (the liver) on the image's left; its left lobe crosses the midline a little
    assert cols.size > 100 and np.mean(cols < 32) > 0.8 and cols.mean() < 24, (
        np.mean(cols < 32),
        cols.mean(),
    )


def test_phantom_mri_as_dicom_equals_nifti(phantom_root, tmp_path):
    scan = phantom_root / "MRI_Dataset_v200" / "s0000"
    img = nib.load(scan / "mri.nii.gz")
    quarters = np.clip(np.rint(img.get_fdata() * 4), 0, 65535).astype(
        np.uint16
    )  # exact in both formats
    write_nifti(tmp_path / "mri.nii.gz", (quarters / 4).astype(np.float32), img.affine)
    series = write_series(
        tmp_path / "dicom" / "mri", quarters, img.affine, modality="MR", slope=0.25
    )
    meta = dict(modality="mr", image_id="m1", segmentations=str(scan / "segmentations"))
    ws_n, nifti, _ = _prepare([dict(image=str(tmp_path / "mri.nii.gz"), **meta)], tmp_path, "nifti")
    ws_d, dicom, _ = _prepare([dict(image=str(series), **meta)], tmp_path, "dicom")
    assert (dicom.modality == "mri").all() and dicom.plane.nunique() == 1 and len(dicom) > 5
    assert_same_slices(ws_n, nifti, ws_d, dicom)


def test_dicom_defects_are_recorded_skips(tmp_path):
    vol = (np.arange(4 * 5 * 6).reshape(4, 5, 6) % 7 * 100).astype(np.uint16)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    mixed = write_series(tmp_path / "mixed", vol, affine, seed=1)
    write_series(tmp_path / "other", vol, affine, seed=2)
    for f in (tmp_path / "other").iterdir():
        f.rename(mixed / f"B{f.name}")
    gap = write_series(tmp_path / "gap", vol, affine)
    sorted(gap.iterdir())[2].unlink()
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "IM0001").write_bytes(b"not a dicom file" * 10)
    good = write_series(tmp_path / "good", vol, affine)
    single = sorted(write_series(tmp_path / "one", vol, affine).iterdir())[0].rename(
        tmp_path / "single.dcm"
    )
    rows = [dict(image=str(p), modality="ct") for p in (mixed, gap, junk, good, single)]
    _, table, skipped = _prepare(rows, tmp_path, "w", ct_spacing_mm=2.0)
    assert set(table.image_id) == {"good"}
    reasons = skipped[skipped.action == "skip_scan"].set_index("image_id").reason
    assert f"folder {mixed} holds 2 DICOM series" in reasons["mixed"]
    assert (
        "missing, duplicate or irregularly spaced slices" in reasons["gap"]
        and str(gap) in reasons["gap"]
    )
    assert f"no DICOM series in folder {junk}" in reasons["junk"]
    assert "is a single DICOM file; give the folder holding its series" in reasons["single.dcm"]


def test_reader_geometry_matches_the_written_affine(tmp_path):
    vol = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5)
    rot = np.array(
        [[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]
    )  # an oblique-free permuted orientation
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.7, 0.8, 2.5])
    affine[:3, 3] = [10.25, -20.5, 30.125]
    data, got = read_dicom_series(
        write_series(tmp_path / "s", vol, affine, slope=2.0, intercept=-5.0)
    )
    np.testing.assert_allclose(got, affine, atol=1e-6)
    np.testing.assert_array_equal(data, vol.astype(np.float32) * 2 - 5)
    with pytest.raises(DicomDefect, match="no DICOM series"):
        read_dicom_series(tmp_path)


def test_a_manifest_of_only_missing_series_is_an_error(tmp_path):
    with pytest.raises(SailError, match="every scan was skipped"):
        _prepare([dict(image=str(tmp_path / "nowhere"), modality="ct")], tmp_path, "w")
