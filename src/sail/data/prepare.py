"""The ``phantom`` and ``prepare`` stages: dataset folder -> PNG slices, slices.parquet,
skipped.csv.

Scans are sliced in parallel worker processes (one volume in memory per worker). Each finished
scan leaves a part file keyed by the config hash, so an interrupted run resumes where it stopped
and the final table is the same as an uninterrupted run's.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from sail.artifacts import SLICE_ID_COLUMNS
from sail.config import PrepareConfig, SailConfig
from sail.console import progress
from sail.data.label_maps import LABEL_COLUMNS, structure_id_table, structure_ids_frame
from sail.data.labels import HARMONISED
from sail.data.manifest import (
    GEOMETRY_COLUMNS,
    KNOWN_METADATA,
    ScanRef,
    discover_manifest,
    is_manifest,
)
from sail.data.phantom import write_phantom_dataset
from sail.data.slicing import ScanResult, SliceOptions, slice_scan
from sail.data.totalseg import DATASET_FOLDERS, discover
from sail.errors import SailError
from sail.workspace import (
    StageRecord,
    Workspace,
    fingerprint,
    hash_config,
    is_done,
    mark_done,
    write_csv_atomic,
    write_parquet_atomic,
)

log = logging.getLogger(__name__)

SKIP_COLUMNS = ["modality", "image_id", "plane", "slice_from", "slice_to", "action", "reason"]
META_ORDER = [*SLICE_ID_COLUMNS, *KNOWN_METADATA, *GEOMETRY_COLUMNS]


def dataset_source(cfg: SailConfig, ws: Workspace) -> Path:
    """The dataset prepare reads: the configured folder, else the workspace's phantom."""
    return Path(cfg.prepare.source) if cfg.prepare.source is not None else ws.phantom_dir


def run_phantom(cfg: SailConfig, ws: Workspace, force: bool = False) -> None:
    """Write the phantom dataset into ``<ws>/phantom`` when no dataset source is configured."""
    if cfg.prepare.source is not None:
        log.info("phantom: skipped (prepare.source is %s)", cfg.prepare.source)
        return
    record = StageRecord("phantom", hash_config(cfg.phantom.model_dump(mode="json")), {})
    truth = ws.phantom_truth
    if not force and is_done(truth, record):
        log.info("phantom: up to date")
        return
    if ws.phantom_dir.exists():
        shutil.rmtree(ws.phantom_dir)
    write_phantom_dataset(
        ws.phantom_dir,
        cfg.phantom,
        workers=_workers(cfg.prepare.workers, cfg.phantom.n_ct + cfg.phantom.n_mri),
    )
    mark_done(truth, record)


def _workers(configured: int | None, n_tasks: int) -> int:
    return max(1, min(configured or os.cpu_count() or 1, n_tasks))


def _meta_fingerprint(source: Path, modalities: list[str]) -> dict[str, str]:
    if is_manifest(source):
        return {"manifest": fingerprint(source)}
    out = {}
    for m in modalities:
        root = source / DATASET_FOLDERS[m]
        if root.is_dir():
            out[f"{m}_meta"] = fingerprint(root / "meta.csv")
            out[f"{m}_scans"] = hash_config(sorted(p.name for p in root.iterdir() if p.is_dir()))
    return out


def _part_path(parts: Path, ref: ScanRef) -> Path:
    return Workspace.prepare_part(parts, ref.modality, ref.image_id)


def _slice_and_store(ref: ScanRef, opts: SliceOptions, root: Path, parts: Path) -> ScanResult:
    result = slice_scan(ref, opts, root)
    skips = pd.DataFrame(result.skips, columns=SKIP_COLUMNS)
    rows = result.rows if result.rows is not None else pd.DataFrame()
    # one part per scan: rows + skip records, written atomically after its PNGs
    write_parquet_atomic(_part_path(parts, ref), rows, {"skips": skips.to_json(orient="records")})
    return result


def _read_part(path: Path) -> ScanResult:
    table = pq.read_table(path)
    skips = pd.read_json(io.StringIO(table.schema.metadata[b"skips"].decode()), orient="records")
    rows = table.to_pandas() if table.num_rows else None
    return ScanResult(rows, skips.to_dict("records") if len(skips) else [])


