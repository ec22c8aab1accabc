"""Device-resident SAE trainer: the whole L2-normalised embedding matrix lives on the device,
batches are gathers through a device permutation, and a whole dictionary family trains per step.

Metrics are summed on the device and read back every ``log_every`` steps; the training recipe
(``auto`` or ``published``, see ``sail.sae.recipe``) fills in the settings the user did not
give. A family resumes from its members' ``train_state.pt`` with identical final weights.
``train_family`` is a short loop over named steps (``plan_family``, ``start_run``,
``resume_step``, ``train_step``, ``log_step``, ``validate_step``, ``checkpoint_step``,
``calibrate_step``, ``final_step``).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from sail.artifacts import SPLIT_CSV, SPLITS, TRAIN_STATE, read_split
from sail.config import SailConfig, TrainConfig, TrainingSettings
from sail.console import progress
from sail.device import resolve_device
from sail.encoders.table import read_embeddings
from sail.errors import SailError
from sail.sae.checkpoint import METRIC_COLUMNS, WEIGHTS, save_sae
from sail.sae.distributed import DistContext, from_env, local_device
from sail.sae.grid import GridEntry, families, load_grid, shard_entries, with_seeds
from sail.sae.kernels import decode_path
from sail.sae.memory import check_fits
from sail.sae.model import ForwardOut, StackedSAE, variant_class
from sail.sae.recipe import lr_at, resolve, warn_if_unconverged
from sail.slice_ids import volume_ids
from sail.workspace import (
    StageRecord,
    Workspace,
    atomic_path,
    fingerprint,
    hash_config,
    is_done,
    mark_done,
)

log = logging.getLogger(__name__)

STATE_FILE = TRAIN_STATE


# ----- data -----------------------------------------------------------------------------------
def split_labels(
    slice_ids: np.ndarray, split_df: pd.DataFrame, source: str = f"data/{SPLIT_CSV}"
) -> np.ndarray:
    """Split label per slice_id ("modality/image_id/plane/idx") from a modality,image_id,split
    table."""
    for col in ("modality", "image_id", "split"):
        if col not in split_df.columns:
            raise SailError(f"{source}: missing column '{col}'")
    bad = ~split_df["split"].isin(SPLITS)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise SailError(
            f"{source}: line {row + 2}: split {split_df['split'].iloc[row]!r} is not train, valid "
            "or test"
        )
    parts = pd.Series(slice_ids, dtype=object).str.split("/", n=2, expand=True)
    if parts.shape[1] < 3 or parts.isna().any().any():
        first = (
            slice_ids[int(np.flatnonzero(parts.isna().any(axis=1).to_numpy())[0])]
            if parts.shape[1] >= 3
            else slice_ids[0]
        )
        raise SailError(f"slice_id {first!r} is not 'modality/image_id/plane/index'")
    key = split_df.astype({"modality": str, "image_id": str}).drop_duplicates(
        ["modality", "image_id"]
    )
    merged = pd.DataFrame({"modality": parts[0], "image_id": parts[1]}).merge(
        key[["modality", "image_id", "split"]], on=["modality", "image_id"], how="left"
    )
    missing = merged["split"].isna().to_numpy()
    if missing.any():
        first = slice_ids[int(np.flatnonzero(missing)[0])]
        raise SailError(f"{source}: no split for {int(missing.sum())} slice(s), e.g. {first!r}")
    return merged["split"].to_numpy(dtype=object)


def seeded_split(n: int, groups: np.ndarray | None, seed: int) -> np.ndarray:
    """80/10/10 split of rows (or of the distinct values of ``groups``), reproducible per seed."""
    keys, inverse = (
        (np.arange(n), np.arange(n))
        if groups is None
        else np.unique(groups.astype(str), return_inverse=True)
    )
    g = len(keys)
    order = np.random.default_rng(seed).permutation(g)
    n_valid = max(1, round(0.1 * g)) if g >= 3 else 0
    n_test = max(1, round(0.1 * g)) if g >= 3 else 0
    label = np.empty(g, dtype=object)
    label[order[: g - n_valid - n_test]] = "train"
    label[order[g - n_valid - n_test : g - n_test]] = "valid"
    label[order[g - n_test :]] = "test"
    return label[inverse]


def calibration_holdout(slice_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Mask of the training rows kept out of training to calibrate thresholds.

    Whole volumes in a seeded order until they hold ``fraction`` of the rows (at least one volume,
    never all), so the rows that set the thresholds are unseen by the SAE and the validation
    split stays unseen by every choice; counting rows, not volumes, keeps enough rows when volumes
    differ in size. With a single volume nothing is held out (the caller calibrates on the
    training rows, warned).
    """
    keys, inverse, sizes = np.unique(volume_ids(slice_ids), return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(keys))
    n_cal = int(np.searchsorted(np.cumsum(sizes[order]), fraction * len(inverse))) + 1
    chosen = np.zeros(len(keys), dtype=bool)
    chosen[order[: min(n_cal, len(keys) - 1)]] = True
    return chosen[inverse]


