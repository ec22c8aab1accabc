"""Sparse activation tables: ``slice_id``, ``idx`` (list<int32>), ``val`` (list<float32>).

The list columns are CSR already: Arrow's offsets are CSR's indptr, the flattened child arrays are
its indices and data. Reading builds a scipy CSR matrix from those buffers without per-row Python.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from sail.errors import SailError
from sail.workspace import check_table, write_parquet_atomic

META_KEY = "sail"


def activations_arrow(slice_ids, codes: sp.csr_matrix) -> pa.Table:
    codes = sp.csr_matrix(codes)
    codes.sort_indices()
    offsets = pa.array(codes.indptr.astype(np.int32), type=pa.int32())
    idx = pa.ListArray.from_arrays(
        offsets, pa.array(codes.indices.astype(np.int32), type=pa.int32())
    )
    val = pa.ListArray.from_arrays(
        offsets, pa.array(codes.data.astype(np.float32), type=pa.float32())
    )
    return pa.table(
        {"slice_id": pa.array(list(slice_ids), type=pa.string()), "idx": idx, "val": val}
    )


def write_activations(
    path: str | Path, slice_ids, codes: sp.csr_matrix, metadata: dict | None = None
) -> None:
    meta = dict(metadata or {})
    meta["n_features"] = int(codes.shape[1])
    table = activations_arrow(slice_ids, codes)
    write_parquet_atomic(path, table, {META_KEY: json.dumps(meta, sort_keys=True, default=str)})


def read_activations(path: str | Path) -> tuple[np.ndarray, sp.csr_matrix, dict]:
    """Return (slice_ids, codes as CSR (N, n_features) float32, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise SailError(f"activations table not found: {path}")
    check_table(path, "activations table")
    table = pq.read_table(path)
    for col in ("slice_id", "idx", "val"):
        if col not in table.column_names:
            raise SailError(f"{path}: missing column '{col}'")
    raw_meta = (table.schema.metadata or {}).get(META_KEY.encode())
    metadata = json.loads(raw_meta) if raw_meta else {}
    if "n_features" not in metadata:
        raise SailError(f"{path}: schema metadata lacks 'n_features'")
    idx = table.column("idx").combine_chunks()
    val = table.column("val").combine_chunks()
    indptr = idx.offsets.to_numpy().astype(np.int64)
    indptr = indptr - indptr[0]
    indices = idx.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    data = val.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    n = len(table)
    codes = sp.csr_matrix((data, indices, indptr), shape=(n, int(metadata["n_features"])))
    slice_ids = np.asarray(table.column("slice_id").to_pylist(), dtype=object)
    return slice_ids, codes, metadata
