"""Evaluation inputs: the slice table joined with the split, dense and sparse matrices aligned
to it.

Every matrix is row-aligned to :class:`EvalData.slices` (sorted by slice_id), so a row index means
the same slice in every table and dense and sparse probes draw identical subsamples.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import scipy.sparse as sp

from sail.artifacts import SPLITS, read_final_metrics, read_sae_cfg, read_split
from sail.encoders.table import read_embeddings
from sail.errors import SailError
from sail.sae.activations_io import read_activations
from sail.slice_ids import volume_codes
from sail.workspace import Workspace, check_table

log = logging.getLogger(__name__)

STRUCTURE_PREFIX = "has_"
_CONFIG_RE = re.compile(r"^D_(?P<d>\d+(?:_\d+)*)_K_(?P<k>\d+(?:_\d+)*)(?:-.*)?$")


@dataclass
class EvalData:
    """Slices with a split, in slice_id order; ``volume`` is an integer code of (modality,
    image_id)."""

    slices: pd.DataFrame
    volume: np.ndarray
    split_rows: dict[str, np.ndarray]


@dataclass
class SaeInfo:
    """What evaluation needs from an SAE folder: level boundaries and final quality metrics."""

    dict_sizes: list[int]
    k_values: list[int]
    metrics: dict[str, float] = field(default_factory=dict)


def load_eval_data(ws: Workspace) -> EvalData:
    for path in (ws.slices_table, ws.split_csv):
        if not path.is_file():
            raise SailError(f"{path} not found: run `sail prepare` and `sail split` first")
    check_table(ws.slices_table, "slices table")
    slices = pd.read_parquet(ws.slices_table)
    split = read_split(ws.split_csv)
    for col in ("slice_id", "modality", "image_id"):
        if col not in slices.columns:
            raise SailError(f"{ws.slices_table}: missing column '{col}'")
    twice = slices["slice_id"].duplicated()
    if twice.any():
        raise SailError(
            f"{ws.slices_table}: duplicate slice_id {slices['slice_id'][twice].iloc[0]!r}"
        )
    slices = slices.drop(columns=["split"], errors="ignore").merge(
        split[["modality", "image_id", "split"]].astype({"modality": str, "image_id": str}),
        on=["modality", "image_id"],
        how="left",
    )
    unsplit = int(slices["split"].isna().sum())
    if unsplit:
        log.warning(
            "%d slices belong to volumes missing from %s; they are not evaluated",
            unsplit,
            ws.split_csv,
        )
        slices = slices[slices["split"].notna()]
    return _make_eval_data(slices)


def _make_eval_data(slices: pd.DataFrame) -> EvalData:
    slices = slices.sort_values("slice_id", kind="stable").reset_index(drop=True)
    # Volumes are keyed by (modality, image_id): CT and MRI reuse sNNNN ids.
    volume = volume_codes(slices)
    split_rows = {s: np.flatnonzero(slices["split"].to_numpy() == s) for s in SPLITS}
    return EvalData(slices=slices, volume=volume, split_rows=split_rows)


def restrict(data: EvalData, keep: np.ndarray) -> EvalData:
    """The subset of rows ``keep`` (bool mask), e.g. the slices an encoder has embeddings for."""
    return _make_eval_data(data.slices[keep])


def embedded(ws: Workspace, encoder: str, data: EvalData) -> tuple[EvalData, np.ndarray]:
    """``data`` restricted to slices with an embedding, and their rows in the embeddings table.

    Reads only the slice_id column; slices without an embedding are dropped with a warning.
    """
    path = ws.embeddings(encoder)
    if not path.is_file():
        raise SailError(f"embeddings table not found: {path}")
    ids = pq.read_table(path, columns=["slice_id"]).column("slice_id").to_pylist()
    pos = pd.Index(ids).get_indexer(data.slices["slice_id"])
    if (pos < 0).any():
        missing = int((pos < 0).sum())
        if missing == len(pos):
            raise SailError(f"{path}: no slice_id matches {ws.slices_table}")
        log.warning(
            "%s: %d of %d slices have no embedding; they are not evaluated", path, missing, len(pos)
        )
        data = restrict(data, pos >= 0)
        pos = pos[pos >= 0]
    return data, pos


def load_dense(
    ws: Workspace, encoder: str, data: EvalData, normalise: bool = False
) -> tuple[EvalData, np.ndarray]:
    """Embeddings row-aligned to ``data`` (restricted to the slices that have one)."""
    data, pos = embedded(ws, encoder, data)
    x_ND = read_embeddings(ws.embeddings(encoder)).x_ND[pos]
    if normalise:
        x_ND = x_ND / np.maximum(np.linalg.norm(x_ND, axis=1, keepdims=True), 1e-12)
    return data, x_ND


def discover_configs(ws: Workspace, encoder: str) -> list[tuple[str, str]]:
    """(variant, config) pairs that have train, valid and test activations."""
    root = ws.activations_root / encoder
    found = []
    if not root.is_dir():
        return found
    for variant_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for cfg_dir in sorted(p for p in variant_dir.iterdir() if p.is_dir()):
            missing = [
                s
                for s in SPLITS
                if not ws.activations(encoder, variant_dir.name, cfg_dir.name, s).is_file()
            ]
            if missing:
                log.warning(
                    "%s: no %s activations; config not evaluated", cfg_dir, "/".join(missing)
                )
                continue
            found.append((variant_dir.name, cfg_dir.name))
    return found


def discover_encoders(ws: Workspace) -> list[str]:
    return ws.encoders_with_embeddings()


def load_sparse(
    ws: Workspace, encoder: str, variant: str, config: str, data: EvalData
) -> sp.csr_matrix:
    """All splits' codes stacked into one CSR aligned to ``data`` rows."""
    parts_idx, parts_csr, n_features = [], [], None
    for split in SPLITS:
        path = ws.activations(encoder, variant, config, split)
        ids, csr, _ = read_activations(path)
        if n_features is None:
            n_features = csr.shape[1]
        elif csr.shape[1] != n_features:
            raise SailError(f"{path}: {csr.shape[1]} features, but other splits have {n_features}")
        rows = data.split_rows[split]
        pos = pd.Index(ids).get_indexer(data.slices["slice_id"].to_numpy()[rows])
        if (pos < 0).any():
            example = data.slices["slice_id"].iloc[rows[np.flatnonzero(pos < 0)[0]]]
            raise SailError(
                f"{path}: lacks {int((pos < 0).sum())} {split} slices of the split "
                f"(e.g. {example!r}); rerun `sail activations` after changing the split or "
                "embeddings"
            )
        parts_idx.append(rows)
        parts_csr.append(csr[pos])
    stacked = sp.vstack(parts_csr, format="csr")
    order = np.argsort(np.concatenate(parts_idx), kind="stable")
    out = stacked[order]
    if out.shape[0] != len(data.slices):
        raise SailError(
            f"activations of {encoder}/{variant}/{config} cover {out.shape[0]} "
            f"of {len(data.slices)} slices"
        )
    out = sp.csr_matrix(out, dtype=np.float32)
    out.sort_indices()
    return out


