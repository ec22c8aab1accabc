"""Spatial grounding: which structure a feature's maps point at, and how often, against a null.

Pure functions over arrays (the maps stage loads them; docs/spatial_maps.md defines the numbers):

- the structure is chosen on the TRAIN top slices: maps upsampled bilinearly to the label maps'
  resolution, positive map mass summed inside each structure's mask; the structure with the most
  mass wins (background never does) and its share of all positive mass is reported;
- the pointing game is scored on the VALID top slices: a hit when the peak pixel of the upsampled
  map lies inside that structure's mask;
- the null keeps each map and its peak but reads the label map of another valid slice of the same
  modality x plane (seeded draws, averaged): how often the peak would land in the structure by the
  anatomy's layout alone.

Label maps here hold global structure indices (0 = background), one shape for all slices.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def upsample(maps_Nhw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Grid maps -> (N, H, W) float32 at the label maps' resolution (bilinear, half-pixel centres,
    as the encoder's own resize)."""
    x = torch.as_tensor(np.asarray(maps_Nhw, dtype=np.float32))[:, None]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)[:, 0].numpy()


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


def peak_pixels(maps_Nhw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Flat pixel index, at resolution ``size``, of each map's peak after bilinear upsampling.

    A bilinear map (half-pixel centres) is a convex blend of neighbouring cells, so its maximum is
    the largest cell's value, reached at that cell's centre; towards the border it is a plateau,
    and a plain argmax of the upsampled image would pick the plateau's first pixel (the image
    edge, mostly background). The peak is therefore the pixel under the centre of the largest
    cell (ties: the first cell in row-major order).
    """
    N, h, w = np.shape(maps_Nhw)
    H, W = size
    cell = np.asarray(maps_Nhw, dtype=np.float32).reshape(N, -1).argmax(axis=1)
    y = np.clip(np.floor((cell // w + 0.5) * H / h), 0, H - 1).astype(np.int64)
    x = np.clip(np.floor((cell % w + 0.5) * W / w), 0, W - 1).astype(np.int64)
    return y * W + x


def labels_at(labels_PHW: np.ndarray, rows: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """``labels_PHW[rows, pixel]`` for broadcast ``rows`` and flat ``pixels``; -1 where a row is
    -1 (no slice to draw)."""
    flat = labels_PHW.reshape(len(labels_PHW), -1)
    out = flat[np.maximum(rows, 0), np.broadcast_to(pixels, np.shape(rows))].astype(np.int64)
    return np.where(rows >= 0, out, -1)


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
    peak_labels_T: np.ndarray, null_labels_TR: np.ndarray, label: int
) -> tuple[float, float]:
    """(hit rate, null hit rate) of ``label``: the share of peaks inside it, and the same over the
    drawn label maps (slices without a draw left out of the null); nan when there is nothing."""
    if label <= 0 or len(peak_labels_T) == 0:
        return float("nan"), float("nan")
    hit = float(np.mean(peak_labels_T == label))
    drawn = null_labels_TR >= 0
    null = float(np.mean(null_labels_TR[drawn] == label)) if drawn.any() else float("nan")
    return hit, null
