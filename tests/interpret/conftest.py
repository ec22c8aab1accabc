"""Small workspaces for the interpret tests: slices, split, PNGs, embeddings and planted SAE codes.

``make_codes`` plants one feature per structure, modality and plane (plus an always-on feature
and sparse noise features), so a correct pipeline must recover them; the dense embeddings are
the same signal with noise in another basis.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

from sail.encoders.table import write_embeddings
from sail.sae.activations_io import write_activations
from sail.workspace import Workspace

TARGET = ("toyenc", "matryoshka", "D_16_64_K_4_8")
REGIONS = {
    "head": ["brain", "skull"],
    "thorax": ["heart", "lung_left", "lung_right", "sternum"],
    "abdomen": ["liver", "spleen", "stomach", "kidney_left"],
    "pelvis": ["urinary_bladder", "hip_left", "hip_right", "sacrum"],
}
STRUCTURES = sorted({s for v in REGIONS.values() for s in v})


def synthetic_slices(
    n_ct: int = 80, n_mri: int = 40, per_plane: int = 4, seed: int = 0
) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for modality, n in (("ct", n_ct), ("mri", n_mri)):
        for i in range(n):
            image_id = f"s{i:04d}"
            region = list(REGIONS)[i % 4]
            sex = "m" if rng.random() < 0.5 else "f"
            age = float(rng.integers(20, 90))
            planes = (
                ["axial", "coronal", "sagittal"]
                if modality == "ct"
                else [["axial", "coronal", "sagittal"][i % 3]]
            )
            for plane in planes:
                for j in range(per_plane):
                    present = {s: bool(rng.random() < 0.85) for s in REGIONS[region]}
                    row = {
                        "slice_id": f"{modality}/{image_id}/{plane}/{j:04d}",
                        "modality": modality,
                        "image_id": image_id,
                        "plane": plane,
                        "slice_idx": j,
                        "png_path": f"data/slices/{modality}/{image_id}/{plane}_{j:04d}.png",
                        "sex": sex,
                        "age": age,
                        "age_group": "<40"
                        if age < 40
                        else "40-60"
                        if age < 60
                        else "60-80"
                        if age < 80
                        else ">=80",
                    }
                    row |= {f"has_{s}": present.get(s, False) for s in STRUCTURES}
                    rows.append(row)
    return pd.DataFrame(rows).sort_values("slice_id").reset_index(drop=True)


def make_codes(slices: pd.DataFrame, seed: int = 0) -> tuple[sp.csr_matrix, list[str]]:
    """Feature j < S: structure j; then modality ct/mri, planes, an always-on one, then noise."""
    rng = np.random.default_rng(seed)
    n = len(slices)
    cols = [slices[f"has_{s}"].to_numpy(bool) for s in STRUCTURES]
    cols += [slices.modality.eq(m).to_numpy() for m in ("ct", "mri")]
    cols += [slices.plane.eq(p).to_numpy() for p in ("axial", "coronal", "sagittal")]
    names = STRUCTURES + ["ct", "mri", "axial", "coronal", "sagittal"]
    planted = np.stack(cols, 1).astype(np.float32) * rng.uniform(0.5, 1.5, (n, len(cols))).astype(
        np.float32
    )
    always = rng.uniform(0.1, 0.2, (n, 1)).astype(np.float32)
    noise = (rng.random((n, 8)) < 0.1) * rng.uniform(0.05, 0.3, (n, 8))
    X = np.concatenate([planted, always, noise.astype(np.float32)], 1)
    return sp.csr_matrix(X), names + ["always_on"] + [f"noise{i}" for i in range(8)]


def build_workspace(root: Path, slices: pd.DataFrame, seed: int = 0, png: bool = True) -> Workspace:
    ws = Workspace(root).ensure()
    ws.data_dir.mkdir(parents=True, exist_ok=True)
    slices.to_parquet(ws.slices_table, index=False)
    vols = slices[["modality", "image_id"]].drop_duplicates().reset_index(drop=True)
    rng = np.random.default_rng(seed)
    vols["split"] = np.array(["train", "train", "valid", "test", "test"])[
        rng.permutation(np.arange(len(vols)) % 5)
    ]
    vols.sort_values(["modality", "image_id"]).to_csv(ws.split_csv, index=False)
    if png:
        for k, p in enumerate(slices.png_path):
            path = ws.root / p
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((16, 16), k % 256, np.uint8)).save(path)
    codes, _ = make_codes(slices, seed)
    proj = np.random.default_rng(seed + 1).normal(size=(codes.shape[1], 24)).astype(np.float32)
    dense = codes.toarray() @ proj + 0.05 * np.random.default_rng(seed + 2).normal(
        size=(len(slices), 24)
    ).astype(np.float32)
    write_embeddings(ws.embeddings(TARGET[0]), slices.slice_id, dense)
    split_of = slices.merge(vols, on=["modality", "image_id"]).split.to_numpy()
    for s in ("train", "valid", "test"):
        rows = np.flatnonzero(split_of == s)
        write_activations(ws.activations(*TARGET, s), slices.slice_id.to_numpy()[rows], codes[rows])
    return ws


@pytest.fixture
def toy_ws(tmp_path) -> Workspace:
    return build_workspace(tmp_path / "ws", synthetic_slices())


class Server:
    """A real OpenAI-compatible HTTP server on 127.0.0.1 for the backend tests.

    mode(request_json, n) -> (status, body or dict, delay_s); every request is recorded."""

    def __init__(self, mode):
        self.mode = mode
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                outer.headers.append(dict(self.headers))
                status, out, delay = outer.mode(body, len(outer.requests))
                time.sleep(delay)
                data = out.encode() if isinstance(out, str) else json.dumps(out).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    """Factory: server(mode) starts a Server; it is closed after the test."""
    holder = {}

    def start(mode):
        holder["s"] = Server(mode)
        return holder["s"]

    yield start
    if "s" in holder:
        holder["s"].close()
