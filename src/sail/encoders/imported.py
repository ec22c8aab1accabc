"""Bring your own embeddings: any Parquet table with ``slice_id`` and a vector becomes
embeddings/<name>.parquet.

The vector may be a fixed-size list column, a list column (every row the same length), or one
numeric column per dimension. Ids are checked against data/slices.parquet (unknown ids are an
error; missing ones too unless ``allow_missing``), and every value must be finite.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sail.encoders.table import write_embeddings
from sail.errors import SailError
from sail.workspace import StageRecord, Workspace, fingerprint, hash_config, is_done, mark_done

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _examples(values, k: int = 5) -> str:
    values = list(values)
    shown = ", ".join(repr(str(v)) for v in values[:k])
    return shown + (f" and {len(values) - k} more" if len(values) > k else "")


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _list_matrix(path: Path, col: str, arr: pa.Array, ids: np.ndarray) -> np.ndarray:
    if arr.null_count:
        rows = np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))
        raise SailError(
            f"{path}: column '{col}' is null for {len(rows)} rows, e.g. slice_id "
            f"{_examples(ids[rows])}"
        )
    if not _is_number(arr.type.value_type):
        raise SailError(f"{path}: column '{col}' holds {arr.type.value_type}, not numbers")
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != lengths[0]).any():
        odd = np.flatnonzero(lengths != lengths[0])[0]
        raise SailError(
            f"{path}: column '{col}' is ragged: slice_id {ids[0]!r} has {lengths[0]} values, "
            f"slice_id {ids[odd]!r} has {lengths[odd]} (all rows need one dimension)"
        )
    values = arr.flatten()  # honours slicing/offsets; fixed-size and variable lists alike
    if values.null_count:
        rows = np.unique(
            np.repeat(np.arange(len(arr)), lengths)[values.is_null().to_numpy(zero_copy_only=False)]
        )
        raise SailError(
            f"{path}: column '{col}' has null values in {len(rows)} rows, e.g. slice_id "
            f"{_examples(ids[rows])}"
        )
    d = int(lengths[0]) if len(lengths) else 0
    return values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(arr), d)


def read_vector_table(path: str | Path) -> tuple[np.ndarray, np.ndarray, str]:
    """(slice_ids, x_ND float32, description of the vector column(s)) from any supported layout."""
    path = Path(path)
    table = _read_parquet(path)
    ids = _slice_ids(path, table)
    others = [c for c in table.column_names if c != "slice_id"]
    list_cols = [c for c in others if _is_list(table.schema.field(c).type)]
    if list_cols:
        x_ND, source = _from_list_column(path, table, list_cols, ids)
    else:
        x_ND, source = _from_numeric_columns(path, table, others, ids)
    _check_finite(path, x_ND, ids)
    return ids, x_ND, source


def _read_parquet(path: Path) -> pa.Table:
    """The whole table; a missing or unreadable file is a user error naming it."""
    if not path.is_file():
        raise SailError(f"embeddings table not found: {path}")
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise SailError(f"{path}: not a readable Parquet file ({exc})") from None


def _slice_ids(path: Path, table: pa.Table) -> np.ndarray:
    """The ``slice_id`` column as strings: present, without nulls, non-empty and unique."""
    if "slice_id" not in table.column_names:
        raise SailError(
            f"{path}: missing column 'slice_id' (columns: {', '.join(table.column_names)})"
        )
    id_col = table.column("slice_id")
    if id_col.null_count:
        raise SailError(f"{path}: column 'slice_id' has {id_col.null_count} null values")
    ids = np.asarray([str(v) for v in id_col.to_pylist()], dtype=object)
    if len(ids) == 0:
        raise SailError(f"{path}: no rows")
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise SailError(
            f"{path}: column 'slice_id' has duplicates, e.g. {_examples(uniq[counts > 1])}"
        )
    return ids


def _from_list_column(
    path: Path, table: pa.Table, list_cols: list[str], ids: np.ndarray
) -> tuple[np.ndarray, str]:
    """The vectors of the one list column (``embedding`` when there are several candidates)."""
    if "embedding" in list_cols:
        col = "embedding"
    elif len(list_cols) == 1:
        col = list_cols[0]
    else:
        raise SailError(
            f"{path}: several vector columns ({', '.join(list_cols)}); "
            "name the one to use 'embedding'"
        )
    x_ND = _list_matrix(path, col, table.column(col).combine_chunks(), ids)
    return x_ND, f"list column '{col}'"


def _from_numeric_columns(
    path: Path, table: pa.Table, others: list[str], ids: np.ndarray
) -> tuple[np.ndarray, str]:
    """One numeric column per dimension, in table order; others are skipped with a warning."""
    dims = [c for c in others if _is_number(table.schema.field(c).type)]
    if not dims:
        raise SailError(
            f"{path}: no vector: expected a list column or one numeric column per dimension"
        )
    ignored = [c for c in others if c not in dims]
    if ignored:
        log.warning("%s: ignoring non-numeric columns %s", path, ", ".join(ignored))
    for c in dims:
        nulls = table.column(c).null_count
        if nulls:
            rows = np.flatnonzero(table.column(c).is_null().to_numpy())
            raise SailError(
                f"{path}: column '{c}' has {nulls} null values, "
                f"e.g. slice_id {_examples(ids[rows])}"
            )
    x_ND = np.column_stack([table.column(c).to_numpy().astype(np.float32) for c in dims])
    return x_ND, f"{len(dims)} numeric columns ({dims[0]} .. {dims[-1]})"


def _check_finite(path: Path, x_ND: np.ndarray, ids: np.ndarray) -> None:
    """At least one dimension, and every value finite in float32."""
    if x_ND.shape[1] == 0:
        raise SailError(f"{path}: the vectors have no dimensions")
    bad = ~np.isfinite(x_ND).all(axis=1)
    if bad.any():
        raise SailError(
            f"{path}: {int(bad.sum())} rows have NaN/inf values (or overflow float32), "
            f"e.g. slice_id {_examples(ids[bad])}"
        )


def import_embeddings(
    ws: Workspace,
    table_path: str | Path,
    name: str,
    force: bool = False,
    allow_missing: bool = False,
) -> Path:
    """Validate ``table_path`` against the workspace's slices and write
    embeddings/<name>.parquet."""
    table_path = Path(table_path)
    if not _NAME.match(name):
        raise SailError(
            f"--name {name!r}: use letters, digits, '.', '_' and '-' (starting with a letter or "
            "digit)"
        )
    if not ws.slices_table.is_file():
        raise SailError(
            f"{ws.slices_table} not found: importing checks ids against prepared slices "
            "(run `sail prepare`, or train directly with `sail train --embeddings TABLE`)"
        )
    final = ws.embeddings(name)
    record = StageRecord(
        "import-embeddings",
        hash_config({"name": name, "allow_missing": allow_missing}),
        {"table": fingerprint(table_path), "slices": fingerprint(ws.slices_table)},
    )
    if not force and is_done(final, record):
        log.info("import %s: up to date (%s)", name, ws.relative(final))
        return final
    ids, x_ND, source = read_vector_table(table_path)
    known = np.asarray(
        pq.read_table(ws.slices_table, columns=["slice_id"]).column("slice_id").to_pylist(),
        dtype=object,
    )
    unknown = np.setdiff1d(ids, known)
    if len(unknown):
        raise SailError(
            f"{table_path}: {len(unknown)} slice_id values are not in {ws.slices_table}, e.g. "
            f"{_examples(unknown)}"
        )
    missing = np.setdiff1d(known, ids)
    if len(missing):
        if not allow_missing:
            raise SailError(
                f"{table_path}: {len(missing)} slices of {ws.slices_table} have no vector, e.g. "
                f"{_examples(missing)} "
                "(pass --allow-missing to import a subset)"
            )
        log.warning("import %s: %d slices have no vector and are left out", name, len(missing))
    metadata = {
        "encoder": "imported",
        "name": name,
        "weights": f"imported:{table_path.name}:{record.inputs['table']}",
        "source": str(table_path),
        "vector": source,
        "n_slices": len(ids),
    }
    write_embeddings(final, ids, x_ND, metadata)
    mark_done(final, record, {"n_slices": len(ids), "dim": int(x_ND.shape[1])})
    log.info("import %s: wrote %s (%d x %d) from %s", name, ws.relative(final), *x_ND.shape, source)
    return final