def calibration_record(slice_ids: np.ndarray, fraction: float, seed: int) -> dict[str, Any]:
    """What cfg.json records about the calibration rows: counts and a hash of their ids."""
    ids = np.sort(np.asarray(slice_ids, dtype=str))
    return {
        "rows": int(len(ids)),
        "volumes": int(len(np.unique(volume_ids(ids)))),
        "fraction": fraction,
        "seed": seed,
        "slice_ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
    }


@dataclass
class EmbeddingData:
    """One table's rows with their split labels and the provenance the checkpoints record."""

    encoder: str
    slice_ids: np.ndarray
    x_ND: np.ndarray
    split: np.ndarray
    inputs: dict[str, str]
    split_info: dict[str, Any] = field(default_factory=dict)

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)


def load_data(
    ws: Workspace,
    encoder: str | None = None,
    embeddings: Path | None = None,
    name: str | None = None,
    group_by: str | None = None,
    seed: int = 42,
) -> EmbeddingData:
    """Rows + splits: the workspace table with data/split.csv, or any table (§8 of DESIGN)."""
    if embeddings is not None:
        path = Path(embeddings)
        table = read_embeddings(path)
        schema = pq.read_schema(path)
        encoder = name or path.stem
        if "split" in schema.names:
            split = np.asarray(
                pq.read_table(path, columns=["split"]).column("split").to_pylist(), dtype=object
            )
            bad = ~np.isin(split, SPLITS)
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise SailError(
                    f"{path}: column 'split' row {row}: {split[row]!r} is not train, valid or test"
                )
            info = {"source": "column"}
        else:
            groups = None
            if group_by is not None:
                if group_by not in schema.names:
                    raise SailError(
                        f"{path}: --group-by column '{group_by}' not found (columns: "
                        f"{schema.names})"
                    )
                groups = np.asarray(
                    pq.read_table(path, columns=[group_by]).column(group_by).to_pylist(),
                    dtype=object,
                )
            split = seeded_split(len(table.slice_ids), groups, seed)
            info = {
                "source": "seeded",
                "fractions": [0.8, 0.1, 0.1],
                "group_by": group_by,
                "seed": seed,
            }
        inputs = {"embeddings": fingerprint(path), "split": hash_config(info)}
    else:
        if encoder is None:
            raise SailError("name an --encoder or give --embeddings TABLE.parquet")
        path = ws.embeddings(encoder)
        table = read_embeddings(path)
        if not ws.split_csv.is_file():
            raise SailError(
                f"{ws.split_csv} not found; run `sail split` first (or train with --embeddings)"
            )
        split = split_labels(table.slice_ids, read_split(ws.split_csv), str(ws.split_csv))
        info = {"source": ws.split_csv.name, "fingerprint": fingerprint(ws.split_csv)}
        inputs = {"embeddings": fingerprint(path), "split": fingerprint(ws.split_csv)}
    if not np.isfinite(table.x_ND).all():
        row = int(np.flatnonzero(~np.isfinite(table.x_ND).all(1))[0])
        raise SailError(f"{path}: row {row} ({table.slice_ids[row]}) holds NaN or inf")
    check_trainable(path, table.slice_ids, table.x_ND)
    info["counts"] = {s: int((split == s).sum()) for s in SPLITS}
    return EmbeddingData(encoder, table.slice_ids, table.x_ND, split, inputs, info)


def check_trainable(path: Path, slice_ids: np.ndarray, x_ND: np.ndarray) -> None:
    """Refuse rows that would make the split or the metrics lie: duplicate slice_ids (one row on
    both sides of the split), all-zero rows and constant tables (a "perfect" FVU of 0)."""
    uniq, counts = np.unique(slice_ids.astype(str), return_counts=True)
    if (counts > 1).any():
        dup = str(uniq[counts > 1][0])
        rows = np.flatnonzero(slice_ids.astype(str) == dup)[:2].tolist()
        raise SailError(
            f"{path}: column 'slice_id' has duplicates, e.g. {dup!r} at rows {rows}; each slice "
            "must appear once"
        )
    if len(x_ND) == 0:
        raise SailError(f"{path}: the table has no rows")
    zero = ~np.any(x_ND, axis=1)
    if zero.any():
        row = int(np.flatnonzero(zero)[0])
        raise SailError(
            f"{path}: row {row} ({slice_ids[row]}) is an all-zero embedding ({int(zero.sum())} "
            "such rows)"
        )
    norms_N = np.sqrt(np.einsum("nd,nd->n", x_ND, x_ND, dtype=np.float64))
    cos_N = (x_ND @ (x_ND[0] / norms_N[0]).astype(x_ND.dtype)) / norms_N  # no (N, D) temporary
    if len(x_ND) > 1 and cos_N.min() > 1 - 1e-6:
        raise SailError(
            f"{path}: every row holds the same direction (the SAE sees L2-normalised rows): it "
            "would reconstruct them perfectly and learn nothing"
        )


def to_device_normalized(x_ND: np.ndarray, device: torch.device) -> torch.Tensor:
    """Per-sample L2 normalisation (as published), done once, on the device."""
    x = torch.from_numpy(np.require(x_ND, np.float32, ["C", "W"])).to(device)
    return torch.nn.functional.normalize(x, dim=1)