def parse_config_name(name: str) -> tuple[list[int], list[int]] | None:
    """``D_<sizes>_K_<ks>`` with any number of levels (plus optional -suffixes), else None."""
    m = _CONFIG_RE.match(name)
    if not m:
        return None
    return [int(v) for v in m["d"].split("_")], [int(v) for v in m["k"].split("_")]


def sae_levels(
    ws: Workspace, encoder: str, variant: str, config: str
) -> tuple[list[int], list[int]] | None:
    """(dict_sizes, k_values) from the SAE's cfg.json; from the grid's folder name only when the
    SAE folder is gone (activations kept), else None."""
    sae = ws.sae(encoder, variant, config)
    if sae.cfg.is_file():
        cfg = read_sae_cfg(sae.path)
        return cfg.dict_sizes, cfg.k_values
    return parse_config_name(config)


def load_sae_info(
    ws: Workspace, encoder: str, variant: str, config: str, n_features: int
) -> SaeInfo:
    """Level boundaries from cfg.json (else the folder name) and last validation metrics."""
    dict_sizes, k_values = sae_levels(ws, encoder, variant, config) or (None, [])
    if not dict_sizes or dict_sizes[-1] != n_features:
        if dict_sizes:
            log.warning(
                "%s: dict_sizes %s do not end at the %d activation features; one level assumed",
                config,
                dict_sizes,
                n_features,
            )
        dict_sizes = [n_features]
    return SaeInfo(
        dict_sizes=dict_sizes,
        k_values=k_values,
        metrics=read_final_metrics(ws.sae(encoder, variant, config).metrics),
    )
