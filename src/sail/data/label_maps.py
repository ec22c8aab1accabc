"""Per-slice label maps (``prepare.label_maps``): one structure id per pixel, beside each PNG.

Ids: within a modality, ``structure_id`` is TotalSegmentator's own class id of the structure
(:data:`sail.data.labels.CLASS_IDS`: task "total" for CT, 1-117; "total_mr" for MRI, 1-50), so a
label map opens with TotalSegmentator's label table in 3D Slicer or ITK-SNAP; mask names outside
the vocabulary (a user manifest's own structures) follow in string order. 0 is background. The
ids do not depend on which masks a data set holds, so a label map means the same thing across
runs; ``data/structure_ids.csv`` lists them.

Overlap: TotalSegmentator's masks may overlap (a structure inside another, resampling at the
edges). Where several masks cover a voxel, the smallest structure, the one with the fewest voxels
in that volume, wins (ties: the lower id), so small organs are not painted over by the large ones
around them. Overlapping pixels are counted per slice (``label_overlap_px``).

The resolution runs once per volume through a lookup on the packed mask words: each distinct
combination of structure bits gets its winner, and every voxel reads its combination's winner.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sail.data.labels import CLASS_IDS
from sail.data.manifest import ScanRef
from sail.errors import SailError

MAX_ID = 255  # 8-bit label maps
# slices.parquet columns written only when label maps are on (after the geometry columns)
LABEL_COLUMNS = ["label_path", "label_overlap_px"]


def structure_id_table(scans: list[ScanRef]) -> dict[str, dict[str, int]]:
    """modality -> structure -> id for the modalities of ``scans`` (see the module docstring).

    Raises when a modality has more structures than an 8-bit label map can hold."""
    table: dict[str, dict[str, int]] = {}
    for modality in sorted({ref.modality for ref in scans}):
        ids = dict(CLASS_IDS.get(modality, {}))
        held = {s for ref in scans if ref.modality == modality for s in ref.structures}
        extra = sorted(held - set(ids))
        first = max(ids.values(), default=0) + 1
        ids |= {name: first + i for i, name in enumerate(extra)}
        if max(ids.values(), default=0) > MAX_ID:
            raise SailError(
                f"prepare.label_maps: {modality} has {len(ids)} structures "
                f"({len(extra)} outside TotalSegmentator's vocabulary); an 8-bit label map holds "
                f"at most {MAX_ID}. Turn label_maps off or drop structures"
            )
        table[modality] = ids
    return table


def structure_ids_frame(table: dict[str, dict[str, int]]) -> pd.DataFrame:
    """``data/structure_ids.csv``'s rows: modality, structure_id, structure."""
    rows = [
        (modality, sid, name)
        for modality, ids in sorted(table.items())
        for name, sid in sorted(ids.items(), key=lambda item: item[1])
    ]
    return pd.DataFrame(rows, columns=["modality", "structure_id", "structure"])


def unpack_bits(words_NW: np.ndarray, n_structures: int) -> np.ndarray:
    """(N, n_words) uint64 -> (N, n_structures) bool; bit s of the words = structure s."""
    bytes_ = words_NW.astype("<u8").view(np.uint8).reshape(words_NW.shape[0], -1)
    bits = np.unpackbits(bytes_, axis=1, bitorder="little")
    return bits[:, :n_structures].astype(bool)


def _distinct_rows(words_NW: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.unique(words_NW, axis=0, return_inverse=True, return_counts=True)`` through one 1D
    unique per word (a row unique sorts opaque bytes, several times slower): each word's value
    index is folded into a running row code, refactorised so it stays below the row count."""
    n_words = words_NW.shape[1]
    code = np.zeros(words_NW.shape[0], np.int64)
    for w in range(n_words):
        values, index = np.unique(words_NW[:, w], return_inverse=True)
        code = code * len(values) + index.reshape(-1)  # < rows^2: no int64 overflow
        if 0 < w < n_words - 1:
            code = np.unique(code, return_inverse=True)[1].reshape(-1)
    _, first, inverse, counts = np.unique(
        code, return_index=True, return_inverse=True, return_counts=True
    )
    return words_NW[first], inverse.reshape(-1), counts


def label_volume(packed: np.ndarray, ids_S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Packed mask words (..., n_words) -> (uint8 label volume, bool "two or more masks" volume).

    ``ids_S[s]`` is the id of bit s. The smallest structure (fewest voxels here) wins a voxel
    several masks cover; ties go to the lower bit."""
    shape, n_words = packed.shape[:-1], packed.shape[-1]
    n_structures = len(ids_S)
    words_NW = packed.reshape(-1, n_words)
    labels_N = np.zeros(words_NW.shape[0], np.uint8)
    overlap_N = np.zeros(words_NW.shape[0], bool)
    inside = np.flatnonzero((words_NW != 0).any(axis=1))
    if inside.size == 0 or n_structures == 0:
        return labels_N.reshape(shape), overlap_N.reshape(shape)
    combos_UW, inverse, counts_U = _distinct_rows(words_NW[inside])
    bits_US = unpack_bits(combos_UW, n_structures)
    voxels_S = counts_U @ bits_US.astype(np.int64)
    rank_S = np.empty(n_structures, np.int64)
    rank_S[np.lexsort((np.arange(n_structures), voxels_S))] = np.arange(n_structures)
    winner_U = np.where(bits_US, rank_S, n_structures).argmin(axis=1)
    inverse = inverse.reshape(-1)
    labels_N[inside] = np.asarray(ids_S, np.uint8)[winner_U][inverse]
    overlap_N[inside] = (bits_US.sum(axis=1) >= 2)[inverse]
    return labels_N.reshape(shape), overlap_N.reshape(shape)