# ----- schedule, clipping, metrics --------------------------------------------------------------
@torch.no_grad()
def clip_per_model(
    params: list[torch.nn.Parameter], n_models: int, max_norm: float
) -> torch.Tensor:
    """clip_grad_norm_ applied to each stacked model separately (models never share a norm)."""
    sq = torch.zeros(n_models, device=params[0].device, dtype=torch.float32)
    for p in params:
        if p.grad is not None:
            sq += torch.linalg.vector_norm(
                p.grad.reshape(n_models, -1), dim=1, dtype=torch.float32
            ).pow(2)
    norm = sq.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(scale.view(-1, *[1] * (p.grad.dim() - 1)).to(p.grad.dtype))
    return norm


class Meter:
    """Device-side sums for per-dimension FVU (float64), published R², L0 and AuxK."""

    def __init__(self, n_levels: int, n_models: int, d_in: int, device: torch.device):
        self.shape = (n_levels, n_models)
        self.d_in = d_in
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sse = torch.zeros(self.shape, dtype=torch.float64, device=self.device)
        self.l0 = torch.zeros(self.shape, dtype=torch.int64, device=self.device)
        self.sum_x = torch.zeros(self.d_in, dtype=torch.float64, device=self.device)
        self.sumsq_x = torch.zeros(self.d_in, dtype=torch.float64, device=self.device)
        self.auxk = torch.zeros(self.shape[1], dtype=torch.float64, device=self.device)
        self.n = 0
        self.steps = 0

    def add(
        self,
        x_BD: torch.Tensor,
        sse_LM: torch.Tensor,
        l0_LM: torch.Tensor,
        auxk_M: torch.Tensor | None = None,
    ) -> None:
        xd = x_BD.double()
        self.sum_x += xd.sum(0)
        self.sumsq_x += xd.pow(2).sum(0)
        self.sse += sse_LM
        self.l0 += l0_LM
        if auxk_M is not None:
            self.auxk += auxk_M.double()
            self.steps += 1
        self.n += x_BD.shape[0]

    def all_reduce(self, ctx: DistContext) -> None:
        """Sum the ranks' accumulators (AuxK is already a global-batch value, so it is kept)."""
        for t in (self.sse, self.l0, self.sum_x, self.sumsq_x):
            ctx.all_reduce(t)
        n = torch.tensor([self.n], dtype=torch.int64, device=self.device)
        self.n = int(ctx.all_reduce(n).item())

    def summary(self) -> dict[str, np.ndarray]:
        """(L, M) arrays of fvu, r2_published, l0 and (M,) auxk since the last reset."""
        n = max(self.n, 1)
        var_per_dim = (self.sumsq_x - self.sum_x.pow(2) / n).sum()
        var_scalar = self.sumsq_x.sum() - self.sum_x.sum().pow(2) / (n * self.d_in)
        return {
            "fvu": (self.sse / var_per_dim.clamp_min(1e-30)).cpu().numpy(),
            "r2_published": (1 - self.sse / var_scalar.clamp_min(1e-30)).cpu().numpy(),
            "l0": (self.l0.double() / n).cpu().numpy(),
            "auxk": (self.auxk / max(self.steps, 1)).cpu().numpy(),
        }


# ----- trainer ----------------------------------------------------------------------------------
@dataclass
class Runtime:
    """How (not what) to train: none of these change the result beyond float tolerance."""

    device: torch.device
    precision: str = "fp32"
    decode: str = "auto"  # dense, sparse, or auto: kernels.decode_path per family
    log_every: int = 50
    checkpoint_every: int = 1
    show_progress: bool = True
    dist: DistContext | None = None  # data-parallel group (torchrun); None: one process

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main

    @classmethod
    def from_config(cls, tc: TrainConfig) -> Runtime:
        device = local_device(resolve_device(tc.device))
        precision = (
            tc.precision
            if tc.precision != "auto"
            else ("bf16" if device.type == "cuda" else "fp32")
        )
        ctx = from_env(device)
        return cls(
            device,
            precision,
            tc.decode,
            tc.log_every,
            tc.checkpoint_every,
            ctx is None or ctx.is_main,
            ctx,
        )