def _slice_scans(
    scans: list, parts: Path, opts: SliceOptions, ws: Workspace, workers: int | None
) -> dict[tuple[str, str], ScanResult]:
    """Every scan's rows and skips: read from its part file when an earlier run finished it, else
    sliced now (in worker processes) and stored as a part, so an interrupted run resumes."""
    results: dict[tuple[str, str], ScanResult] = {}
    todo = []
    for ref in scans:
        part = _part_path(parts, ref)
        if part.exists():
            results[(ref.modality, ref.image_id)] = _read_part(part)
        else:
            todo.append(ref)
    if results:
        log.info("prepare: resuming, %d of %d scans already sliced", len(results), len(scans))
    n_workers = _workers(workers, len(todo))
    with progress() as bar:
        task = bar.add_task("slicing scans", total=len(scans), completed=len(results))
        if n_workers == 1:
            for ref in todo:
                results[(ref.modality, ref.image_id)] = _slice_and_store(ref, opts, ws.root, parts)
                bar.advance(task)
            return results
        with ProcessPoolExecutor(max_workers=n_workers) as pool:
            futures = {
                pool.submit(_slice_and_store, ref, opts, ws.root, parts): ref for ref in todo
            }
            for future in as_completed(futures):
                ref = futures[future]
                results[(ref.modality, ref.image_id)] = future.result()
                bar.advance(task)
    return results


def prepare_hash(pc: PrepareConfig) -> str:
    """The settings that change prepare's output. ``label_maps`` enters only when on, so a
    workspace prepared before the option existed stays up to date with it off."""
    settings = pc.model_dump(mode="json", exclude={"workers", "source"})
    if not settings.pop("label_maps"):
        return hash_config(settings)
    return hash_config(settings | {"label_maps": True})


def parts_key(config_hash: str, label_ids: dict[str, dict[str, int]] | None) -> str:
    """The part folder's key: the config hash, and with label maps on the id table too (a new
    mask name outside the vocabulary shifts the ids after it, so parts written before it are
    not resumed)."""
    if label_ids is None:
        return config_hash
    return hash_config({"prepare": config_hash, "structure_ids": label_ids})


def run_prepare(cfg: SailConfig, ws: Workspace, force: bool = False) -> None:
    pc = cfg.prepare
    source = dataset_source(cfg, ws)
    if pc.source is None and not source.exists():
        run_phantom(cfg, ws)
    config_hash = prepare_hash(pc)
    record = StageRecord(
        "prepare",
        config_hash,
        _meta_fingerprint(source, pc.modalities) | {"source": str(source.resolve())},
    )
    if not force and is_done(ws.slices_table, record):
        log.info("prepare: up to date (%s)", ws.slices_table)
        return
    scans, skips = (discover_manifest if is_manifest(source) else discover)(source, pc.modalities)
    if pc.max_scans is not None:
        scans = [
            s for m in pc.modalities for s in [r for r in scans if r.modality == m][: pc.max_scans]
        ]
    if not scans:
        raise SailError(f"{source}: no scans found for modalities {', '.join(pc.modalities)}")
    label_ids = structure_id_table(scans) if pc.label_maps else None
    opts = SliceOptions(
        style=pc.style,
        image_size=pc.image_size,
        slice_stride=pc.slice_stride,
        ct_spacing_mm=pc.ct_spacing_mm,
        label_ids=label_ids,
    )
    parts = ws.prepare_parts(parts_key(config_hash, label_ids))
    if force and parts.exists():
        shutil.rmtree(parts)
    if force and ws.slices_dir.exists():
        shutil.rmtree(ws.slices_dir)
    parts.mkdir(parents=True, exist_ok=True)

    results = _slice_scans(scans, parts, opts, ws, pc.workers)
    frames = [results[k].rows for k in sorted(results) if results[k].rows is not None]
    for k in sorted(results):
        skips.extend(results[k].skips)
    if not frames:  # a previous slices.parquet + skipped.csv pair stays as it was
        failed = ws.skipped_failed_csv if ws.slices_table.exists() else ws.skipped_csv
        write_csv_atomic(failed, pd.DataFrame(skips, columns=SKIP_COLUMNS))
        raise SailError(f"{source}: every scan was skipped; reasons in {failed}")
    table = _assemble(frames)
    _write_structure_ids(ws, label_ids)
    write_parquet_atomic(ws.slices_table, table)
    _write_skips(
        ws, skips
    )  # after the table: the pair is consistent once the manifest below is written
    n_skipped = sum(1 for s in skips if s["action"] == "skip_scan")
    summary = {
        "slices": len(table),
        "scans": int(table.groupby(["modality", "image_id"]).ngroups),
        "skipped_scans": n_skipped,
        "skipped_csv": fingerprint(ws.skipped_csv),
    }
    if label_ids is not None:
        summary |= _label_summary(table) | {"structure_ids": fingerprint(ws.structure_ids)}
    mark_done(ws.slices_table, record, summary)
    shutil.rmtree(parts, ignore_errors=True)
    by_plane = table.groupby(["modality", "plane"]).size().to_dict()
    log.info(
        "prepare: %d slices from %d scans (%s); %d scans skipped -> %s",
        len(table),
        summary["scans"],
        ", ".join(f"{m}/{p}: {n}" for (m, p), n in by_plane.items()),
        n_skipped,
        ws.relative(ws.skipped_csv),
    )


