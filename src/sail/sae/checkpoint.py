"""SAE checkpoints: ``model.safetensors`` + ``cfg.json`` (+ ``metrics.csv``), and import of the
published Lightning checkpoints (``last.ckpt`` + ``hparams.yaml``) into that format.
"""

from __future__ import annotations

import hashlib
import json
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
from sail.sae.model import SAESpec, StackedSAE, variant_class
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
        "inference": model.inference_summary(m),
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


def _read_weights(
    weights: Path, cfg: dict[str, Any], verify: bool, nonfinite_ok: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """The tensors of ``weights``, after checking they are what save_sae wrote (unless not
    ``verify``)."""
    redo = "retrain it (`sail train --force`) or restore the file"
    expected = cfg.get("weights_sha256")
    if verify and expected is not None and sha256_file(weights) != expected:
        raise SailError(
            f"{weights}: content does not match the sha256 recorded in {CFG} when it was written "
            f"(the file is damaged or was replaced); {redo}, or pass --no-verify to load it anyway"
        )
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error type for every defect
        raise SailError(
            f"{weights}: not a readable safetensors file ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'empty'}); {redo}"
        ) from None
    for name, tensor in state.items():
        # weights must be finite; a variant names the tensors that may not be (its thresholds)
        if (
            name not in nonfinite_ok
            and tensor.is_floating_point()
            and not bool(torch.isfinite(tensor).all())
        ):
            raise SailError(f"{weights}: tensor '{name}' holds NaN or inf values; {redo}")
    return state


def spec_from_cfg(cfg: dict[str, Any], where: str | Path = CFG) -> SAESpec:
    """The SAESpec cfg.json describes (a SailError naming the file and key when one is missing)."""
    for key in ("variant", "dict_sizes", "k_values", "d_in"):
        if key not in cfg:
            raise SailError(f"{where}: missing key '{key}'")
    try:
        return SAESpec(
            cfg["variant"],
            tuple(cfg["dict_sizes"]),
            tuple(cfg["k_values"]),
            cfg.get("topk_mode", "per_level"),
        )
    except SailError as exc:
        raise SailError(f"{where}: {exc}") from None


def load_stack(
    sae_dir: str | Path,
    device: str | torch.device = "cpu",
    allow_stale: bool = False,
    verify: bool = True,
) -> tuple[StackedSAE, dict[str, Any]]:
    """Load a checkpoint folder as a one-model :class:`StackedSAE` (M = 1) and its cfg.json.

    The internal form the stages use (``sail.load_sae`` wraps it as a :class:`sail.SAE`). The
    variant's class may refuse a checkpoint whose fields mean something else now (unless
    ``allow_stale``). The weights must match the sha256 in cfg.json (unless not ``verify``), hold
    every tensor and be finite.
    """
    sae_dir = Path(sae_dir)
    cfg = read_cfg(sae_dir)
    weights = sae_dir / WEIGHTS
    if not weights.is_file():
        raise SailError(f"SAE weights not found: {weights}")
    spec = spec_from_cfg(cfg, sae_dir / CFG)
    cls = variant_class(spec.variant)
    cls.check_loadable(cfg, str(sae_dir / CFG), allow_stale)
    model = cls([spec], int(cfg["d_in"]))
    state = _read_weights(weights, cfg, verify, cls.nonfinite_state)
    missing = sorted(set(model.state_names) - set(state))
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
    except Exception as exc:  # any unpickling refusal ends up here
        if not trust_pickle:
            raise SailError(
                f"{path}: cannot be read with torch.load(weights_only=True) "
                f"({type(exc).__name__}); "
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
    """Convert a published ``last.ckpt`` + ``hparams.yaml`` into
    ``<out_root>/<encoder>/sail/<name>/``."""
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
            f"{ckpt}: tensor(s) {bad} do not match input_dim {d_in} and dictionary "
            f"{spec.dict_sizes}"
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