def epoch_permutation(n: int, seed: int, epoch: int, fixed: bool) -> torch.Tensor:
    """A fresh permutation per epoch, derived from (seed, epoch) so a resumed run sees the same."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + (0 if fixed else epoch))
    return torch.randperm(n, generator=g)


@dataclass
class FamilyResult:
    model: StackedSAE
    metrics: list[pd.DataFrame]
    final: list[dict[str, Any]]  # per model: metrics of the stored codes on held-out rows
    calibration: list[dict[str, Any]] | None = (
        None  # per model: how thresholds were set (matryoshka)
    )
    settings: TrainingSettings | None = None  # the resolved settings the family trained with


def _state_key(entries: list[GridEntry], n_train: int, d: int) -> str:
    return hash_config(
        {
            "names": [e.name for e in entries],
            "settings": entries[0].settings.model_dump(mode="json"),
            "n_train": n_train,
            "d": d,
        }
    )


def _save_states(
    dirs: list[Path],
    model: StackedSAE,
    opt: torch.optim.Optimizer,
    names: list[str],
    since_fired: torch.Tensor,
    rows: list[list[dict]],
    step: int,
    epoch: int,
    key: str,
) -> None:
    params = dict(model.named_parameters())
    for m, out in enumerate(dirs):
        opt_state = {}
        for name, p in params.items():
            st = opt.state.get(p, {})
            if st:
                opt_state[name] = {
                    "exp_avg": st["exp_avg"][m].cpu().clone(),
                    "exp_avg_sq": st["exp_avg_sq"][m].cpu().clone(),
                    "step": float(st["step"]),
                }
        state = {
            "key": key,
            "step": step,
            "epoch": epoch,
            "member": names[m],
            "model": {k: v.cpu() for k, v in model.model_state(m).items()},
            "since_fired": since_fired[m].cpu().clone(),
            "opt": opt_state,
            "rows": rows[m],
        }
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / STATE_FILE) as tmp:
            torch.save(state, tmp)


def _load_states(dirs: list[Path], key: str) -> list[dict] | None:
    paths = [d / STATE_FILE for d in dirs]
    if not any(p.is_file() for p in paths):
        return None
    try:
        states = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    except (OSError, RuntimeError, FileNotFoundError) as exc:
        log.warning("cannot resume (%s); training the family from scratch", exc)
        return None
    if any(s["key"] != key for s in states) or len({s["step"] for s in states}) != 1:
        log.warning(
            "train_state.pt files do not match this family and settings; training from scratch"
        )
        return None
    return states


def _restore(
    states: list[dict], model: StackedSAE, opt: torch.optim.Optimizer, fused: bool
) -> torch.Tensor:
    for m, st in enumerate(states):
        model.load_model_state(m, {k: v.to(model.b_dec.device) for k, v in st["model"].items()})
    for name, p in model.named_parameters():
        if name not in states[0]["opt"]:
            continue
        step_dev = p.device if fused else torch.device("cpu")
        opt.state[p] = {
            "step": torch.tensor(
                states[0]["opt"][name]["step"], dtype=torch.float32, device=step_dev
            ),
            "exp_avg": torch.stack([s["opt"][name]["exp_avg"] for s in states]).to(p.device),
            "exp_avg_sq": torch.stack([s["opt"][name]["exp_avg_sq"] for s in states]).to(p.device),
        }
    return torch.stack([s["since_fired"] for s in states]).to(model.b_dec.device)


@torch.no_grad()
def all_reduce_grads(params: list[torch.nn.Parameter], ctx: DistContext) -> None:
    """Sum the ranks' gradients in one flat buffer (each rank's loss is its share of the global
    mean)."""
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    )
    ctx.all_reduce(flat)
    for p, g in zip(params, flat.split([p.numel() for p in params]), strict=False):
        p.grad = g.view_as(p)


def _rows(
    meter: Meter,
    model: StackedSAE,
    step: int,
    epoch: int,
    split: str,
    dead_MF: torch.Tensor,
    lr: float,
    out: list[list[dict]],
    mode: str,
) -> dict[str, np.ndarray]:
    s = meter.summary()
    dead = dead_MF.float()
    dead_frac = np.stack([dead[:, :Fl].mean(1).cpu().numpy() for Fl in model.dict_sizes])  # (L, M)
    for m in range(model.n_models):
        for li in range(model.n_levels):
            out[m].append(
                {
                    "step": step,
                    "epoch": epoch,
                    "split": split,
                    "mode": mode,
                    "level": li,
                    "fvu": float(s["fvu"][li, m]),
                    "r2_published": float(s["r2_published"][li, m]),
                    "l0": float(s["l0"][li, m]),
                    "dead_frac": float(dead_frac[li, m]),
                    "auxk_loss": float(s["auxk"][m]) if split == "train" else float("nan"),
                    "lr": lr,
                }
            )
    s["dead_frac"] = dead_frac
    return s


def _evaluate(
    model: StackedSAE, x_ND: torch.Tensor, batch_size: int, mode: str, meter: Meter
) -> torch.Tensor:
    """Metric sums of ``mode``'s codes on x into ``meter``; returns the latents that never fired
    (M, F)."""
    meter.reset()
    fired_MF = torch.zeros(model.n_models, model.n_latents, dtype=torch.bool, device=x_ND.device)
    for start in range(0, x_ND.shape[0], batch_size):
        xb = x_ND[start : start + batch_size]
        sse, l0, fired = model.eval_levels(xb, mode)
        meter.add(xb, sse, l0)
        fired_MF |= fired
    return ~fired_MF


@dataclass
class FamilyPlan:
    """What stays fixed while one family trains: its members, resolved settings and schedule."""

    entries: list[GridEntry]
    settings: TrainingSettings
    n_train: int
    d_in: int
    batch_size: int
    steps_per_epoch: int
    total_steps: int
    dead_window: int  # rows a latent may go unselected before it counts as dead
    auxk_k: int
    auxk_alpha: float  # 0: no AuxK (the variant has none)
    key: str  # identifies the family and settings in train_state.pt
    decode: str  # dense or sparse training path (kernels.decode_path)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    @property
    def n_models(self) -> int:
        return len(self.entries)


@dataclass
class FamilyRun:
    """What changes while one family trains (what train_state.pt saves and a resume restores)."""

    model: StackedSAE
    opt: torch.optim.Optimizer
    fused: bool
    since_fired: torch.Tensor  # (M, F) rows since each latent was last selected
    rows: list[list[dict]]  # metrics.csv rows per model
    step: int = 0
    epoch: int = 0  # the next epoch to run
    lr: float = 0.0
    params: list[torch.nn.Parameter] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.params = list(self.model.parameters())


def plan_family(
    entries: list[GridEntry], x_train: torch.Tensor, decode: str = "auto"
) -> FamilyPlan:
    """Resolve the recipe for this data size and derive the batch, schedule, AuxK settings and
    the training path (``decode``: dense, sparse, or auto for the static shape rule)."""
    N, D = x_train.shape
    if N == 0:
        raise SailError("the training split is empty")
    spec = entries[0].spec
    settings = resolve(entries[0].settings, spec.variant, N, spec.dict_sizes[-1])
    B = min(settings.batch_size, N)
    steps_per_epoch = math.ceil(N / B)
    return FamilyPlan(
        entries=entries,
        settings=settings,
        n_train=N,
        d_in=D,
        batch_size=B,
        steps_per_epoch=steps_per_epoch,
        total_steps=settings.epochs * steps_per_epoch,
        dead_window=min(settings.dead_window, N),
        auxk_k=settings.auxk_k or max(1, D // 2),
        auxk_alpha=settings.auxk_alpha if variant_class(spec.variant).uses_auxk else 0.0,
        key=_state_key(entries, N, D),
        decode=decode_path(decode, x_train.device, D, spec.dict_sizes[-1]),
    )


def start_run(plan: FamilyPlan, x_train: torch.Tensor) -> FamilyRun:
    """The initialised stack (one seed per member) and its Adam optimiser."""
    device = x_train.device
    settings = plan.settings
    model = StackedSAE([e.spec for e in plan.entries], plan.d_in).to(device)
    sample_idx = torch.randperm(
        plan.n_train, generator=torch.Generator().manual_seed(settings.seed)
    )[:8192].to(device)
    seeds = [
        int(hash_config([settings.seed, e.spec.to_json()]), 16) % (2**62) for e in plan.entries
    ]
    model.initialize(seeds, x_train[sample_idx], settings.b_dec_init)
    fused = device.type in ("cuda", "cpu")  # one kernel per parameter instead of ~10 passes over it
    opt = torch.optim.Adam(
        model.parameters(), lr=settings.lr, betas=(0.9, 0.999), eps=1e-8, fused=fused or None
    )
    since_fired = torch.zeros(plan.n_models, model.n_latents, dtype=torch.int64, device=device)
    rows: list[list[dict]] = [[] for _ in range(plan.n_models)]
    return FamilyRun(model, opt, fused, since_fired, rows)


def resume_step(run: FamilyRun, plan: FamilyPlan, dirs: list[Path]) -> bool:
    """Continue from the members' train_state.pt when they match this family; True if resumed."""
    states = _load_states(dirs, plan.key)
    if states is not None:
        run.since_fired = _restore(states, run.model, run.opt, run.fused)
        run.step, run.epoch = states[0]["step"], states[0]["epoch"]
        run.rows = [list(s["rows"]) for s in states]
        log.info("resuming %s at epoch %d (step %d)", ", ".join(plan.names), run.epoch, run.step)
    run.lr = lr_at(run.step, plan.total_steps, plan.settings)
    return states is not None


