"""The embeddings table: ``slice_id`` + ``embedding`` (fixed_size_list<float32, d>), sorted by
slice_id.

Reading goes straight from the Arrow buffer to one (N, d) float32 array: no per-row Python.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sail.errors import SailError
from sail.workspace import check_table, write_parquet_atomic

META_KEY = "sail"


@dataclass
class EmbeddingTable:
    slice_ids: np.ndarray  # (N,) object array of str
    x_ND: np.ndarray  # (N, d) float32
    metadata: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.x_ND.shape[1])


def embeddings_arrow(slice_ids, x_ND: np.ndarray) -> pa.Table:
    x_ND = np.ascontiguousarray(x_ND, dtype=np.float32)
    n, d = x_ND.shape
    values = pa.array(x_ND.reshape(-1), type=pa.float32())
    emb = pa.FixedSizeListArray.from_arrays(values, d)
    return pa.table({"slice_id": pa.array(list(slice_ids), type=pa.string()), "embedding": emb})


def write_embeddings(
    path: str | Path, slice_ids, x_ND: np.ndarray, metadata: dict | None = None
) -> None:
    """Write rows sorted by slice_id with ``metadata`` (JSON) under the schema key ``sail``."""
    slice_ids = np.asarray(slice_ids, dtype=object)
    order = np.argsort(slice_ids, kind="stable")
    table = embeddings_arrow(slice_ids[order], np.asarray(x_ND)[order])
    meta = dict(metadata or {})
    meta.setdefault("dim", int(np.asarray(x_ND).shape[1]))
    write_parquet_atomic(path, table, {META_KEY: json.dumps(meta, sort_keys=True, default=str)})


def read_embeddings(path: str | Path) -> EmbeddingTable:
    path = Path(path)
    if not path.is_file():
        raise SailError(f"embeddings table not found: {path}")
    check_table(path, "embeddings table")
    table = pq.read_table(path)
    for col in ("slice_id", "embedding"):
        if col not in table.column_names:
            raise SailError(f"{path}: missing column '{col}'")
    emb = table.column("embedding").combine_chunks()
    if not pa.types.is_fixed_size_list(emb.type):
        raise SailError(
            f"{path}: column 'embedding' must be fixed_size_list<float32, d>, got {emb.type}"
        )
    d = emb.type.list_size
    x_ND = (
        emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, d)
    )
    raw_meta = (table.schema.metadata or {}).get(META_KEY.encode())
    metadata = json.loads(raw_meta) if raw_meta else {}
    slice_ids = np.asarray(table.column("slice_id").to_pylist(), dtype=object)
    return EmbeddingTable(slice_ids=slice_ids, x_ND=x_ND, metadata=metadata)
