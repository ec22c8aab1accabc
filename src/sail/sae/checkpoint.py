"""SAE checkpoints: ``model.safetensors`` + ``cfg.json`` (+ ``metrics.csv``), and import of the
published Lightning checkpoints (``last.ckpt`` + ``hparams.yaml``) into that format.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml
from safetensors.torch import load_file, save_file

from sail import __version__
from sail.artifacts import CFG_SCHEMA_VERSION as SCHEMA_VERSION
from sail.artifacts import SAE_CFG as CFG
from sail.artifacts import SAE_METRICS as METRICS
from sail.artifacts import SAE_WEIGHTS as WEIGHTS
from sail.artifacts import read_cfg as read_cfg
from sail.errors import SailError
from sail.sae.model import SAESpec, StackedSAE
from sail.workspace import SEMANTICS, atomic_path, write_csv_atomic, write_json_atomic

METRIC_COLUMNS = [
    "step",
    "epoch",
    "split",
    "level",
    "fvu",
    "r2_published",
    "l0",
    "dead_frac",
    "auxk_loss",
    "lr",
    "mode",
]


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _finite_or_none(values: list[float]) -> list[float | None]:
    return [v if math.isfinite(v) else None for v in values]


def inference_summary(model: StackedSAE, m: int = 0) -> dict[str, Any]:
    if model.variant == "sail":
        return {
            "kind": "soft_threshold",
            "theta": float(model.theta_M()[m]),
            "theta_sum": float(model.theta_sum[m]),
            "theta_count": int(model.theta_count[m]),
        }
    return {
        "kind": "jumprelu",
        "per": "range" if model.topk_mode == "per_level" else "dictionary",
        "ranges": [list(r) for r in model.threshold_ranges()],
        # null: the range never fired on the calibration rows (threshold inf, its latents are dead)
        "thresholds": _finite_or_none([float(t) for t in model.thresholds[m].tolist()]),
    }


def save_sae(
    out_dir: str | Path,
    model: StackedSAE,
    m: int,
    name: str,
    extra: dict[str, Any],
    metrics: pd.DataFrame | None = None,
) -> Path:
    """Write model m of ``model`` to ``out_dir`` (weights, cfg.json and metrics.csv, atomically)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = model.specs[m]
    state = {k: v.detach().cpu().contiguous() for k, v in model.model_state(m).items()}
    with atomic_path(out_dir / WEIGHTS) as tmp:
        # one metadata key: safetensors writes a multi-key metadata map in hash order, which would
        # make the bytes of identical models differ between processes
        meta = json.dumps(
            {"schema_version": SCHEMA_VERSION, "variant": spec.variant}, sort_keys=True
        )
        save_file(state, str(tmp), metadata={"sail": meta})
    cfg = {
        "weights_sha256": sha256_file(out_dir / WEIGHTS),
        "schema_version": SCHEMA_VERSION,
        "sail_version": __version__,
        "git_commit": git_commit(),
        "name": name,
        "published_name": spec.published_name,
        **spec.to_json(),
        "d_in": model.d_in,
        "input_normalization": "l2",
        "inference": inference_summary(model, m),
        "artifact_semantics": SEMANTICS["train"],
        **extra,
    }
    write_json_atomic(out_dir / CFG, cfg)
    if metrics is None:
        metrics = pd.DataFrame(columns=METRIC_COLUMNS)
    write_csv_atomic(out_dir / METRICS, metrics[METRIC_COLUMNS])
    return out_dir


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Full SHA-256 of a file (checkpoints are MBs: hashing them on load costs milliseconds)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_weights(weights: Path, cfg: dict[str, Any], verify: bool) -> dict[str, torch.Tensor]:
    """The tensors of ``weights``, after checking they are what save_sae wrote (unless not ``verify``)."""
    redo = "retrain it (`sail train --force`) or restore the file"
    expected = cfg.get("weights_sha256")
    if verify and expected is not None and sha256_file(weights) != expected:
        raise SailError(
            f"{weights}: content does not match the sha256 recorded in {CFG} when it was written (the "
            f"file is damaged or was replaced); {redo}, or pass --no-verify to load it anyway"
        )
    try:
        state = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for every defect
        raise SailError(
            f"{weights}: not a readable safetensors file ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'empty'}); {redo}"
        ) from None
    for name, tensor in state.items():
        # thresholds are NaN before calibration and +inf for a range that never fired; weights must be finite
        if (
            name != "thresholds"
            and tensor.is_floating_point()
            and not bool(torch.isfinite(tensor).all())
        ):
            raise SailError(f"{weights}: tensor '{name}' holds NaN or inf values; {redo}")
    return state


def spec_from_cfg(cfg: dict[str, Any]) -> SAESpec:
    return SAESpec(
        cfg["variant"],
        tuple(cfg["dict_sizes"]),
        tuple(cfg["k_values"]),
        cfg.get("topk_mode", "per_level"),
    )