def batch_rows(x_train: torch.Tensor, idx: torch.Tensor, ctx: DistContext | None) -> torch.Tensor:
    """This process's rows of a global batch (its contiguous slice under data parallelism)."""
    if ctx is None:
        return x_train[idx]
    lo, hi = ctx.batch_bounds(idx.numel())
    return x_train[idx[lo:hi]]


def train_step(
    run: FamilyRun, plan: FamilyPlan, x: torch.Tensor, batch_global: int, rt: Runtime
) -> ForwardOut:
    """One optimiser step of every member on the batch ``x`` (``batch_global`` rows over all
    ranks): learning-rate schedule, loss (with AuxK once latents are dead), gradients, per-model
    clipping, Adam and the variant's decoder constraint; updates the dead-latent counters."""
    model, ctx, device = run.model, rt.dist, x.device
    run.lr = lr_at(run.step, plan.total_steps, plan.settings)
    for group in run.opt.param_groups:
        group["lr"] = run.lr
    dead = run.since_fired >= plan.dead_window
    alpha = plan.auxk_alpha
    use_aux = alpha > 0 and (device.type != "cpu" or bool(dead.any()))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=rt.precision == "bf16"):
        out = model.forward_train(
            x,
            plan.decode,
            dead if use_aux else None,
            plan.auxk_k,
            alpha if use_aux else 0.0,
            ctx,
            batch_global,
        )
    run.opt.zero_grad(set_to_none=True)
    out.loss.backward()
    params = run.params
    fired_MF = out.fired_MF
    if ctx is not None:
        all_reduce_grads(params, ctx)
        fired_MF = ctx.all_reduce(fired_MF.to(torch.int32), "max").bool()
    model.project_decoder_grad()
    if plan.settings.clip_norm is not None:
        clip_per_model(params, plan.n_models, plan.settings.clip_norm)
    run.opt.step()
    model.normalize_decoder()
    run.since_fired = torch.where(
        fired_MF, torch.zeros_like(run.since_fired), run.since_fired + batch_global
    )
    run.step += 1
    return out


