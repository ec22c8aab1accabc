"""Seed stability: do a config's features come back when it is trained again with another seed?

``train.seeds`` trains replicates of a config in ``<config>/seed-<n>/`` that differ only in the
seed (initialisation, batch order, calibration volumes). Each replicate's decoder rows (the tied W
for ``sail``) are matched one-to-one to the config's own model by the Hungarian assignment (scipy
``linear_sum_assignment``) on |cos|; a latent of the config's model is *stable* against a
replicate when its match has |cos| >= ``STABLE_COS``. Replicates are compared with the config's
own model (the one ranked and interpreted), not with each other: the question a reader of the
report asks is whether the feature they look at would reappear.
"""

from __future__ import annotations

import logging
from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from sail.errors import SailError
from sail.workspace import Workspace

log = logging.getLogger(__name__)

STABLE_COS = 0.9
STABILITY_COLUMNS = [
    "encoder",
    "variant",
    "sae_config",
    "n_seeds",
    "seeds",
    "n_latents",
    "matched_share",
    "matched_share_all_seeds",
    "mean_matched_cos",
    "matched_share_by_level",
]


def unit_rows(a_LD: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm (float64; a zero row stays zero)."""
    a = a_LD.astype(np.float64)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def matched_cos(reference_LD: np.ndarray, other_LD: np.ndarray) -> np.ndarray:
    """|cos| of each reference row with the row of ``other`` the Hungarian assignment on |cos| gives
    it (one-to-one); 0 for a reference row left without a partner (``other`` smaller)."""
    cos = np.abs(unit_rows(reference_LD) @ unit_rows(other_LD).T)
    rows, cols = linear_sum_assignment(cos, maximize=True)
    out = np.zeros(reference_LD.shape[0])
    out[rows] = cos[rows, cols]
    return out


def stability_summary(
    reference_LD: np.ndarray, replicates: list[np.ndarray], dict_sizes: list[int]
) -> dict[str, object]:
    """Stable shares of the reference model's latents against each replicate, averaged over them.

    ``matched_share``: mean over replicates of the share of latents matched at |cos| >=
    STABLE_COS; ``matched_share_all_seeds``: share matched in every replicate; ``mean_matched_cos``:
    mean matched |cos|; ``matched_share_by_level``: ``matched_share`` per Matryoshka level
    (latents [0, s_1), [s_1, s_2), ...), ';'-joined, coarse to fine.
    """
    n = reference_LD.shape[0]
    if not replicates:
        return {
            "n_latents": n,
            "matched_share": np.nan,
            "matched_share_all_seeds": np.nan,
            "mean_matched_cos": np.nan,
            "matched_share_by_level": "",
        }
    cos_RL = np.stack([matched_cos(reference_LD, w) for w in replicates])
    stable_RL = cos_RL >= STABLE_COS
    bounds = [0, *dict_sizes] if dict_sizes and dict_sizes[-1] == n else [0, n]
    by_level = [stable_RL[:, lo:hi].mean() for lo, hi in pairwise(bounds)]
    return {
        "n_latents": n,
        "matched_share": float(stable_RL.mean()),
        "matched_share_all_seeds": float(stable_RL.all(axis=0).mean()),
        "mean_matched_cos": float(cos_RL.mean()),
        "matched_share_by_level": ";".join(f"{v:.3f}" for v in by_level),
    }


def load_decoder(sae_dir: Path) -> tuple[np.ndarray, int | None]:
    """(latents, d) decoder rows of a checkpoint (the tied W for ``sail``, W_dec for matryoshka)
    and the seed it was trained with (None for a checkpoint that does not record one)."""
    from sail.sae.checkpoint import load_stack

    model, cfg = load_stack(sae_dir)
    seed = (cfg.get("training") or {}).get("seed")
    return model.W_decoder[0].detach().float().cpu().numpy(), seed


def config_stability(
    ws: Workspace,
    encoder: str,
    variant: str,
    config: str,
    dict_sizes: list[int],
) -> pd.DataFrame:
    """One stability.csv row for a config: its own model against its trained replicates.

    A replicate whose checkpoint cannot be read, or whose dictionary differs in shape, is left out
    with a warning and not counted in ``n_seeds``.
    """
    ids = {"encoder": encoder, "variant": variant, "sae_config": config}
    try:
        reference, main_seed = load_decoder(ws.sae_dir(encoder, variant, config))
    except SailError as exc:
        log.warning("%s/%s/%s: no stability figures (%s)", encoder, variant, config, exc)
        return pd.DataFrame([{**ids, "n_seeds": 0}], columns=STABILITY_COLUMNS)
    seeds, replicates = [main_seed], []
    for seed, folder in ws.replicate_dirs(encoder, variant, config).items():
        try:
            w, _ = load_decoder(folder)
        except SailError as exc:
            log.warning("%s: replicate left out of the stability figures (%s)", folder, exc)
            continue
        if w.shape != reference.shape:
            log.warning(
                "%s: decoder %s differs from its config's %s; left out of the stability figures",
                folder,
                w.shape,
                reference.shape,
            )
            continue
        seeds.append(seed)
        replicates.append(w)
    row = {
        **ids,
        "n_seeds": len(seeds),
        "seeds": ";".join("?" if s is None else str(s) for s in seeds),
        **stability_summary(reference, replicates, dict_sizes),
    }
    return pd.DataFrame([row], columns=STABILITY_COLUMNS)
