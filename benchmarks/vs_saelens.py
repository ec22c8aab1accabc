"""SAIL vs SAELens: training samples/s per model on the same data, one JSON line per run.

    python benchmarks/vs_saelens.py                                    # three shapes, both sides
    python benchmarks/vs_saelens.py --saelens-python /work/venv-saelens/bin/python
    python benchmarks/vs_saelens.py --shapes 128x256 --steps 400

Both sides train ONE Matryoshka BatchTopK SAE (M = 1, global top-k over nested prefixes, which is
SAELens' MatryoshkaBatchTopK) with the same rows, batch, K, level widths, a constant learning rate
and float32 on the CPU, end to end through each library's own trainer: SAIL's ``train_family``
(through ``sail.evaluate.ground_truth.train_models``, its single entry for benchmarks) and
SAELens' ``SAETrainer.fit``. The figure is trained samples / wall seconds of the whole call, so
each side pays its own per-step overheads (SAIL: shuffling, metric rows, validation, the final
threshold calibration; SAELens: dead-latent tracking, gradient clipping, its threshold EMA).

SAELens comes from the ``saelens`` extra, in this interpreter or a side venv given by
``--saelens-python`` (sae-lens pins transformer-lens and friends, which may not sit beside SAIL's
own pins); the side interpreter runs this same file with ``--worker saelens``, which imports only
torch, numpy and sae_lens. Rows: unit-norm mixtures of a random sparse dictionary (what SAIL
feeds after L2 normalisation), so selection has real structure to find.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = ("128x256", "768x4096", "1536x8192")
K_BY_WIDTH = {256: 8, 4096: 32, 8192: 64}


def parse_shape(text: str) -> tuple[int, int]:
    d, width = text.lower().split("x")
    return int(d), int(width)


def level_widths(width: int) -> list[int]:
    """Three nested levels, 1/8, 1/2 and all of the dictionary."""
    return [width // 8, width // 2, width]


def make_rows(n: int, d: int, seed: int) -> np.ndarray:
    """Unit-norm rows, each a mix of 8 of 4d random unit directions plus a little noise."""
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((4 * d, d)).astype(np.float32)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    picks = rng.integers(0, 4 * d, size=(n, 8))
    x = (atoms[picks] * rng.uniform(0.5, 1.5, size=(n, 8, 1)).astype(np.float32)).sum(1)
    x += 0.05 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def run_sail(x: np.ndarray, width: int, k: int, batch: int, steps: int, lr: float) -> float:
    import torch

    from sail.evaluate.ground_truth import train_models
    from sail.sae.model import SAESpec

    n = len(x)
    epochs = max(1, round(steps * batch / n))
    spec = SAESpec("matryoshka", tuple(level_widths(width)), (k,), topk_mode="global")
    x_train = torch.from_numpy(x)
    x_valid = x_train[: min(n, 4096)]
    training = {"lr": lr, "batch_size": batch, "epochs": epochs, "warmup_steps": 0}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        train_models([spec], x_train, x_valid, training, tmp)
        seconds = time.perf_counter() - start
    return epochs * n / seconds


def run_saelens(x: np.ndarray, width: int, k: int, batch: int, steps: int, lr: float) -> float:
    import torch
    from sae_lens import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    d = x.shape[1]
    cfg = MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=d, d_sae=width, k=k, matryoshka_widths=level_widths(width), device="cpu"
    )
    sae = MatryoshkaBatchTopKTrainingSAE(cfg)
    rows = torch.from_numpy(x)
    gen = torch.Generator().manual_seed(0)

    def batches():
        while True:
            order = torch.randperm(len(rows), generator=gen)
            for start in range(0, len(rows) - batch + 1, batch):
                yield rows[order[start : start + batch]]

    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch,
        train_batch_size_samples=batch,
        lr=lr,
        lr_end=lr,
        device="cpu",
    )
    trainer = SAETrainer(trainer_cfg, sae, batches())
    start = time.perf_counter()
    trainer.fit()
    return steps * batch / (time.perf_counter() - start)


def warm_up(side: str) -> None:
    """Pay one-off costs before the clock starts on both sides: imports and torch's first
    optimizer construction (which imports its compiler stack)."""
    import importlib

    import torch

    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    if side == "sail":  # modules the trainer imports lazily
        for module in ("sail.config", "sail.sae.train"):
            importlib.import_module(module)


def worker(args: argparse.Namespace) -> None:
    """One side, one shape; prints samples/s as JSON (runs in either interpreter)."""
    import torch

    torch.set_num_threads(args.threads)
    warm_up(args.worker)
    torch.manual_seed(0)
    x = np.load(args.data)
    d, width = parse_shape(args.shapes)
    run = run_sail if args.worker == "sail" else run_saelens
    rate = run(x, width, args.k or K_BY_WIDTH.get(width, 32), args.batch_size, args.steps, args.lr)
    print(json.dumps({"samples_per_s": round(rate, 1)}))


def measure(side: str, python: str, shape: str, data: Path, args: argparse.Namespace) -> float:
    cmd = [python, __file__, "--worker", side, "--shapes", shape, "--data", str(data)]
    cmd += ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    cmd += ["--threads", str(args.threads), "--lr", str(args.lr), "--k", str(args.k)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TQDM_DISABLE="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{side} worker failed at {shape}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["samples_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="d x dictionary width, comma list")
    ap.add_argument("--steps", type=int, default=0, help="training steps (default: per shape)")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--k", type=int, default=0, help="K (default: 8 / 32 / 64 by width)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="alternating runs per side and shape")
    ap.add_argument("--saelens-python", default=sys.executable)
    ap.add_argument("--worker", choices=["sail", "saelens"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            d, width = parse_shape(shape)
            steps = args.steps or (400 if width <= 1024 else 40)
            shape_args = argparse.Namespace(**{**vars(args), "steps": steps})
            data = Path(tmp) / f"{shape}.npy"
            np.save(data, make_rows(max(16 * args.batch_size, 8192), d, seed=0))
            rates: dict[str, list[float]] = {"sail": [], "saelens": []}
            for _ in range(args.rounds):  # alternate, so load from other jobs hits both sides
                rates["sail"].append(measure("sail", sys.executable, shape, data, shape_args))
                rates["saelens"].append(
                    measure("saelens", args.saelens_python, shape, data, shape_args)
                )
            best = {side: max(r) for side, r in rates.items()}
            line = {"bench": "vs_saelens", "shape": shape, "batch": args.batch_size}
            line |= {"k": args.k or K_BY_WIDTH.get(width, 32), "steps": steps}
            line |= {"threads": args.threads, "rounds": rates}
            line |= {f"{side}_samples_per_s": best[side] for side in best}
            line["sail_over_saelens"] = round(best["sail"] / best["saelens"], 2)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
