"""Workspace layout, atomic writes and stage manifests (see docs/artifacts.md).

Every artifact is written to a temp name in its own folder and renamed into place, so an
interrupted run never leaves a half-written file that a later run would trust. A stage is
skipped when the manifest beside its main artifact records the same config hash and the same
input fingerprints.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sail import __version__
from sail.errors import SailError

log = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".manifest.json"
# A seed replicate of an SAE config lives in <config>/seed-<n>/ (train.seeds); the config folder
# itself holds the first seed's model, the one ranked and interpreted.
REPLICATE_PREFIX = "seed-"
STABILITY_CSV = "stability.csv"
HIERARCHY_CSV = "hierarchy.csv"
# Inputs smaller than this are content-hashed; larger ones are fingerprinted by size and,
# when they are workspace artifacts, by the hash of their own manifest.
CONTENT_HASH_LIMIT = 64 * 1024 * 1024
_UMASK = os.umask(0)
os.umask(_UMASK)
# What a stage's artifacts mean. Bump a stage's number when a fix changes the meaning of what it
# wrote (not just its bytes): its manifests then stop matching and the stage reruns. 2: held-out
# calibration reproducing the last level's selection, metrics from the stored codes (train and
# everything downstream of the codes).
SEMANTICS: dict[str, int] = {
    "train": 2,
    "activations": 2,
    "evaluate": 2,
    "interpret": 2,
    "figures": 2,
    "report": 2,
}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; artifacts get the usual permissions
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_csv_atomic(path: str | os.PathLike, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def write_parquet_atomic(
    path: str | os.PathLike,
    table: pa.Table | pd.DataFrame,
    metadata: Mapping[str, str] | None = None,
) -> None:
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def hash_config(obj: Any) -> str:
    """Stable hash of a JSON-able object (dict keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def hash_file(path: str | os.PathLike, chunk: int = 1 << 20, full: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest() if full else h.hexdigest()[:16]


def fingerprint(path: str | os.PathLike) -> str:
    """Cheap identity of an input: its manifest's hash if it has one, else content or size."""
    path = Path(path)
    manifest = manifest_path(path)
    if manifest.exists():
        return "manifest:" + hash_file(manifest)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        listing = [(str(p.relative_to(path)), p.stat().st_size) for p in files]
        return "dir:" + hash_config(listing)
    if not path.exists():
        return "missing"
    size = path.stat().st_size
    if size <= CONTENT_HASH_LIMIT:
        return "sha256:" + hash_file(path)
    return f"size:{size}"


def replicate_folder(seed: int) -> str:
    """Folder name of the seed-``seed`` replicate inside its config's folder."""
    return f"{REPLICATE_PREFIX}{seed}"


def manifest_path(artifact: str | os.PathLike) -> Path:
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + MANIFEST_SUFFIX)


@dataclass(frozen=True)
class StageRecord:
    """What a finished stage promises about one artifact."""

    stage: str
    config_hash: str
    inputs: dict[str, str]

    @property
    def semantics(self) -> int:
        """The stage family's entry in SEMANTICS ("evaluate/sae" and "interpret.language" share theirs)."""
        return SEMANTICS.get(re.split(r"[./]", self.stage)[0], 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "config_hash": self.config_hash,
            "inputs": self.inputs,
            "semantics": self.semantics,
            "sail_version": __version__,
        }


def is_done(
    artifact: str | os.PathLike, record: StageRecord, ignore_semantics: bool = False
) -> bool:
    """True when ``artifact`` exists and its manifest matches ``record`` (but for the artifact
    semantics when ``ignore_semantics``: to tell a stale artifact from a missing one)."""
    artifact = Path(artifact)
    manifest = manifest_path(artifact)
    if not artifact.exists() or not manifest.exists():
        return False
    try:
        saved = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    integrity = saved.get("integrity")
    if integrity and integrity.get("bytes") != artifact.stat().st_size:
        log.warning(
            "%s: size differs from what its manifest recorded (damaged or replaced); redoing it",
            artifact,
        )
        return False
    return (
        saved.get("stage") == record.stage
        and saved.get("config_hash") == record.config_hash
        and saved.get("inputs") == record.inputs
        and (ignore_semantics or saved.get("semantics", 1) == record.semantics)
    )


def mark_done(
    artifact: str | os.PathLike, record: StageRecord, extra: Mapping[str, Any] | None = None
) -> None:
    payload = record.to_json()
    if extra:
        payload["summary"] = dict(extra)
    if Path(artifact).suffix == ".parquet":
        payload["integrity"] = table_integrity(artifact)
    elif (
        Path(artifact).suffix == ".safetensors"
    ):  # cfg.json holds its sha256; the size makes is_done see damage
        payload["integrity"] = {"bytes": Path(artifact).stat().st_size}
    write_json_atomic(manifest_path(artifact), payload)


def table_integrity(path: str | os.PathLike) -> dict[str, Any]:
    """What a written table is: bytes, rows and sha256, hashed once here (never on every read)."""
    path = Path(path)
    return {
        "bytes": path.stat().st_size,
        "rows": pq.read_metadata(path).num_rows,
        "sha256": hash_file(path, full=True),
    }


def check_table(path: str | os.PathLike, what: str = "table") -> int:
    """Cheap check of a Parquet table before it is read: its footer parses and, when its manifest
    recorded them, its size and row count match. Returns the row count.

    A damaged table (truncated, overwritten, replaced) is an error naming it and the stage to
    rerun, before any result is computed from it.
    """
    path = Path(path)
    redo = "rerun the stage that wrote it with --force"
    try:
        rows = pq.read_metadata(path).num_rows
    except (OSError, pa.ArrowException) as exc:
        raise SailError(
            f"{path}: not a readable Parquet {what} ({str(exc).splitlines()[0]}); {redo}"
        ) from None
    try:
        integrity = json.loads(manifest_path(path).read_text()).get("integrity") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        integrity = {}
    size = path.stat().st_size
    if integrity.get("bytes") not in (None, size) or integrity.get("rows") not in (None, rows):
        raise SailError(
            f"{path}: {size} bytes / {rows} rows, but its manifest recorded {integrity.get('bytes')} "
            f"bytes / {integrity.get('rows')} rows when it was written (damaged or replaced); {redo}"
        )
    return rows


class Workspace:
    """Paths of every artifact in one run folder (layout in docs/artifacts.md)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"

    def ensure(self) -> Workspace:
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    @property
    def config_yaml(self) -> Path:
        return self.root / "config.yaml"

    @property
    def phantom_dir(self) -> Path:
        return self.root / "phantom"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def slices_dir(self) -> Path:
        return self.data_dir / "slices"

    @property
    def slices_table(self) -> Path:
        return self.data_dir / "slices.parquet"

    @property
    def skipped_csv(self) -> Path:
        return self.data_dir / "skipped.csv"

    @property
    def split_csv(self) -> Path:
        return self.data_dir / "split.csv"

    def embeddings(self, encoder: str) -> Path:
        return self.root / "embeddings" / f"{encoder}.parquet"

    def sae_dir(self, encoder: str, variant: str, config_name: str) -> Path:
        return self.root / "sae" / encoder / variant / config_name

    def replicate_dir(self, encoder: str, variant: str, config_name: str, seed: int) -> Path:
        return self.sae_dir(encoder, variant, config_name) / replicate_folder(seed)

    def replicate_dirs(self, encoder: str, variant: str, config_name: str) -> dict[int, Path]:
        """Seed -> folder of every trained replicate of a config (those holding a cfg.json)."""
        root = self.sae_dir(encoder, variant, config_name)
        found = {}
        for folder in sorted(root.glob(f"{REPLICATE_PREFIX}*")) if root.is_dir() else []:
            seed = folder.name[len(REPLICATE_PREFIX) :]
            if re.fullmatch(r"-?\d+", seed) and (folder / "cfg.json").is_file():
                found[int(seed)] = folder
        return dict(sorted(found.items()))

    def activations(self, encoder: str, variant: str, config_name: str, split: str) -> Path:
        return self.root / "activations" / encoder / variant / config_name / f"{split}.parquet"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def stability_csv(self) -> Path:
        return self.eval_dir / STABILITY_CSV

    @property
    def hierarchy_csv(self) -> Path:
        return self.eval_dir / HIERARCHY_CSV

    @property
    def interpret_dir(self) -> Path:
        return self.root / "interpret"

    @property
    def figures_dir(self) -> Path:
        return self.root / "figures"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    def relative(self, path: str | os.PathLike) -> str:
        return Path(path).relative_to(self.root).as_posix()


@contextlib.contextmanager
def stage_lock(root: str | os.PathLike, name: str) -> Iterator[Path]:
    """An advisory lock so two runs never write the same stage's outputs at once.

    ``name`` carries the shard (``encode-0of4``) and torchrun rank, so shard jobs and ranks on one
    workspace take different locks. The lock is the kernel's (flock): it ends with the process that
    held it, so a killed run leaves no stale lock; the file only says who held it last.
    """
    import fcntl
    import socket
    import time

    path = Path(root) / ".locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise SailError(
                f"{path}: stage {name} is being written by another sail run ({holder}); wait for it to "
                "finish (the lock ends with that process, even if it is killed)"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(
            f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        )
        f.flush()
        try:
            yield path
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
