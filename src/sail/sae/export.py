"""``sail export-sae``: a trained SAE folder as SAELens' on-disk format or a Hugging Face folder.

SAELens (v6 on-disk format): ``cfg.json`` (architecture, d_in, d_sae, dtype, device,
apply_b_dec_to_input, normalize_activations, reshape_activations, metadata) and
``sae_weights.safetensors`` (W_enc (D, F), b_enc (F,), W_dec (F, D), b_dec (D,), and threshold
(F,) for ``jumprelu``). The variant says how it maps (``StackedSAE.saelens_weights``): matryoshka
is ``jumprelu`` with the calibrated thresholds, sail is ``standard`` with b_enc - theta.

SAIL's per-row L2 normalisation is expressed exactly with SAELens' ``constant_norm_rescale``,
which scales each row to norm sqrt(D): W_enc is divided by sqrt(D) and b_dec multiplied by it,
so the pre-activations equal SAIL's and the exported SAE takes raw embeddings; W_dec is
multiplied by sqrt(D), so SAELens' ``decode`` (which divides by the row's scale) returns
reconstructions in raw units, as ``SAE.forward`` does. The one inexactness is float rounding
(a different order of the same operations), checked by tests/sae/test_export.py.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from sail import __version__
from sail.artifacts import EXPORT_HF_SAELENS_DIR as HF_SAELENS_DIR
from sail.artifacts import EXPORT_MODEL_CARD as MODEL_CARD
from sail.artifacts import EXPORT_SAELENS_CFG as SAELENS_CFG
from sail.artifacts import EXPORT_SAELENS_WEIGHTS as SAELENS_WEIGHTS
from sail.errors import SailError
from sail.sae.api import SAE, load_sae
from sail.sae.checkpoint import CFG, METRICS, WEIGHTS
from sail.workspace import atomic_path, write_json_atomic

FORMATS = ("saelens", "hf")
SAELENS_FORMAT = "6.0.0"  # the on-disk format version these keys follow


def saelens_state(sae: SAE) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """SAELens cfg.json dict and state dict of one SAE, taking raw embeddings."""
    w = sae.stack.saelens_weights(0)
    D = sae.d_in
    if sae.input_normalization == "l2":
        norm, scale = "constant_norm_rescale", math.sqrt(D)
    else:
        norm, scale = "none", 1.0
    state = {
        "W_enc": (w.W_enc_DF / scale).contiguous(),
        "b_enc": w.b_enc_F.contiguous(),
        "W_dec": (w.W_dec_FD * scale).contiguous(),
        "b_dec": (w.b_dec_D * scale).contiguous(),
    }
    if w.threshold_F is not None:
        state["threshold"] = w.threshold_F.contiguous()
    cfg = sae.cfg
    cfg_out = {
        "architecture": w.architecture,
        "d_in": D,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": norm,
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT,
            "sae_lens_training_version": None,
            "model_name": cfg.get("encoder"),
            "hook_name": "embedding",
            "prepend_bos": False,
            "exported_by": f"sail {__version__}",
            "sail_variant": cfg.get("variant"),
            "sail_name": cfg.get("name"),
            "sail_weights_sha256": cfg.get("weights_sha256"),
            "sail_input_normalization": sae.input_normalization,
            "sail_notes": w.notes,
        },
    }
    return cfg_out, state


def export_saelens(sae: SAE, out: Path) -> Path:
    """Write ``sae`` in SAELens' on-disk format to ``out`` (atomically, file by file)."""
    cfg_out, state = saelens_state(sae)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / SAELENS_WEIGHTS) as tmp:
        save_file({k: v.cpu() for k, v in state.items()}, str(tmp))
    write_json_atomic(out / SAELENS_CFG, cfg_out)
    return out


def _card_metrics(cfg: dict[str, Any]) -> dict[str, Any]:
    final = cfg.get("final_metrics") or {}
    keep = ("split", "rows", "mode", "fvu", "r2_published", "l0", "dead_frac")
    return {k: final[k] for k in keep if k in final}


