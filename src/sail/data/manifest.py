"""Manifest input: one row per volume (CSV or Parquet) -> the scans ``prepare`` slices.

Columns (relative paths resolve against the manifest's folder):

- ``image`` (required): a NIfTI file or a folder holding one DICOM series;
- ``image_id``: optional; default = the file name without ``.nii(.gz)`` (the folder name for
  DICOM), with characters outside ``[A-Za-z0-9._-]`` replaced by ``_``; duplicates are an error;
- ``modality``: ``ct`` or ``mri`` (``mr`` accepted); optional when ``prepare.modalities`` names one;
- ``segmentations``: optional; a folder of per-structure masks (``<structure>.nii.gz``,
  TotalSegmentator-style) or one multi-label NIfTI plus ``labels``, a CSV label table with
  columns ``value,name``;
- ``group``: optional patient key; the split keeps a group's volumes on one side;
- metadata: ``sex``, ``age``, ``age_group``, ``institute``, ``study_type``, ``manufacturer``,
  ``scanner_model``, ``kvp``, ... (docs/artifacts.md) and any free column; all flow into
  slices.parquet. Nothing is read from DICOM headers into the table (no PHI leaks).

TotalSegmentator's layout is turned into the same kind of table
(:func:`sail.data.totalseg.discover`), so both sources share one path to the slicer.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sail.errors import SailError

log = logging.getLogger(__name__)

# Metadata columns slices.parquet always has (null when a source lacks them), in table order.
KNOWN_METADATA = [
    "sex",
    "age",
    "age_group",
    "institute",
    "study_type",
    "manufacturer",
    "scanner_model",
    "kvp",
    "pathology",
    "pathology_location",
    "magnetic_field_strength",
    "slice_thickness",
    "repetition_time",
    "echo_time",
    "scanning_sequence",
    "source",
    "official_split",
]
SOURCE_COLUMNS = ["image", "image_id", "modality", "segmentations", "labels"]
# Per-slice geometry and display columns that slicing writes into slices.parquet.
GEOMETRY_COLUMNS = [
    "pixel_spacing_mm",
    "slice_spacing_mm",
    "slice_position_mm",
    "crop_r0",
    "crop_c0",
    "crop_size",
    "window_center",
    "window_width",
]
# Columns sail writes itself: a manifest column of one of these names would be overwritten.
RESERVED = {
    "slice_id",
    "plane",
    "slice_idx",
    "png_path",
    "split",
    "label_path",
    "label_overlap_px",
    *GEOMETRY_COLUMNS,
}
MODALITY_NAMES = {"ct": "ct", "mri": "mri", "mr": "mri"}
_ID_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class ScanRef:
    """One volume to slice: its image, masks (a folder or one label map) and metadata row."""

    modality: str
    image_id: str
    image_path: Path
    seg_dir: Path | None
    structures: tuple[str, ...]
    meta: dict = field(hash=False, compare=False)
    label_map: Path | None = None
    label_values: tuple[int, ...] = ()

    @property
    def has_masks(self) -> bool:
        return self.seg_dir is not None or self.label_map is not None


def skip_record(modality: str, image_id: str, reason: str, action: str = "skip_scan") -> dict:
    return {
        "modality": modality,
        "image_id": image_id,
        "plane": None,
        "slice_from": None,
        "slice_to": None,
        "action": action,
        "reason": reason,
    }


def is_manifest(source: Path) -> bool:
    return Path(source).suffix.lower() in (".csv", ".parquet", ".pq")


def read_manifest(path: Path) -> pd.DataFrame:
    """The manifest as strings (empty cells = null); an unreadable file or no ``image`` column is
    an error."""
    path = Path(path)
    if not path.is_file():
        raise SailError(f"manifest not found: {path}")
    try:
        if path.suffix.lower() == ".csv":
            table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        else:
            table = pd.read_parquet(path)
            table = (
                table.astype(object)
                .where(table.notna(), None)
                .map(lambda v: v if v is None else str(v))
            )
    except Exception as exc:  # pandas/pyarrow raise many types for a bad file
        raise SailError(f"{path}: cannot read manifest ({type(exc).__name__}: {exc})") from None
    table.columns = [str(c).strip() for c in table.columns]
    dup = sorted({c for c in table.columns if list(table.columns).count(c) > 1})
    if dup:
        raise SailError(f"{path}: column '{dup[0]}' appears twice")
    if "image" not in table.columns:
        raise SailError(
            f"{path}: missing required column 'image'; found {', '.join(table.columns)}"
        )
    bad = sorted(c for c in table.columns if c in RESERVED or c.startswith("has_") or not c)
    if bad:
        raise SailError(
            f"{path}: column '{bad[0]}' is reserved for what sail writes (slice geometry, split, "
            "has_<structure> flags); rename it"
        )
    table = table.apply(lambda s: s.map(lambda v: v.strip() if isinstance(v, str) else v))
    return table.replace({"": None}).reset_index(drop=True)


def derive_image_id(image: str) -> str:
    name = Path(image.rstrip("/")).name
    for suffix in _NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip("._-")
    return name or "scan"


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _modality(value: str | None, default: str | None, where: str) -> str:
    if value is None:
        if default is None:
            raise SailError(
                f"{where}: no modality; add a 'modality' column (ct or mri) or set "
                "prepare.modalities "
                "to one modality"
            )
        return default
    modality = MODALITY_NAMES.get(value.lower())
    if modality is None:
        raise SailError(f"{where}: modality {value!r} is not ct or mri")
    return modality


def read_label_table(path: Path) -> dict[str, int]:
    """``value,name`` CSV -> {name: value}; duplicates, non-integer or zero values are errors
    naming the file."""
    if not path.is_file():
        raise SailError(f"label table not found: {path}")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except Exception as exc:  # pandas raises many types for a bad file
        raise SailError(f"{path}: cannot read label table ({exc})") from None
    table.columns = [c.strip() for c in table.columns]
    if not {"value", "name"} <= set(table.columns):
        raise SailError(
            f"{path}: label table needs columns 'value' and 'name'; found "
            f"{', '.join(table.columns)}"
        )
    values = pd.to_numeric(table["value"].str.strip(), errors="coerce")
    bad = table["value"][values.isna() | (values != values.round()) | (values <= 0)]
    if len(bad):
        raise SailError(
            f"{path}: label value {bad.iloc[0]!r} (row {bad.index[0] + 1}) is not a positive "
            "integer"
        )
    names = table["name"].str.strip()
    for column, series in (("name", names), ("value", values)):
        dup = series[series.duplicated()]
        if len(dup):
            raise SailError(f"{path}: {column} {dup.iloc[0]!r} appears twice")
    if (names == "").any():
        raise SailError(f"{path}: row {int(np.flatnonzero(names == '')[0]) + 1} has an empty name")
    return dict(zip(names, values.astype(int), strict=True))


def _mask_names(seg_dir: Path) -> list[str]:
    if not seg_dir.is_dir():
        return []
    return sorted(
        {
            p.name[: -len(s)]
            for s in _NIFTI_SUFFIXES
            for p in seg_dir.glob(f"*{s}")
            if p.name.endswith(s) and not (s == ".nii" and p.name.endswith(".nii.gz"))
        }
    )


def scans_from_table(
    table: pd.DataFrame, base: Path, modalities: list[str], origin: str
) -> list[ScanRef]:
    """Rows -> ScanRefs of the requested modalities. Table-level defects raise; per-volume defects
    (missing files) are left to the slicer, which skips the scan and records why."""
    default = modalities[0] if len(modalities) == 1 else None
    rows: list[tuple[int, str, str, dict]] = []
    for i, row in enumerate(table.to_dict("records")):
        where = f"{origin} row {i + 1}"
        if row.get("image") is None:
            raise SailError(f"{where}: empty 'image'")
        modality = _modality(row.get("modality"), default, where)
        given = row.get("image_id")
        if given is not None and not _ID_OK.match(given):
            raise SailError(
                f"{where}: image_id {given!r} may hold only letters, digits, '.', '_' and '-'"
            )
        rows.append((i, modality, given or derive_image_id(row["image"]), row))
    seen: dict[tuple[str, str], int] = {}
    for i, modality, image_id, _ in rows:
        if (modality, image_id) in seen:
            raise SailError(
                f"{origin}: rows {seen[(modality, image_id)] + 1} and {i + 1} both give {modality} "
                f"image_id {image_id!r}; add a unique 'image_id' column"
            )
        seen[(modality, image_id)] = i
    rows = [r for r in rows if r[1] in modalities]
    folder_names: dict[str, set[str]] = {m: set() for m in modalities}
    for _, modality, _, row in rows:
        seg = row.get("segmentations")
        if seg is not None and row.get("labels") is None:
            folder_names[modality].update(_mask_names(_resolve(base, seg)))
    label_tables: dict[Path, dict[str, int]] = {}
    scans = []
    for i, modality, image_id, row in rows:
        meta = {k: v for k, v in row.items() if k not in SOURCE_COLUMNS}
        seg = None if row.get("segmentations") is None else _resolve(base, row["segmentations"])
        if row.get("labels") is not None:
            if seg is None:
                raise SailError(
                    f"{origin} row {i + 1}: 'labels' given without a 'segmentations' label map"
                )
            table_path = _resolve(base, row["labels"])
            if table_path not in label_tables:
                label_tables[table_path] = read_label_table(table_path)
            labels = label_tables[table_path]
            names = tuple(sorted(labels))
            scans.append(
                ScanRef(
                    modality,
                    image_id,
                    _resolve(base, row["image"]),
                    None,
                    names,
                    meta,
                    label_map=seg,
                    label_values=tuple(labels[n] for n in names),
                )
            )
        else:
            names = tuple(sorted(folder_names[modality])) if seg is not None else ()
            scans.append(
                ScanRef(modality, image_id, _resolve(base, row["image"]), seg, names, meta)
            )
    return scans


def discover_manifest(path: Path, modalities: list[str]) -> tuple[list[ScanRef], list[dict]]:
    path = Path(path)
    scans = scans_from_table(read_manifest(path), path.parent, modalities, str(path))
    return scans, []
