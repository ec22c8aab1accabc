"""One scan -> 2D slices (PNG) + per-slice rows with labels and geometry.

Two geometries (``prepare.style``):

- ``canonical``: reorient to RAS with nibabel, name planes by anatomy, radiological display
  (anterior / superior up, patient right on image left), CT resampled to an isotropic spacing,
  fixed window mapping, pad to square (no anatomy lost).
- ``published``: the published array-axis planes (x=sagittal, y=coronal, z=axial as stored), its
  rotation/mirroring, central square crop, per-volume min-max rescale with truncation, CT required
  to be isotropic, MRI sliced along the axis with the fewest voxels.

Structure presence is computed for all masks at once: masks are packed into 64-bit words (one bit
per structure), so reorientation, resampling and the per-slice "any voxel in the crop" test run
once per word instead of once per structure.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation
from PIL import Image

from sail.artifacts import LABEL_MAP_SUFFIX, Workspace
from sail.data.dicom import DicomDefect, read_dicom_series
from sail.data.label_maps import label_volume, unpack_bits
from sail.data.labels import age_group
from sail.data.manifest import KNOWN_METADATA, ScanRef
from sail.data.manifest import skip_record as _skip

log = logging.getLogger(__name__)

PLANES = (
    "sagittal",
    "coronal",
    "axial",
)  # array axis 0, 1, 2 in RAS (and as labelled by the published code)

# (centre, width) in HU per normalised study type, as published (38 types).
_WINDOW_GROUPS: list[tuple[tuple[float, float], list[str]]] = [
    (
        (-100, 1400),
        ["ct thorax-abdomen-pelvis", "ct neck-thorax-abdomen-pelvis", "ct thorax-abdomen"],
    ),
    ((50, 1000), ["ct abdomen-pelvis", "ct abdomen", "ct neck", "ct intervention", "ct operation"]),
    ((-200, 1400), ["ct thorax-neck", "ct thorax-chest", "ct thorax", "ct chest"]),
    ((-50, 1400), ["ct polytrauma", "ct whole body"]),
    ((80, 1400), ["ct pelvis"]),
    ((40, 400), ["ct head", "ct polytrauma head"]),
    ((60, 1000), ["ct orbita"]),
    ((120, 1200), ["ct headbasis-felsenleg", "ct gesichtshead"]),
    (
        (120, 1000),
        [
            "ct angiography neck-thx-abd-pelvis-leg",
            "ct angiography pelvis-leg",
            "ct angiography thorax-abdomen-pelvis",
            "ct angiography abdomen-pelvis-leg",
            "ct angiography abdomen-pelvis",
            "ct heart-thorakale aorta",
            "ct aortic valve",
            "ct heart",
            "ct left artrium",
            "ct coronary arteries",
        ],
    ),
    ((100, 900), ["ct angiography head", "ct angiography neck"]),
    ((100, 1000), ["ct angiography thorax"]),
    (
        (200, 2000),
        [
            "ct spine",
            "ct upper leg left",
            "ct hip right",
            "ct upper limb both",
            "ct lower limb left",
        ],
    ),
]
CT_WINDOWS: dict[str, tuple[float, float]] = {
    name: w for w, names in _WINDOW_GROUPS for name in names
}
# Wide soft-tissue/bone window used for study types outside the published table (recorded per scan).
DEFAULT_CT_WINDOW = (-50.0, 1400.0)


@dataclass(frozen=True)
class SliceOptions:
    style: str = "canonical"
    image_size: int = 224
    slice_stride: int = 1
    ct_spacing_mm: float = 1.5
    # modality -> structure -> label-map id (sail.data.label_maps.structure_id_table); None: no
    # label maps (``prepare.label_maps`` off)
    label_ids: Mapping[str, Mapping[str, int]] | None = None


@dataclass
class ScanResult:
    rows: pd.DataFrame | None
    skips: list[dict]


class ScanDefect(Exception):
    """A defect that makes one scan unusable; it is skipped and recorded, the run goes on."""


def normalise_study_type(value: str | None) -> str:
    return re.sub(r"\s+", " ", (value or "").strip().lower())


def ct_window(study_type: str | None) -> tuple[tuple[float, float], bool]:
    """(centre, width) for a study type, and whether it is a known (published) type."""
    key = normalise_study_type(study_type)
    if key in CT_WINDOWS:
        return CT_WINDOWS[key], True
    return DEFAULT_CT_WINDOW, False


def _load_volume(path: Path, what: str) -> nib.spatialimages.SpatialImage:
    if not path.is_file():
        raise ScanDefect(f"{what} file missing: {path}")
    try:
        img = nib.load(str(path))
        shape = img.shape
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise ScanDefect(f"cannot read {what} {path}: {exc}") from None
    if len(shape) == 4 and shape[3] == 1:
        img = img.slicer[..., 0]
    elif len(shape) != 3:
        raise ScanDefect(f"{what} {path} is not a 3D volume (shape {shape})")
    if min(img.shape) < 1 or np.prod(img.shape) == 0:
        raise ScanDefect(f"{what} {path} is empty (shape {img.shape})")
    return img


def _read_image(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI file or a DICOM series folder -> (float32 volume, RAS affine)."""
    if path.is_dir():
        try:
            data, affine = read_dicom_series(path)
        except DicomDefect as exc:
            raise ScanDefect(str(exc)) from None
    elif path.suffix.lower() in (".dcm", ".ima"):
        raise ScanDefect(f"image {path} is a single DICOM file; give the folder holding its series")
    else:
        img = _load_volume(path, "image")
        try:
            data = np.asarray(img.get_fdata(dtype=np.float32))
        except Exception as exc:
            raise ScanDefect(f"cannot decode image {path}: {exc}") from None
        affine = img.affine
    if not np.isfinite(data).all():
        raise ScanDefect(f"image {path} has {int((~np.isfinite(data)).sum())} non-finite voxels")
    if float(data.max()) == float(data.min()):
        raise ScanDefect(
            f"image {path} is an empty volume (constant intensity {float(data.min()):g})"
        )
    return data, affine


