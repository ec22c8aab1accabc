"""A feature's spatial maps for one volume, back in the volume's own voxel grid (NIfTI).

``prepare`` turns a volume into PNG slices by (1) reorienting it to RAS (canonical style), (2)
resampling it (canonical CT: every axis to ``ct_spacing_mm``; MRI: the in-plane axes to square
pixels), (3) viewing each plane through :class:`sail.data.slicing.ViewGeometry` (transpose, flips),
(4) a square crop or pad (``crop_r0``, ``crop_c0``, ``crop_size``), (5) a resize to
``image_size``, keeping every ``slice_stride``-th slice between the first and last with anatomy.

:func:`place_slices` inverts that as a *pull*: every voxel of the source volume is followed
forward to its continuous position in the prepared array, then to (slice, row, col) of a PNG,
and takes the map's value there (bilinear, ``align_corners=False``, edges clamped), so maps at
image resolution and maps on the encoder's grid are placed by the same rule. Every step is a map
of one axis, so the pull is separable: one small matrix product per slice, no per-voxel Python.

Which voxels get a value: a voxel is *filled* when the nearest kept slice (in prepared slice
positions, after resampling) lies within half the stride (``slice_stride / 2``; for stride 1:
its own slice was kept) and its in-plane position falls inside the crop. Every other voxel is 0
and unfilled (slices dropped as empty, published-style crop margins). The filled mask is written
beside each map.
"""

from __future__ import annotations

import difflib
import gzip
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from sail.artifacts import SAE_CFG, SLICE_ID_COLUMNS, VolumeMapFiles, Workspace
from sail.data.slicing import PLANES, nearest_index, square_box
from sail.errors import SailError
from sail.workspace import write_bytes_atomic, write_json_atomic

if TYPE_CHECKING:
    import nibabel as nib

    from sail.config import SailConfig

log = logging.getLogger(__name__)

# Geometry and identity columns of slices.parquet the export reads.
SLICE_COLUMNS = [*SLICE_ID_COLUMNS, "crop_r0", "crop_c0", "crop_size"]


# ---- the inverse geometry (pure) ---------------------------------------------------------------
@dataclass(frozen=True)
class AxisMap:
    """One axis of the prepared array: which source axis it came from and, for each source index
    along that axis, its continuous index in the prepared array (after flips and resampling)."""

    source_axis: int
    coords: np.ndarray  # (n_source,) float64
    size: int  # length of the prepared axis
    spacing_mm: float  # after resampling


@dataclass(frozen=True)
class PlaneLayout:
    """One plane's kept slices and its crop, as slices.parquet records them."""

    axis: int  # prepared array axis the plane slices along (PLANES order)
    slice_idx: np.ndarray  # (T,) kept slice indices, ascending
    crop_r0: int
    crop_c0: int
    crop_size: int
    flip_cols: bool
    stride: int


def _orientation(affine: np.ndarray, style: str) -> np.ndarray:
    """(3, 2) nibabel orientation: source axis -> (prepared axis, +1/-1); identity if published."""
    from nibabel.orientations import io_orientation

    if style == "canonical":
        return io_orientation(affine)
    return np.array([[0, 1], [1, 1], [2, 1]], dtype=float)


def _target_spacing(
    spacing: np.ndarray, modality: str, slice_axis: int, style: str, ct_spacing_mm: float
) -> np.ndarray:
    """Spacing after prepare's resampling (slicing._prepare_ct / _prepare_mri)."""
    out = spacing.astype(float).copy()
    if modality == "ct":
        if style == "canonical":
            out[:] = ct_spacing_mm
        return out
    in_plane = [a for a in range(3) if a != slice_axis]
    if abs(out[in_plane[0]] - out[in_plane[1]]) > 1e-3:
        out[in_plane] = float(out[in_plane].min())
    return out


