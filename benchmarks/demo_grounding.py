"""The spatial-grounding figures of a finished demo: issue 17's acceptance and what lies under it.

python benchmarks/demo_grounding.py WORKSPACE [--seed 0] [--note TEXT]

WORKSPACE is a finished `sail demo` (or `sail run` with label maps) folder. One JSON line per
encoder and structure rule, from eval/spatial_grounding.csv:

- ``enrichment``: the features whose slice-level enrichment names a structure (the acceptance:
  their median pointing-game hit rate against the median shuffled-layout null), and the located
  figures on the top slices that hold the structure (against slices that hold it too);
- ``train_chosen``: every mapped feature, on the structure its train maps chose.

Each line gives the medians and means, how many features reach 3x their own null with a non-zero
rate, and a 95% interval of the ratio of medians from resampling the features (1000 draws,
seeded; draws with a median null of 0 left out; features of one config share volumes, so it
understates the uncertainty).
docs/spatial_maps.md reads these numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from sail.artifacts import Workspace, read_table

RULES = {"enrichment": "enrichment_", "train_chosen": ""}


def ratio_interval(
    hit: np.ndarray, null: np.ndarray, rng: np.random.Generator
) -> list[float] | None:
    """2.5 and 97.5 percentiles of median(hit) / median(null) over features resampled (draws
    whose median null is 0 have no ratio and are left out; None when every draw is such)."""
    idx = rng.integers(0, len(hit), size=(1000, len(hit)))
    null_medians = np.median(null[idx], axis=1)
    defined = null_medians > 0
    if not defined.any():
        return None
    ratios = np.median(hit[idx], axis=1)[defined] / null_medians[defined]
    return [round(float(q), 2) for q in np.percentile(ratios, [2.5, 97.5])]


def summary(rows: pd.DataFrame, hit: str, null: str, rng: np.random.Generator) -> dict:
    rows = rows[rows[hit].notna() & rows[null].notna()]
    h, n = rows[hit].to_numpy(float), rows[null].to_numpy(float)
    if not len(rows):
        return {"features": 0}
    return {
        "features": len(rows),
        "median": round(float(np.median(h)), 4),
        "median_null": round(float(np.median(n)), 4),
        "ratio_of_medians": round(float(np.median(h) / np.median(n)), 2)
        if np.median(n) > 0
        else None,
        "ratio_interval_95": ratio_interval(h, n, rng),
        "mean": round(float(h.mean()), 4),
        "mean_null": round(float(n.mean()), 4),
        "features_3x_own_null": int(((h >= 3 * n) & (h > 0)).sum()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--note", default="", help="what run this is (kept in each line)")
    args = ap.parse_args()
    ws = Workspace(args.workspace)
    table = read_table(ws.eval.spatial_grounding)
    if table is None or table.empty:
        raise SystemExit(f"{ws.eval.spatial_grounding}: no grounding rows (run `sail maps`)")
    for (encoder, rule), p in (
        ((e, r), p) for e in sorted(table.encoder.unique()) for r, p in RULES.items()
    ):
        rng = np.random.default_rng(args.seed)
        rows = table[table.encoder == encoder]
        named = rows[rows[f"{p}structure"].fillna("").ne("")]
        holding = named[named[f"{p}n_holding"] > 0]
        line = {
            "what": "demo_grounding",
            "encoder": encoder,
            "rule": rule,
            "method": sorted(rows.method.unique()),
            "share_of_top_slices_holding": round(
                float((named[f"{p}n_holding"] / named.n_slices).median()), 3
            ),
            "hit_vs_layout_null": summary(named, f"{p}hit_rate", f"{p}null_hit_rate", rng),
            "located_vs_holding_null": summary(
                holding, f"{p}located_rate", f"{p}located_null_rate", rng
            ),
        }
        print(json.dumps(line | ({"note": args.note} if args.note else {})))


if __name__ == "__main__":
    main()
