"""A run killed (SIGKILL) during encoding and again during training, then rerun, ends with the
same embeddings and SAE weights as a run that was never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

CONFIG = """
workspace: {ws}
phantom: {{n_ct: 4, n_mri: 2, size: 32, seed: 5}}
prepare: {{image_size: 32, ct_spacing_mm: 6.0, workers: 1}}
split: {{test_institutes: [A], train_fraction: 0.7}}
encode:
  encoders: [{{encoder: efficientnet-lite0, image_size: 32}}]
  chunk_size: 32
  batch_size: 8
  workers: 0
train:
  grid: [{{variant: matryoshka, dict_sizes: [16, 64], k_values: [2, 4]}}]
  training: {{epochs: 60, batch_size: 32, dead_window: 500}}
"""


def _start(cfg: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.Popen(
        [sys.executable, "-m", "sail", "run", str(cfg), "--to", "train"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    t0 = time.monotonic()
    while not ready():
        assert proc.poll() is None, f"run ended before the kill point: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() - t0 < timeout, "kill point never reached"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _run(cfg: Path) -> None:
    proc = _start(cfg)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def _artifacts(ws: Path) -> dict[str, object]:
    sae = sorted((ws / "sae").rglob("model.safetensors"))
    assert sae and not list((ws / "sae").rglob("train_state.pt"))
    return {
        "embeddings": pq.read_table(ws / "embeddings" / "efficientnet-lite0.parquet"),
        **{str(p.relative_to(ws)): p.read_bytes() for p in sae},
    }


def test_killed_during_encode_and_train_resumes_to_identical_artifacts(tmp_path):
    configs = {}
    for name in ("plain", "killed"):
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(CONFIG.format(ws=tmp_path / name))
    _run(configs["plain"])

    ws = tmp_path / "killed"
    parts = ws / "embeddings" / "efficientnet-lite0.parts"
    proc = _start(configs["killed"])
    _kill_when(proc, lambda: len(list(parts.glob("chunk_*.parquet"))) >= 2)
    assert not (ws / "embeddings" / "efficientnet-lite0.parquet").exists()
    proc = _start(configs["killed"])
    _kill_when(
        proc, lambda: any((ws / "sae").rglob("train_state.pt")) if (ws / "sae").exists() else False
    )
    assert not any((ws / "sae").rglob("model.safetensors"))
    _run(configs["killed"])

    plain, killed = _artifacts(tmp_path / "plain"), _artifacts(ws)
    assert plain.keys() == killed.keys()
    assert plain.pop("embeddings").equals(killed.pop("embeddings"))
    for key in plain:
        assert plain[key] == killed[key], key
