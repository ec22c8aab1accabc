"""Reader of TotalSegmentator's on-disk layout (CT v2.0.1, MRI v2.0.0).

    <root>/CT_Dataset_v201/meta.csv          ';'-separated, UTF-8 with BOM
    <root>/CT_Dataset_v201/sNNNN/ct.nii.gz
    <root>/CT_Dataset_v201/sNNNN/segmentations/<structure>.nii.gz
    <root>/MRI_Dataset_v200/...              (mri.nii.gz)

Either modality may be absent. Layout errors (no dataset folder, no meta.csv, a missing
required column) raise :class:`SailError`; per-scan defects are left to the slicer, which skips
the scan and records why.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from sail.data.labels import VOCABULARY, normalise_age, normalise_sex
from sail.data.manifest import ScanRef, scans_from_table, skip_record
from sail.errors import SailError

log = logging.getLogger(__name__)

DATASET_FOLDERS = {"ct": "CT_Dataset_v201", "mri": "MRI_Dataset_v200"}
IMAGE_FILES = {"ct": "ct.nii.gz", "mri": "mri.nii.gz"}
SHARED_META = ["age", "gender", "institute", "study_type", "split", "manufacturer", "scanner_model"]
META_COLUMNS = {
    "ct": ["image_id", *SHARED_META, "kvp", "pathology", "pathology_location"],
    "mri": [
        "image_id",
        *SHARED_META,
        "magnetic_field_strength",
        "slice_thickness",
        "repetition_time",
        "echo_time",
        "scanning_sequence",
        "source",
    ],
}
# Columns without which a scan cannot be labelled or split; the rest may be missing (null).
REQUIRED_META = ["image_id", "age", "gender", "institute", "study_type"]
# meta.csv names -> slices.parquet (and manifest) names
_RENAMED = {"gender": "sex", "split": "official_split"}
_skip = skip_record
__all__ = ["ScanRef", "discover", "layout_manifest", "read_meta"]


def read_meta(path: Path, modality: str) -> pd.DataFrame:
    """Read one meta.csv; a missing file or required column is an error naming it."""
    if not path.is_file():
        raise SailError(
            f"{path}: meta.csv not found (expected TotalSegmentator's ';'-separated table)"
        )
    try:
        meta = pd.read_csv(path, sep=";", encoding="utf-8-sig", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise SailError(f"{path}: cannot parse as ';'-separated CSV: {exc}") from exc
    meta.columns = [c.strip() for c in meta.columns]
    missing = [c for c in REQUIRED_META if c not in meta.columns]
    if missing:
        raise SailError(
            f"{path}: missing required column(s) {', '.join(missing)}; found "
            f"{', '.join(meta.columns)}"
        )
    for col in META_COLUMNS[modality]:
        if col not in meta.columns:
            log.warning("%s: optional column '%s' absent; it will be null", path, col)
            meta[col] = ""
    meta = meta.apply(lambda s: s.str.strip())
    dupes = meta["image_id"][meta["image_id"].duplicated()].tolist()
    if dupes:
        raise SailError(f"{path}: duplicate image_id rows: {', '.join(dupes[:5])}")
    return meta.replace({"": None})


def discover(source: Path, modalities: list[str]) -> tuple[list[ScanRef], list[dict]]:
    """List every scan of the requested modalities under ``source``, through a manifest.

    The layout becomes a manifest table (image, segmentations, meta.csv's columns renamed to the
    slices.parquet names: ``gender`` -> ``sex``, ``split`` -> ``official_split``), read like any
    user manifest. Returns the scans plus skip records (scan folders without a meta row, meta rows
    without a folder). The structure list of a modality is the union of mask names over its scans,
    so a scan lacking one of them is caught (and skipped) by the slicer.
    """
    source = Path(source)
    if not source.is_dir():
        raise SailError(f"dataset folder not found: {source}")
    found = [m for m in modalities if (source / DATASET_FOLDERS[m]).is_dir()]
    if not found:
        wanted = " or ".join(DATASET_FOLDERS[m] for m in modalities)
        raise SailError(f"{source}: no {wanted} folder (TotalSegmentator layout expected)")
    scans: list[ScanRef] = []
    skips: list[dict] = []
    for modality in found:
        table, layout_skips = layout_manifest(source, modality)
        skips.extend(layout_skips)
        refs = scans_from_table(table, source, [modality], str(source / DATASET_FOLDERS[modality]))
        unknown = sorted(set(refs[0].structures if refs else ()) - set(VOCABULARY[modality]))
        if unknown:
            log.warning(
                "%s: %d mask name(s) outside TotalSegmentator's %s vocabulary kept as columns: %s",
                source / DATASET_FOLDERS[modality],
                len(unknown),
                modality,
                ", ".join(unknown[:8]),
            )
        scans.extend(refs)
    return scans, skips


def layout_manifest(source: Path, modality: str) -> tuple[pd.DataFrame, list[dict]]:
    """One modality's folder as a manifest table (paths relative to ``source``) + skip records."""
    root = source / DATASET_FOLDERS[modality]
    meta = read_meta(root / "meta.csv", modality)
    skips = normalise_meta(meta, root / "meta.csv", modality)
    meta = meta.set_index("image_id", drop=False)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    rows = []
    for folder in folders:
        if folder.name not in meta.index:
            skips.append(
                _skip(modality, folder.name, f"folder {folder} has no row in {root / 'meta.csv'}")
            )
            continue
        row = {k: meta.loc[folder.name, k] for k in META_COLUMNS[modality] if k != "image_id"}
        rows.append(
            {
                "image": f"{DATASET_FOLDERS[modality]}/{folder.name}/{IMAGE_FILES[modality]}",
                "image_id": folder.name,
                "modality": modality,
                "segmentations": f"{DATASET_FOLDERS[modality]}/{folder.name}/segmentations",
                **{_RENAMED.get(k, k): v for k, v in row.items()},
            }
        )
    for image_id in sorted(set(meta.index) - {f.name for f in folders}):
        skips.append(_skip(modality, image_id, f"meta.csv row has no scan folder under {root}"))
    return pd.DataFrame(
        rows,
        columns=["image", "image_id", "modality", "segmentations"]
        + [_RENAMED.get(k, k) for k in META_COLUMNS[modality] if k != "image_id"],
    ), skips


def normalise_meta(meta: pd.DataFrame, path: Path, modality: str) -> list[dict]:
    """Normalise gender/age in place where unambiguous (``Male`` -> m, ``045Y`` -> 45); every other
    value becomes null and is recorded (row, column, value) in skipped.csv, never silently."""
    issues = []
    for col, normalise in (("gender", normalise_sex), ("age", normalise_age)):
        values = []
        for row, (image_id, raw) in enumerate(zip(meta["image_id"], meta[col], strict=True)):
            value, ok = normalise(raw)
            values.append(None if value is None else str(value))
            if not ok:
                issues.append(
                    _skip(
                        modality,
                        image_id,
                        f"{path} line {row + 2} column '{col}': {raw!r} is not "
                        f"recognised; stored as null",
                        action="null_value",
                    )
                )
        meta[col] = pd.Series(
            values, dtype=object, index=meta.index
        )  # None stays None (a list would give NaN)
    return issues
