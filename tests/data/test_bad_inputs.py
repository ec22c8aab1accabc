"""Each bad input ends in a clear error naming the culprit, or in a skip recorded in skipped.csv."""

import gzip

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from sail.config import ConfigError, load_config
from sail.data.prepare import run_prepare
from sail.errors import SailError
from sail.pipeline import run_pipeline
from sail.workspace import Workspace

from .conftest import make_cfg, write_nifti

CT = "CT_Dataset_v201"


def _prepare(src, tmp_path, **kw):
    ws = Workspace(tmp_path / "w")
    run_prepare(make_cfg(src, ws.root, **kw), ws)
    return pd.read_parquet(ws.slices_table), pd.read_csv(ws.skipped_csv)


def _skip_reason(skipped, image_id, modality="ct"):
    rows = skipped[
        (skipped.image_id == image_id)
        & (skipped.modality == modality)
        & (skipped.action == "skip_scan")
    ]
    assert len(rows) == 1, skipped
    return rows.reason.iloc[0]


def test_missing_meta_csv_is_an_error_naming_it(phantom_copy, tmp_path):
    (phantom_copy / CT / "meta.csv").unlink()
    with pytest.raises(SailError, match=r"CT_Dataset_v201/meta.csv: meta.csv not found"):
        _prepare(phantom_copy, tmp_path)


def test_missing_required_column_is_named(phantom_copy, tmp_path):
    meta = phantom_copy / CT / "meta.csv"
    text = meta.read_text(encoding="utf-8-sig").replace("gender", "sex_of_patient")
    meta.write_text(text, encoding="utf-8")
    with pytest.raises(SailError, match="missing required column.*gender"):
        _prepare(phantom_copy, tmp_path)


def test_duplicate_image_id_is_an_error(phantom_copy, tmp_path):
    meta = phantom_copy / CT / "meta.csv"
    lines = meta.read_text(encoding="utf-8-sig").splitlines()
    meta.write_text("\n".join(lines + [lines[1]]) + "\n", encoding="utf-8")
    with pytest.raises(SailError, match="duplicate image_id.*s0000"):
        _prepare(phantom_copy, tmp_path)


def test_no_dataset_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SailError, match="no CT_Dataset_v201 or MRI_Dataset_v200 folder"):
        _prepare(tmp_path / "empty", tmp_path)
    with pytest.raises(SailError, match="dataset folder not found"):
        _prepare(tmp_path / "nope", tmp_path)


def test_missing_image_is_skipped_and_recorded(phantom_copy, tmp_path):
    (phantom_copy / CT / "s0001" / "ct.nii.gz").unlink()
    table, skipped = _prepare(phantom_copy, tmp_path)
    assert "image file missing" in _skip_reason(skipped, "s0001")
    assert "s0001" not in set(table[table.modality == "ct"].image_id)
    assert {"s0000", "s0002", "s0003", "s0004"} <= set(table[table.modality == "ct"].image_id)


def test_corrupt_image_is_skipped(phantom_copy, tmp_path):
    (phantom_copy / CT / "s0002" / "ct.nii.gz").write_bytes(
        gzip.compress(b"not a nifti file at all" * 20)
    )
    _, skipped = _prepare(phantom_copy, tmp_path)
    assert "cannot read image" in _skip_reason(skipped, "s0002")


def test_truncated_mask_is_skipped(phantom_copy, tmp_path):
    path = phantom_copy / CT / "s0003" / "segmentations" / "liver.nii.gz"
    path.write_bytes(path.read_bytes()[:60])
    _, skipped = _prepare(phantom_copy, tmp_path)
    assert "liver" in _skip_reason(skipped, "s0003")


def test_mask_shape_mismatch_is_skipped(phantom_copy, tmp_path):
    path = phantom_copy / CT / "s0003" / "segmentations" / "spleen.nii.gz"
    write_nifti(path, np.zeros((5, 5, 5), np.uint8), np.eye(4))
    _, skipped = _prepare(phantom_copy, tmp_path)
    assert "mask 'spleen' shape (5, 5, 5) differs" in _skip_reason(skipped, "s0003")


def test_missing_mask_file_is_skipped(phantom_copy, tmp_path):
    (phantom_copy / CT / "s0004" / "segmentations" / "heart.nii.gz").unlink()
    _, skipped = _prepare(phantom_copy, tmp_path)
    assert "mask 'heart' file missing" in _skip_reason(skipped, "s0004")