def prepared_axes(
    affine: np.ndarray,
    shape: tuple[int, int, int],
    modality: str,
    slice_axis: int,
    style: str,
    ct_spacing_mm: float,
) -> tuple[AxisMap, AxisMap, AxisMap]:
    """How each source voxel index maps into the array prepare sliced, per prepared axis.

    Mirrors slicing._slice_scan: reorientation (canonical), then per-axis resampling whose output
    voxel q samples input position (q + 0.5) * s_out / s_in - 0.5, inverted here.
    """
    from nibabel.orientations import inv_ornt_aff

    ornt = _orientation(affine, style)
    oriented_affine = affine @ inv_ornt_aff(ornt, shape) if style == "canonical" else affine
    spacing = np.sqrt((oriented_affine[:3, :3] ** 2).sum(axis=0))
    target = _target_spacing(spacing, modality, slice_axis, style, ct_spacing_mm)
    axes: dict[int, AxisMap] = {}
    for src in range(3):
        dst, flip = int(ornt[src, 0]), ornt[src, 1] < 0
        n = int(shape[src])
        index = np.arange(n, dtype=float)
        oriented = n - 1 - index if flip else index
        n_out, _ = nearest_index(n, spacing[dst], target[dst])
        resampled = not (n_out == n and abs(spacing[dst] - target[dst]) < 1e-6)
        coords = (oriented + 0.5) * (spacing[dst] / target[dst]) - 0.5 if resampled else oriented
        size = n_out if resampled else n
        axes[dst] = AxisMap(src, coords, size, float(target[dst] if resampled else spacing[dst]))
    return axes[0], axes[1], axes[2]


def _bilinear_rows(x: np.ndarray, size: int) -> np.ndarray:
    """(n, size) weights that sample a length-``size`` signal at positions ``x`` (edges
    clamped)."""
    x = np.clip(x, 0.0, size - 1)
    lo = np.floor(x).astype(np.intp)
    hi = np.minimum(lo + 1, size - 1)
    w = (x - lo).astype(np.float32)
    out = np.zeros((len(x), size), dtype=np.float32)
    rows = np.arange(len(x))
    np.add.at(out, (rows, lo), 1.0 - w)
    np.add.at(out, (rows, hi), w)
    return out


def _nearest_kept(positions: np.ndarray, kept: np.ndarray, stride: int) -> np.ndarray:
    """Index into ``kept`` of the nearest kept slice of each position, -1 beyond half the
    stride."""
    right = np.clip(np.searchsorted(kept, positions), 0, len(kept) - 1)
    left = np.clip(right - 1, 0, len(kept) - 1)
    pick = np.where(np.abs(kept[left] - positions) <= np.abs(kept[right] - positions), left, right)
    near = np.abs(kept[pick] - positions) <= max(stride, 1) / 2
    return np.where(near, pick, -1)


