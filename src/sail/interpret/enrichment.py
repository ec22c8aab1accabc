"""Enrichment of a feature's top-activating slices against the split's base rate.

For every attribute value (modality, plane, sex, age group) and every structure and body region:
the share among the top slices, the base rate over the split, their ratio (lift) and a
one-sided binomial p-value. Prompts quote these numbers; the metadata describer uses them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import stats

CATEGORICAL = ("modality", "plane", "sex", "age_group")
MIN_SHARE = 0.5
MIN_LIFT = 1.2
MAX_P = 0.01
DEMOGRAPHIC_SHARE = 0.7


@dataclass
class Enrichment:
    n_top: int
    # attribute -> list of (value, share, base, lift, p), sorted by share desc
    categorical: dict[str, list[tuple[str, float, float, float, float]]] = field(default_factory=dict)
    structures: list[tuple[str, float, float, float, float]] = field(default_factory=list)
    regions: list[tuple[str, float, float, float, float]] = field(default_factory=list)

    def dominant(self, attr: str, min_share: float) -> str | None:
        rows = self.categorical.get(attr, [])
        return rows[0][0] if rows and rows[0][1] >= min_share else None

    def enriched_value(self, attr: str) -> str | None:
        """A demographic value only when it dominates and is enriched against the base rate."""
        for value, share, base, lift, p in self.categorical.get(attr, []):
            if share >= DEMOGRAPHIC_SHARE and lift >= MIN_LIFT and p < MAX_P:
                return value
        return None

    @staticmethod
    def _enriched(rows):
        keep = [r for r in rows if r[1] >= MIN_SHARE and r[3] >= MIN_LIFT and r[4] < MAX_P]
        return sorted(keep, key=lambda r: (-r[1] * np.log(r[3]), r[0]))

    def enriched_structures(self):
        return self._enriched(self.structures)

    def enriched_regions(self):
        return self._enriched(self.regions)

    def to_json(self) -> dict:
        def rows(rs, only=None):
            return [{"value": v, "share": round(s, 3), "base": round(b, 3), "lift": round(li, 2), "p": float(f"{p:.2g}")}
                    for v, s, b, li, p in rs if only is None or (v in only)]

        return {
            "n_top": self.n_top,
            **{a: rows(v) for a, v in self.categorical.items()},
            "structures": rows(self.enriched_structures()),
            "regions": rows(self.enriched_regions()),
        }


class EnrichmentTable:
    """Base rates of one split, computed once; ``of(rows)`` scores one feature's top slices."""

    def __init__(self, meta, H_NS: np.ndarray, structures: list[str]):
        from sail.data.labels import STRUCTURE_REGION

        self.values: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for a in CATEGORICAL:
            col = meta[a].astype("string")
            known = col.notna().to_numpy()
            cats = sorted(col.dropna().unique())
            onehot = np.stack([(col == c).fillna(False).to_numpy() for c in cats], axis=1) if cats else np.zeros((len(meta), 0), bool)
            base = onehot[known].mean(0) if known.any() else np.zeros(len(cats))
            self.values[a] = (np.asarray(cats, dtype=object), onehot, known, base)
        self.structures = np.asarray(structures, dtype=object)
        self.H = H_NS
        self.h_base = H_NS.mean(0) if len(H_NS) else np.zeros(H_NS.shape[1])
        regions = sorted({STRUCTURE_REGION[s] for s in structures if s in STRUCTURE_REGION})
        R = np.zeros((len(structures), len(regions)), dtype=np.float32)
        for j, s in enumerate(structures):
            if s in STRUCTURE_REGION:
                R[j, regions.index(STRUCTURE_REGION[s])] = 1
        self.regions = np.asarray(regions, dtype=object)
        self.RG = (H_NS.astype(np.float32) @ R) > 0
        self.r_base = self.RG.mean(0) if len(H_NS) else np.zeros(len(regions))

    @staticmethod
    def _rows(names, hits, n, base):
        if n == 0:
            return []
        share = hits / n
        with np.errstate(divide="ignore", invalid="ignore"):
            lift = np.where(base > 0, share / base, np.inf)
        p = stats.binom.sf(hits - 1, n, np.clip(base, 1e-12, 1))
        order = np.lexsort((names.astype(str), -share))
        return [(str(names[i]), float(share[i]), float(base[i]), float(lift[i]), float(p[i])) for i in order if hits[i] > 0]

    def of(self, rows: np.ndarray) -> Enrichment:
        ev = Enrichment(n_top=len(rows))
        for a, (cats, onehot, known, base) in self.values.items():
            k = rows[known[rows]]
            ev.categorical[a] = self._rows(cats, onehot[k].sum(0), len(k), base)
        ev.structures = self._rows(self.structures, self.H[rows].sum(0), len(rows), self.h_base)
        ev.regions = self._rows(self.regions, self.RG[rows].sum(0), len(rows), self.r_base)
        return ev