def _model_index(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Hugging Face's ``model-index``: the last level's held-out metrics of the stored codes."""
    final = _card_metrics(cfg)
    names = {"fvu": "FVU", "r2_published": "R2 (published)", "l0": "L0", "dead_frac": "dead"}
    metrics = [
        {"type": key, "value": float(final[key][-1]), "name": f"{label} (last level)"}
        for key, label in names.items()
        if final.get(key)
    ]
    if not metrics:
        return []
    dataset = {
        "name": f"{cfg.get('encoder')} embeddings ({final.get('split')} split)",
        "type": "embeddings",
    }
    task = {"type": "feature-extraction", "name": "sparse dictionary learning"}
    return [
        {
            "name": cfg.get("name"),
            "results": [{"task": task, "dataset": dataset, "metrics": metrics}],
        }
    ]


def model_card(sae: SAE) -> str:
    """README.md for the Hugging Face folder: YAML front matter, then what the SAE is and how to
    load it with SAIL or SAELens."""
    cfg = sae.cfg
    split = cfg.get("split") or {}
    front = {
        "library_name": "sail",
        "pipeline_tag": "feature-extraction",
        "tags": [
            "sparse-autoencoder",
            "sae",
            "saelens",
            "interpretability",
            "medical-imaging",
            f"sail-{cfg.get('variant')}",
        ],
        "training_data": {  # not `datasets`: that key names Hub dataset ids
            "encoder": cfg.get("encoder"),
            "embeddings_fingerprint": cfg.get("embeddings_fingerprint"),
            "split_source": split.get("source"),
            "split_counts": split.get("counts"),
        },
        "metrics": ["fvu", "r2_published", "l0", "dead_frac"],
        "model-index": _model_index(cfg),
        "sail": {
            "variant": cfg.get("variant"),
            "name": cfg.get("name"),
            "dict_sizes": cfg.get("dict_sizes"),
            "k_values": cfg.get("k_values"),
            "topk_mode": cfg.get("topk_mode"),
            "d_in": cfg.get("d_in"),
            "input_normalization": sae.input_normalization,
            "sail_version": cfg.get("sail_version"),
            "weights_sha256": cfg.get("weights_sha256"),
            "final_metrics": _card_metrics(cfg),
        },
    }
    body = f"""
# SAIL {cfg.get("variant")} SAE `{cfg.get("name")}` on `{cfg.get("encoder")}` embeddings

A Matryoshka sparse autoencoder trained with [SAIL](https://github.com/) on image embeddings of
the `{cfg.get("encoder")}` encoder: {cfg.get("d_in")} inputs, {sae.d_sae} latents (nested
dictionary sizes {cfg.get("dict_sizes")}, K {cfg.get("k_values")}, top-k mode
{cfg.get("topk_mode")}). Inputs are raw embeddings; the SAE normalises each row
({sae.input_normalization}) itself.

```python
from sail import load_sae          # this folder: model.safetensors + cfg.json
sae = load_sae(".")
codes = sae.encode(embeddings)      # (N, {cfg.get("d_in")}) raw -> (N, {sae.d_sae})
```

With SAELens: `SAE.load_from_disk("{HF_SAELENS_DIR}")` (the same encode on raw embeddings).

Held-out metrics of the stored codes are in the front matter (`model-index`: the last level;
`sail.final_metrics`: every level); `metrics.csv` has the training curve and `cfg.json` every
setting.
"""
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n" + body


def export_hf(sae: SAE, sae_dir: Path, out: Path) -> Path:
    """A folder for ``huggingface_hub.upload_folder``: SAIL's files, a SAELens copy in
    ``saelens/`` and a model card."""
    out.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS, CFG, METRICS):
        if (sae_dir / name).is_file():
            with atomic_path(out / name) as tmp:
                shutil.copyfile(sae_dir / name, tmp)
    export_saelens(sae, out / HF_SAELENS_DIR)
    with atomic_path(out / MODEL_CARD) as tmp:
        Path(tmp).write_text(model_card(sae), encoding="utf-8")
    return out


def export_sae_folder(sae_dir: str | Path, out: str | Path, fmt: str, verify: bool = True) -> Path:
    """Export the trained SAE in ``sae_dir`` to ``out`` as ``saelens`` or ``hf``."""
    if fmt not in FORMATS:
        raise SailError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    sae_dir, out = Path(sae_dir), Path(out)
    if out.resolve() == sae_dir.resolve():
        raise SailError(f"{out}: the export folder must differ from the SAE folder")
    sae = load_sae(sae_dir, verify=verify)
    if fmt == "saelens":
        return export_saelens(sae, out)
    return export_hf(sae, sae_dir, out)