def load_sae(
    sae_dir: str | Path,
    device: str | torch.device = "cpu",
    allow_stale: bool = False,
    verify: bool = True,
) -> tuple[StackedSAE, dict[str, Any]]:
    """Load a checkpoint folder as a single-SAE :class:`StackedSAE` (M = 1) and its cfg.json.

    A matryoshka checkpoint calibrated by an older SAIL (artifact semantics 1: per-prefix
    thresholds that collapse flat-K schedules) is refused unless ``allow_stale``. The weights must
    match the sha256 in cfg.json (unless not ``verify``), hold every tensor and be finite.
    """
    sae_dir = Path(sae_dir)
    cfg = read_cfg(sae_dir)
    weights = sae_dir / WEIGHTS
    if not weights.is_file():
        raise SailError(f"SAE weights not found: {weights}")
    if (
        not allow_stale
        and cfg["variant"] == "matryoshka"
        and cfg.get("artifact_semantics", 1) < SEMANTICS["train"]
    ):
        raise SailError(
            f"{sae_dir / CFG}: its thresholds were calibrated by an older SAIL whose rule is wrong for "
            "flat-K schedules; run `sail train --recalibrate` (keeps the weights) or retrain"
        )
    model = StackedSAE([spec_from_cfg(cfg)], int(cfg["d_in"]))
    state = _read_weights(weights, cfg, verify)
    missing = sorted(set(model.model_state(0)) - set(state))
    if missing:
        raise SailError(
            f"{weights}: tensor(s) {missing} missing; retrain it (`sail train --force`)"
        )
    try:
        model.load_model_state(0, state)
    except SailError as exc:
        raise SailError(f"{weights}: {exc}") from None
    return model.to(device).eval(), cfg


def _load_lightning_ckpt(path: Path, trust_pickle: bool) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling refusal ends up here
        if not trust_pickle:
            raise SailError(
                f"{path}: cannot be read with torch.load(weights_only=True) ({type(exc).__name__}); "
                "pass --trust-checkpoint to unpickle it fully, only if you trust its source"
            ) from None
    return torch.load(path, map_location="cpu", weights_only=False)


def import_published(
    ckpt: str | Path,
    hparams: str | Path,
    out_root: str | Path,
    encoder: str,
    trust_pickle: bool = False,
) -> Path:
    """Convert a published ``last.ckpt`` + ``hparams.yaml`` into ``<out_root>/<encoder>/sail/<name>/``."""
    ckpt, hparams = Path(ckpt), Path(hparams)
    for p in (ckpt, hparams):
        if not p.is_file():
            raise SailError(f"file not found: {p}")
    try:
        hp = yaml.safe_load(hparams.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise SailError(f"{hparams}: not valid YAML: {exc}") from exc
    for key in ("input_dim", "dictionary_sizes", "k_values"):
        if key not in hp:
            raise SailError(f"{hparams}: missing key '{key}'")
    raw = _load_lightning_ckpt(ckpt, trust_pickle)
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict):
        raise SailError(f"{ckpt}: no state_dict found")
    keys = {
        "W": "model.encoder.weight",
        "b_enc": "model.encoder.bias",
        "b_dec": "model.bias",
        "theta_sum": "model._threshold_sum",
        "theta_count": "model._threshold_count",
    }
    for key in keys.values():
        if key not in state:
            raise SailError(f"{ckpt}: state_dict lacks '{key}' (keys: {sorted(state)[:8]}...)")
    if "model.decoder.weight" in state:
        raise SailError(
            f"{ckpt}: untied decoder checkpoints are not supported (the published grid is tied)"
        )
    spec = SAESpec("sail", tuple(hp["dictionary_sizes"]), tuple(hp["k_values"]))
    d_in = int(hp["input_dim"])
    model = StackedSAE([spec], d_in)
    tensors = {
        ours: state[theirs]
        .detach()
        .to(torch.float32 if ours != "theta_count" else torch.int64)
        .reshape(getattr(model, ours)[0].shape)
        for ours, theirs in keys.items()
        if state[theirs].numel() == getattr(model, ours)[0].numel()
    }
    if len(tensors) != len(keys):
        bad = [theirs for ours, theirs in keys.items() if ours not in tensors]
        raise SailError(
            f"{ckpt}: tensor(s) {bad} do not match input_dim {d_in} and dictionary {spec.dict_sizes}"
        )
    model.load_model_state(0, tensors)
    saved_theta = state.get("model.inference_threshold")
    extra = {
        "encoder": encoder,
        "imported_from": {"checkpoint": str(ckpt), "hparams": str(hparams), "hparams_content": hp},
        "published_inference_threshold": float(saved_theta) if saved_theta is not None else None,
        "training": None,
        "final_metrics": None,
    }
    out_dir = Path(out_root) / encoder / "sail" / spec.published_name
    return save_sae(out_dir, model, 0, spec.published_name, extra)
