"""A feature's top-activating slices: the one ranking rule every stage shares.

Monosemanticity, autointerp and the report all look at "the slices a feature fires on most". They
must agree on which slices those are, so the rule lives here once: positive activations only, in
descending order, ties broken by the lower row (rows are sorted by slice_id everywhere), and, for
the "one per volume" view, the first (highest) slice of each volume ((modality, image_id): slices
of one volume are not independent evidence).

:func:`top_volumes` does it for every feature at once (one segmented sort of the nonzeros);
:func:`top_per_volume` is the same function on one column.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def ranked_rows(csc: sp.csc_matrix, feature: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and values of every positive activation of ``feature``, highest first (ties: the
    lower row)."""
    lo, hi = csc.indptr[feature], csc.indptr[feature + 1]
    rows, vals = csc.indices[lo:hi], csc.data[lo:hi]
    keep = vals > 0
    rows, vals = rows[keep], vals[keep]
    order = np.lexsort((rows, -vals))
    return rows[order], vals[order]


def top_volumes(
    codes: sp.spmatrix, volume: np.ndarray, n_max: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per feature, the rows of its ``n_max`` highest positive activations with one row per volume.

    Returns (top rows, F x n_max int64, -1 padded, in descending activation order) and the number of
    distinct volumes each feature activates in. Ties in activation break by row index.
    """
    csc = sp.csc_matrix(codes)
    n_features = csc.shape[1]
    col = np.repeat(np.arange(n_features, dtype=np.int64), np.diff(csc.indptr))
    row, val = csc.indices.astype(np.int64), csc.data
    pos = val > 0
    col, row, val = col[pos], row[pos], val[pos]
    order = np.lexsort((row, -val, col))  # by feature, then activation descending
    col, row = col[order], row[order]
    key = col * (int(volume.max()) + 1 if len(volume) else 1) + volume[row]
    # First occurrence of each (feature, volume) in activation order: stable sort by key.
    by_key = np.argsort(key, kind="stable")
    first = np.ones(len(key), dtype=bool)
    first[1:] = key[by_key][1:] != key[by_key][:-1]
    keep = np.sort(by_key[first])
    col, row = col[keep], row[keep]
    n_vol = np.bincount(col, minlength=n_features)
    start = np.concatenate([[0], np.cumsum(n_vol)[:-1]])
    rank = np.arange(len(col)) - start[col]
    sel = rank < n_max
    top = np.full((n_features, n_max), -1, dtype=np.int64)
    top[col[sel], rank[sel]] = row[sel]
    return top, n_vol


def top_per_volume(
    csc: sp.csc_matrix, feature: int, volume: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows and values of ``feature``'s ``n`` highest activations, at most one row per volume."""
    column = csc[:, [feature]]
    top, _ = top_volumes(column, volume, n)
    rows = top[0][top[0] >= 0]
    return rows, column[rows].toarray().ravel()
