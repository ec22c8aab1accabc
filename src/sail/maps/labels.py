"""Per-slice label maps (prepare.label_maps) as the grounding reads them: global structure indices.

A label map stores per-modality structure ids (data/structure_ids.csv); grounding compares CT and
MRI slices through one vocabulary, so each map is translated on load to an index into
:attr:`LabelMaps.names` (0 = background, then the structures in name order).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from sail.artifacts import read_label_map, read_structure_ids
from sail.console import track
from sail.data.labels import HARMONISED
from sail.errors import SailError
from sail.maps.grounding import cell_presence
from sail.workspace import Workspace

LABEL_PATH = "label_path"


@dataclass
class LabelStore:
    """Label maps of some slice rows, loaded: ``labels`` (n, H, W) global indices."""

    rows: np.ndarray  # sorted EvalData rows
    labels: np.ndarray
    n_labels: int
    _presence: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False)

    def positions(self, rows: np.ndarray) -> np.ndarray:
        """Index into :attr:`labels` of each row (-1 stays -1)."""
        pos = np.searchsorted(self.rows, np.maximum(rows, 0))
        return np.where(rows >= 0, pos, -1)

    def get(self, rows: np.ndarray) -> np.ndarray:
        return self.labels[self.positions(rows)]

    def presence(self, grid: tuple[int, int]) -> np.ndarray:
        """Which labels each grid cell's footprint holds, per loaded slice (computed once per
        grid: every feature of a config reads it)."""
        grid = (int(grid[0]), int(grid[1]))
        if grid not in self._presence:
            self._presence[grid] = cell_presence(self.labels, grid, self.n_labels)
        return self._presence[grid]


class LabelMaps:
    """Where each slice's label map is and how its ids translate to global indices."""

    def __init__(self, ws: Workspace, slices: pd.DataFrame, ids: pd.DataFrame):
        self.root = ws.root
        self.names = ["", *sorted(set(ids["structure"].astype(str)))]
        self.paths = slices[LABEL_PATH].to_numpy(dtype=object)
        self.modality = slices["modality"].to_numpy(dtype=str)
        self.lut: dict[str, np.ndarray] = {}
        self.cache: dict[int, np.ndarray] = {}  # row -> translated map (configs share slices)
        for modality, group in ids.groupby("modality"):
            lut = np.zeros(256, dtype=np.uint16)
            lut[group["structure_id"].to_numpy(int)] = [
                self.names.index(s) for s in group["structure"].astype(str)
            ]
            self.lut[str(modality)] = lut

    @classmethod
    def open(cls, ws: Workspace, slices: pd.DataFrame) -> LabelMaps | None:
        """The workspace's label maps, or None when prepare wrote none."""
        if LABEL_PATH not in slices.columns or slices[LABEL_PATH].isna().all():
            return None
        if not ws.structure_ids.is_file():
            raise SailError(
                f"{ws.slices_table} has label maps but {ws.structure_ids} is missing; rerun "
                "`sail prepare --force`"
            )
        return cls(ws, slices, read_structure_ids(ws.structure_ids))

    def indices(self, structure: str) -> np.ndarray:
        """Global indices a structure name covers: itself, and for a harmonised name (the
        ``has_lung_right`` flag is MRI's lung_right OR CT's right lobes) the parts a label map
        holds instead; empty for none, or for a structure no label map holds."""
        names = [structure, *HARMONISED.get(structure, [])] if structure else []
        return np.array([self.names.index(n) for n in names if n in self.names[1:]], np.int64)

    @staticmethod
    def groups(slices: pd.DataFrame) -> np.ndarray:
        """Integer code of each row's modality x plane (the null's shuffling unit)."""
        key = slices["modality"].astype(str) + "/" + slices["plane"].astype(str)
        return pd.factorize(key, sort=True)[0].astype(np.int64)

    def load(self, rows: np.ndarray) -> LabelStore:
        """Read the label maps of ``rows`` (sorted, distinct); one shape for all of them."""
        unread = [r for r in rows if r not in self.cache]
        for row in track(unread, "label maps") if unread else ():
            self.cache[row] = self._read(row)
        maps = [self.cache[row] for row in rows]
        shapes = {m.shape for m in maps}
        if len(shapes) > 1:
            raise SailError(f"label maps differ in size ({sorted(shapes)}); rerun `sail prepare`")
        stack = np.stack(maps) if maps else np.zeros((0, 1, 1), np.uint16)
        return LabelStore(np.asarray(rows), stack, len(self.names))

    def _read(self, row: int) -> np.ndarray:
        path = self.paths[row]
        if not isinstance(path, str) or not path:
            raise SailError(f"{LABEL_PATH} is empty for slice row {row}: rerun `sail prepare`")
        lut = self.lut.get(self.modality[row])
        if lut is None:
            raise SailError(f"structure ids: no rows for modality {self.modality[row]!r}")
        return lut[read_label_map(self.root / path)]