def _read_packed_masks(ref: ScanRef, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """All masks as bits of uint64 words: (X, Y, Z, n_words); bit s = structure s."""
    n_words = max(1, math.ceil(len(ref.structures) / 64))
    packed = np.zeros((*shape, n_words), dtype=np.uint64)
    if ref.seg_dir is not None and not ref.seg_dir.is_dir():
        raise ScanDefect(f"segmentations folder missing: {ref.seg_dir}")
    if ref.label_map is not None:
        return _pack_label_map(ref, _mask_voxels(ref.label_map, "label map", shape, affine), packed)
    for s, name in enumerate(ref.structures):
        path = ref.seg_dir / f"{name}.nii.gz"
        if not path.is_file() and (ref.seg_dir / f"{name}.nii").is_file():
            path = ref.seg_dir / f"{name}.nii"
        inside = _mask_voxels(path, f"mask '{name}'", shape, affine) != 0
        if inside.any():
            word = packed[..., s // 64]  # a view: the in-place OR below writes into ``packed``
            word[inside] |= np.uint64(1) << np.uint64(s % 64)
    return packed


def _mask_voxels(path: Path, what: str, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    img = _load_volume(path, what)
    if tuple(img.shape) != tuple(shape):
        raise ScanDefect(
            f"{what} shape {tuple(img.shape)} differs from image shape {tuple(shape)} ({path})"
        )
    if not np.allclose(img.affine, affine, atol=1e-2):
        raise ScanDefect(f"{what} affine differs from the image affine ({path})")
    try:
        voxels = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise ScanDefect(f"cannot decode {what} {path}: {exc}") from None
    if (
        voxels.dtype.kind in "fc" and not np.isfinite(voxels).all()
    ):  # NaN != 0 would mark every voxel
        raise ScanDefect(f"{what} holds NaN or inf voxels ({path})")
    return voxels


def _pack_label_map(ref: ScanRef, labels: np.ndarray, packed: np.ndarray) -> np.ndarray:
    """One multi-label volume -> structure bits, through a value -> bit lookup (no loop over
    structures)."""
    values = np.unique(labels)
    unknown = sorted(set(values.tolist()) - {0} - set(ref.label_values))
    if unknown:
        shown = ", ".join(f"{v:g}" for v in unknown[:8])
        raise ScanDefect(
            f"label map {ref.label_map} holds value(s) {shown} missing from its label table"
        )
    if not ref.label_values:
        return packed
    lut_bit = np.full(max(ref.label_values) + 1, -1, dtype=np.int64)
    lut_bit[list(ref.label_values)] = np.arange(len(ref.label_values))
    bit = lut_bit[
        labels.astype(np.int64)
    ]  # 0 -> -1 (background); every other value is in the table
    for w in range(packed.shape[-1]):
        in_word = (bit >= 64 * w) & (bit < 64 * (w + 1))
        packed[..., w] = np.where(
            in_word,
            np.left_shift(np.uint64(1), (bit - 64 * w).clip(0).astype(np.uint64)),
            np.uint64(0),
        )
    return packed


def nearest_index(n_in: int, spacing_in: float, spacing_out: float) -> tuple[int, np.ndarray]:
    n_out = max(1, int(round(n_in * spacing_in / spacing_out)))
    centres = (np.arange(n_out) + 0.5) * (spacing_out / spacing_in) - 0.5
    return n_out, centres


def _resample_axis(
    vol: np.ndarray, axis: int, spacing_in: float, spacing_out: float, linear: bool
) -> np.ndarray:
    """Resample one axis with voxel centres aligned to the same physical extent."""
    n_in = vol.shape[axis]
    n_out, pos = nearest_index(n_in, spacing_in, spacing_out)
    if n_out == n_in and abs(spacing_in - spacing_out) < 1e-6:
        return vol
    pos = np.clip(pos, 0, n_in - 1)
    if not linear:
        return np.take(vol, np.rint(pos).astype(np.intp), axis=axis)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, n_in - 1)
    w = (pos - lo).astype(np.float32)
    shape = [1] * vol.ndim
    shape[axis] = n_out
    w = w.reshape(shape)
    return np.take(vol, lo, axis=axis) * (1 - w) + np.take(vol, hi, axis=axis) * w


def _resampled_affine(affine: np.ndarray, spacing_in: np.ndarray, spacing_out) -> np.ndarray:
    """The voxel -> world affine of a volume resampled by :func:`_resample_axis` on every axis:
    output voxel k sits at input index (k + 0.5) * s_out / s_in - 0.5 (identity when unchanged),
    so slice positions and centres are read in the resampled grid, not the source one."""
    scale = np.asarray(spacing_out, dtype=float) / np.asarray(spacing_in, dtype=float)
    out = affine.copy()
    out[:3, :3] = affine[:3, :3] * scale
    out[:3, 3] = affine[:3, 3] + affine[:3, :3] @ (0.5 * scale - 0.5)
    return out


def _to_uint8_fixed(data: np.ndarray, lower: float, upper: float) -> np.ndarray:
    scaled = (np.clip(data, lower, upper) - lower) * (255.0 / (upper - lower))
    return np.rint(scaled).astype(np.uint8)


def _to_uint8_published(data: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """Clip, then min-max rescale of the clipped volume to 0-255 and truncate (as published)."""
    clipped = np.clip(data, lower, upper)
    vmin, vmax = float(clipped.min()), float(clipped.max())
    if vmax <= vmin:
        raise ScanDefect("image is constant after windowing")
    return ((clipped - vmin) * (255.0 / (vmax - vmin))).astype(np.uint8)


@dataclass(frozen=True)
class ViewGeometry:
    """How an array axis becomes a displayed 2D image: which in-plane axes are reversed, crop."""

    axis: int
    flip_cols: bool  # published axial keeps column order (neurological); everything else mirrors

    def display(self, vol: np.ndarray) -> np.ndarray:
        """(n, rows, cols) view: rows = last in-plane axis reversed, cols = first in-plane axis."""
        v = np.moveaxis(vol, self.axis, 0)  # (n, P, Q, ...)
        v = np.swapaxes(v, 1, 2)  # (n, Q, P, ...)
        v = v[:, ::-1]
        return v[:, :, ::-1] if self.flip_cols else v


def square_box(rows: int, cols: int, style: str, flip_cols: bool) -> tuple[int, int, int]:
    """(r0, c0, side) in display coordinates; negative offsets mean padding (canonical)."""
    if style == "canonical":
        side = max(rows, cols)
        return -((side - rows) // 2), -((side - cols) // 2), side
    side = min(rows, cols)
    # The published crop is centred with floor division on the stored array axes, before the
    # display flips; a flipped axis therefore starts at the ceiling side in display coordinates.
    r0 = (rows - side) - (rows - side) // 2
    c0 = (cols - side) - (cols - side) // 2 if flip_cols else (cols - side) // 2
    return r0, c0, side


def _square(img: np.ndarray, r0: int, c0: int, side: int) -> np.ndarray:
    if r0 >= 0 and c0 >= 0:
        return img[r0 : r0 + side, c0 : c0 + side]
    out = np.zeros((side, side), dtype=img.dtype)
    out[-r0 : -r0 + img.shape[0], -c0 : -c0 + img.shape[1]] = img
    return out


_SEX = {"f": "f", "m": "m", "female": "f", "male": "m"}


def _meta_columns(ref: ScanRef, style: str) -> dict:
    """slices.parquet's metadata columns from the scan's manifest row; free columns follow as
    given."""
    m = ref.meta

    def num(key: str) -> float | None:
        v = pd.to_numeric(pd.Series([m.get(key)]), errors="coerce").iloc[0]
        return None if pd.isna(v) else float(v)

    age = num("age")
    group = age_group([age], style).iloc[0]
    known = {
        "sex": _SEX.get((m.get("sex") or "").strip().lower()),
        "age": age,
        "age_group": group if group is not None or m.get("age_group") is None else m["age_group"],
        **{k: m.get(k) for k in ("institute", "study_type", "manufacturer", "scanner_model")},
        "kvp": num("kvp"),
        "pathology": m.get("pathology"),
        "pathology_location": m.get("pathology_location"),
        **{
            k: num(k)
            for k in ("magnetic_field_strength", "slice_thickness", "repetition_time", "echo_time")
        },
        "scanning_sequence": m.get("scanning_sequence"),
        "source": m.get("source"),
        "official_split": m.get("official_split"),
    }
    return known | {k: v for k, v in m.items() if k not in KNOWN_METADATA}


def mri_slice_axis(shape: tuple[int, ...], spacing: np.ndarray, style: str) -> int:
    """Acquisition axis: largest spacing (canonical) else fewest voxels; published: fewest
    voxels."""
    if style == "canonical":
        order = np.argsort(spacing)[::-1]
        if spacing[order[0]] - spacing[order[1]] > 1e-3:
            return int(order[0])
    return int(np.argmin(shape))


def slice_scan(ref: ScanRef, opts: SliceOptions, workspace_root: Path) -> ScanResult:
    """Slice one scan; any defect skips the scan and is returned as a record, never raised."""
    try:
        return _slice_scan(ref, opts, workspace_root)
    except ScanDefect as exc:
        return ScanResult(None, [_skip(ref.modality, ref.image_id, str(exc))])


def _prepare_ct(ref: ScanRef, opts: SliceOptions, data, packed, spacing, skips: list[dict]):
    """CT: resampled to ``ct_spacing_mm`` (canonical) or checked isotropic (published), windowed
    by study type (an unknown one gets the default window and a recorded skip row); all three
    planes. Returns the data, masks, spacing, (lower, upper, centre, width) and the axes."""
    if opts.style == "canonical":
        for axis in range(3):
            data = _resample_axis(data, axis, spacing[axis], opts.ct_spacing_mm, linear=True)
            packed = _resample_axis(packed, axis, spacing[axis], opts.ct_spacing_mm, linear=False)
        spacing = np.full(3, opts.ct_spacing_mm)
    elif np.ptp(spacing) > 1e-6:
        raise ScanDefect(
            f"CT is not isotropic (spacing {np.round(spacing, 4).tolist()} mm); "
            "the published style does not resample"
        )
    (centre, width), known = ct_window(ref.meta.get("study_type"))
    if not known:
        skips.append(
            _skip(
                ref.modality,
                ref.image_id,
                f"unknown study type {ref.meta.get('study_type')!r}: default window "
                f"centre {centre:g} width {width:g}",
                action="default_window",
            )
        )
    window = (centre - width / 2, centre + width / 2, centre, width)
    return data, packed, spacing, window, [0, 1, 2]


def _prepare_mri(ref: ScanRef, opts: SliceOptions, data, packed, spacing):
    """MRI: the acquisition plane only, resampled in-plane to square pixels, windowed between the
    1st and 99th percentile of the foreground."""
    axis = mri_slice_axis(data.shape, spacing, opts.style)
    in_plane = [a for a in range(3) if a != axis]
    target = float(min(spacing[in_plane]))
    if abs(spacing[in_plane[0]] - spacing[in_plane[1]]) > 1e-3:
        for a in in_plane:
            data = _resample_axis(data, a, spacing[a], target, linear=True)
            packed = _resample_axis(packed, a, spacing[a], target, linear=False)
            spacing[a] = target
    foreground = data[data > 0]
    if foreground.size == 0:
        raise ScanDefect(f"image {ref.image_path} has no voxel above 0")
    lower, upper = (float(v) for v in np.percentile(foreground, [1, 99]))
    if upper <= lower:
        raise ScanDefect(
            f"image {ref.image_path} has no intensity range between its 1st and 99th percentiles"
        )
    return data, packed, spacing, (lower, upper, (lower + upper) / 2, upper - lower), [axis]


def _named(keep: np.ndarray, name, ref: ScanRef, plane: str) -> list[tuple[int, str]]:
    """(slice index, relative path) of each kept slice, ``name`` a :class:`Workspace` namer."""
    return [(int(idx), name(ref.modality, ref.image_id, plane, int(idx))) for idx in keep]


def _save_slice(
    img: np.ndarray, box: tuple[int, int, int], size: int, resample, root: Path, rel: str
) -> str:
    """Crop/pad one displayed slice to its square, resize it to ``size`` and save it as an 8-bit
    PNG (lossless; label maps resize with NEAREST so every pixel keeps a real id)."""
    pil = Image.fromarray(np.ascontiguousarray(_square(img, *box)), mode="L")
    if box[2] != size:
        pil = pil.resize((size, size), resample)
    pil.save(root / rel, compress_level=3)
    return rel


@dataclass
class _LabelVolume:
    """One volume's label map in the sliced geometry, and where two or more masks overlap."""

    labels: np.ndarray  # uint8 structure ids, 0 = background
    overlap: np.ndarray  # bool


def _label_volume(ref: ScanRef, opts: SliceOptions, packed: np.ndarray) -> _LabelVolume | None:
    """None when label maps are off or the scan has no masks (no label map, label_path null)."""
    if opts.label_ids is None or not ref.has_masks:
        return None
    ids = opts.label_ids[ref.modality]
    return _LabelVolume(*label_volume(packed, np.array([ids[s] for s in ref.structures])))


def _label_map_columns(
    vol: _LabelVolume | None,
    geom: ViewGeometry,
    keep: np.ndarray,
    box: tuple[int, int, int],
    crop: tuple[slice, slice],
    opts: SliceOptions,
    ref: ScanRef,
    plane: str,
    root: Path,
) -> dict:
    """Write the kept slices' label maps (same crop, orientation and size as their PNGs) and
    return the ``label_path`` / ``label_overlap_px`` columns; none when label maps are off."""
    if opts.label_ids is None:
        return {}
    if vol is None:
        return {"label_path": [None] * keep.size, "label_overlap_px": [None] * keep.size}
    view, overlap = geom.display(vol.labels), geom.display(vol.overlap)
    nearest = Image.Resampling.NEAREST
    paths = [
        _save_slice(view[idx], box, opts.image_size, nearest, root, rel)
        for idx, rel in _named(keep, Workspace.slice_label_map, ref, plane)
    ]
    rs, cs = crop
    overlap_px = overlap[keep][:, rs, cs].reshape(keep.size, -1).sum(axis=1)
    return {"label_path": paths, "label_overlap_px": overlap_px.astype(np.int64)}


def _slice_scan(ref: ScanRef, opts: SliceOptions, workspace_root: Path) -> ScanResult:
    skips: list[dict] = []
    data, affine = _read_image(ref.image_path)
    packed = _read_packed_masks(ref, data.shape, affine)
    if opts.style == "canonical":
        ornt = io_orientation(affine)
        affine = affine @ inv_ornt_aff(ornt, data.shape)
        data = apply_orientation(data, ornt)
        packed = apply_orientation(packed, ornt)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    spacing_in = spacing.copy()  # _prepare_mri updates ``spacing`` in place

    if ref.modality == "ct":
        data, packed, spacing, window, axes = _prepare_ct(ref, opts, data, packed, spacing, skips)
    else:
        data, packed, spacing, window, axes = _prepare_mri(ref, opts, data, packed, spacing)
    affine = _resampled_affine(affine, spacing_in, spacing)
    lower, upper, centre, width = window

    pixels = (_to_uint8_fixed if opts.style == "canonical" else _to_uint8_published)(
        data, lower, upper
    )
    del data
    meta = _meta_columns(ref, opts.style)
    out_dir = workspace_root / Workspace.volume_slices(ref.modality, ref.image_id)
    labels = _label_volume(ref, opts, packed)
    if labels is None and out_dir.is_dir():  # label maps of an earlier run with them on
        for stale in out_dir.glob(f"*{LABEL_MAP_SUFFIX}"):
            stale.unlink()
    frames = []
    for axis in axes:
        plane = PLANES[axis]
        geom = ViewGeometry(axis, flip_cols=not (opts.style == "published" and axis == 2))
        view = geom.display(pixels)
        view_masks = geom.display(packed)
        n, rows, cols = view.shape
        r0, c0, side = square_box(rows, cols, opts.style, geom.flip_cols)
        rs, cs = (
            slice(max(r0, 0), max(r0, 0) + min(side, rows)),
            slice(max(c0, 0), max(c0, 0) + min(side, cols)),
        )
        words = np.bitwise_or.reduce(view_masks[:, rs, cs].reshape(n, -1, packed.shape[-1]), axis=1)
        flags = unpack_bits(words, len(ref.structures))
        if ref.has_masks:
            occupied, empty = np.flatnonzero(flags.any(axis=1)), "no structure"
        else:  # no segmentations: keep every slice that shows anything (not one flat grey level)
            crop = view[:, rs, cs].reshape(n, -1)
            occupied, empty = (
                np.flatnonzero(crop.max(axis=1) > crop.min(axis=1)),
                "blank (no masks given)",
            )
        if occupied.size == 0:
            skips.append(
                _skip(
                    ref.modality,
                    ref.image_id,
                    f"{empty} in any {plane} slice: view dropped",
                    action="drop_view",
                )
                | {"plane": plane, "slice_from": 0, "slice_to": n - 1}
            )
            continue
        first, last = int(occupied[0]), int(occupied[-1])
        for lo, hi in ((0, first - 1), (last + 1, n - 1)):
            if hi >= lo:
                skips.append(
                    _skip(
                        ref.modality,
                        ref.image_id,
                        f"empty leading/trailing slices ({empty})",
                        action="drop_slices",
                    )
                    | {"plane": plane, "slice_from": lo, "slice_to": hi}
                )
        keep = np.arange(first, last + 1)
        keep = keep[keep % opts.slice_stride == 0]
        if keep.size == 0:
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        box = (r0, c0, side)
        paths = [
            _save_slice(
                view[idx], box, opts.image_size, Image.Resampling.LANCZOS, workspace_root, rel
            )
            for idx, rel in _named(keep, Workspace.slice_png, ref, plane)
        ]
        label_columns = _label_map_columns(
            labels, geom, keep, box, (rs, cs), opts, ref, plane, workspace_root
        )
        centre_vox = (np.array(pixels.shape[:3]) - 1) / 2.0
        vox = np.tile(centre_vox, (keep.size, 1))
        vox[:, axis] = keep
        world = (affine[:3, :3] @ vox.T).T + affine[:3, 3]
        normal = int(np.argmax(np.abs(affine[:3, axis])))
        in_plane_spacing = float(spacing[[a for a in range(3) if a != axis]].max())
        frame = pd.DataFrame(
            {
                "slice_id": [f"{ref.modality}/{ref.image_id}/{plane}/{i:04d}" for i in keep],
                "modality": ref.modality,
                "image_id": ref.image_id,
                "plane": plane,
                "slice_idx": keep.astype(np.int32),
                "png_path": paths,
                **{k: [v] * keep.size for k, v in meta.items()},
                "pixel_spacing_mm": in_plane_spacing,
                "slice_spacing_mm": float(spacing[axis]),
                "slice_position_mm": world[:, normal],
                "crop_r0": r0,
                "crop_c0": c0,
                "crop_size": side,
                "window_center": float(centre),
                "window_width": float(width),
                **label_columns,
            }
        )
        present = pd.DataFrame(flags[keep], columns=[f"has_{s}" for s in ref.structures])
        frames.append(pd.concat([frame, present], axis=1))
    rows = pd.concat(frames, ignore_index=True) if frames else None
    if rows is None:
        what = "any structure" if ref.has_masks else "any content"
        skips.append(_skip(ref.modality, ref.image_id, f"no slice with {what} in any plane"))
    return ScanResult(rows, skips)