def _write_structure_ids(ws: Workspace, label_ids: dict[str, dict[str, int]] | None) -> None:
    """``data/structure_ids.csv`` with label maps on; an earlier run's copy is removed with them
    off (its label maps are, slice by slice, too)."""
    if label_ids is None:
        ws.structure_ids.unlink(missing_ok=True)
        return
    write_csv_atomic(ws.structure_ids, structure_ids_frame(label_ids))


def _label_summary(table: pd.DataFrame) -> dict[str, int]:
    """How many slices got a label map and how many of them had overlapping masks (logged)."""
    overlap = table["label_overlap_px"].dropna()
    summary = {
        "label_maps": int(table["label_path"].notna().sum()),
        "overlap_slices": int((overlap > 0).sum()),
        "overlap_px": int(overlap.sum()),
    }
    log.info(
        "prepare: %d label maps (%d slices without masks have none); %d slices hold %d pixels "
        "covered by two or more masks, resolved to the smallest structure (label_overlap_px)",
        summary["label_maps"],
        len(table) - summary["label_maps"],
        summary["overlap_slices"],
        summary["overlap_px"],
    )
    return summary


def _write_skips(ws: Workspace, skips: list[dict]) -> None:
    write_csv_atomic(ws.skipped_csv, pd.DataFrame(skips, columns=SKIP_COLUMNS))


def _assemble(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate per-scan rows: structure flags null where a modality lacks the structure,
    harmonised flags added, columns in the documented order (a manifest's free metadata columns
    after the known ones, before the flags), rows sorted by slice_id."""
    table = pd.concat(frames, ignore_index=True, sort=False)
    flag_cols = sorted(c for c in table.columns if c.startswith("has_"))
    for col in flag_cols:
        table[col] = table[col].astype("boolean")
    for name, parts in HARMONISED.items():
        cols = [f"has_{p}" for p in parts if f"has_{p}" in table.columns]
        if not cols:
            continue
        derived = table[cols].fillna(False).any(axis=1)
        has_parts = table[cols].notna().any(axis=1)
        target = f"has_{name}"
        if target not in table.columns:
            table[target] = pd.array([pd.NA] * len(table), dtype="boolean")
        fill = table[target].isna() & has_parts
        table.loc[fill, target] = derived[fill]
    flag_cols = sorted(c for c in table.columns if c.startswith("has_"))
    for col in META_ORDER:
        if col not in table.columns:
            table[col] = None
    label_cols = [c for c in LABEL_COLUMNS if c in table.columns]  # only with label maps on
    if label_cols:
        table["label_overlap_px"] = table["label_overlap_px"].astype("Int64")
    free = [
        c
        for c in table.columns
        if c not in META_ORDER and c not in label_cols and not c.startswith("has_")
    ]  # manifest order
    for col in free:  # a free column whose every value is a number becomes float (e.g. a score)
        numbers = pd.to_numeric(table[col], errors="coerce")
        if table[col].notna().any() and numbers.notna().sum() == table[col].notna().sum():
            table[col] = numbers.astype(float)
    table = (
        table[META_ORDER + label_cols + free + flag_cols]
        .sort_values("slice_id", kind="stable")
        .reset_index(drop=True)
    )
    table["slice_idx"] = table["slice_idx"].astype(np.int32)
    return table
