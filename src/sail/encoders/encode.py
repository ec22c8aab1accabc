"""The ``encode`` stage: every slice in data/slices.parquet -> embeddings/<name>.parquet.

The sorted slice list is cut into fixed chunks (``chunk_size`` rows) and each chunk into fixed
batches, so the same slice always meets the same batch: an interrupted run, a resumed run and a
sharded run (``--shard i/n`` takes chunks i, i+n, ...) compute identical numbers. Finished chunks
are written atomically to ``embeddings/<name>.parts/`` and skipped on the next run; a merge joins
them into the final table (an unsharded run merges itself; shards need ``sail encode --merge``).
DataLoader workers decode whole batches of PNGs; resizing and normalising happen on the device.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from sail import __version__
from sail.artifacts import ENCODE_ENCODER, ENCODE_PLAN
from sail.console import progress
from sail.device import resolve_device
from sail.encoders.base import EncoderSpec, Precision, Preprocess, get_spec, resolve_precision
from sail.encoders.table import read_embeddings, write_embeddings
from sail.errors import SailError
from sail.shards import parse_shard
from sail.workspace import (
    StageRecord,
    Workspace,
    fingerprint,
    hash_config,
    is_done,
    manifest_path,
    mark_done,
    write_json_atomic,
)

if TYPE_CHECKING:
    from sail.config import EncodeConfig, SailConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodeJob:
    """One embeddings table to produce, with every setting resolved."""

    spec: EncoderSpec
    name: str
    weights: str | None
    image_size: int
    device: torch.device
    precision: Precision
    requested_precision: str
    batch_size: int
    workers: int
    chunk_size: int
    pooling: str = "auto"

    def identity(self) -> dict[str, Any]:
        """What the numbers depend on (the manifest's config hash). Device and batch size are not
        in it."""
        pooling = (
            {"pooling": self.pooling} if self.pooling != "auto" else {}
        )  # keeps older manifests valid
        return {
            "encoder": self.spec.name,
            "weights": self.spec.weights_identity(self.weights),
            "image_size": self.image_size,
            "precision": self.requested_precision,
            **pooling,
        }

    def build(self):
        """The encoder on its device, in its precision."""
        kwargs = {"pooling": self.pooling} if self.pooling != "auto" else {}
        encoder = self.spec.build(weights=self.weights, image_size=self.image_size, **kwargs)
        return encoder.to(self.device, self.precision)

    def plan_key(self) -> str:
        """Parts made under another key are stale (other chunks, or other resolved precision)."""
        return hash_config(
            {**self.identity(), "resolved_precision": self.precision, "chunk_size": self.chunk_size}
        )


def encode_shard(shard: str | None) -> tuple[int, int] | None:
    """This process's encode shard (i, n): it encodes chunks i, i+n, i+2n, ... (strided).

    ``--shard i/n`` when given, else torchrun's RANK/WORLD_SIZE, else None (every chunk).
    """
    if shard is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return (int(os.environ.get("RANK", "0")), world) if world > 1 else None
    return parse_shard(shard)


def default_workers() -> int:
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def table_name(entry) -> str:
    """The embeddings table an ``encode.encoders`` entry writes (its ``name`` or the encoder's)."""
    return entry.name or get_spec(entry.encoder).table_name


def entry_for_table(encoders: list, table: str):
    """The ``encode.encoders`` entry that writes embeddings/<table>.parquet (None: imported)."""
    return next((e for e in encoders if table_name(e) == table), None)


def entry_job(entry, settings: EncodeConfig) -> EncodeJob:
    """The encode job of one ``encode.encoders`` entry: what the encode stage runs, and what the
    maps stage and the NIfTI export rebuild to see slices exactly as encode did."""
    return make_job(
        entry.encoder,
        settings,
        name=table_name(entry),
        weights=entry.weights,
        image_size=entry.image_size,
        pooling=entry.pooling,
    )


def recorded_job(
    configs: list, ws: Workspace, table: str, settings: EncodeConfig
) -> EncodeJob | None:
    """The job that wrote embeddings/<table>.parquet, rebuilt to see slices exactly as encode did
    (the maps stage, the NIfTI export): the first ``configs`` entry naming ``table`` whose
    settings hash to what the encode stage recorded (its precision applied to ``settings``).

    None when no entry names the table (imported embeddings); SailError when entries name it but
    none matches the record: maps from another input size or precision would not be the maps of
    the stored embeddings.
    """
    manifest = manifest_path(ws.embeddings(table))
    recorded = json.loads(manifest.read_text()).get("config_hash") if manifest.is_file() else None
    seen = []
    for config in configs:
        entry = entry_for_table(config.encode.encoders, table)
        if entry is None:
            continue
        job = entry_job(entry, settings.model_copy(update={"precision": config.encode.precision}))
        if recorded in (None, hash_config(job.identity())):
            return job
        seen.append(f"{entry.encoder} at {job.image_size} px, {config.encode.precision}")
    if not seen:
        return None
    raise SailError(
        f"embeddings/{table}: the encode.encoders entries naming it ({'; '.join(seen)}) differ "
        f"from what the encode stage recorded in {manifest}; give the config encode ran with "
        "(--config)"
    )


def make_job(
    encoder: str,
    settings: EncodeConfig,
    name: str | None = None,
    weights: str | None = None,
    image_size: int | None = None,
    pooling: str = "auto",
) -> EncodeJob:
    """Resolve one table's settings (``settings`` needs device, precision, batch_size, workers,
    chunk_size)."""
    spec = get_spec(encoder)
    if pooling != "auto" and not spec.extra.get("named"):
        raise SailError(
            f"encoder {spec.name} has its published pooling; "
            "--pooling applies to timm:/hf: encoders"
        )
    device = resolve_device(settings.device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return EncodeJob(
        spec=spec,
        name=name or spec.table_name,
        weights=weights,
        image_size=image_size or spec.image_size_for(weights),
        device=device,
        precision=resolve_precision(spec, device, settings.precision),
        requested_precision=settings.precision,
        batch_size=settings.batch_size
        or (spec.batch_size if device.type == "cuda" else spec.cpu_batch_size),
        workers=default_workers() if settings.workers is None else settings.workers,
        chunk_size=settings.chunk_size,
        pooling=pooling,
    )


def read_slice_index(ws: Workspace) -> tuple[np.ndarray, np.ndarray]:
    """(slice_ids, png_paths), sorted by slice_id, from data/slices.parquet."""
    path = ws.slices_table
    if not path.is_file():
        raise SailError(
            f"{path} not found: run `sail prepare` first "
            "(or `sail import-embeddings` for your own vectors)"
        )
    schema = pq.read_schema(path)
    for col in ("slice_id", "png_path"):
        if col not in schema.names:
            raise SailError(f"{path}: missing column '{col}'")
    table = pq.read_table(path, columns=["slice_id", "png_path"])
    ids = np.asarray(table.column("slice_id").to_pylist(), dtype=str)
    pngs = np.asarray(table.column("png_path").to_pylist(), dtype=str)
    if len(ids) == 0:
        raise SailError(f"{path}: no slices to encode")
    order = np.argsort(ids, kind="stable")
    ids, pngs = ids[order], pngs[order]
    dup = ids[1:][ids[1:] == ids[:-1]]
    if len(dup):
        raise SailError(
            f"{path}: column 'slice_id' has {len(dup)} duplicate values, e.g. {dup[0]!r}"
        )
    return ids, pngs


class BatchDecoder(torch.utils.data.Dataset):
    """Item k = batch k, decoded in a worker: uint8 (B, 1, H, W), plus the rows that failed to read.

    Batches whose images differ in size are resized here (float, the encoder's own resize) to the
    model's input size, so the device always receives one stacked tensor.
    """

    def __init__(
        self,
        root: Path,
        png_paths: np.ndarray,
        batches: list[tuple[int, int, int]],
        preprocess: Preprocess,
    ):
        self.root = str(root)
        self.png_paths = (
            png_paths  # fixed-width unicode: no per-item refcounts touched in forked workers
        )
        self.batches = batches
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> dict[str, Any]:
        _, start, stop = self.batches[k]
        images: list[np.ndarray | None] = []
        bad: list[tuple[int, str]] = []
        for row in range(start, stop):
            try:
                with Image.open(os.path.join(self.root, self.png_paths[row])) as im:
                    images.append(np.array(im if im.mode == "L" else im.convert("L")))
            except (OSError, ValueError) as exc:
                bad.append((row, f"{type(exc).__name__}: {exc}"))
                images.append(None)
        shapes = {im.shape for im in images if im is not None}
        fill = np.zeros(next(iter(shapes)) if shapes else (1, 1), dtype=np.uint8)
        arrays = [fill if im is None else im for im in images]
        if len(shapes) <= 1:
            batch = torch.from_numpy(np.stack(arrays))[:, None]
        else:
            batch = torch.cat(
                [self.preprocess.resize(torch.from_numpy(a)[None, None]) for a in arrays]
            )
        return {"index": k, "images": batch, "bad": bad}


class PartsDir:
    """``embeddings/<name>.parts/``: plan.json, encoder.json and one parquet per finished chunk."""

    def __init__(self, ws: Workspace, name: str):
        self.ws, self.name = ws, name
        self.dir = ws.embedding_parts(name)

    def chunk(self, k: int) -> Path:
        return self.ws.embedding_chunk(self.name, k)

    def has(self, k: int) -> bool:
        """A finished chunk: its Parquet footer reads and holds the planned row count. A damaged
        part (truncated, overwritten) is removed, so it is encoded again rather than trusted."""
        path = self.chunk(k)
        if not path.is_file():
            return False
        plan = self.plan() or {}
        want = None
        if "n_slices" in plan and "chunk_size" in plan:
            want = min(plan["chunk_size"], plan["n_slices"] - k * plan["chunk_size"])
        try:
            rows = pq.read_metadata(path).num_rows
        except (OSError, pa.ArrowException):
            rows = -1
        if rows < 0 or (want is not None and rows != want):
            log.warning(
                "%s: damaged part (%s rows, expected %s); encoding it again",
                path,
                "unreadable" if rows < 0 else rows,
                want,
            )
            path.unlink(missing_ok=True)
            return False
        return True

    def plan(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.dir / ENCODE_PLAN).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def encoder_metadata(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.dir / ENCODE_ENCODER).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def start(self, plan: dict[str, Any], discard: list[int]) -> None:
        """Keep matching finished chunks; drop stale ones (another plan) and the ``discard``
        list."""
        old = self.plan()
        if old is not None and old.get("key") != plan["key"]:
            stale = sorted(self.dir.glob("chunk_*.parquet"))
            if stale:
                log.info("%s: discarding %d parts made with other settings", self.dir, len(stale))
            for path in stale:
                path.unlink(missing_ok=True)
            (self.dir / ENCODE_ENCODER).unlink(missing_ok=True)
        for k in discard:
            self.chunk(k).unlink(missing_ok=True)
        write_json_atomic(self.dir / ENCODE_PLAN, plan)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _chunk_batches(
    chunks: list[int], n_rows: int, chunk_size: int, batch_size: int
) -> list[tuple[int, int, int]]:
    out = []
    for k in chunks:
        lo, hi = k * chunk_size, min(n_rows, (k + 1) * chunk_size)
        out.extend((k, s, min(hi, s + batch_size)) for s in range(lo, hi, batch_size))
    return out


def _non_finite_error(name: str, ids: np.ndarray) -> SailError:
    shown = ", ".join(ids[:5])
    more = f" and {len(ids) - 5} more" if len(ids) > 5 else ""
    return SailError(
        f"encoder {name}: non-finite (NaN/inf) embeddings for {len(ids)} slices: {shown}{more}"
    )


def encode_chunks(
    ws: Workspace,
    job: EncodeJob,
    ids: np.ndarray,
    pngs: np.ndarray,
    chunks: list[int],
    parts: PartsDir,
) -> int:
    """Encode ``chunks`` and write each as soon as it is complete. Returns the number of slices
    encoded."""
    encoder = job.build()
    write_json_atomic(parts.dir / ENCODE_ENCODER, encoder.metadata())
    batches = _chunk_batches(chunks, len(ids), job.chunk_size, job.batch_size)
    loader = torch.utils.data.DataLoader(
        BatchDecoder(ws.root, pngs, batches, encoder.preprocess),
        batch_size=None,
        shuffle=False,
        num_workers=job.workers,
        pin_memory=job.device.type == "cuda",
        prefetch_factor=2 if job.workers > 0 else None,
    )
    n_total = sum(stop - start for _, start, stop in batches)
    pending: list[torch.Tensor] = []
    t0 = time.perf_counter()
    with progress() as bar:
        task = bar.add_task(f"encode {job.name}", total=n_total)
        for item in loader:
            k, start, stop = batches[item["index"]]
            if item["bad"]:
                row, msg = item["bad"][0]
                raise SailError(
                    f"cannot read {len(item['bad'])} PNG(s) for encoding, "
                    f"e.g. {ws.root / pngs[row]} "
                    f"(slice {ids[row]}): {msg}"
                )
            pending.append(encoder.encode(item["images"]))  # stays on the device: no sync per batch
            bar.advance(task, stop - start)
            if stop == min(len(ids), (k + 1) * job.chunk_size):
                x_ND = torch.cat(pending)
                pending = []
                lo = k * job.chunk_size
                finite_N = torch.isfinite(x_ND).all(dim=1).cpu().numpy()
                if not finite_N.all():
                    raise _non_finite_error(job.name, ids[lo:stop][~finite_N])
                write_embeddings(parts.chunk(k), ids[lo:stop], x_ND.cpu().numpy(), {"chunk": k})
    seconds = time.perf_counter() - t0
    log.info(
        "encoded %d slices with %s in %.1f s (%.1f slices/s)",
        n_total,
        job.name,
        seconds,
        n_total / max(seconds, 1e-9),
    )
    return n_total


def encode_job(
    ws: Workspace, job: EncodeJob, force: bool = False, shard: tuple[int, int] | None = None
) -> Path | None:
    """Produce embeddings/<job.name>.parquet (or this shard's parts). Returns the table once it
    exists."""
    final = ws.embeddings(job.name)
    record = StageRecord(
        "encode", hash_config(job.identity()), {"slices": fingerprint(ws.slices_table)}
    )
    if not force and is_done(final, record):
        log.info("encode %s: up to date (%s)", job.name, ws.relative(final))
        return final
    ids, pngs = read_slice_index(ws)
    n_chunks = -(-len(ids) // job.chunk_size)
    mine = list(range(n_chunks)) if shard is None else list(range(shard[0], n_chunks, shard[1]))
    parts = PartsDir(ws, job.name)
    plan = {
        "key": job.plan_key(),
        "record": record.to_json(),
        "identity": job.identity(),
        "name": job.name,
        "n_slices": len(ids),
        "chunk_size": job.chunk_size,
        "n_chunks": n_chunks,
    }
    parts.start(plan, discard=mine if force else [])
    todo = [k for k in mine if not parts.has(k)]
    if len(todo) < len(mine):
        log.info(
            "encode %s: resuming, %d of %d chunks already done",
            job.name,
            len(mine) - len(todo),
            len(mine),
        )
    if todo:
        encode_chunks(ws, job, ids, pngs, todo, parts)
    if shard is not None:
        log.info(
            "encode %s: shard %d/%d finished (%d chunks); once every shard is done run "
            "`sail encode --merge --name %s`",
            job.name,
            shard[0],
            shard[1],
            len(mine),
            job.name,
        )
        return None
    return merge_parts(ws, job.name)


def merge_parts(ws: Workspace, name: str) -> Path:
    """Join finished chunks into embeddings/<name>.parquet (identical to an unsharded run), then
    drop them."""
    parts = PartsDir(ws, name)
    plan = parts.plan()
    if plan is None:
        try:
            canonical = get_spec(name).table_name
        except SailError:
            canonical = name
        if canonical != name:
            return merge_parts(ws, canonical)
        raise SailError(
            f"{parts.dir}: no encoding parts to merge; run "
            f"`sail encode --encoder ... --name {name} --shard i/n` first"
        )
    ids, _ = read_slice_index(ws)
    record = StageRecord(
        plan["record"]["stage"], plan["record"]["config_hash"], plan["record"]["inputs"]
    )
    if record.inputs.get("slices") != fingerprint(ws.slices_table) or plan["n_slices"] != len(ids):
        raise SailError(
            f"{ws.slices_table} changed after the parts in {parts.dir} were started; encode again"
        )
    missing = [k for k in range(plan["n_chunks"]) if not parts.has(k)]
    if missing:
        shown = ", ".join(str(k) for k in missing[:10])
        raise SailError(
            f"{parts.dir}: {len(missing)} of {plan['n_chunks']} chunks are not finished yet "
            f"(chunks {shown}"
            f"{' ...' if len(missing) > 10 else ''}); run the remaining shards, then merge"
        )
    meta = parts.encoder_metadata()
    if meta is None:
        raise SailError(f"{parts.dir}: {ENCODE_ENCODER} is missing; encode again")
    tables = [read_embeddings(parts.chunk(k)) for k in range(plan["n_chunks"])]
    merged_ids = np.concatenate([t.slice_ids for t in tables]).astype(str)
    if not np.array_equal(merged_ids, ids):
        raise SailError(
            f"{parts.dir}: the parts do not cover the slices of {ws.slices_table} in order; "
            "encode again"
        )
    x_ND = np.concatenate([t.x_ND for t in tables])
    final = ws.embeddings(name)
    metadata = {**meta, "name": name, "n_slices": len(ids), "sail_version": __version__}
    write_embeddings(final, merged_ids, x_ND, metadata)
    mark_done(final, record, {"n_slices": len(ids), "dim": int(x_ND.shape[1])})
    parts.remove()
    log.info("encode %s: wrote %s (%d x %d)", name, ws.relative(final), *x_ND.shape)
    return final


def run_encode(cfg: SailConfig, ws: Workspace, force: bool = False) -> None:
    """Pipeline stage: one table per entry of ``encode.encoders``."""
    settings = cfg.encode
    shard = encode_shard(settings.shard)
    names = [table_name(e) for e in settings.encoders]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise SailError(
            f"config encode.encoders: output name {sorted(dup)[0]!r} is used twice; "
            "give each a distinct 'name'"
        )
    for entry in settings.encoders:
        encode_job(ws, entry_job(entry, settings), force=force, shard=shard)
