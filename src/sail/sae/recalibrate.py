"""``sail train --recalibrate``: recompute what training derives after the last step (matryoshka
thresholds and the final metrics of the stored codes) for existing checkpoints, without retraining.

A fix to the calibration rule (artifact semantics 2) changes what stored codes mean; retraining
the paper grid would throw GPU hours away when only the thresholds and metrics must change.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from sail.config import SailConfig, TrainingSettings
from sail.console import track
from sail.sae.checkpoint import METRIC_COLUMNS, METRICS, WEIGHTS, load_stack, save_sae
from sail.sae.grid import GridEntry
from sail.sae.model import variant_class
from sail.sae.train import (
    EmbeddingData,
    Meter,
    Runtime,
    _calibration_rows,
    _evaluate,
    _held_out,
    _rows,
    calibrate_step,
    to_device_normalized,
)
from sail.workspace import StageRecord, Workspace, hash_config, mark_done

log = logging.getLogger(__name__)


def recalibrate_encoder(
    cfg: SailConfig, ws: Workspace, data: EmbeddingData, entries: list[GridEntry]
) -> list[Path]:
    """Recalibrate every entry that has a checkpoint; entries without one are listed and skipped."""
    rt = Runtime.from_config(cfg.train)
    train_rows = data.rows("train")
    x_train = to_device_normalized(data.x_ND[train_rows], rt.device)
    x_valid = to_device_normalized(data.x_ND[data.rows("valid")], rt.device)
    done = []
    for e in track(entries, f"recalibrate {data.encoder}"):
        sae_dir = ws.sae_dir(data.encoder, e.spec.variant, e.name)
        if not (sae_dir / WEIGHTS).is_file():
            log.warning("%s: no checkpoint to recalibrate; train it without --recalibrate", sae_dir)
            continue
        model, old_cfg = load_stack(sae_dir, rt.device, allow_stale=True)
        held, calib_info = _calibration_rows(
            e, data.slice_ids[train_rows]
        )  # no copy of the rows trained on
        x_calib = None if held is None else x_train[torch.from_numpy(held).to(x_train.device)]
        trained_on_all = old_cfg.get("calibration", {}).get("held_out") is not True
        if x_calib is not None and trained_on_all:
            log.warning(
                "%s was trained on every training row: its calibration rows are not held out",
                sae_dir,
            )
        ran = _settings_that_ran(old_cfg, e)
        calibration = calibrate_step(model, [e.name], x_calib, x_train, ran.batch_size)
        held_split, x_held = _held_out(x_valid, x_calib, x_train)
        meter = Meter(model.n_levels, 1, model.d_in, rt.device)
        dead_MF = _evaluate(model, x_held, min(ran.batch_size, x_held.shape[0]), "inference", meter)
        steps = int((old_cfg.get("final_metrics") or {}).get("steps") or 0)
        rows: list[list[dict]] = [[]]
        final = _rows(
            meter, model, steps, ran.epochs, held_split, dead_MF, float("nan"), rows, "inference"
        )
        extra = _cfg_extra(old_cfg, held_split, x_held.shape[0], final, steps)
        if calibration is not None:
            extra["calibration"] = {
                **calib_info,
                **calibration[0],
                "held_out": calibration[0]["held_out"] and not trained_on_all,
                "recalibrated": True,
            }
        metrics = pd.concat(
            [_training_rows(sae_dir / METRICS, e, ran.epochs), pd.DataFrame(rows[0])],
            ignore_index=True,
        )
        save_sae(sae_dir, model, 0, e.name, extra, metrics[METRIC_COLUMNS])
        mark_done(
            sae_dir / WEIGHTS,
            StageRecord("train", hash_config(e.record_config()), data.inputs),
            {"final": extra["final_metrics"], "recalibrated": True},
        )
        log.info(
            "%s/%s/%s: recalibrated (final L0 %.1f on %s)",
            data.encoder,
            e.spec.variant,
            e.name,
            extra["final_metrics"]["l0"][-1],
            held_split,
        )
        done.append(sae_dir)
    return done


def _cfg_extra(
    old_cfg: dict[str, Any], split: str, n_rows: int, final: dict, steps: int
) -> dict[str, Any]:
    """cfg.json keys to keep from the old file, with the new final metrics and semantics."""
    own = {
        "schema_version",
        "sail_version",
        "git_commit",
        "name",
        "published_name",
        "variant",
        "dict_sizes",
        "k_values",
        "topk_mode",
        "d_in",
        "input_normalization",
        "inference",
        "calibration",
        "artifact_semantics",
    }
    extra = {k: v for k, v in old_cfg.items() if k not in own}
    extra["final_metrics"] = {
        "split": split,
        "rows": int(n_rows),
        "mode": "inference",
        "fvu": final["fvu"][:, 0].tolist(),
        "r2_published": final["r2_published"][:, 0].tolist(),
        "l0": final["l0"][:, 0].tolist(),
        "dead_frac": final["dead_frac"][:, 0].tolist(),
        "dead_frac_source": "stored codes",
        "steps": steps,
    }
    return extra


def _settings_that_ran(old_cfg: dict[str, Any], entry: GridEntry) -> TrainingSettings:
    """The resolved settings cfg.json recorded (the recipe picks epochs from the data size)."""
    recorded = old_cfg.get("training")
    return TrainingSettings.model_validate(recorded) if recorded else entry.settings


def _training_rows(path: Path, entry: GridEntry, epochs: int) -> pd.DataFrame:
    """metrics.csv without its old final rows (epoch == epochs), with the ``mode`` column filled
    in."""
    df = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=METRIC_COLUMNS)
    if "mode" not in df.columns:
        published = variant_class(entry.spec.variant).validation_mode == "published"
        df["mode"] = [
            "published" if s != "train" and published else "batchtopk" for s in df["split"]
        ]
    return df[df["epoch"] < epochs].reindex(columns=METRIC_COLUMNS)
