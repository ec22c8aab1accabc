"""Ground-truth benchmark: do the SAEs find a known dictionary? One JSON line per (model, recipe).

    python benchmarks/ground_truth.py        # the pinned default setting, auto recipe
    python benchmarks/ground_truth.py --setting flat --recipes auto,published \
        --epochs 20 --batch-size 512
    python benchmarks/ground_truth.py --lrs 1e-4,3e-4,3e-3,1e-2 --recipes auto,published \
        --rows 10000 > s10k.jsonl
    python benchmarks/ground_truth.py --sweep-from s10k.jsonl s100k.jsonl --out sweep.png
    python benchmarks/ground_truth.py --init-from-truth --models matryoshka-global,batchtopk

Embeddings come from ``sail.evaluate.ground_truth.generate`` (d 256, 512 true features, Zipf 1.0,
64 parents with 2-4 children, 8 active per row, noise 0.05, offset norm 1, 100k rows by default);
rows are split 80/10/10 (train / valid for threshold calibration / test for every metric). Models
of one total size are trained with the real trainer: ``sail`` (per_level), ``matryoshka``
per_level (K 2/4/8, and ``matryoshka-equal-k`` 8/8/8 on request) and global, and a plain
single-level BatchTopK (a matryoshka spec with one level).
Training settings are the defaults (``training.recipe``) unless given here. A figure (recovered
share, MCC and absorption per model and recipe) is written to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sail.evaluate.ground_truth import GroundTruthSettings, generate, score_sae, train_models
from sail.sae.model import SAESpec

# name -> (generator settings, dictionary sizes, per-level K, global K)
SETTINGS: dict[str, tuple[GroundTruthSettings, tuple[int, ...], tuple[int, ...], int]] = {
    # the pinned default (issue 15): hierarchy, Zipf frequencies, correlation, noise, offset
    "default": (GroundTruthSettings(), (64, 256, 1024), (2, 4, 8), 8),
    # issue 14's side-by-side: 128-d, 96 equally frequent independent features, 5 active per row
    "flat": (
        GroundTruthSettings(
            d=128,
            n_features=96,
            n_parents=0,
            zipf_exponent=0.0,
            mean_active=5,
            correlation=0.0,
            n_rows=20_000,
        ),
        (32, 128, 256),
        (2, 3, 5),
        5,
    ),
}


def model_specs(setting: str = "default") -> dict[str, SAESpec]:
    """The models, all with the same total number of latents and the same average L0.

    ``matryoshka-equal-k`` is per_level with the last level's K at every level (8/8/8): the
    increasing schedule (2/4/8) leaves the first levels' latents only 2 and 4 slots per row, which
    raises absorption (docs/ground_truth.md).
    """
    _, sizes, k_levels, k = SETTINGS[setting]
    return {
        "sail": SAESpec("sail", sizes, k_levels),
        "matryoshka": SAESpec("matryoshka", sizes, k_levels),
        "matryoshka-global": SAESpec("matryoshka", sizes, (k,), "global"),
        "matryoshka-equal-k": SAESpec("matryoshka", sizes, (k,) * len(sizes)),
        "batchtopk": SAESpec("matryoshka", sizes[-1:], (k,)),
    }


DEFAULT_MODELS = ("sail", "matryoshka", "matryoshka-global", "batchtopk")


@contextlib.contextmanager
def init_from_truth(truth: Any) -> Iterator[None]:
    """Diagnostic: start every matryoshka SAE at the true dictionary (encoder = decoder = truth).

    True features take the first latents in order of decreasing frequency (a parent before its
    children, so Matryoshka's prefixes hold them in a natural order); the other latents keep their
    random init. What training does from there says whether the truth is a minimum the objective
    keeps (the training is the problem) or one it leaves (the objective is).
    """
    from sail.sae.model import variant_class

    matryoshka = variant_class("matryoshka")
    original = matryoshka.initialize
    order = np.argsort(-truth.prob_F, kind="stable")
    rows = torch.from_numpy(truth.dictionary_FD[order])

    def initialize(self: Any, seeds: list[int], *args: Any, **kwargs: Any) -> None:
        original(self, seeds, *args, **kwargs)
        with torch.no_grad():
            self.W_dec[:, : rows.shape[0]] = rows
            self.W_enc[:, : rows.shape[0]] = rows

    matryoshka.initialize = initialize
    try:
        yield
    finally:
        matryoshka.initialize = original


def split_rows(n: int) -> tuple[slice, slice, slice]:
    a, b = int(0.8 * n), int(0.9 * n)
    return slice(0, a), slice(a, b), slice(b, n)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    base = SETTINGS[args.setting][0]
    rows = args.rows or base.n_rows
    gen = dataclasses.replace(base, n_rows=rows, seed=args.data_seed)
    truth = generate(gen)
    x = torch.nn.functional.normalize(torch.from_numpy(truth.x_ND), dim=1)
    tr, va, te = split_rows(rows)
    specs = model_specs(args.setting)
    runs = [(r, None) for r in args.recipes] + [("auto", lr) for lr in args.lrs]
    out = []
    for name in args.models:
        for recipe, lr in runs:
            training: dict[str, Any] = {
                "recipe": recipe,
                "batch_size": args.batch_size,
                "seed": args.seed,
            }
            if args.epochs is not None:
                training["epochs"] = args.epochs
            if lr is not None:
                training["lr"] = lr
            start = time.perf_counter()
            init = init_from_truth(truth) if args.init_from_truth else contextlib.nullcontext()
            with tempfile.TemporaryDirectory() as tmp, init:
                result = train_models([specs[name]], x[tr], x[va], training, tmp)
            seconds = time.perf_counter() - start
            metrics = score_sae(result.model, x[te], truth, np.arange(rows)[te])[0]
            used = (
                result.settings.model_dump(mode="json") if result.settings is not None else training
            )
            line = {
                "bench": "ground_truth",
                "setting": args.setting,
                "model": name,
                "recipe": recipe,
                "lr_given": lr is not None,
                "init": "truth" if args.init_from_truth else "random",
                "rows": rows,
                "train_rows": tr.stop,
                "spec": specs[name].to_json(),
                **{k: _json_number(v) for k, v in metrics.items()},
                "train_s": round(seconds, 1),
                "settings": {
                    k: used[k]
                    for k in (
                        "epochs",
                        "batch_size",
                        "lr",
                        "lr_min",
                        "warmup_steps",
                        "clip_norm",
                        "schedule",
                    )
                },
                "generator": {
                    k: getattr(gen, k)
                    for k in (
                        "d",
                        "n_features",
                        "zipf_exponent",
                        "n_parents",
                        "mean_active",
                        "noise_std",
                        "offset_norm",
                        "correlation",
                        "seed",
                    )
                },
            }
            print(json.dumps(line), flush=True)
            out.append(line)
    return out


def figure(lines: list[dict[str, Any]], path: Path) -> None:
    """Grouped bars: recovered share, MCC and absorption per model, one bar per recipe/lr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(line["model"] for line in lines))
    labels = list(dict.fromkeys(_label(line) for line in lines))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), constrained_layout=True)
    width = 0.8 / max(len(labels), 1)
    for ax, metric, title in zip(
        axes,
        ("recovered", "mcc", "absorption"),
        ("recovered at |cos| >= 0.9", "MCC (Hungarian mean |cos|)", "absorption (lower is better)"),
        strict=True,
    ):
        for j, label in enumerate(labels):
            vals = [
                next((ln[metric] for ln in lines if ln["model"] == m and _label(ln) == label), None)
                for m in models
            ]
            vals = [np.nan if v is None else v for v in vals]
            ax.bar(np.arange(len(models)) + j * width, vals, width, label=label)
        ax.set_xticks(
            np.arange(len(models)) + width * (len(labels) - 1) / 2, models, rotation=20, fontsize=8
        )
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, 1)
        if all(ln[metric] is None for ln in lines):
            ax.text(
                0.5,
                0.5,
                "no hierarchy in this setting",
                transform=ax.transAxes,
                ha="center",
                fontsize=9,
            )
    axes[0].legend(fontsize=7)
    rows = lines[0]["rows"]
    fig.suptitle(
        f"Ground truth: d {lines[0]['generator']['d']}, "
        f"{lines[0]['generator']['n_features']} true features, {rows} rows",
        fontsize=10,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def sweep_figure(lines: list[dict[str, Any]], path: Path) -> None:
    """Recovered share and FVU against lr, one line per (model, rows); recipe runs as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    groups = sorted({(ln["model"], ln["rows"]) for ln in lines})
    for (model, rows), color in zip(
        groups, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False
    ):
        mine = [ln for ln in lines if ln["model"] == model and ln["rows"] == rows]
        for ax, metric in zip(axes, ("recovered", "fvu"), strict=True):
            pts = sorted(
                (ln["settings"]["lr"], ln[metric]) for ln in mine if ln["recipe"] == "auto"
            )
            ax.plot(
                *zip(*pts, strict=True),
                "-",
                color=color,
                alpha=0.6,
                label=f"{model}, {rows // 1000}k rows",
            )
            for ln in mine:
                if not ln["lr_given"]:
                    marker = "*" if ln["recipe"] == "auto" else "x"
                    ax.plot(ln["settings"]["lr"], ln[metric], marker, color=color, markersize=12)
    for ax, label in zip(axes, ("recovered at |cos| >= 0.9", "FVU"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7, title="* auto recipe, x published", title_fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _json_number(v: Any) -> Any:
    """Rounded floats; NaN (no hierarchy: no absorption pairs) as null: lines stay strict JSON."""
    if isinstance(v, float):
        return None if np.isnan(v) else round(v, 4)
    return v


def _label(line: dict[str, Any]) -> str:
    return f"lr {line['settings']['lr']:.0e}" if line["lr_given"] else f"{line['recipe']} recipe"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--setting",
        choices=sorted(SETTINGS),
        default="default",
        help="default: the pinned issue-15 setting; flat: issue 14's (128-d, 96 features, 5 on)",
    )
    p.add_argument(
        "--rows", type=int, default=None, help="rows generated (80%% train); default: the setting's"
    )
    p.add_argument(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help="comma list of " + ", ".join(model_specs()) + " (default: all but matryoshka-equal-k)",
    )
    p.add_argument("--recipes", default="auto", help="comma list of auto, published")
    p.add_argument(
        "--lrs", default="", help="comma list of learning rates (auto recipe otherwise): a sweep"
    )
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--data-seed", type=int, default=0, help="generator seed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--init-from-truth",
        action="store_true",
        help="diagnostic: start matryoshka SAEs at the true dictionary (is the truth a minimum?)",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/ground_truth.png"))
    p.add_argument(
        "--sweep-from",
        type=Path,
        nargs="*",
        default=None,
        help="only draw the lr-sweep figure (to --out) from JSON-line files of earlier runs",
    )
    args = p.parse_args()
    if args.sweep_from:
        lines = [
            json.loads(t) for f in args.sweep_from for t in f.read_text().splitlines() if t.strip()
        ]
        sweep_figure([ln for ln in lines if "model" in ln], args.out)
        return
    args.models = [m for m in args.models.split(",") if m]
    args.recipes = [r for r in args.recipes.split(",") if r]
    args.lrs = [float(v) for v in args.lrs.split(",") if v]
    unknown = sorted(set(args.models) - set(model_specs()))
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {list(model_specs())}")
    torch.set_num_threads(args.threads)
    lines = run(args)
    if lines:
        figure(lines, args.out)
        print(json.dumps({"bench": "ground_truth", "figure": str(args.out)}))


if __name__ == "__main__":
    main()