def place_slices(
    axes: tuple[AxisMap, AxisMap, AxisMap], layout: PlaneLayout, maps_THW: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice 2D maps (one per ``layout.slice_idx``; any square-covering size H x W: image
    resolution or the encoder's grid) -> (values, filled) in the SOURCE volume's voxel grid.

    ``values`` is float32, 0 where not filled; ``filled`` says which voxels got a map value.
    """
    maps_THW = np.asarray(maps_THW, dtype=np.float32)
    if maps_THW.ndim != 3 or len(maps_THW) != len(layout.slice_idx):
        raise ValueError(
            f"expected {len(layout.slice_idx)} maps (T, H, W), got {tuple(maps_THW.shape)}"
        )
    order = np.argsort(layout.slice_idx, kind="stable")
    kept, maps_THW = np.asarray(layout.slice_idx, dtype=float)[order], maps_THW[order]
    slice_ax = axes[layout.axis]
    # display rows = the last in-plane axis reversed, cols = the first (ViewGeometry.display)
    p_ax, q_ax = (axes[a] for a in range(3) if a != layout.axis)
    rows = (q_ax.size - 1 - q_ax.coords) - layout.crop_r0
    cols = (p_ax.size - 1 - p_ax.coords if layout.flip_cols else p_ax.coords) - layout.crop_c0
    side, (_, H, W) = layout.crop_size, maps_THW.shape
    in_rows = (rows >= -0.5) & (rows < side - 0.5)
    in_cols = (cols >= -0.5) & (cols < side - 0.5)
    R_rH = _bilinear_rows((rows + 0.5) * H / side - 0.5, H) * in_rows[:, None]
    C_cW = _bilinear_rows((cols + 0.5) * W / side - 0.5, W) * in_cols[:, None]
    pick_S = _nearest_kept(slice_ax.coords, kept, layout.stride)
    values_Src = np.zeros((len(pick_S), len(rows), len(cols)), dtype=np.float32)
    hit = pick_S >= 0
    if hit.any():
        values_Src[hit] = R_rH[None] @ maps_THW[pick_S[hit]] @ C_cW.T[None]
    filled_Src = hit[:, None, None] & in_rows[None, :, None] & in_cols[None, None, :]
    to_source = np.argsort([slice_ax.source_axis, q_ax.source_axis, p_ax.source_axis])
    return values_Src.transpose(to_source), filled_Src.transpose(to_source)


def plane_layout(rows: pd.DataFrame, plane: str, style: str, stride: int) -> PlaneLayout:
    """One plane's slices.parquet rows -> its layout (one crop per plane, as prepare writes)."""
    crops = rows[["crop_r0", "crop_c0", "crop_size"]].drop_duplicates()
    if len(crops) != 1:
        raise SailError(f"slices.parquet: plane {plane} of one volume has {len(crops)} crops")
    r0, c0, side = (int(v) for v in crops.iloc[0])
    axis = PLANES.index(plane)
    return PlaneLayout(
        axis=axis,
        slice_idx=np.sort(rows["slice_idx"].to_numpy(dtype=np.int64)),
        crop_r0=r0,
        crop_c0=c0,
        crop_size=side,
        flip_cols=not (style == "published" and axis == 2),
        stride=stride,
    )


def check_layout(
    axes: tuple[AxisMap, AxisMap, AxisMap], layout: PlaneLayout, style: str, where: str
) -> None:
    """The layout must be the one prepare derives from this volume under these settings (else the
    settings or the volume changed since prepare)."""
    p_ax, q_ax = (axes[a] for a in range(3) if a != layout.axis)
    expected = square_box(q_ax.size, p_ax.size, style, layout.flip_cols)
    found = (layout.crop_r0, layout.crop_c0, layout.crop_size)
    n = axes[layout.axis].size
    if expected != found or layout.slice_idx.max() >= n:
        raise SailError(
            f"{where}: slices.parquet records crop {found} and slices up to "
            f"{int(layout.slice_idx.max())}, but prepare's settings give crop {expected} over "
            f"{n} slices for this volume; the volume or the prepare settings changed since "
            "prepare ran (give the config prepare ran with, or prepare again)"
        )


# ---- writing ----------------------------------------------------------------------------------
def _header_copy(source: nib.Nifti1Image | None, affine: np.ndarray, descrip: str):
    """A header in the source's geometry: the source's own (qform, sform, their codes, units)
    with its scaling dropped, or a fresh one from the affine (a DICOM source has none)."""
    import nibabel as nib

    if isinstance(source, nib.Nifti1Image | nib.Nifti2Image):
        header = source.header.copy()
    else:
        header = nib.Nifti1Header()
        header.set_qform(affine, code=1)
        header.set_sform(affine, code=1)
    header.set_slope_inter(1.0, 0.0)
    header["descrip"] = descrip[:79].encode()
    return header


def _display_range(data: np.ndarray) -> tuple[float, float]:
    """cal_min/cal_max: symmetric about 0 for signed maps (a diverging colour map centres on
    "no contribution"), else the data range (the 0/1 mask); never the CT's own window."""
    lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if lo < 0:
        bound = max(-lo, hi)
        return -bound, bound
    return lo, hi


def write_nifti(
    path: Path,
    data: np.ndarray,
    affine: np.ndarray,
    source: nib.Nifti1Image | None,
    descrip: str,
    dtype=np.float32,
) -> Path:
    """Atomically write ``data`` as a gzipped NIfTI with the source's affine and header."""
    import nibabel as nib

    header = _header_copy(source, affine, descrip)
    header.set_data_dtype(dtype)
    klass = type(source) if isinstance(source, nib.Nifti1Image | nib.Nifti2Image) else None
    img = (klass or nib.Nifti1Image)(np.asarray(data, dtype=dtype), affine, header=header)
    img.header["cal_min"], img.header["cal_max"] = _display_range(data)
    write_bytes_atomic(path, gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))
    return path


# ---- the export -------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceVolume:
    """The volume prepare read: its header (NIfTI; None for DICOM), affine and shape."""

    path: Path
    image: nib.Nifti1Image | None
    affine: np.ndarray
    shape: tuple[int, int, int]


def read_source(path: Path) -> SourceVolume:
    """Geometry of a source volume, without decoding a NIfTI's voxels."""
    import nibabel as nib

    if path.is_dir():
        from sail.data.dicom import DicomDefect, read_dicom_series

        try:
            data, affine = read_dicom_series(path)
        except DicomDefect as exc:
            raise SailError(str(exc)) from None
        return SourceVolume(path, None, affine, tuple(int(s) for s in data.shape[:3]))
    if not path.is_file():
        raise SailError(f"source volume not found: {path} (moved since prepare ran?)")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise SailError(f"cannot read source volume {path}: {exc}") from None
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise SailError(f"source volume {path} is not a 3D volume (shape {shape})")
    return SourceVolume(path, img, np.asarray(img.affine, dtype=float), shape)


def find_volume(slices: pd.DataFrame, volume: str) -> tuple[str, str]:
    """``ID`` or ``modality/ID`` -> (modality, image_id); unknown or ambiguous -> SailError."""
    ids = slices[["modality", "image_id"]].drop_duplicates()
    modality, _, image_id = volume.rpartition("/")
    match = ids[(ids.image_id == image_id) & ((ids.modality == modality) | (modality == ""))]
    if len(match) == 1:
        return str(match.modality.iloc[0]), image_id
    if len(match) > 1:
        both = ", ".join(f"{m}/{image_id}" for m in sorted(match.modality))
        raise SailError(f"--volume {volume!r} is in several modalities; give one of {both}")
    names = sorted(set(ids.image_id) | {f"{m}/{i}" for m, i in ids.itertuples(index=False)})
    close = difflib.get_close_matches(volume, names, n=5, cutoff=0.5)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise SailError(f"--volume {volume!r}: no such volume in data/slices.parquet{hint}")


def _read_volume_slices(ws: Workspace, volume: str) -> tuple[str, str, pd.DataFrame]:
    path = ws.slices_table
    if not path.is_file():
        raise SailError(f"{path} not found: run `sail prepare` first")
    import pyarrow.parquet as pq

    missing = [c for c in SLICE_COLUMNS if c not in pq.read_schema(path).names]
    if missing:
        raise SailError(f"{path}: missing column(s) {missing} (prepared by an older SAIL?)")
    ids = pd.read_parquet(path, columns=["modality", "image_id"])
    modality, image_id = find_volume(ids, volume)
    rows = pd.read_parquet(
        path,
        columns=SLICE_COLUMNS,
        filters=[("modality", "==", modality), ("image_id", "==", image_id)],
    )
    return modality, image_id, rows.sort_values(["plane", "slice_idx"]).reset_index(drop=True)


@dataclass(frozen=True)
class SaeTarget:
    encoder: str
    variant: str
    config: str

    @property
    def key(self) -> str:
        return f"{self.encoder}/{self.variant}/{self.config}"


def resolve_sae(cfg: SailConfig, ws: Workspace, sae: str | None) -> SaeTarget:
    """``encoder/variant/config``, or the interpreted config (final_rank 1 of the first
    interpreted encoder, as the interpret stage chooses)."""
    if sae is not None:
        parts = sae.strip("/").split("/")
        if len(parts) != 3 or not all(parts):
            raise SailError(f"--sae {sae!r}: give encoder/variant/config, e.g. {_example(ws)}")
        target = SaeTarget(*parts)
        if not ws.sae(*parts).cfg.is_file():
            raise SailError(
                f"--sae {sae!r}: no trained SAE at {ws.sae_dir(*parts)}; e.g. {_example(ws)}"
            )
        return target
    from sail.artifacts import read_ranking
    from sail.interpret.data import select_targets

    targets = select_targets(cfg, ws)
    interpreted = [t for t in targets if _has_interpret_outputs(ws, t)]
    targets = interpreted or targets
    ranking = read_ranking(ws.eval.ranking)
    if ranking is not None:
        best = {
            (r.encoder, r.variant, r.sae_config)
            for r in ranking[ranking.final_rank == 1].itertuples(index=False)
        }
        targets = [t for t in targets if (t.encoder, t.variant, t.sae_config) in best] or targets
    first = targets[0]
    log.info("maps: --sae not given; using the interpreted config %s", first.key)
    return SaeTarget(first.encoder, first.variant, first.sae_config)


def _has_interpret_outputs(ws: Workspace, target) -> bool:
    """Whether the interpret stage wrote anything for this config (it interprets a subset)."""
    verbs = ("fingerprint", "autointerp", "language")
    key = (target.encoder, target.variant, target.sae_config)
    return any(ws.interpret(verb, *key).path.is_dir() for verb in verbs)


def _example(ws: Workspace) -> str:
    found = sorted(
        p.parent.relative_to(ws.sae_root).as_posix() for p in ws.sae_root.glob(f"*/*/*/{SAE_CFG}")
    )
    return found[0] if found else "efficientnet-lite0/matryoshka/D_16_64_256_K_16-global"


def _candidate_configs(cfg: SailConfig, ws: Workspace) -> Iterator[SailConfig]:
    """The config given, then the workspace's config.yaml (what the last pipeline run used),
    read only when the first does not match."""
    from sail.config import load_config

    yield cfg
    if ws.config_yaml.is_file():
        yield load_config(ws.config_yaml)


def _encode_job(cfg: SailConfig, ws: Workspace, table: str):
    """The encode job that made ``embeddings/<table>.parquet``, from the given config or else the
    workspace's config.yaml (:func:`sail.encoders.encode.recorded_job`)."""
    from sail.encoders.encode import recorded_job

    job = recorded_job(list(_candidate_configs(cfg, ws)), ws, table, cfg.encode)
    if job is None:
        raise SailError(
            f"the SAE's embeddings table {table!r}: no encode.encoders entry makes it (imported "
            "embeddings have no encoder to map with); give the config encode ran with (--config)"
        )
    return job


def _png_batches(ws: Workspace, pngs: np.ndarray, preprocess, batch_size: int):
    """The volume's PNGs decoded and batched as the encode stage decodes them."""
    from sail.encoders.encode import BatchDecoder

    batches = [(0, s, min(len(pngs), s + batch_size)) for s in range(0, len(pngs), batch_size)]
    decoder = BatchDecoder(ws.root, pngs, batches, preprocess)
    for k in range(len(batches)):
        item = decoder[k]
        if item["bad"]:
            row, msg = item["bad"][0]
            raise SailError(f"cannot read slice PNG {ws.root / pngs[row]}: {msg}")
        yield item["images"]


def compute_slice_maps(cfg: SailConfig, ws: Workspace, target: SaeTarget, rows, feature: int):
    """(maps_Thw float32, pre_T float32, method) of ``feature`` for every slice in ``rows``, by
    the maps stage's method rule (``maps.method``: exact for a mean-pooled encoder, approximate
    for DINOv3's patch tokens, occlusion only when asked)."""
    import torch

    from sail.console import progress
    from sail.maps.methods import encoder_pass, maps_from_pass, resolve_method
    from sail.sae.api import load_sae

    sae = load_sae(ws.sae_dir(target.encoder, target.variant, target.config))
    if not 0 <= feature < sae.d_sae:
        raise SailError(f"--feature {feature}: SAE {target.key} has features 0..{sae.d_sae - 1}")
    job = _encode_job(cfg, ws, target.encoder)
    encoder = job.build()
    method = resolve_method(encoder, cfg.maps.method)
    if method is None:
        raise SailError(
            f"{encoder.name} pools by {encoder.pooled_by} and has no patch tokens: no exact or "
            "approximate map to export; set maps.method: occlusion to export occlusion maps"
        )
    sae.to(job.device)
    pngs = rows["png_path"].to_numpy(dtype=str)
    maps, pre = [], []
    with progress() as bar:
        task = bar.add_task(f"maps f{feature} ({method})", total=len(pngs))
        for images in _png_batches(ws, pngs, encoder.preprocess, job.batch_size):
            run = encoder_pass(encoder, images, method, cfg.maps.occlusion_grid, job.batch_size)
            result = maps_from_pass(run, sae, [feature])
            maps.append(result.maps_BKhw[:, 0].cpu())
            pre.append(result.pre_BK[:, 0].cpu())
            bar.advance(task, len(images))
    return torch.cat(maps).numpy(), torch.cat(pre).numpy(), method


def _prepare_settings(cfg: SailConfig, ws: Workspace):
    """The prepare settings slices.parquet was made with (their hash is in its manifest): the
    given config's, else the workspace's config.yaml's; and the source prepare read."""
    from sail.data.prepare import prepare_hash
    from sail.workspace import manifest_path

    manifest = manifest_path(ws.slices_table)
    saved = json.loads(manifest.read_text()) if manifest.is_file() else {}
    for candidate in _candidate_configs(cfg, ws):
        if saved.get("config_hash") in (None, prepare_hash(candidate.prepare)):
            return candidate.prepare, saved.get("inputs", {}).get("source")
    also = f" or {ws.config_yaml}'s" if ws.config_yaml.is_file() else ""
    raise SailError(
        f"{ws.slices_table} was prepared with other prepare settings than the given config's"
        f"{also}; give the config prepare ran with (--config)"
    )


def _scan_path(cfg: SailConfig, ws: Workspace, source: str | None, modality: str, image_id: str):
    """The image file (or DICOM folder) prepare sliced for this volume."""
    from sail.data.manifest import discover_manifest, is_manifest
    from sail.data.prepare import dataset_source
    from sail.data.totalseg import discover

    places = [Path(source)] if source else []  # recorded by prepare, else the config's
    places.append(dataset_source(cfg, ws))
    root = next((p for p in places if p.exists()), None)
    if root is None:
        raise SailError(f"dataset source {places[0]} not found (moved since prepare ran?)")
    scans, _ = (discover_manifest if is_manifest(root) else discover)(root, [modality])
    for ref in scans:
        if ref.modality == modality and ref.image_id == image_id:
            return ref.image_path
    raise SailError(f"{modality}/{image_id} is no longer in the dataset source {root}")


def export_volume_maps(
    cfg: SailConfig,
    ws: Workspace,
    volume: str,
    feature: int,
    sae: str | None = None,
    out: Path | None = None,
) -> list[Path]:
    """Feature ``feature``'s map on every prepared slice of ``volume`` -> one float32 NIfTI per
    plane in the source volume's geometry (its affine and header), a filled-voxel mask beside
    each, and a JSON sidecar. Returns the written paths (maps first)."""
    t0 = time.perf_counter()
    modality, image_id, rows = _read_volume_slices(ws, volume)
    target = resolve_sae(cfg, ws, sae)
    prep, source = _prepare_settings(cfg, ws)
    src = read_source(_scan_path(cfg, ws, source, modality, image_id))
    maps_Thw, pre_T, method = compute_slice_maps(cfg, ws, target, rows, feature)
    folder = Path(out) if out is not None else ws.maps(*target.key.split("/")).volumes
    files = VolumeMapFiles(folder, modality, image_id, feature)
    written, planes = [], {}
    for plane, part in rows.groupby("plane", sort=True):
        plane = str(plane)
        layout = plane_layout(part, plane, prep.style, prep.slice_stride)
        axes = prepared_axes(
            src.affine, src.shape, modality, layout.axis, prep.style, prep.ct_spacing_mm
        )
        check_layout(axes, layout, prep.style, f"{modality}/{image_id} {plane}")
        values, filled = place_slices(axes, layout, maps_Thw[part.index.to_numpy()])
        descrip = f"sail f{feature} {plane} {method} {target.key}"
        write_nifti(files.map(plane), values, src.affine, src.image, descrip)
        write_nifti(files.filled(plane), filled, src.affine, src.image, descrip, dtype=np.uint8)
        written += [files.map(plane), files.filled(plane)]
        planes[plane] = _plane_summary(part, pre_T, values, filled, files, plane)
    sidecar = files.sidecar
    write_json_atomic(
        sidecar,
        {
            "volume": f"{modality}/{image_id}",
            "source": str(src.path),
            "feature": feature,
            "sae": target.key,
            "method": method,
            "approximate": method != "exact",
            "prepare": {
                "style": prep.style,
                "slice_stride": prep.slice_stride,
                "ct_spacing_mm": prep.ct_spacing_mm,
                "image_size": prep.image_size,
            },
            "fill_rule": "nearest kept slice within slice_stride / 2, inside the crop",
            "planes": planes,
            "seconds": round(time.perf_counter() - t0, 3),
        },
    )
    log.info(
        "maps: %s feature %d of %s -> %s (%.1f s)",
        f"{modality}/{image_id}",
        feature,
        target.key,
        folder,
        time.perf_counter() - t0,
    )
    return [*written, sidecar]


def _plane_summary(part, pre_T, values, filled, files: VolumeMapFiles, plane: str) -> dict:
    pre = pre_T[part.index.to_numpy()]
    return {
        "map": files.map(plane).name,
        "filled": files.filled(plane).name,
        "n_slices": len(part),
        "filled_voxels": int(filled.sum()),
        "filled_fraction": round(float(filled.mean()), 6),
        "value_range": [float(values.min()), float(values.max())],
        "slice_idx": part["slice_idx"].astype(int).tolist(),
        "pre_activation": [round(float(v), 6) for v in pre],
    }