def log_step(run: FamilyRun, plan: FamilyPlan, meter: Meter, ctx: DistContext | None) -> None:
    """Turn the training sums since the last log into metrics rows and reset them."""
    if ctx is not None:
        meter.all_reduce(ctx)
    dead = run.since_fired >= plan.dead_window
    _rows(meter, run.model, run.step, run.epoch, "train", dead, run.lr, run.rows, "batchtopk")
    meter.reset()


def validate_step(run: FamilyRun, plan: FamilyPlan, x_valid: torch.Tensor, meter: Meter) -> None:
    """Metrics rows of the validation split in the variant's validation mode (end of an epoch)."""
    if not x_valid.shape[0]:
        return
    model = run.model
    _evaluate(model, x_valid, plan.batch_size, model.validation_mode, meter)
    dead = run.since_fired >= plan.dead_window
    _rows(
        meter, model, run.step, run.epoch, "valid", dead, run.lr, run.rows, model.validation_label
    )


def checkpoint_step(run: FamilyRun, plan: FamilyPlan, dirs: list[Path], rt: Runtime) -> bool:
    """Write every member's train_state.pt when an epoch that is not the last completes on
    a checkpoint boundary (rank 0 only); True if written. ``run.epoch`` is the next epoch."""
    last = run.epoch == plan.settings.epochs
    if last or run.epoch % rt.checkpoint_every != 0 or not rt.is_main:
        return False
    _save_states(
        dirs,
        run.model,
        run.opt,
        plan.names,
        run.since_fired,
        run.rows,
        run.step,
        run.epoch,
        plan.key,
    )
    return True


def run_epoch(
    run: FamilyRun,
    plan: FamilyPlan,
    x_train: torch.Tensor,
    rt: Runtime,
    meter: Meter,
    tick: Callable[[int], None],
) -> None:
    """The training steps of one epoch, logging every ``rt.log_every`` steps and at its end
    (``tick(step)`` after each log, e.g. to move a progress bar)."""
    settings = plan.settings
    B = plan.batch_size
    perm = epoch_permutation(
        plan.n_train, settings.seed, run.epoch, settings.permutation == "fixed"
    ).to(x_train.device)
    run.model.train()
    for b in range(plan.steps_per_epoch):
        idx = perm[b * B : (b + 1) * B]
        x = batch_rows(x_train, idx, rt.dist)
        out = train_step(run, plan, x, idx.numel(), rt)
        meter.add(x, out.sse_LM, out.l0_LM, out.auxk_M)
        if run.step % rt.log_every == 0 or b == plan.steps_per_epoch - 1:
            log_step(run, plan, meter, rt.dist)
            tick(run.step)
    run.model.eval()


def final_step(
    run: FamilyRun,
    plan: FamilyPlan,
    x_valid: torch.Tensor,
    x_calib: torch.Tensor | None,
    x_train: torch.Tensor,
    calibration: list[dict[str, Any]] | None,
) -> FamilyResult:
    """Metrics of the stored codes on held-out rows, and the family's result."""
    model = run.model
    held_split, x_held = _held_out(x_valid, x_calib, x_train)
    meter = Meter(model.n_levels, plan.n_models, plan.d_in, x_train.device)
    dead_MF = _evaluate(model, x_held, plan.batch_size, "inference", meter)
    epochs = plan.settings.epochs
    final = _rows(
        meter, model, run.step, epochs, held_split, dead_MF, run.lr, run.rows, "inference"
    )
    finals = [
        {
            "split": held_split,
            "rows": int(x_held.shape[0]),
            "mode": "inference",
            "fvu": final["fvu"][:, m].tolist(),
            "r2_published": final["r2_published"][:, m].tolist(),
            "l0": final["l0"][:, m].tolist(),
            "dead_frac": final["dead_frac"][:, m].tolist(),
            "dead_frac_source": "stored codes",
            "steps": run.step,
        }
        for m in range(plan.n_models)
    ]
    metrics = [pd.DataFrame(r, columns=METRIC_COLUMNS) for r in run.rows]
    warn_if_unconverged(plan.names, metrics)
    return FamilyResult(model, metrics, finals, calibration, plan.settings)


