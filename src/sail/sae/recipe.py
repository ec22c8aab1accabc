"""Training recipes: the settings a run uses when the user does not give them.

``published`` is the paper's recipe (reference/spec_sae.md §3.1): Adam at 1e-4, linear warmup over
min(1000, steps / 10) steps from 0.1x, cosine decay to 1e-6, gradient clipping at 0.5, 100 epochs.
It was tuned for 900k rows at batch 2048 (39k steps); on 10k-100k rows the cosine has decayed the
learning rate to nothing long before the dictionary is learned (issue 14: 0% of planted features
recovered where lr 1e-3 recovers 99%).

``auto`` (the default for ``matryoshka``) picks, from the dictionary size D, the training rows N
and the batch B (B = min(batch_size, N)):

- **lr = 0.032 / sqrt(D)** (1e-3 at D = 1024, 3.5e-4 at D = 8192). Gao et al. 2024, "Scaling and
  evaluating sparse autoencoders" (§2.3, appendix A), find the best Adam learning rate of a TopK
  SAE falls roughly as 1 / sqrt(number of latents); the constant is set on the ground-truth
  benchmark (``benchmarks/ground_truth.py``, docs/benchmarks.md).
- **schedule ``constant``**: linear warmup over 5% of the steps (at most 1000), then constant, then
  a linear decay to 0 over the last 20% of the steps (warmup-stable-decay; Hägele et al. 2024,
  "Scaling laws and compute-optimal training beyond fixed training durations", show a short
  linear cool-down matches a full cosine while the learning rate stays useful for most of the run).
- **no gradient clipping**: inputs are L2-normalised and Adam's step is already bounded by the
  learning rate; clipping at 0.5 slows learning without a stability benefit on this data.
- **epochs**: enough for at least ``MIN_STEPS`` optimizer steps, at most ``MAX_EPOCHS``
  (a dictionary needs thousands of Adam steps, however small the data; large data needs few
  passes). At the paper's 800k rows and batch 2048 this is 13 epochs instead of 100.

Explicitly given settings override the recipe key by key (``TrainingSettings.model_fields_set``).
The ``sail`` variant keeps ``published`` unless the recipe is named, because it exists to reproduce
the paper. Folder names are computed against the published settings (see ``sail.sae.grid``).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from sail.config import TrainingSettings

log = logging.getLogger(__name__)

LR_SCALE = 0.032  # lr = LR_SCALE / sqrt(D)
MIN_STEPS = 5000
MAX_EPOCHS = 100
WARMUP_FRACTION = 0.05
MAX_WARMUP = 1000
DECAY_FRACTION = 0.2  # the ``constant`` schedule's linear tail
# Convergence check: at most this share of the run's FVU decrease may happen between 60% and
# 80% of its steps.
LATE_WINDOW = (0.6, 0.8)
MAX_LATE_DROP = 0.1


def effective_recipe(settings: TrainingSettings, variant: str) -> str:
    """The named recipe, else the variant's default (``published`` for ``sail``, for paper
    parity; ``auto`` otherwise)."""
    if settings.recipe is not None:
        return settings.recipe
    from sail.sae.model import variant_class

    return variant_class(variant).default_recipe


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    return max(1, math.ceil(n_train / max(1, min(batch_size, n_train))))


def auto_values(
    n_train: int, dict_size: int, batch_size: int, epochs: int | None = None
) -> dict[str, Any]:
    """The ``auto`` recipe's epochs, lr, lr_min, warmup, clipping and schedule for this shape
    (warmup from the given ``epochs`` when the user set them)."""
    per_epoch = steps_per_epoch(n_train, batch_size)
    if epochs is None:
        epochs = min(MAX_EPOCHS, max(1, math.ceil(MIN_STEPS / per_epoch)))
    total = epochs * per_epoch
    return {
        "epochs": epochs,
        "lr": LR_SCALE / math.sqrt(dict_size),
        "lr_min": 0.0,
        "warmup_steps": min(MAX_WARMUP, max(1, round(WARMUP_FRACTION * total))),
        "clip_norm": None,
        "schedule": "constant",
    }


def resolve(
    settings: TrainingSettings, variant: str, n_train: int, dict_size: int
) -> TrainingSettings:
    """Concrete settings for one family: the recipe's values where the user gave none.

    The result names its recipe and has a concrete warmup, so cfg.json records what ran.
    """
    recipe = effective_recipe(settings, variant)
    values = settings.model_dump()
    if recipe == "auto":
        explicit = settings.model_fields_set
        given_epochs = settings.epochs if "epochs" in explicit else None
        auto = auto_values(n_train, dict_size, settings.batch_size, given_epochs)
        values.update({k: v for k, v in auto.items() if k not in explicit})
    elif values["warmup_steps"] is None:
        values["warmup_steps"] = min(
            1000, values["epochs"] * steps_per_epoch(n_train, settings.batch_size) // 10
        )
    values["recipe"] = recipe
    return TrainingSettings.model_validate(values)


def lr_at(step: int, total: int, settings: TrainingSettings) -> float:
    """Learning rate at an optimizer step of a run of ``total`` steps.

    ``cosine`` (published): linear warmup from 0.1x, then cosine to lr_min. ``constant``: linear
    warmup from 0.1x, constant, then linear decay to lr_min over the last ``DECAY_FRACTION``.
    """
    warmup = settings.warmup_steps if settings.warmup_steps is not None else min(1000, total // 10)
    base = settings.lr
    if step < warmup:
        return base * (0.1 + 0.9 * step / warmup)
    if settings.schedule == "constant":
        tail = max(1, round(DECAY_FRACTION * total))
        left = total - step
        if left >= tail:
            return base
        return settings.lr_min + (base - settings.lr_min) * max(left, 0) / tail
    span = max(total - warmup, 1)
    t = min(step - warmup, span)
    return settings.lr_min + (base - settings.lr_min) * (1 + math.cos(math.pi * t / span)) / 2


def late_fvu_drop(steps: list[int], fvu: list[float]) -> float | None:
    """Share of the run's train-FVU decrease that happened between 60% and 80% of its steps.

    A converged run has made nearly all its progress by then (a share near 0); a run that is still
    learning at a steady pace makes about a fifth of it there. The window ends before the
    ``constant`` schedule's decay tail, whose annealing gain is expected. None: too few log points
    or no decrease at all.
    """
    if len(steps) < 3 or steps[-1] <= 0:
        return None
    steps_a = np.asarray(steps, dtype=float)
    lo = np.flatnonzero(steps_a <= LATE_WINDOW[0] * steps_a[-1])
    hi = np.flatnonzero(steps_a <= LATE_WINDOW[1] * steps_a[-1])
    total = fvu[0] - fvu[-1]
    if lo.size == 0 or hi[-1] == lo[-1] or total <= 0:
        return None
    return float((fvu[lo[-1]] - fvu[hi[-1]]) / total)


def warn_if_unconverged(names: list[str], metrics: list[Any]) -> list[str]:
    """Log a warning for each model whose last-level train FVU still falls fast late in the run.

    ``metrics`` are the members' metrics tables (metrics.csv columns). Returns the names warned.
    """
    warned = []
    for name, table in zip(names, metrics, strict=False):
        train = table[table["split"] == "train"]
        if train.empty:
            continue
        last = train[train["level"] == train["level"].max()]
        drop = late_fvu_drop(last["step"].tolist(), last["fvu"].tolist())
        if drop is not None and drop > MAX_LATE_DROP:
            log.warning(
                "%s: %.0f%% of the training FVU decrease came between 60%% and 80%% of the steps; "
                "the run is probably "
                "too short to converge: give more epochs (training.epochs) or use "
                "training.recipe: auto",
                name,
                100 * drop,
            )
            warned.append(name)
    return warned
