"""Where the demo's planted concepts live: the acceptance table of issue 15 item 4, split by plane.

python benchmarks/demo_concepts.py WORKSPACE [--encoder efficientnet-lite0]

WORKSPACE is a finished `sail demo` (or `sail run`) folder. One JSON line per planted label with
the acceptance figures (the config the ranking chose on valid, its best feature chosen on train,
ROC-AUC on test; the best raw dimension, same protocol) and two diagnostics the acceptance does
not use:

- ``by_subset``: the same protocol run inside each CT plane alone (feature chosen on that plane's
  train rows, scored on its test rows), which shows whether the SAE has the concept per plane;
- ``probe_test_roc_auc``: an L2 logistic-regression probe on the whole embedding (fit on train,
  scored on test), the ceiling for any single linear direction (an SAE latent is one).

A last line gives the medians and the number of labels at or above 0.90. docs/demo_concepts.md
reads these numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression

from sail.artifacts import Workspace, read_ranking, read_split
from sail.config import load_config
from sail.encoders.table import read_embeddings
from sail.evaluate.concepts import (
    chosen_configs,
    ground_concepts,
    label_families,
    raw_dimension_concepts,
)
from sail.evaluate.probes import roc_auc
from sail.report.selection import planted_labels
from sail.sae.activations_io import read_activations

SPLITS = ("train", "valid", "test")
SUBSETS = ("axial", "coronal", "sagittal")  # CT planes (MRI has too few slices per plane)


def slice_table(ws: Workspace) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """slices.parquet in slice_id order with its split, and the row numbers of each split."""
    slices = pd.read_parquet(ws.slices_table).sort_values("slice_id", kind="stable")
    slices = slices.merge(read_split(ws.split_csv), on=["modality", "image_id"], how="left")
    split = slices["split"].to_numpy()
    return slices.reset_index(drop=True), {s: np.flatnonzero(split == s) for s in SPLITS}


def codes_in_order(ws: Workspace, encoder: str, variant: str, config: str, ids) -> sp.csr_matrix:
    """The config's codes of every split, stacked in the order of ``ids``."""
    parts = [read_activations(ws.activations(encoder, variant, config, s)) for s in SPLITS]
    codes = sp.vstack([c for _, c, _ in parts]).tocsr()
    where = {sid: i for i, sid in enumerate(np.concatenate([i for i, _, _ in parts]))}
    return codes[[where[sid] for sid in ids]]


def probe_aucs(x_ND: np.ndarray, slices: pd.DataFrame, rows: dict[str, np.ndarray]) -> dict:
    """Test ROC-AUC of a logistic-regression probe per label (the linear ceiling)."""
    mean, std = x_ND[rows["train"]].mean(0), x_ND[rows["train"]].std(0) + 1e-6
    z = (x_ND - mean) / std
    test = {n: (r, y[:, j]) for _, r, names, y in label_families(slices, rows["test"])
            for j, n in enumerate(names)}  # fmt: skip
    out = {}
    for _, r, names, y in label_families(slices, rows["train"]):
        for j, name in enumerate(names):
            if name not in test or len(np.unique(y[:, j])) < 2:
                continue
            model = LogisticRegression(C=0.05, max_iter=300).fit(z[r], y[:, j])
            tr, ty = test[name]
            out[name] = roc_auc(ty.astype(np.int8), model.decision_function(z[tr]))
    return out


def rounded(value) -> float | None:
    """A figure for a JSON line: 3 decimals, None where undefined (one class on that split)."""
    value = float(value)
    return round(value, 3) if np.isfinite(value) else None


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--encoder", default="efficientnet-lite0")
    args = ap.parse_args()
    ws = Workspace(args.workspace)
    cfg = load_config(ws.config_yaml, {"workspace": args.workspace})
    slices, rows = slice_table(ws)
    chosen = chosen_configs(read_ranking(ws.eval.ranking), cfg.train.variants)
    variant, config = chosen[args.encoder]
    codes = codes_in_order(ws, args.encoder, variant, config, slices["slice_id"])
    table = read_embeddings(ws.embeddings(args.encoder))
    x_ND = table.x_ND[pd.Index(table.slice_ids).get_indexer(slices["slice_id"])]
    if cfg.evaluate.probe.dense_input == "l2":  # as the evaluate stage's raw-dimension control
        x_ND = x_ND / np.linalg.norm(x_ND, axis=1, keepdims=True)
    labels = planted_labels(cfg)
    pooled, _ = ground_concepts(codes, slices, rows, {}, [], 1.0)
    pooled = pooled.set_index("label")["test_roc_auc"]
    raw = raw_dimension_concepts(x_ND, slices, rows, args.encoder).set_index("label")
    probe = probe_aucs(x_ND, slices, rows)
    by_subset = {}
    for plane in SUBSETS:
        keep = ((slices["modality"] == "ct") & (slices["plane"] == plane)).to_numpy()
        sub = {s: r[keep[r]] for s, r in rows.items()}
        c, _ = ground_concepts(codes, slices, sub, {}, [], 1.0)
        by_subset[f"ct_{plane}"] = c.set_index("label")["test_roc_auc"]
    out = []
    for label in labels:
        row = {
            "what": "demo_concept",
            "label": label,
            "sae_config": f"{variant}/{config}",
            "test_roc_auc": rounded(pooled.get(label, np.nan)),
            "raw_test_roc_auc": rounded(raw["raw_test_roc_auc"].get(label, np.nan)),
            "probe_test_roc_auc": rounded(probe.get(label, np.nan)),
            "by_subset": {k: rounded(v.get(label, np.nan)) for k, v in by_subset.items()},
        }
        out.append(row)
        print(json.dumps(row), flush=True)
    frame = pd.DataFrame(out).astype({c: float for c in ("test_roc_auc", "raw_test_roc_auc")})
    frame["probe_test_roc_auc"] = frame["probe_test_roc_auc"].astype(float)
    summary = {"what": "demo_concepts_summary", "encoder": args.encoder}
    for col in ("test_roc_auc", "raw_test_roc_auc", "probe_test_roc_auc"):
        summary[f"median_{col}"] = round(float(frame[col].median()), 3)
        summary[f"n_at_least_0.90_{col}"] = int((frame[col] >= 0.90).sum())
    for key in by_subset:
        values = pd.DataFrame(list(frame["by_subset"]))[key].astype(float)
        summary[f"median_{key}"] = rounded(values.median())
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
