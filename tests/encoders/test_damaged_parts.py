"""A damaged part file in embeddings/<name>.parts/ is detected and encoded again (issue 16)."""

from __future__ import annotations

from sail.encoders.encode import PartsDir, merge_parts, run_encode

from .conftest import make_workspace
from .test_encode import cfg_for, count_forward, tables_identical


def test_truncated_part_is_encoded_again(tmp_path, monkeypatch):
    ref = make_workspace(tmp_path / "ref")
    run_encode(cfg_for(ref), ref)
    ws = make_workspace(tmp_path / "ws")
    run_encode(cfg_for(ws, shard="0/1"), ws)  # a shard run keeps its parts
    parts = PartsDir(ws, "efficientnet-lite0")
    chunk = parts.chunk(1)
    chunk.write_bytes(chunk.read_bytes()[:100])
    calls = count_forward(monkeypatch)
    run_encode(cfg_for(ws, shard="0/1"), ws)
    assert calls == [2, 2]  # chunk 1 (4 slices) only
    merge_parts(ws, "efficientnet-lite0")
    tables_identical(ws.embeddings("efficientnet-lite0"), ref.embeddings("efficientnet-lite0"))


def test_part_with_wrong_row_count_is_not_trusted(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    run_encode(cfg_for(ws, shard="0/1"), ws)
    parts = PartsDir(ws, "efficientnet-lite0")
    parts.chunk(2).write_bytes(
        parts.chunk(0).read_bytes()
    )  # a readable table with 4 rows where 2 belong
    assert parts.has(0) and not parts.has(2) and not parts.chunk(2).exists()
