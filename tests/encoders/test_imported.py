from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sail.cli import app
from sail.encoders.imported import import_embeddings
from sail.encoders.table import read_embeddings
from sail.errors import SailError


@pytest.fixture
def ids(tiny_ws) -> list[str]:
    return sorted(pd.read_parquet(tiny_ws.slices_table).slice_id)


def _write(path, table: pa.Table):
    pq.write_table(table, path)
    return path


def _vectors(n: int, d: int = 5) -> np.ndarray:
    return np.arange(n * d, dtype=np.float64).reshape(n, d) / 7


@pytest.mark.parametrize("layout", ["fixed_size_list", "list", "columns"])
def test_every_layout_imports_to_the_same_table(tiny_ws, ids, tmp_path, layout):
    x = _vectors(len(ids))
    shuffled = list(reversed(ids))
    rows = x[::-1]
    if layout == "fixed_size_list":
        emb = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1), pa.float32()), 5)
        table = pa.table({"slice_id": shuffled, "vec": emb, "split": ["train"] * len(ids)})
    elif layout == "list":
        table = pa.table(
            {"slice_id": shuffled, "embedding": pa.array(list(rows), pa.list_(pa.float64()))}
        )
    else:
        table = pa.table(
            {
                "slice_id": shuffled,
                **{f"f{j}": rows[:, j] for j in range(5)},
                "note": ["x"] * len(ids),
            }
        )
    src = _write(tmp_path / "mine.parquet", table)
    out = import_embeddings(tiny_ws, src, "mine")
    t = read_embeddings(out)
    assert list(t.slice_ids) == ids
    np.testing.assert_allclose(t.x_ND, x.astype(np.float32))
    assert (
        t.metadata["encoder"] == "imported"
        and t.metadata["name"] == "mine"
        and t.metadata["dim"] == 5
    )


def test_unknown_and_missing_ids_are_reported(tiny_ws, ids, tmp_path):
    x = _vectors(len(ids))
    wrong = ids[:-1] + ["ct/s9999/axial/0000"]
    src = _write(
        tmp_path / "a.parquet",
        pa.table({"slice_id": wrong, "embedding": pa.array(list(x), pa.list_(pa.float32()))}),
    )
    with pytest.raises(
        SailError, match="1 slice_id values are not in .*slices.parquet, e.g. 'ct/s9999/axial/0000'"
    ):
        import_embeddings(tiny_ws, src, "mine")
    subset = _write(
        tmp_path / "b.parquet",
        pa.table({"slice_id": ids[:6], "embedding": pa.array(list(x[:6]), pa.list_(pa.float32()))}),
    )
    with pytest.raises(SailError, match="4 slices of .* have no vector, e.g. .*--allow-missing"):
        import_embeddings(tiny_ws, subset, "mine")
    t = read_embeddings(import_embeddings(tiny_ws, subset, "mine", allow_missing=True))
    assert list(t.slice_ids) == ids[:6]


def test_ragged_nan_null_and_duplicate_inputs_are_errors(tiny_ws, ids, tmp_path):
    ragged = [[1.0, 2.0, 3.0]] * len(ids)
    ragged[4] = [1.0, 2.0]
    src = _write(tmp_path / "r.parquet", pa.table({"slice_id": ids, "embedding": ragged}))
    with pytest.raises(
        SailError, match=f"ragged: slice_id '{ids[0]}' has 3 values, slice_id '{ids[4]}' has 2"
    ):
        import_embeddings(tiny_ws, src, "mine")

    x = _vectors(len(ids))
    x[2, 1] = np.nan
    x[7, 0] = np.inf
    src = _write(
        tmp_path / "n.parquet",
        pa.table({"slice_id": ids, "embedding": pa.array(list(x), pa.list_(pa.float64()))}),
    )
    with pytest.raises(SailError, match=f"2 rows have NaN/inf values .*'{ids[2]}', '{ids[7]}'"):
        import_embeddings(tiny_ws, src, "mine")

    with_null = [list(r) for r in _vectors(len(ids))]
    with_null[3][2] = None
    src = _write(tmp_path / "u.parquet", pa.table({"slice_id": ids, "embedding": with_null}))
    with pytest.raises(SailError, match=f"null values in 1 rows, e.g. slice_id '{ids[3]}'"):
        import_embeddings(tiny_ws, src, "mine")

    src = _write(
        tmp_path / "d.parquet", pa.table({"slice_id": ids[:-1] + ids[:1], "f0": np.ones(len(ids))})
    )
    with pytest.raises(SailError, match=f"duplicates, e.g. '{ids[0]}'"):
        import_embeddings(tiny_ws, src, "mine")

    src = _write(tmp_path / "s.parquet", pa.table({"id": ids, "f0": np.ones(len(ids))}))
    with pytest.raises(SailError, match="missing column 'slice_id'"):
        import_embeddings(tiny_ws, src, "mine")


def test_cli_import_and_up_to_date(tiny_ws, ids, tmp_path):
    src = _write(
        tmp_path / "c.parquet",
        pa.table({"slice_id": ids, "f0": np.ones(len(ids)), "f1": np.zeros(len(ids))}),
    )
    args = ["import-embeddings", str(src), "--name", "byo", "--workspace", str(tiny_ws.root)]
    assert CliRunner().invoke(app, args).exit_code == 0
    first = tiny_ws.embeddings("byo").stat().st_mtime_ns
    assert CliRunner().invoke(app, args).exit_code == 0
    assert tiny_ws.embeddings("byo").stat().st_mtime_ns == first
    bad = CliRunner().invoke(
        app,
        [
            "import-embeddings",
            str(tmp_path / "none.parquet"),
            "--name",
            "x",
            "--workspace",
            str(tiny_ws.root),
        ],
    )
    assert bad.exit_code == 2 and "embeddings table not found" in bad.output
