"""Enrichment of a feature's top-activating slices against the split's base rate, tested over
volumes.

For every attribute value (modality, plane, sex, age group) and every structure and body region:
the share among the top slices, the base rate over the split, their ratio (lift) and a one-sided
p-value. Prompts quote these numbers; the metadata describer uses them.

The share describes the slices; the test counts volumes ((modality, image_id)). Adjacent slices
of one volume share sex, age and institute, so counting 120 top slices of 3 male volumes as 120
binomial draws let "male" pass p < 0.01. Here each of the V volumes among the top slices
contributes its own share s_v (the fraction of its top slices holding the value, in [0, 1]) and
p = P(Binomial(V, base) >= floor(sum s_v)): exact for per-volume attributes such as sex (s_v is 0
or 1), conservative for per-slice ones such as structures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from sail.slice_ids import volume_codes

CATEGORICAL = ("modality", "plane", "sex", "age_group")
MIN_SHARE = 0.5
MIN_LIFT = 1.2
MAX_P = 0.01
DEMOGRAPHIC_SHARE = 0.7


@dataclass
class Enrichment:
    n_top: int  # top slices
    n_volumes: int = 0  # the volumes they come from: the unit of the p-values
    # attribute -> list of (value, share, base, lift, p), sorted by share desc
    categorical: dict[str, list[tuple[str, float, float, float, float]]] = field(
        default_factory=dict
    )
    structures: list[tuple[str, float, float, float, float]] = field(default_factory=list)
    regions: list[tuple[str, float, float, float, float]] = field(default_factory=list)

    def dominant(self, attr: str, min_share: float) -> str | None:
        rows = self.categorical.get(attr, [])
        return rows[0][0] if rows and rows[0][1] >= min_share else None

    def enriched_value(self, attr: str) -> str | None:
        """A demographic value only when it dominates and is enriched against the base rate."""
        for value, share, _base, lift, p in self.categorical.get(attr, []):
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
            return [
                {
                    "value": v,
                    "share": round(s, 3),
                    "base": round(b, 3),
                    "lift": round(li, 2),
                    "p": float(f"{p:.2g}"),
                }
                for v, s, b, li, p in rs
                if only is None or (v in only)
            ]

        return {
            "n_top": self.n_top,
            "n_volumes": self.n_volumes,
            **{a: rows(v) for a, v in self.categorical.items()},
            "structures": rows(self.enriched_structures()),
            "regions": rows(self.enriched_regions()),
        }


class EnrichmentTable:
    """Base rates of one split, computed once; ``of(rows)`` scores one feature's top slices.

    The one enrichment implementation: autointerp's prompts and describer and the report's feature
    pages (which add metadata columns such as institute through ``categorical``) use it on the same
    split and the same top slices (:func:`top_slices_for_enrichment`), so a page's numbers are the
    ones its description was built from.
    """

    def __init__(
        self, meta, H_NS: np.ndarray, structures: list[str], categorical=CATEGORICAL
    ) -> None:
        from sail.data.labels import STRUCTURE_REGION

        self.volume = volume_codes(meta)
        self.values: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for a in categorical:
            col = meta[a].astype("string")
            known = col.notna().to_numpy()
            cats = sorted(col.dropna().unique())
            onehot = (
                np.stack([(col == c).fillna(False).to_numpy() for c in cats], axis=1)
                if cats
                else np.zeros((len(meta), 0), bool)
            )
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
    def _rows(names, x_RL: np.ndarray, known_R: np.ndarray, inv_R: np.ndarray, n_vol: int, base):
        """(value, share, base, lift, p) per label: share over the known top slices, p over their
        volumes."""
        x = x_RL[known_R].astype(np.float64)
        if len(x) == 0:
            return []
        hits = x.sum(0)
        share = hits / len(x)
        with np.errstate(divide="ignore", invalid="ignore"):
            lift = np.where(base > 0, share / base, np.inf)
        sums = np.zeros((n_vol, x.shape[1]))
        np.add.at(sums, inv_R[known_R], x)
        counts = np.bincount(inv_R[known_R], minlength=n_vol)
        per_volume = sums[counts > 0] / counts[counts > 0, None]
        p = stats.binom.sf(
            np.floor(per_volume.sum(0) + 1e-9) - 1, len(per_volume), np.clip(base, 1e-12, 1)
        )
        order = np.lexsort((names.astype(str), -share))
        return [
            (str(names[i]), float(share[i]), float(base[i]), float(lift[i]), float(p[i]))
            for i in order
            if hits[i] > 0
        ]

    def of(self, rows: np.ndarray) -> Enrichment:
        """Enrichment of a feature's top slices ``rows``; p-values count the volumes they come
        from."""
        rows = np.asarray(rows)
        _, inv = np.unique(self.volume[rows], return_inverse=True)
        n_vol = int(inv.max()) + 1 if len(rows) else 0
        ev = Enrichment(n_top=len(rows), n_volumes=n_vol)
        everywhere = np.ones(len(rows), dtype=bool)
        for a, (cats, onehot, known, base) in self.values.items():
            ev.categorical[a] = self._rows(cats, onehot[rows], known[rows], inv, n_vol, base)
        ev.structures = self._rows(
            self.structures, self.H[rows], everywhere, inv, n_vol, self.h_base
        )
        ev.regions = self._rows(self.regions, self.RG[rows], everywhere, inv, n_vol, self.r_base)
        return ev


def top_slices_for_enrichment(csc, feature: int, n_top: int) -> np.ndarray:
    """The slices a feature's enrichment describes: its ``n_top`` highest activations (slices, not
    one per volume: the p-values count their volumes)."""
    from sail.evaluate.top_slices import ranked_rows

    return ranked_rows(csc, feature)[0][:n_top]
