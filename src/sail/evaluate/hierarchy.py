"""Matryoshka hierarchy: the parent, in the coarser levels, of every latent of a finer level.

A Matryoshka SAE's first level must reconstruct on its own, so it learns coarse concepts ("liver");
later levels add refinements that fire on top of them ("liver lesion"). Two views of a latent's
parent among the latents of all earlier levels, both reported:

- **co-activation**: the parent that fires most strongly, relative to its usual strength, on the
  rows where the child fires: ``lift = E[a_parent | child active] / E[a_parent]``. The parent is
  chosen on one set of rows (the stage: train) and its lift, ``P(parent active | child active)``
  and base rate are reported on another (valid), so the reported lift is not inflated by the
  choice of the best of many candidates. Top-k codes fire weakly on many rows, so a bare
  ``P(parent active | child active)`` counts a faint firing like a strong one and crowns latents
  that fire on most rows; the lift asks for the parent to be *more* present with the child than
  without. A child with no earlier latent above lift 1 on the choosing rows has no co-activation
  parent (-1); a child that never fires there has none either.
- **decoder cosine**: the earlier latent whose decoder row is closest in direction (signed cos).

Ties in lift go to the larger decoder cosine.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sail.evaluate.stability import unit_rows

HIERARCHY_COLUMNS = [
    "encoder",
    "variant",
    "sae_config",
    "feature",
    "level",
    "n_active",
    "parent_coact",
    "coact_lift",
    "p_parent_given_child",
    "parent_rate",
    "parent_decoder",
    "decoder_cos",
    "parents_agree",
]
_BLOCK = 1024  # children scored together: bounds the dense (children, candidates) matrices


def level_bounds(dict_sizes: list[int], n_latents: int) -> list[tuple[int, int]]:
    """[lo, hi) latent range of each level; one level when the sizes do not describe the codes."""
    if not dict_sizes or dict_sizes[-1] != n_latents:
        return [(0, n_latents)]
    edges = [0, *dict_sizes]
    return list(pairwise(edges))


def find_parents(
    decoder_LD: np.ndarray | None,
    codes_NL: sp.spmatrix,
    dict_sizes: list[int],
    report_codes_NL: sp.spmatrix | None = None,
) -> pd.DataFrame:
    """One row per latent of level 2 and beyond: its co-activation and decoder parents.

    The co-activation parent is chosen on ``codes_NL`` and its figures (``n_active``, lift,
    conditional probability, base rate) are measured on ``report_codes_NL`` (default: the same
    rows). A latent is active where its code is > 0; without a decoder (no checkpoint) the
    decoder parent is -1 and its cosine NaN.
    """
    n_latents = codes_NL.shape[1]
    choose = _Stats.of(codes_NL)
    report = choose if report_codes_NL is None else _Stats.of(report_codes_NL)
    w = None if decoder_LD is None else unit_rows(decoder_LD)
    parts = []
    for level, (lo, hi) in enumerate(level_bounds(dict_sizes, n_latents), start=1):
        if level == 1:
            continue
        for start in range(lo, hi, _BLOCK):
            children = np.arange(start, min(start + _BLOCK, hi))
            parts.append(_block_parents(children, lo, level, choose, report, w))
    if not parts:
        return pd.DataFrame(columns=HIERARCHY_COLUMNS[3:])
    return pd.concat(parts, ignore_index=True)


@dataclass
class _Stats:
    """Held-out codes (CSC, negatives clipped), their activity pattern and per-latent summaries."""

    codes: sp.csc_matrix
    active: sp.csc_matrix
    count_L: np.ndarray  # rows where each latent fires
    mean_L: np.ndarray  # mean activation over all rows
    rate_L: np.ndarray  # share of rows where each latent fires

    @classmethod
    def of(cls, codes_NL: sp.spmatrix) -> _Stats:
        n_rows = max(codes_NL.shape[0], 1)
        codes = sp.csc_matrix(codes_NL, dtype=np.float64)
        codes.data = np.maximum(codes.data, 0)
        active = codes.copy()
        active.data = (active.data > 0).astype(np.float64)
        count = np.asarray(active.sum(axis=0)).ravel().astype(np.int64)
        mean = np.asarray(codes.sum(axis=0)).ravel() / n_rows
        return cls(codes, active, count, mean, count / n_rows)

    def lift_and_p(self, children: np.ndarray, n_candidates: int) -> tuple[np.ndarray, np.ndarray]:
        """(children, candidates) lift E[a_parent | child active] / E[a_parent] and
        P(parent active | child active); 0 where undefined."""
        child_on = self.active[:, children].T
        per_child = np.maximum(self.count_L[children], 1)[:, None]
        mean_CP = (child_on @ self.codes[:, :n_candidates]).toarray() / per_child
        p_CP = (child_on @ self.active[:, :n_candidates]).toarray() / per_child
        base = self.mean_L[:n_candidates]
        lift_CP = np.divide(mean_CP, base, out=np.zeros_like(mean_CP), where=base > 0)
        return lift_CP, p_CP


def _block_parents(
    children: np.ndarray,
    n_candidates: int,
    level: int,
    choose: _Stats,
    report: _Stats,
    w_LD: np.ndarray | None,
) -> pd.DataFrame:
    """Parents among latents [0, n_candidates) of the latents ``children`` (one level), chosen
    on ``choose`` and measured on ``report``."""
    if w_LD is None:
        cos_CP = np.zeros((children.size, n_candidates))
    else:
        cos_CP = w_LD[children] @ w_LD[:n_candidates].T
    parent_decoder = cos_CP.argmax(axis=1)
    lift_choose, p_choose = choose.lift_and_p(children, n_candidates)
    # the cosine (in [-1, 1]) only breaks ties
    parent_coact = (lift_choose + 1e-9 * cos_CP).argmax(axis=1)
    rows = np.arange(children.size)
    none = (choose.count_L[children] == 0) | (lift_choose[rows, parent_coact] <= 1)
    parent_coact = np.where(none, -1, parent_coact)
    chosen = np.maximum(parent_coact, 0)
    same = report is choose
    lift_CP, p_CP = (lift_choose, p_choose) if same else report.lift_and_p(children, n_candidates)
    n_child = report.count_L[children]
    decoder_cos = cos_CP[rows, parent_decoder]
    if w_LD is None:
        parent_decoder, decoder_cos = np.full(children.size, -1), np.full(children.size, np.nan)
    return pd.DataFrame(
        {
            "feature": children,
            "level": level,
            "n_active": n_child,
            "parent_coact": parent_coact,
            "coact_lift": np.where(none | (n_child == 0), np.nan, lift_CP[rows, chosen]),
            "p_parent_given_child": np.where(none | (n_child == 0), np.nan, p_CP[rows, chosen]),
            "parent_rate": np.where(none, np.nan, report.rate_L[chosen]),
            "parent_decoder": parent_decoder,
            "decoder_cos": decoder_cos,
            "parents_agree": (parent_coact == parent_decoder) & (parent_coact >= 0),
        }
    )


def config_hierarchy(
    ids: dict[str, str],
    decoder_LD: np.ndarray | None,
    choose_codes_NL: sp.spmatrix,
    report_codes_NL: sp.spmatrix,
    dict_sizes: list[int],
) -> pd.DataFrame:
    """hierarchy.csv rows of one SAE config (``ids``: encoder, variant, sae_config): parents
    chosen on ``choose_codes_NL`` (train), their figures measured on ``report_codes_NL``
    (valid)."""
    df = find_parents(decoder_LD, choose_codes_NL, dict_sizes, report_codes_NL)
    for k, v in reversed(list(ids.items())):
        df.insert(0, k, v)
    return df[HIERARCHY_COLUMNS]
