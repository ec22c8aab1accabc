"""prepare.label_maps: per-slice structure-id maps beside the PNGs (issue 17 item 1)."""

import json
from dataclasses import replace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sail.artifacts import LABEL_MAP_SUFFIX, read_label_map, read_structure_ids
from sail.data.label_maps import label_volume, structure_id_table
from sail.data.labels import VOCABULARY
from sail.data.prepare import _slice_and_store, parts_key, prepare_hash, run_prepare
from sail.data.slicing import SliceOptions
from sail.data.totalseg import discover
from sail.errors import SailError
from sail.workspace import Workspace, manifest_path

from .conftest import REAL_EXAMPLE, make_cfg, write_ct_dataset


def _prepare(source, root, **kw):
    ws = Workspace(root)
    run_prepare(make_cfg(source, ws.root, **kw), ws)
    return ws, pd.read_parquet(ws.slices_table)


def _ids(ws, modality):
    ids = read_structure_ids(ws.structure_ids)
    ids = ids[ids.modality == modality]
    return dict(zip(ids.structure, ids.structure_id, strict=True))


def _flag(value) -> bool:
    return bool(pd.notna(value) and value)


@pytest.fixture(scope="module")
def labelled(phantom_root, tmp_path_factory):
    return _prepare(phantom_root, tmp_path_factory.mktemp("labels"), label_maps=True)


def test_label_maps_have_the_png_geometry_and_only_flagged_ids(labelled):
    ws, table = labelled
    assert table.label_path.notna().all() and (table.label_overlap_px >= 0).all()
    assert (table.label_path == table.png_path.str.replace(".png", LABEL_MAP_SUFFIX)).all()
    for modality, rows in table.groupby("modality"):
        names = {i: s for s, i in _ids(ws, modality).items()}
        for row in rows.itertuples():
            labels = read_label_map(ws.root / row.label_path)
            assert labels.shape == np.asarray(Image.open(ws.root / row.png_path)).shape
            found = {names[i] for i in np.unique(labels) if i}
            flagged = {s for s in found if _flag(getattr(row, f"has_{s}"))}
            assert found == flagged, (row.slice_id, found - flagged)


def test_large_structures_in_the_label_map_agree_with_their_flags(labelled):
    ws, table = labelled
    for modality, name in (("ct", "liver"), ("ct", "brain"), ("mri", "liver"), ("mri", "brain")):
        sid = _ids(ws, modality)[name]
        rows = table[table.modality == modality]
        in_map = [(read_label_map(ws.root / p) == sid).any() for p in rows.label_path]
        assert rows[f"has_{name}"].sum() > 0
        assert (np.array(in_map) == rows[f"has_{name}"].to_numpy(dtype=bool)).all(), name


def test_structure_ids_are_totalsegmentators_class_ids(labelled):
    """CT ids are TotalSegmentator's task "total" (1-117), MRI ids its "total_mr" (1-50): a few
    checked by hand against its class map, across the table's breaks in order."""
    ws, table = labelled
    ids = read_structure_ids(ws.structure_ids)
    for modality in ("ct", "mri"):
        rows = ids[ids.modality == modality]
        assert sorted(rows.structure) == VOCABULARY[modality]
        assert rows.structure_id.tolist() == list(range(1, len(VOCABULARY[modality]) + 1))
    hand = {
        "ct": {"spleen": 1, "liver": 5, "vertebrae_S1": 26, "vertebrae_L5": 27, "vertebrae_C1": 50,
               "heart": 51, "spinal_cord": 79, "brain": 90, "skull": 91, "rib_left_1": 92,
               "rib_left_10": 101, "rib_right_1": 104, "rib_right_12": 115, "sternum": 116,
               "costal_cartilages": 117},
        "mri": {"spleen": 1, "liver": 5, "lung_left": 10, "lung_right": 11, "vertebrae": 19,
                "intervertebral_discs": 20, "spinal_cord": 21, "brain": 50},
    }  # fmt: skip
    for modality, expected in hand.items():
        assert {name: _ids(ws, modality)[name] for name in expected} == expected
    summary = json.loads(manifest_path(ws.slices_table).read_text())["summary"]
    assert summary["label_maps"] == len(table)
    assert summary["overlap_px"] == table.label_overlap_px.sum()


