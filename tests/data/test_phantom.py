import json

import nibabel as nib
import numpy as np
import pandas as pd

from sail.config import PUBLISHED_PROBE_STRUCTURES as PROBE_STRUCTURES
from sail.config import PhantomConfig
from sail.data.labels import VOCABULARY
from sail.data.phantom import _plan_scans, write_phantom_dataset
from sail.data.totalseg import META_COLUMNS, discover


def test_layout_is_totalsegmentator(phantom_root):
    ct = phantom_root / "CT_Dataset_v201"
    mri = phantom_root / "MRI_Dataset_v200"
    raw = (ct / "meta.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")  # UTF-8 BOM like the real file
    header = raw.decode("utf-8-sig").splitlines()[0].split(";")
    assert header == META_COLUMNS["ct"]
    assert (mri / "meta.csv").read_text(encoding="utf-8-sig").splitlines()[0].split(
        ";"
    ) == META_COLUMNS["mri"]
    for sid in ("s0000", "s0004"):
        masks = sorted(p.name[:-7] for p in (ct / sid / "segmentations").glob("*.nii.gz"))
        assert masks == VOCABULARY["ct"]
        assert (ct / sid / "ct.nii.gz").is_file()
    assert (
        sorted(p.name[:-7] for p in (mri / "s0000" / "segmentations").glob("*.nii.gz"))
        == VOCABULARY["mri"]
    )
    img = nib.load(ct / "s0003" / "ct.nii.gz")
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert img.get_data_dtype() == np.int16
    scans, skips = discover(phantom_root, ["ct", "mri"])
    assert len(scans) == 8 and skips == []


def test_truth_matches_masks_and_meta(phantom_root):
    truth = json.loads((phantom_root / "phantom_truth.json").read_text())
    meta = pd.read_csv(phantom_root / "CT_Dataset_v201" / "meta.csv", sep=";", encoding="utf-8-sig")
    planted = set()
    for scan in truth["scans"]:
        folder = (
            phantom_root
            / ("CT_Dataset_v201" if scan["modality"] == "ct" else "MRI_Dataset_v200")
            / scan["image_id"]
        )
        present = sorted(
            p.name[:-7]
            for p in (folder / "segmentations").glob("*.nii.gz")
            if np.asanyarray(nib.load(p).dataobj).any()
        )
        assert present == scan["structures_present"]
        assert set(present) <= set(VOCABULARY[scan["modality"]])
        planted |= set(present)
        if scan["modality"] == "ct":
            row = meta.set_index("image_id").loc[scan["image_id"]]
            assert row["gender"] == scan["sex"] and row["age"] == scan["age"]
            assert (row["pathology"] != "no_pathology") == (scan["lesion"] is not None)
            assert ("prostate" in present) <= (scan["sex"] == "m")
    assert len(planted) >= 20
    assert set(PROBE_STRUCTURES) - {"prostate"} <= planted


def test_deterministic_per_seed(tmp_path):
    cfg = PhantomConfig(n_ct=2, n_mri=1, size=24, seed=3)
    a, b = write_phantom_dataset(tmp_path / "a", cfg), write_phantom_dataset(tmp_path / "b", cfg)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    c = write_phantom_dataset(tmp_path / "c", cfg.model_copy(update={"seed": 4}))
    assert (c / "CT_Dataset_v201" / "s0000" / "ct.nii.gz").read_bytes() != (
        a / "CT_Dataset_v201" / "s0000" / "ct.nii.gz"
    ).read_bytes()


def test_institute_weights_put_a_fifth_in_test_institutes():
    plans = _plan_scans(PhantomConfig(n_ct=400, n_mri=200, seed=0))
    frac = np.mean([p.institute in ("A", "D", "E") for p in plans])
    assert 0.15 < frac < 0.25
    assert len({p.institute for p in plans}) >= 6


def test_ct_intensities_are_hounsfield(phantom_root):
    truth = json.loads((phantom_root / "phantom_truth.json").read_text())
    scan = next(
        s for s in truth["scans"] if s["modality"] == "ct" and "liver" in s["structures_present"]
    )
    folder = phantom_root / "CT_Dataset_v201" / scan["image_id"]
    hu = nib.load(folder / "ct.nii.gz").get_fdata()
    liver = np.asanyarray(nib.load(folder / "segmentations" / "liver.nii.gz").dataobj).astype(bool)
    lungs = np.asanyarray(
        nib.load(folder / "segmentations" / "lung_lower_lobe_right.nii.gz").dataobj
    ).astype(bool)
    assert 60 < np.median(hu[liver]) < 140  # portal-venous phase
    if lungs.any():
        assert np.median(hu[lungs]) < -600
    assert hu.min() >= -1024
