"""Spatial grounding: which structure a feature's maps point at, and how often, against a null.

Pure functions over arrays (the maps stage loads them; docs/spatial_maps.md defines the numbers):

- the structure is chosen on the TRAIN top slices: maps upsampled bilinearly to the label maps'
  resolution, positive map mass summed inside each structure's mask; the structure with the most
  mass wins (background never does) and its share of all positive mass is reported;
- the pointing game is scored on the VALID top slices: a hit when the image region covered by the
  map's peak cell (its footprint) holds that structure (see :func:`cell_presence`);
- the null keeps each map and its peak cell but reads the label map of another valid slice of
  the same modality x plane (seeded draws, averaged): how often the peak would land in the
  structure by the anatomy's layout alone.

Label maps here hold global structure indices (0 = background), one shape for all slices.
"""

from __future__ import annotations

import numpy as np


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of 1-D bilinear resampling with cell centres aligned and edges
    clamped (``align_corners=False``, as the encoder's own resize): output pixel o samples input
    coordinate (o + 0.5) * n_in / n_out - 0.5."""
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    A = np.zeros((n_out, n_in))
    np.add.at(A, (np.arange(n_out), lo), 1 - frac)
    np.add.at(A, (np.arange(n_out), hi), frac)
    return A


def upsample(maps_Nhw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Grid maps -> (N, H, W) float32 by bilinear upsampling (separable: two batched matmuls).
    The one rule for grounding and for the report's overlays."""
    _, h, w = np.shape(maps_Nhw)
    rows_Hh = bilinear_matrix(h, size[0]).astype(np.float32)
    cols_wW = bilinear_matrix(w, size[1]).T.astype(np.float32)
    return rows_Hh @ np.asarray(maps_Nhw, np.float32) @ cols_wW


def positive_mass(up_NHW: np.ndarray, labels_NHW: np.ndarray, n_labels: int) -> np.ndarray:
    """(N, n_labels) sum of the positive map values inside each label (column 0: background)."""
    N = len(up_NHW)
    index = labels_NHW.reshape(N, -1).astype(np.int64) + n_labels * np.arange(N)[:, None]
    weights = np.maximum(up_NHW.reshape(N, -1), 0).astype(np.float64)
    mass = np.bincount(index.ravel(), weights=weights.ravel(), minlength=N * n_labels)
    return mass.reshape(N, n_labels)


def choose_structure(mass_NL: np.ndarray) -> tuple[int, float]:
    """The structure (label > 0) with the most positive mass over the slices, and its share of
    all positive mass (background included); (0, nan) when no structure holds any."""
    total_L = mass_NL.sum(0)
    if total_L.sum() <= 0 or total_L[1:].max(initial=0) <= 0:
        return 0, float("nan")
    label = 1 + int(np.argmax(total_L[1:]))
    return label, float(total_L[label] / total_L.sum())


def peak_cells(maps_Nhw: np.ndarray) -> np.ndarray:
    """Flat grid index of each map's largest cell (ties: the first in row-major order).

    A bilinear upsampling of a grid map is a convex blend of neighbouring cells, so its maximum is
    the largest cell's value at that cell's centre: the map's peak is a cell, never finer.
    """
    N = len(maps_Nhw)
    return np.asarray(maps_Nhw, dtype=np.float32).reshape(N, -1).argmax(axis=1)


def cell_presence(labels_NHW: np.ndarray, grid: tuple[int, int], n_labels: int) -> np.ndarray:
    """(N, h*w, n_labels) bool: which labels occur in the image region each grid cell covers.

    The encoder's grid tiles the image into h x w equal regions (pixel row y belongs to cell row
    ``y * h // H``), the footprint of each map cell. The pointing game asks whether the peak
    cell's footprint holds the structure: a grid map cannot place its peak more finely than one
    cell (the classic pointing game allows a 15-pixel tolerance for the same reason), and a
    point-in-mask test at the cell centre would miss every structure smaller than a cell.
    """
    N, H, W = labels_NHW.shape
    h, w = grid
    cell_HW = (np.arange(H) * h // H)[:, None] * w + (np.arange(W) * w // W)[None, :]
    index = (np.arange(N)[:, None] * (h * w) + cell_HW.reshape(1, -1)) * n_labels
    index = index + labels_NHW.reshape(N, -1).astype(np.int64)
    counts = np.bincount(index.ravel(), minlength=N * h * w * n_labels)
    return counts.reshape(N, h * w, n_labels) > 0


def draw_null(
    groups_T: np.ndarray,
    self_T: np.ndarray,
    pool_groups_P: np.ndarray,
    n_draws: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """(T, n_draws) pool rows drawn uniformly from each slice's group, never the slice itself
    (``self_T``: its pool row, -1 if absent); -1 where the group holds no other slice."""
    order = np.argsort(pool_groups_P, kind="stable")
    sorted_groups = pool_groups_P[order]
    start = np.searchsorted(sorted_groups, groups_T, side="left")
    size = np.searchsorted(sorted_groups, groups_T, side="right") - start
    rank_of = np.empty(len(order), dtype=np.int64)
    rank_of[order] = np.arange(len(order))
    self_rank = np.where(self_T >= 0, rank_of[np.maximum(self_T, 0)] - start, -1)
    n_other = size - (self_rank >= 0)
    u = rng.random((len(groups_T), n_draws))
    pick = np.floor(u * np.maximum(n_other, 1)[:, None]).astype(np.int64)
    pick += (self_rank[:, None] >= 0) & (pick >= self_rank[:, None])  # step over the slice itself
    rows = order[np.minimum(start[:, None] + pick, len(order) - 1)] if len(order) else pick
    return np.where(n_other[:, None] > 0, rows, -1)


def pointing(
    presence_PCL: np.ndarray,
    rows_T: np.ndarray,
    cells_T: np.ndarray,
    null_rows_TR: np.ndarray,
    labels: np.ndarray,
) -> tuple[float, float]:
    """(hit rate, null hit rate) of a structure (``labels``: its indices, several for a structure
    a label map holds in parts): the share of the slices (``rows_T``, positions in
    ``presence_PCL``) whose peak cell's footprint holds it, and the same peak cells read on the
    drawn slices (``null_rows_TR``; -1 = no draw, left out); nan when there is nothing."""
    labels = np.atleast_1d(np.asarray(labels, dtype=np.int64))
    if len(labels) == 0 or len(rows_T) == 0:
        return float("nan"), float("nan")
    holds_PC = presence_PCL[:, :, labels].any(axis=-1)
    hit = float(holds_PC[rows_T, cells_T].mean())
    drawn = null_rows_TR >= 0
    if not drawn.any():
        return hit, float("nan")
    cells_TR = np.broadcast_to(cells_T[:, None], null_rows_TR.shape)
    return hit, float(holds_PC[null_rows_TR[drawn], cells_TR[drawn]].mean())