def _overlap_dataset(root):
    """A 10^3 liver with a 4^3 stomach half inside it; stomach's id is the larger one."""
    hu = np.full((20, 20, 20), -1000, np.int16)
    liver = np.zeros_like(hu, dtype=np.uint8)
    stomach = np.zeros_like(liver)
    liver[5:15, 5:15, 5:15] = 1
    stomach[12:16, 8:12, 8:12] = 1  # x 12..14 inside the liver, 15 outside
    hu[(liver | stomach).astype(bool)] = 40
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    return write_ct_dataset(root, {"s0000": (hu, affine, {"liver": liver, "stomach": stomach}, {})})


def test_the_smallest_structure_wins_an_overlap_and_it_is_counted(tmp_path):
    src = _overlap_dataset(tmp_path / "ts")
    # 2 mm voxels, 2 mm sampling, 20 px side: no resampling, no resize, so pixels are voxels
    ws, table = _prepare(src, tmp_path / "w", ct_spacing_mm=2.0, image_size=20, label_maps=True)
    ids = _ids(ws, "ct")
    assert ids["stomach"] > ids["liver"]  # the id order would pick the liver
    sagittal = table[table.plane == "sagittal"].set_index("slice_idx")
    for x in range(5, 16):
        labels = read_label_map(ws.root / sagittal.label_path[x])
        stomach_px = int((labels == ids["stomach"]).sum())
        assert stomach_px == (16 if 12 <= x <= 15 else 0), x
        assert int((labels == ids["liver"]).sum()) == (100 - stomach_px if x <= 14 else 0), x
        assert sagittal.label_overlap_px[x] == (16 if 12 <= x <= 14 else 0), x
    axial = table[table.plane == "axial"].set_index("slice_idx")
    assert axial.label_overlap_px[9] == 3 * 4 and axial.label_overlap_px[5] == 0


def test_label_volume_breaks_size_ties_by_id_and_flags_overlap():
    words = np.zeros((2, 2, 1, 1), np.uint64)
    words[0, 0] = 0b011  # structures 0 and 1: equal size (one voxel alone each + this one)
    words[0, 1] = 0b001
    words[1, 0] = 0b010
    words[1, 1] = 0b100  # structure 2 alone
    labels, overlap = label_volume(words, np.array([7, 3, 9]))
    assert labels[..., 0].tolist() == [[7, 7], [3, 9]]
    assert overlap[..., 0].tolist() == [[True, False], [False, False]]


def test_label_maps_off_writes_nothing_and_turning_them_on_reruns(phantom_root, tmp_path):
    ws, table = _prepare(phantom_root, tmp_path / "w", max_scans=1, label_maps=True)
    assert ws.structure_ids.is_file() and table.label_path.notna().all()
    ws, table = _prepare(phantom_root, tmp_path / "w", max_scans=1)
    assert "label_path" not in table and "label_overlap_px" not in table
    assert not list(ws.slices_dir.rglob(f"*{LABEL_MAP_SUFFIX}")) and not ws.structure_ids.exists()
    ws, table = _prepare(phantom_root, tmp_path / "w", max_scans=1, label_maps=True)
    assert all((ws.root / p).is_file() for p in table.label_path)


def test_a_scan_without_masks_gets_no_label_map(phantom_root, tmp_path):
    image = phantom_root / "CT_Dataset_v201" / "s0000" / "ct.nii.gz"
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(
        f"image,image_id,modality,segmentations\n{image},bare,ct,\n"
        f"{image},masked,ct,{image.parent / 'segmentations'}\n"
    )
    ws, table = _prepare(manifest, tmp_path / "w", label_maps=True)
    bare, masked = table[table.image_id == "bare"], table[table.image_id == "masked"]
    assert len(bare) and bare.label_path.isna().all() and bare.label_overlap_px.isna().all()
    assert masked.label_path.notna().all()
    assert not list((ws.root / Workspace.volume_slices("ct", "bare")).glob(f"*{LABEL_MAP_SUFFIX}"))