def train_family(
    entries: list[GridEntry],
    x_train: torch.Tensor,
    x_valid: torch.Tensor,
    dirs: list[Path],
    rt: Runtime,
    on_epoch_end: Callable[[int], None] | None = None,
    x_calib: torch.Tensor | None = None,
) -> FamilyResult:
    """Train every entry of one family together on the same batches; returns the trained stack.

    ``x_train``/``x_valid``/``x_calib`` are L2-normalised (N, D) tensors on ``rt.device``;
    ``x_calib`` holds training-split rows kept out of training to calibrate thresholds, so the
    validation split stays unseen by every choice. A ``train_state.pt`` is written to each
    member folder every ``rt.checkpoint_every`` epochs and resumed from. With ``rt.dist`` every
    rank passes the same tensors, trains on its contiguous slice of each global batch and ends
    with the same weights; only rank 0 writes train_state.pt.
    """
    plan = plan_family(entries, x_train, rt.decode)
    run = start_run(plan, x_train)
    resume_step(run, plan, dirs)
    meter = Meter(run.model.n_levels, plan.n_models, plan.d_in, x_train.device)
    vmeter = Meter(run.model.n_levels, plan.n_models, plan.d_in, x_train.device)
    spec = entries[0].spec
    label = f"{spec.variant} {spec.published_name.split('_K_')[0]} x{plan.n_models}"
    with progress() as bar:
        task = bar.add_task(
            label, total=plan.total_steps, completed=run.step, visible=rt.show_progress
        )
        while run.epoch < plan.settings.epochs:
            run_epoch(run, plan, x_train, rt, meter, lambda s: bar.update(task, completed=s))
            validate_step(run, plan, x_valid, vmeter)
            run.epoch += 1
            checkpoint_step(run, plan, dirs, rt)
            if on_epoch_end is not None:
                on_epoch_end(run.epoch - 1)
    calibration = calibrate_step(run.model, plan.names, x_calib, x_train, plan.batch_size)
    return final_step(run, plan, x_valid, x_calib, x_train, calibration)


def calibrate_step(
    model: StackedSAE,
    names: list[str],
    x_calib: torch.Tensor | None,
    x_train: torch.Tensor,
    batch_size: int,
) -> list[dict[str, Any]] | None:
    """Calibrate the inference thresholds of variants that have them on the held-out training
    rows (on the training rows, warned, if none are held out)."""
    if not model.calibrates:
        return None
    held_out = x_calib is not None and x_calib.shape[0] > 0
    if not held_out:
        log.warning(
            "no held-out calibration rows: calibrating thresholds on the rows the SAE was trained "
            "on"
        )
    found = model.calibrate(x_calib if held_out else x_train, batch_size)
    for name, cal in zip(names, found, strict=False):
        for lo, hi in cal.dead_ranges:
            log.warning(
                "%s: latents [%d, %d) were never selected at the last level on the calibration "
                "rows; threshold inf, counted dead",
                name,
                lo,
                hi,
            )
    return [{**asdict(cal), "held_out": held_out} for cal in found]


def _held_out(
    x_valid: torch.Tensor, x_calib: torch.Tensor | None, x_train: torch.Tensor
) -> tuple[str, torch.Tensor]:
    """Rows the final metrics come from: valid, else the calibration rows, else (warned) train."""
    if x_valid.shape[0]:
        return "valid", x_valid
    if x_calib is not None and x_calib.shape[0]:
        log.warning("no validation rows: final metrics come from the calibration rows")
        return "calibration", x_calib
    log.warning("no validation or calibration rows: final metrics come from the training rows")
    return "train", x_train


# ----- stage ------------------------------------------------------------------------------------
def _encoders(cfg: SailConfig, ws: Workspace) -> list[str]:
    if cfg.train.encoders:
        return list(cfg.train.encoders)
    found = ws.encoders_with_embeddings()
    if not found:
        raise SailError(
            f"no embeddings tables in {ws.root / 'embeddings'}; run `sail encode` or pass "
            "--embeddings"
        )
    return found


def grid_entries(tc: TrainConfig) -> list[GridEntry]:
    entries = load_grid(tc.grid, list(tc.variants), "variants" in tc.model_fields_set, tc.training)
    entries = shard_entries(with_seeds(entries, tc.seeds, tc.replicate_configs), tc.shard)
    if not entries:
        log.warning(
            "shard %s of the grid is empty (the grid has fewer configs than shards)", tc.shard
        )
    return entries


