"""The issue's acceptance path through the real console script."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

SAIL = [sys.executable, "-m", "sail"]


def _run(*args, cwd):
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run(
        [*SAIL, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300
    )


def test_phantom_prepare_split_and_rerun_skips(tmp_path: Path):
    cfg = tmp_path / "small.yaml"
    cfg.write_text("prepare:\n  image_size: 32\n  ct_spacing_mm: 8.0\n")
    r = _run("phantom", "ts", "--n-ct", "8", "--n-mri", "4", "--size", "32", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = _run("prepare", "--source", "ts", "--workspace", "w", "--config", str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "slicing scans" in r.stderr and "prepare:" in r.stderr
    r = _run("split", "--workspace", "w", "--config", str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "train" in r.stderr and "test" in r.stderr
    split = pd.read_csv(tmp_path / "w" / "data" / "split.csv")
    assert list(split.columns) == ["modality", "image_id", "split"] and len(split) == 12
    r = _run("prepare", "--source", "ts", "--workspace", "w", "--config", str(cfg), cwd=tmp_path)
    assert r.returncode == 0 and "up to date" in r.stderr
    r = _run("split", "--workspace", "w", "--config", str(cfg), cwd=tmp_path)
    assert "up to date" in r.stderr


def test_bad_input_is_one_line_error(tmp_path: Path):
    r = _run("prepare", "--source", "nowhere", "--workspace", "w", cwd=tmp_path)
    assert r.returncode == 2
    assert "error: dataset folder not found: nowhere" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "bad.yaml").write_text("prepare:\n  image_sise: 3\n")
    r = _run("split", "--config", "bad.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "prepare.image_sise': unknown key" in r.stderr