@pytest.mark.skipif(not REAL_EXAMPLE.exists(), reason="../shared/data/totalseg-example not present")
def test_real_subject_label_maps_name_the_right_structures(tmp_path):
    # native 3 mm sampling and a 122 px image: the axial label maps are the masks' voxels
    ws, table = _prepare(
        REAL_EXAMPLE, tmp_path / "w", ct_spacing_mm=3.0, image_size=122, label_maps=True
    )
    names = {i: s for s, i in _ids(ws, "ct").items()}
    seg = REAL_EXAMPLE / "CT_Dataset_v201" / "s0001" / "segmentations"
    axial = table[table.plane == "axial"]
    wanted = ("liver", "spleen", "aorta", "vertebrae_L1", "lung_lower_lobe_right")
    masks = {
        s: nib.as_closest_canonical(nib.load(seg / f"{s}.nii.gz")).get_fdata() > 0 for s in wanted
    }
    assert (axial.label_overlap_px == 0).all()  # TotalSegmentator's masks are exclusive
    for row in axial.itertuples():
        labels = read_label_map(ws.root / row.label_path)
        found = {names[i] for i in np.unique(labels) if i}
        assert all(_flag(getattr(row, f"has_{s}")) for s in found), row.slice_id
        for name, mask in masks.items():
            count = int((labels == _ids(ws, "ct")[name]).sum())
            assert count == int(mask[:, :, row.slice_idx].sum()), (name, row.slice_idx)
    assert any(masks["liver"][:, :, i].any() for i in axial.slice_idx)


def test_readers_reject_bad_files_naming_them(tmp_path):
    rgb = tmp_path / "rgb.labels.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(rgb)
    with pytest.raises(SailError, match="rgb.labels.png.*8-bit single-channel"):
        read_label_map(rgb)
    junk = tmp_path / "junk.labels.png"
    junk.write_bytes(b"not a png")
    with pytest.raises(SailError, match="junk.labels.png"):
        read_label_map(junk)
    with pytest.raises(SailError, match="label map not found"):
        read_label_map(tmp_path / "missing.labels.png")
    table = tmp_path / "ids.csv"
    table.write_text("modality,structure_id,structure\nct,1,liver\nct,300,aorta\n")
    with pytest.raises(SailError, match="ids.csv: row 2: structure_id '300'"):
        read_structure_ids(table)
    table.write_text("modality,structure_id,structure\nct,1,liver\nct,1,aorta\n")
    with pytest.raises(SailError, match="ct structure_id 1 listed twice"):
        read_structure_ids(table)
    table.write_text("modality,structure\nct,liver\n")
    with pytest.raises(SailError, match="missing column"):
        read_structure_ids(table)


def test_interrupted_prepare_resumes_to_identical_label_maps(phantom_root, tmp_path):
    full, table = _prepare(phantom_root, tmp_path / "full", max_scans=2, label_maps=True)
    part = Workspace(tmp_path / "part")
    cfg = make_cfg(phantom_root, part.root, max_scans=2, label_maps=True)
    scans, _ = discover(phantom_root, ["ct"])
    mri, _ = discover(phantom_root, ["mri"])
    label_ids = structure_id_table(scans[:2] + mri[:2])
    parts = part.prepare_parts(parts_key(prepare_hash(cfg.prepare), label_ids))
    parts.mkdir(parents=True)
    opts = SliceOptions(image_size=32, ct_spacing_mm=8.0, label_ids=label_ids)
    _slice_and_store(scans[0], opts, part.root, parts)  # killed after the first scan
    run_prepare(cfg, part)
    resumed = pd.read_parquet(part.slices_table)
    pd.testing.assert_frame_equal(table, resumed)
    assert not parts.exists()  # prepare used (and cleared) this part folder
    for rel in table.label_path:
        assert (full.root / rel).read_bytes() == (part.root / rel).read_bytes()


def test_structures_outside_the_vocabulary_follow_its_class_ids(phantom_root):
    """A manifest's own mask names get the ids after TotalSegmentator's, in string order."""
    scans, _ = discover(phantom_root, ["ct"])
    own = replace(scans[0], structures=(*scans[0].structures, "zz_lesion", "aa_implant"))
    ids = structure_id_table([own, *scans[1:]])["ct"]
    assert ids["liver"] == 5 and ids["aa_implant"] == 118 and ids["zz_lesion"] == 119
