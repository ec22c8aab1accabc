"""Encoding speed: the whole ``encode`` stage against the raw model forward on the same batches.

For each case it prints JSON lines: ``encode_stage`` (PNG decode in workers + device preprocessing
+ forward + part files + merge, model build excluded), ``raw_forward`` (the same batches already
decoded and normalised in memory, forward only) and their ratio (``loader_overhead`` = 1 - raw /
stage; goal < 10%). ``--full`` adds real-size ViT-L/16 and FocalNet-L (random weights) at 224 and
1024 px in fp32 and bf16 with the pooled-embedding cosine between the two (GPU).

    python benchmarks/encode.py                       # CPU: efficientnet-lite0 at the demo size
    python benchmarks/encode.py --full --n 512        # GPU: + ViT-L/16 and FocalNet-L, fp32 vs bf16

Avoids sail.config (pydantic) so it also runs with PYTHONPATH=src on the lent GPU machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from PIL import Image

from sail.encoders.base import get_spec
from sail.encoders.encode import encode_job, make_job, read_slice_index
from sail.workspace import Workspace


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(what: str, config: dict, device: torch.device, n: int, seconds: float, **extra) -> None:
    print(
        json.dumps(
            {
                "what": what,
                "config": config,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "threads": torch.get_num_threads(),
                "samples_per_s": round(n / seconds, 2) if seconds else None,
                "seconds": round(seconds, 3),
                "peak_memory_mb": round(peak_memory_mb(device), 1),
                **extra,
            }
        ),
        flush=True,
    )


def make_workspace(root: Path, n: int, size: int) -> Workspace:
    """``n`` distinct 8-bit grayscale PNGs of ``size`` px, with the slices.parquet columns that
    encode reads."""
    ws = Workspace(root).ensure()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    rows = []
    for i in range(n):
        rel = Path("data/slices/ct") / f"s{i // 100:04d}" / f"axial_{i % 100:04d}.png"
        (ws.root / rel).parent.mkdir(parents=True, exist_ok=True)
        a, b = rng.uniform(1, 6, 2)
        img = (
            127.5
            * (1 + np.sin(a * xx * 6.28 + b * yy * 6.28))
            * rng.uniform(0.6, 1.0, (size, size))
        )
        Image.fromarray(img.astype(np.uint8)).save(ws.root / rel)
        rows.append(
            {"slice_id": f"ct/s{i // 100:04d}/axial/{i % 100:04d}", "png_path": rel.as_posix()}
        )
    pd.DataFrame(rows).to_parquet(ws.slices_table, index=False)
    return ws


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_case(
    ws: Workspace, encoder: str, image_size: int, settings: SimpleNamespace, label: dict
) -> None:
    job = make_job(encoder, settings, name=f"bench-{encoder}-{image_size}", image_size=image_size)
    config = {
        **label,
        "encoder": encoder,
        "image_size": image_size,
        "batch_size": job.batch_size,
        "workers": job.workers,
        "precision": job.precision,
    }
    t0 = time.perf_counter()
    model = job.spec.build(image_size=image_size).to(job.device, job.precision)
    emit("model_build", config, job.device, 1, time.perf_counter() - t0)

    # Raw forward: the same batches, decoded beforehand and already on the device; the timed call is
    # what the stage's main loop runs per batch (on-device preprocessing + forward), minus loading.
    ids, pngs = read_slice_index(ws)
    batches = []
    for s in range(0, len(ids), job.batch_size):
        imgs = np.stack([np.array(Image.open(ws.root / p)) for p in pngs[s : s + job.batch_size]])
        batches.append(torch.from_numpy(imgs)[:, None].to(job.device))
    model.encode(batches[0])  # warm-up (kernel selection)
    sync(job.device)
    t0 = time.perf_counter()
    for x in batches:
        model.encode(x)
    sync(job.device)
    raw = time.perf_counter() - t0
    emit("raw_forward", config, job.device, len(ids), raw)
    del batches, model

    # The stage, as `sail encode` runs it (it builds its own model; that build is timed apart).
    t0 = time.perf_counter()
    encode_job(ws, job, force=True)
    total = time.perf_counter() - t0
    t0 = time.perf_counter()
    job.spec.build(image_size=image_size)
    build = time.perf_counter() - t0
    stage = max(total - build, 1e-9)
    emit(
        "encode_stage",
        config,
        job.device,
        len(ids),
        stage,
        total_with_build_s=round(total, 3),
        loader_overhead=round(1 - raw / stage, 3),
    )


def bench_precision(
    encoder: str, image_size: int, n: int, device: torch.device, batch_size: int
) -> None:
    """Forward speed in fp32 vs bf16 and the cosine of the pooled embeddings (random weights)."""
    spec = get_spec(encoder)
    g = torch.Generator().manual_seed(0)
    x_B1HW = torch.randint(
        0, 256, (batch_size, 1, image_size, image_size), dtype=torch.uint8, generator=g
    )
    outs = {}
    for precision in ("fp32", "bf16"):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        enc = spec.build(image_size=image_size).to(device, precision)
        enc.encode(x_B1HW[:2])
        sync(device)
        reps = max(1, n // batch_size)
        t0 = time.perf_counter()
        for _ in range(reps):
            out = enc.encode(x_B1HW)
        sync(device)
        seconds = time.perf_counter() - t0
        outs[precision] = out.float().cpu()
        emit(
            "forward_precision",
            {
                "encoder": encoder,
                "image_size": image_size,
                "batch_size": batch_size,
                "precision": precision,
            },
            device,
            reps * batch_size,
            seconds,
        )
        del enc
    cos = torch.nn.functional.cosine_similarity(outs["fp32"], outs["bf16"], dim=1)
    print(
        json.dumps(
            {
                "what": "bf16_vs_fp32_cosine",
                "config": {"encoder": encoder, "image_size": image_size, "weights": "random"},
                "mean": round(cos.mean().item(), 4),
                "min": round(cos.min().item(), 4),
            }
        ),
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=1500, help="slices in the synthetic workspace")
    ap.add_argument("--png-size", type=int, default=128, help="side of the stored PNGs")
    ap.add_argument(
        "--image-size",
        type=int,
        nargs="+",
        default=[112],
        help="model input sides for efficientnet-lite0",
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument(
        "--full",
        action="store_true",
        help="also ViT-L/16 and FocalNet-L at 224 and 1024 px, fp32 vs bf16",
    )
    ap.add_argument(
        "--workspace", type=Path, default=None, help="reuse/keep the synthetic workspace here"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    root = args.workspace or Path(tempfile.mkdtemp(prefix="sail-bench-encode-"))
    ws = Workspace(root)
    if not ws.slices_table.is_file():
        make_workspace(root, args.n, args.png_size)
    settings = SimpleNamespace(
        device=args.device,
        precision="auto",
        batch_size=args.batch_size,
        workers=args.workers,
        chunk_size=1600,
        shard=None,
    )
    label = {"n": args.n, "png_size": args.png_size}
    for size in args.image_size:
        bench_case(ws, "efficientnet-lite0", size, settings, label)
    if args.full:
        device = make_job("random-dinov3", settings).device
        for size in (224, 1024):
            bench_precision(
                "random-dinov3", size, 256 if size == 224 else 64, device, 64 if size == 224 else 16
            )
            bench_precision(
                "random-biomedparse",
                size,
                256 if size == 224 else 64,
                device,
                64 if size == 224 else 16,
            )


if __name__ == "__main__":
    main()
