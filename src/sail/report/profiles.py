"""Volume profiles: where along a volume a feature fires.

A slice-level feature says nothing about where in the body it fires; laid out along the slices of
one volume (in the order of the plane's normal, ``slice_position_mm``), its activations do. A
feature page shows a strip per volume of its top tiles (each in the plane of its top slice, the top
slice marked); a volume page shows every reported feature of a config along that volume's slices.
Profiles describe, they do not score, so every split's slices are used.

The SVGs are plain numbers and escaped text, built here and marked safe by the templates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from markupsafe import escape

FILL = "#3b6ea8"
MARK = "#d0342c"


@dataclass(frozen=True)
class VolumeAxes:
    """The slices of every (volume, plane), in order along the plane's normal.

    ``order[start[g]:start[g + 1]]`` are the rows (of the slices table) of group ``g``, sorted by
    ``position``: ``slice_position_mm`` where the whole group has it, else ``slice_idx``
    (``in_mm[g]`` says which)."""

    group: np.ndarray  # per row: group id
    order: np.ndarray  # rows sorted by (group, position)
    start: np.ndarray  # n_groups + 1 offsets into order
    position: np.ndarray  # per row
    in_mm: np.ndarray  # per group
    keys: dict[tuple[int, str], int]  # (volume code, plane) -> group id
    planes: dict[int, list[str]]  # volume code -> its planes, sorted

    def rows(self, volume: int, plane: str) -> np.ndarray:
        g = self.keys[(int(volume), str(plane))]
        return self.order[self.start[g] : self.start[g + 1]]

    def unit(self, volume: int, plane: str) -> str:
        return "mm" if self.in_mm[self.keys[(int(volume), str(plane))]] else "slice"


def volume_axes(slices: pd.DataFrame, volume: np.ndarray) -> VolumeAxes:
    """Group the slices by (volume, plane) and sort each group along its normal (vectorised)."""
    plane = slices["plane"].astype(str).to_numpy()
    group, uniques = pd.MultiIndex.from_arrays([volume, plane]).factorize()
    n_groups = len(uniques)
    idx = slices["slice_idx"].to_numpy(dtype=float)
    mm = (
        slices["slice_position_mm"].to_numpy(dtype=float)
        if "slice_position_mm" in slices.columns
        else np.full(len(slices), np.nan)
    )
    finite = np.bincount(group, weights=np.isfinite(mm), minlength=n_groups)
    in_mm = finite == np.bincount(group, minlength=n_groups)
    position = np.where(in_mm[group], mm, idx)
    order = np.lexsort((position, group))
    start = np.searchsorted(group[order], np.arange(n_groups + 1))
    keys = {(int(v), str(p)): g for g, (v, p) in enumerate(uniques)}
    planes: dict[int, list[str]] = {}
    for v, p in sorted(keys):
        planes.setdefault(v, []).append(p)
    return VolumeAxes(group, order, start, position, in_mm, keys, planes)


def cell_edges(position: np.ndarray) -> np.ndarray:
    """Edges of one cell per (sorted) slice: midpoints between neighbours, the ends extended by
    half the neighbouring gap (half a unit for a lone slice). Uneven sampling stays honest."""
    if len(position) == 1:
        return np.array([position[0] - 0.5, position[0] + 0.5])
    mid = (position[1:] + position[:-1]) / 2
    first = position[0] - (mid[0] - position[0])
    last = position[-1] + (position[-1] - mid[-1])
    return np.concatenate([[first], mid, [last]])


def column(csc: sp.csc_matrix, feature: int, n_rows: int) -> np.ndarray:
    """One feature's activations over every row, dense."""
    out = np.zeros(n_rows, np.float32)
    lo, hi = csc.indptr[feature], csc.indptr[feature + 1]
    out[csc.indices[lo:hi]] = csc.data[lo:hi]
    return out


@dataclass
class ProfileRow:
    """One volume's strip: sorted positions, the feature's values there, the marked (top) slice."""

    label: str
    href: str
    position: np.ndarray
    value: np.ndarray
    marked: int
    unit: str
    slice_idx: np.ndarray


def _fmt(v: float) -> str:
    return f"{v:.1f}"