def train_encoder(
    cfg: SailConfig,
    ws: Workspace,
    data: EmbeddingData,
    entries: list[GridEntry],
    force: bool = False,
    on_epoch_end: Callable[[int], None] | None = None,
) -> list[Path]:
    """Train the entries (skipping finished ones) for one table; returns the checkpoint folders."""
    rt = Runtime.from_config(cfg.train)
    records = {
        e.name + e.spec.variant: StageRecord("train", hash_config(e.record_config()), data.inputs)
        for e in entries
    }
    todo = [
        e
        for e in entries
        if force
        or not is_done(
            ws.sae_dir(data.encoder, e.spec.variant, e.name) / WEIGHTS,
            records[e.name + e.spec.variant],
        )
    ]
    for e in entries:
        sae_dir = ws.sae_dir(data.encoder, e.spec.variant, e.name)
        if e not in todo:
            log.info("%s/%s/%s: up to date", data.encoder, e.spec.variant, e.name)
        elif not force and is_done(
            sae_dir / WEIGHTS, records[e.name + e.spec.variant], ignore_semantics=True
        ):
            log.warning(
                "%s was written by an older SAIL whose thresholds/metrics meant something else; "
                "retraining "
                "it. `sail train --recalibrate` keeps the trained weights and only recomputes them",
                sae_dir,
            )
    if not todo:
        return [ws.sae_dir(data.encoder, e.spec.variant, e.name) for e in entries]
    train_rows = data.rows("train")
    x_train = to_device_normalized(data.x_ND[train_rows], rt.device)
    x_valid = to_device_normalized(data.x_ND[data.rows("valid")], rt.device)
    for fam in families(todo):
        dirs = [ws.sae_dir(data.encoder, e.spec.variant, e.name) for e in fam]
        if force and rt.is_main:
            for d in dirs:
                (d / STATE_FILE).unlink(missing_ok=True)
        if rt.dist is not None:
            rt.dist.barrier()  # no rank may resume from a state rank 0 is about to discard
        check_fits(
            [e.name for e in fam],
            fam[0].spec.dict_sizes[-1],
            x_train.shape[1],
            fam[0].settings.batch_size,
            rt.device,
        )
        fit, x_calib, calib_info = _fit_and_calibration_rows(
            fam[0], data.slice_ids[train_rows], x_train
        )
        log.info(
            "training %s on %d %s rows: %s",
            fam[0].spec.variant,
            fit.shape[0],
            data.encoder,
            ", ".join(e.name for e in fam),
        )
        result = train_family(fam, fit, x_valid, dirs, rt, on_epoch_end, x_calib=x_calib)
        for m, (e, out) in enumerate(zip(fam, dirs, strict=False) if rt.is_main else []):
            extra = {
                "encoder": data.encoder,
                "embeddings_fingerprint": data.inputs["embeddings"],
                "split": {**data.split_info, "fingerprint": data.inputs["split"]},
                "training": result.settings.model_dump(mode="json"),
                "training_explicit": sorted(e.settings.model_fields_set),
                "final_metrics": result.final[m],
            }
            if result.calibration is not None:
                extra["calibration"] = {**calib_info, **result.calibration[m]}
            save_sae(out, result.model, m, e.name, extra, result.metrics[m])
            mark_done(out / WEIGHTS, records[e.name + e.spec.variant], {"final": result.final[m]})
            (out / STATE_FILE).unlink(missing_ok=True)
        if rt.dist is not None:
            rt.dist.barrier()  # checkpoints are on disk before any rank moves on
    return [ws.sae_dir(data.encoder, e.spec.variant, e.name) for e in entries]


def _calibration_rows(
    entry: GridEntry, train_ids: np.ndarray
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Mask of the training rows held out to calibrate ``entry`` (None: train on them all) and
    what cfg.json records about them. Only variants that calibrate hold rows out (``sail``
    trains on the whole training split, as published)."""
    if not variant_class(entry.spec.variant).calibrates:
        return None, {}
    fraction, seed = entry.settings.calibration_fraction, entry.settings.seed
    held = calibration_holdout(train_ids, fraction, seed)
    if not held.any():
        return None, {"rows": 0, "fraction": fraction, "seed": seed}
    return held, calibration_record(train_ids[held], fraction, seed)


def _fit_and_calibration_rows(
    entry: GridEntry, train_ids: np.ndarray, x_train: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """The rows trained on and the held-out calibration rows (None when nothing is held out)."""
    held, info = _calibration_rows(entry, train_ids)
    if held is None:
        return x_train, None, info
    held_t = torch.from_numpy(held).to(x_train.device)
    return x_train[~held_t], x_train[held_t], info


def run_train(cfg: SailConfig, ws: Workspace, force: bool = False) -> None:
    """Pipeline stage: train the grid for every encoder (or for ``train.embeddings``)."""
    tc = cfg.train
    entries = grid_entries(tc)
    seed = TrainingSettings.model_validate(tc.training).seed
    if tc.embeddings is not None:
        data = load_data(
            ws, embeddings=tc.embeddings, name=tc.name, group_by=tc.group_by, seed=seed
        )
        _train_or_recalibrate(cfg, ws, data, entries, force)
        return
    for encoder in _encoders(cfg, ws):
        _train_or_recalibrate(cfg, ws, load_data(ws, encoder=encoder), entries, force)


def _train_or_recalibrate(
    cfg: SailConfig, ws: Workspace, data: EmbeddingData, entries: list[GridEntry], force: bool
) -> None:
    if cfg.train.recalibrate:
        from sail.sae.recalibrate import recalibrate_encoder

        recalibrate_encoder(cfg, ws, data, entries)
    else:
        train_encoder(cfg, ws, data, entries, force)
