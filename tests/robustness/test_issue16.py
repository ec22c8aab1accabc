"""The cases of issue 16 that are not a plain bad-input error: recorded skips, escape hatches,
warnings, reruns that redo what was damaged, locks, normalised metadata."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from sail.cli import app
from sail.config import load_config
from sail.data.prepare import run_prepare
from sail.data.totalseg import discover
from sail.workspace import Workspace

from .cases import Ctx, _overwrite_middle
from .conftest import copy_workspace, snapshot

CT = "CT_Dataset_v201"


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_nan_mask_is_a_recorded_skip_not_a_structure_on_every_slice(golden, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(golden[0], src)
    path = next((src / CT / "s0001" / "segmentations").glob("*.nii.gz"))
    img = nib.load(path)
    data = np.asarray(img.dataobj).astype(np.float32)
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), path)
    ws = Workspace(tmp_path / "w")
    cfg = load_config(
        None,
        {
            "workspace": ws.root,
            "prepare": {
                "source": src,
                "image_size": 32,
                "ct_spacing_mm": 8.0,
                "workers": 1,
                "modalities": ["ct"],
            },
        },
    )
    run_prepare(cfg, ws)
    skipped = pd.read_csv(ws.skipped_csv)
    row = skipped[(skipped.image_id == "s0001") & (skipped.action == "skip_scan")]
    assert (
        len(row) == 1
        and "holds NaN or inf voxels" in row.reason.iloc[0]
        and path.name in row.reason.iloc[0]
    )
    assert "s0001" not in set(pd.read_parquet(ws.slices_table).image_id)


def test_damaged_checkpoint_refused_unless_no_verify(golden, tmp_path):
    src, golden_ws, cfg = golden
    ctx = Ctx(ws=copy_workspace(golden_ws, tmp_path / "ws"), tmp=tmp_path, src=src, cfg=cfg)
    weights = ctx.sae_dir() / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = np.float32(
        0.123
    ).tobytes()  # the last float of the last tensor: still loadable, still finite
    weights.write_bytes(bytes(data))
    refused = _cli("activations", "--force", *ctx.common())
    assert refused.exit_code == 2 and "does not match the sha256" in refused.output
    assert _cli("activations", "--force", "--no-verify", *ctx.common()).exit_code == 0
    cfg_json = json.loads((ctx.sae_dir() / "cfg.json").read_text())
    assert len(cfg_json["weights_sha256"]) == 64


def test_nan_codes_never_written_from_a_corrupted_checkpoint(golden, tmp_path):
    """The issue's run: bytes overwritten, then activations; no table is written from it."""
    src, golden_ws, cfg = golden
    ctx = Ctx(ws=copy_workspace(golden_ws, tmp_path / "ws"), tmp=tmp_path, src=src, cfg=cfg)
    _overwrite_middle(ctx.sae_dir() / "model.safetensors")
    before = snapshot(ctx.ws / "activations")
    result = _cli("activations", "--force", *ctx.common())
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert snapshot(ctx.ws / "activations") == before


def test_no_held_out_institute_gives_a_warned_seeded_test_split(golden, tmp_path):
    src, golden_ws, cfg = golden
    ctx = Ctx(ws=copy_workspace(golden_ws, tmp_path / "ws"), tmp=tmp_path, src=src, cfg=cfg)
    result = _cli("split", *ctx.config({"split": {"test_institutes": ["Z"]}}))
    assert result.exit_code == 0
    text = " ".join(result.output.split())  # log lines wrap at the console width
    assert "WARNING split: no scan from the held-out institutes Z" in text
    assert (pd.read_csv(ctx.ws / "data" / "split.csv")["split"] == "test").any()


def test_sex_and_age_normalised_or_recorded(golden, tmp_path):
    from sail.data.labels import normalise_age, normalise_sex

    src = tmp_path / "src"
    shutil.copytree(golden[0], src)
    meta = src / CT / "meta.csv"
    table = pd.read_csv(meta, sep=";", dtype=str, encoding="utf-8-sig", keep_default_na=False)
    table.loc[0, ["gender", "age"]] = ["Male", "045Y"]
    table.loc[1, ["gender", "age"]] = ["Female", "6M"]
    table.loc[2, ["gender", "age"]] = ["x?", "old"]
    table.to_csv(meta, sep=";", index=False)
    scans, skips = discover(src, ["ct"])
    by_id = {s.image_id: s.meta for s in scans}
    ids = table.image_id.tolist()
    assert by_id[ids[0]]["sex"] == "m" and float(by_id[ids[0]]["age"]) == 45.0
    assert by_id[ids[1]]["sex"] == "f" and float(by_id[ids[1]]["age"]) == pytest.approx(0.5)
    assert pd.isna(by_id[ids[2]]["sex"]) and pd.isna(by_id[ids[2]]["age"])
    recorded = [s["reason"] for s in skips if s["action"] == "null_value"]
    assert any("line 4 column 'gender': 'x?'" in r for r in recorded)
    assert any("line 4 column 'age': 'old'" in r for r in recorded)
    assert normalise_sex("M") == ("m", True) and normalise_sex("unknown") == (None, False)
    assert normalise_age("") == (None, True) and normalise_age("-3") == (None, False)


def test_second_run_on_a_locked_stage_is_refused_then_runs(golden, tmp_path):
    from sail.workspace import stage_lock

    src, golden_ws, cfg = golden
    ctx = Ctx(ws=copy_workspace(golden_ws, tmp_path / "ws"), tmp=tmp_path, src=src, cfg=cfg)
    with stage_lock(ctx.ws, "split") as lock:
        result = _cli("split", "--force", *ctx.common())
        assert (
            result.exit_code == 2
            and f"{lock}: stage split is being written by another sail run" in result.output
        )
        # shards take their own locks
        with stage_lock(ctx.ws, "train-shard0of2"):
            pass
    with stage_lock(ctx.ws, "interpret"):  # a verb run directly takes the interpret stage's lock
        result = _cli("interpret", "fingerprint", "--force", *ctx.common())
        assert result.exit_code == 2 and "stage interpret is being written" in result.output
    assert (
        _cli("split", *ctx.common()).exit_code == 0
    )  # released: a killed holder releases it the same way


def test_debug_shows_the_traceback(golden, tmp_path):
    cfg = golden[2]
    target = tmp_path / "afile"
    target.write_text("x")
    plain = _cli("split", "-c", cfg, "-w", target)
    assert plain.exit_code == 2 and "Traceback" not in plain.output
    debug = _cli("--debug", "split", "-c", cfg, "-w", target)
    assert isinstance(debug.exception, FileExistsError)


def test_truncated_checkpoint_is_not_up_to_date(golden, tmp_path):
    src, golden_ws, cfg = golden
    ctx = Ctx(ws=copy_workspace(golden_ws, tmp_path / "ws"), tmp=tmp_path, src=src, cfg=cfg)
    weights = ctx.sae_dir() / "model.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[: len(intact) // 2])
    result = _cli("train", *ctx.common())
    assert result.exit_code == 0, result.output
    assert (
        weights.read_bytes() == intact
    )  # retrained (seeded: the same bytes), not trusted as up to date
