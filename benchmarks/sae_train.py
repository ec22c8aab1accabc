"""SAE training and activation-export throughput; one JSON line per measurement.

    python benchmarks/sae_train.py                       # full set (GPU sized)
    python benchmarks/sae_train.py --quick               # CPU-sized subset
    python benchmarks/sae_train.py --batch-sizes 2048 --family-sizes 1 --variants sail

Training steps are the trainer's own step (forward_train, per-model clipping, Adam, decoder
renorm) on random unit-norm data resident on the device; export is `encode_csr` plus the Arrow
write.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sail.sae.activations import encode_csr
from sail.sae.activations_io import write_activations
from sail.sae.grid import PAPER_K_VALUES
from sail.sae.kernels import decode_path
from sail.sae.model import SAESpec, StackedSAE
from sail.sae.train import clip_per_model

DICT = (128, 512, 2048, 8192)


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train(
    variant: str, n_models: int, batch: int, d: int, steps: int, device: torch.device, decode: str
) -> dict:
    ks = [(20, 40, 80, 160)] if n_models == 1 else [tuple(k) for k in PAPER_K_VALUES[:n_models]]
    model = StackedSAE([SAESpec(variant, DICT, k) for k in ks], d).to(device)
    model.initialize(list(range(n_models)))
    opt = torch.optim.Adam(
        model.parameters(), lr=1e-4, fused=device.type in ("cuda", "cpu") or None
    )
    params = list(model.parameters())
    x = torch.nn.functional.normalize(torch.randn(batch * 4, d, device=device), dim=1)
    dead = torch.zeros(n_models, DICT[-1], dtype=torch.bool, device=device)
    dead[:, -DICT[-1] // 4 :] = True  # a quarter dead, so matryoshka pays for AuxK as in real runs
    autocast = device.type == "cuda"

    def step(i: int) -> None:
        xb = x[(i % 4) * batch : (i % 4 + 1) * batch]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model.forward_train(
                xb, decode, dead if variant == "matryoshka" else None, d // 2, 1 / 32
            )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        model.project_decoder_grad()
        clip_per_model(params, n_models, 0.5)
        opt.step()
        model.normalize_decoder()

    step(0)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for i in range(steps):
        step(i + 1)
    sync(device)
    seconds = time.perf_counter() - t
    return {
        "what": "sae_train_step",
        "config": {
            "variant": variant,
            "d": d,
            "dict_sizes": list(DICT),
            "k_values": [list(k) for k in ks],
            "batch_size": batch,
            "models_per_step": n_models,
            "decode": decode,
            "steps": steps,
            "threads": torch.get_num_threads(),
        },
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "samples_per_s": batch * steps / seconds,
        "model_samples_per_s": batch * steps * n_models / seconds,
        "seconds": seconds,
        "peak_memory_mb": peak_mb(device),
    }


def bench_export(variant: str, n: int, d: int, device: torch.device, batch: int) -> dict:
    model = StackedSAE([SAESpec(variant, DICT, (20, 40, 80, 160))], d).to(device)
    model.initialize([0])
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    if variant == "sail":  # a θ that keeps about 160 latents per sample, like the trained model
        xs = torch.nn.functional.normalize(torch.from_numpy(x[:1024]).to(device), dim=1)
        pre = (xs @ model.W[0].T + model.b_enc[0] - model.W[0] @ model.b_dec[0]).reshape(-1)
        model.theta_sum.fill_(float(pre.topk(160 * 1024).values.min()))
        model.theta_count.fill_(1)
    else:
        model.calibrate(
            torch.nn.functional.normalize(torch.from_numpy(x[: min(n, 4096)]).to(device), dim=1)
        )
    encode_csr(model, x[:batch], batch, device)
    sync(device)
    t = time.perf_counter()
    codes = encode_csr(model, x, batch, device)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.parquet"
        write_activations(path, [f"ct/s{i:07d}/axial/0000" for i in range(n)], codes)
        size = path.stat().st_size
    seconds = time.perf_counter() - t
    return {
        "what": "activation_export",
        "config": {
            "variant": variant,
            "d": d,
            "n_features": DICT[-1],
            "rows": n,
            "batch_size": batch,
            "mean_l0": codes.nnz / n,
            "threads": torch.get_num_threads(),
        },
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "samples_per_s": n / seconds,
        "seconds": seconds,
        "bytes_per_sample": size / n,
        "dense_float32_bytes_per_sample": 4 * DICT[-1],
        "peak_memory_mb": peak_mb(device),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--d", type=int, default=1536)
    ap.add_argument("--variants", nargs="+", default=["sail", "matryoshka"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[2048, 8192])
    ap.add_argument("--family-sizes", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--decode", choices=["auto", "dense", "sparse"], default="auto")
    ap.add_argument("--export-rows", type=int, default=200_000)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="CPU subset: batch 2048, one SAE, 3 steps, 20k export rows",
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    decode = decode_path(args.decode, device, args.d, DICT[-1])  # the trainer's own rule
    if args.quick:
        args.batch_sizes, args.family_sizes, args.steps, args.export_rows = [2048], [1], 3, 20_000
    for variant in args.variants:
        for batch in args.batch_sizes:
            for fam in args.family_sizes:
                print(
                    json.dumps(
                        bench_train(variant, fam, batch, args.d, args.steps, device, decode)
                    ),
                    flush=True,
                )
        print(json.dumps(bench_export(variant, args.export_rows, args.d, device, 8192)), flush=True)


if __name__ == "__main__":
    main()