def test_constant_volume_is_skipped(phantom_copy, tmp_path):
    path = phantom_copy / CT / "s0000" / "ct.nii.gz"
    img = nib.load(path)
    write_nifti(path, np.full(img.shape, -1000, np.int16), img.affine)
    _, skipped = _prepare(phantom_copy, tmp_path)
    assert "empty volume" in _skip_reason(skipped, "s0000")


def test_nan_voxels_are_skipped(phantom_copy, tmp_path):
    path = phantom_copy / CT / "s0000" / "ct.nii.gz"
    img = nib.load(path)
    data = img.get_fdata().astype(np.float32)
    data[0, 0, 0] = np.nan
    write_nifti(path, data, img.affine)
    _, skipped = _prepare(phantom_copy, tmp_path)
    assert "non-finite" in _skip_reason(skipped, "s0000")


def test_4d_volume_is_skipped(phantom_copy, tmp_path):
    path = phantom_copy / CT / "s0000" / "ct.nii.gz"
    img = nib.load(path)
    write_nifti(path, np.stack([img.get_fdata()] * 2, axis=-1).astype(np.int16), img.affine)
    _, skipped = _prepare(phantom_copy, tmp_path)
    assert "not a 3D volume" in _skip_reason(skipped, "s0000")


def test_unknown_study_type_uses_default_window_and_is_recorded(phantom_copy, tmp_path):
    meta = phantom_copy / CT / "meta.csv"
    meta.write_text(
        meta.read_text(encoding="utf-8-sig").replace("ct head", "ct mystery scan"), encoding="utf-8"
    )
    table, skipped = _prepare(phantom_copy, tmp_path)
    note = skipped[
        (skipped.image_id == "s0000")
        & (skipped.modality == "ct")
        & (skipped.action == "default_window")
    ]
    assert "unknown study type 'ct mystery scan'" in note.reason.iloc[0]
    kept = table[(table.modality == "ct") & (table.image_id == "s0000")]
    assert len(kept) > 0 and (kept.window_width == 1400).all()


def test_folder_without_meta_row_and_row_without_folder_are_recorded(phantom_copy, tmp_path):
    (phantom_copy / CT / "s0004").rename(phantom_copy / CT / "s0099")
    table, skipped = _prepare(phantom_copy, tmp_path)
    assert "has no row in" in _skip_reason(skipped, "s0099")
    assert "has no scan folder" in _skip_reason(skipped, "s0004")
    assert len(table) > 0


def test_published_style_rejects_anisotropic_ct(phantom_copy, tmp_path):
    path = phantom_copy / CT / "s0000" / "ct.nii.gz"
    img = nib.load(path)
    affine = img.affine.copy()
    affine[2, 2] *= 2
    for p in [path, *(phantom_copy / CT / "s0000" / "segmentations").glob("*.nii.gz")]:
        im = nib.load(p)
        write_nifti(p, np.asanyarray(im.dataobj), affine)
    _, skipped = _prepare(phantom_copy, tmp_path, style="published")
    assert "not isotropic" in _skip_reason(skipped, "s0000")


def test_every_scan_skipped_is_an_error(phantom_copy, tmp_path):
    for folder in (phantom_copy / CT).iterdir():
        if folder.is_dir():
            (folder / "ct.nii.gz").unlink()
    with pytest.raises(SailError, match="every scan was skipped"):
        _prepare(phantom_copy, tmp_path, modalities=["ct"])
    assert (tmp_path / "w" / "data" / "skipped.csv").exists()


def test_config_typo_names_the_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("prepare:\n  imag_size: 64\n")
    with pytest.raises(ConfigError, match=r"config key 'prepare.imag_size': unknown key"):
        load_config(cfg)
    cfg.write_text("prepare:\n  style: fancy\n")
    with pytest.raises(ConfigError, match=r"prepare.style"):
        load_config(cfg)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_unknown_stage_name_is_an_error(tmp_path):
    with pytest.raises(SailError, match="--from 'encodr': unknown stage"):
        run_pipeline(load_config(None, {"workspace": tmp_path}), start="encodr")


def test_split_without_prepare_is_an_error(tmp_path):
    with pytest.raises(SailError, match="run `sail prepare` first"):
        run_pipeline(load_config(None, {"workspace": tmp_path}), start="split", stop="split")