def strip_svg(rows: list[ProfileRow], vmax: float, width: int = 360, row_h: int = 22) -> str:
    """Small multiples: a strip per volume, one cell per slice along the normal; cell opacity is
    the activation over ``vmax`` (the feature's maximum over all slices), the top slice outlined
    in red. Each row spans its own volume's extent, labelled at both ends."""
    if not rows:
        return ""
    label_w, range_w = 150, 110
    total_w = label_w + width + range_w
    parts = []
    for i, row in enumerate(rows):
        y = i * row_h + 3
        h = row_h - 8
        edges = cell_edges(row.position)
        lo, hi = float(edges[0]), float(edges[-1])
        scale = width / max(hi - lo, 1e-9)
        x0 = label_w + (edges[:-1] - lo) * scale
        w = np.maximum(np.diff(edges) * scale, 0.5)
        parts.append(
            f'<a href="{escape(row.href)}"><text x="0" y="{y + h - 2}" font-size="11">'
            f"{escape(row.label)}</text></a>"
            f'<rect x="{label_w}" y="{y}" width="{width}" height="{h}" fill="#eef1f5"/>'
        )
        on = np.flatnonzero(row.value > 0)
        opacity = np.clip(row.value[on] / max(vmax, 1e-12), 0.08, 1.0)
        parts.extend(
            f'<rect x="{x0[j]:.1f}" y="{y}" width="{w[j]:.1f}" height="{h}" fill="{FILL}" '
            f'fill-opacity="{a:.2f}"><title>slice {int(row.slice_idx[j])} · '
            f"{_fmt(row.position[j])} {row.unit} · {row.value[j]:.3g}</title></rect>"
            for j, a in zip(on, opacity, strict=True)
        )
        m = row.marked
        parts.append(
            f'<rect class="top-slice" x="{x0[m]:.1f}" y="{y - 2}" width="{max(w[m], 2):.1f}" '
            f'height="{h + 4}" fill="none" stroke="{MARK}" stroke-width="1.5"><title>top slice '
            f"{int(row.slice_idx[m])} · {_fmt(row.position[m])} {row.unit} · "
            f"{row.value[m]:.3g}</title></rect>"
            f'<text x="{label_w + width + 6}" y="{y + h - 2}" font-size="10" fill="#6e6e73">'
            f"{_fmt(row.position[0])} … {_fmt(row.position[-1])} {row.unit}</text>"
        )
    height = len(rows) * row_h
    return (
        f'<svg class="profile" width="{total_w}" height="{height}" '
        f'viewBox="0 0 {total_w} {height}" role="img">{"".join(parts)}</svg>'
    )


@dataclass
class HeatmapFeature:
    feature: int
    href: str
    label: str


def heatmap_svg(
    position: np.ndarray,
    slice_idx: np.ndarray,
    values_SF: np.ndarray,
    features: list[HeatmapFeature],
    vmax_F: np.ndarray,
    unit: str,
    width: int = 560,
    row_h: int = 13,
) -> tuple[str, np.ndarray]:
    """Reported features (rows) along one volume's slices (columns, sorted by ``position``): a
    cell per nonzero activation, opacity relative to the feature's own maximum over all slices.
    Rows that never fire here are left out; the rest are sorted by their activation-weighted
    mean position, so the diagonal reads top-to-bottom as "where along the volume". Returns the
    SVG and the feature order (indices into ``features``)."""
    mass = values_SF.sum(axis=0)
    fires = np.flatnonzero(mass > 0)
    if not len(fires):
        return "", fires
    centre = (position @ values_SF[:, fires]) / mass[fires]
    rows = fires[np.lexsort((fires, centre))]
    edges = cell_edges(position)
    lo, hi = float(edges[0]), float(edges[-1])
    scale = width / max(hi - lo, 1e-9)
    x0 = 70 + (edges[:-1] - lo) * scale
    w = np.maximum(np.diff(edges) * scale, 0.5)
    parts = []
    for i, j in enumerate(rows):
        y = i * row_h
        feat = features[j]
        parts.append(
            f'<a href="{escape(feat.href)}"><text x="0" y="{y + row_h - 3}" font-size="10">'
            f"#{feat.feature}<title>{escape(feat.label)}</title></text></a>"
        )
        on = np.flatnonzero(values_SF[:, j] > 0)
        opacity = np.clip(values_SF[on, j] / max(float(vmax_F[j]), 1e-12), 0.08, 1.0)
        parts.extend(
            f'<rect x="{x0[s]:.1f}" y="{y + 1}" width="{w[s]:.1f}" height="{row_h - 2}" '
            f'fill="{FILL}" fill-opacity="{a:.2f}"><title>#{feat.feature} · slice '
            f"{int(slice_idx[s])} · {_fmt(position[s])} {unit} · {values_SF[s, j]:.3g}"
            "</title></rect>"
            for s, a in zip(on, opacity, strict=True)
        )
    height = len(rows) * row_h + 18
    parts.append(
        f'<text x="70" y="{height - 4}" font-size="10" fill="#6e6e73">{_fmt(position[0])} {unit}'
        f'</text><text x="{70 + width}" y="{height - 4}" font-size="10" fill="#6e6e73" '
        f'text-anchor="end">{_fmt(position[-1])} {unit}</text>'
    )
    total_w = 70 + width + 10
    return (
        f'<svg class="volume-heatmap" width="{total_w}" height="{height}" '
        f'viewBox="0 0 {total_w} {height}" role="img">{"".join(parts)}</svg>',
        rows,
    )
