"""Inputs of the interpret verbs: which SAE configs, and one split's codes aligned to its metadata.

Rows are sorted by slice_id, so every volume's slices are contiguous (slice_id starts with
``modality/image_id``) and per-volume reductions are one ``reduceat`` over ``vol_start``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sail.artifacts import SLICE_ID_COLUMNS, read_ranking, read_split
from sail.config import SailConfig
from sail.errors import SailError
from sail.sae.activations_io import read_activations
from sail.slice_ids import volume_codes
from sail.workspace import Workspace, check_table

log = logging.getLogger(__name__)

META_COLUMNS = [*SLICE_ID_COLUMNS, "sex", "age", "age_group"]


@dataclass(frozen=True, order=True)
class Target:
    encoder: str
    variant: str
    sae_config: str

    @property
    def key(self) -> str:
        return f"{self.encoder}/{self.variant}/{self.sae_config}"


def select_targets(cfg: SailConfig, ws: Workspace) -> list[Target]:
    """The final_rank == 1 config per encoder and variant (plus ``interpret.sae_configs``), else
    every config with activations."""
    icfg = cfg.interpret
    act_root = ws.activations_root
    found = (
        sorted(
            Target(p.parent.parent.name, p.parent.name, p.name)
            for p in act_root.glob("*/*/*")
            if p.is_dir()
        )
        if act_root.is_dir()
        else []
    )
    if icfg.encoders:
        found = [t for t in found if t.encoder in icfg.encoders]
    if not found:
        raise SailError(f"no activations under {act_root}: run `sail activations` first")
    if "all" in icfg.sae_configs:
        return found
    ranking_csv = ws.eval.ranking
    ranking = read_ranking(ranking_csv)
    if ranking is None:
        log.info("interpret: %s not found; using every config with activations", ranking_csv)
        return found
    best = ranking[ranking.final_rank == 1]
    chosen = {Target(r.encoder, r.variant, r.sae_config) for r in best.itertuples(index=False)}
    chosen |= {t for t in found if t.sae_config in icfg.sae_configs}
    out = [t for t in found if t in chosen]
    if not out:
        log.warning(
            "interpret: %s ranks no config with activations (too few validation volumes?); "
            "using every config under %s",
            ranking_csv,
            act_root,
        )
        return found
    return out


def read_slices(ws: Workspace) -> pd.DataFrame:
    """slices.parquet (identity, demographics, has_* flags) joined with split.csv."""
    if not ws.slices_table.is_file():
        raise SailError(f"{ws.slices_table} not found: run `sail prepare` first")
    check_table(ws.slices_table, "slices table")
    slices = pd.read_parquet(ws.slices_table)
    missing = [c for c in META_COLUMNS if c not in slices.columns]
    if missing:
        raise SailError(f"{ws.slices_table}: missing column(s) {missing}")
    keep = META_COLUMNS + [c for c in slices.columns if c.startswith("has_")]
    split = read_split(ws.split_csv)
    out = slices[keep].merge(split, on=["modality", "image_id"], how="left")
    return out.sort_values("slice_id", kind="stable").reset_index(drop=True)


@dataclass
class SplitData:
    """One split of one SAE config: CSR codes (N, F) and metadata rows in the same order."""

    name: str
    codes: sp.csr_matrix
    meta: pd.DataFrame
    structures: list[str]
    path: Path

    @property
    def n(self) -> int:
        return self.codes.shape[0]

    @cached_property
    def H_NS(self) -> np.ndarray:
        """Structure presence (null -> absent)."""
        cols = [f"has_{s}" for s in self.structures]
        return (
            self.meta[cols].fillna(False).to_numpy(dtype=bool)
            if cols
            else np.zeros((self.n, 0), bool)
        )

    @cached_property
    def volume(self) -> np.ndarray:
        return volume_codes(self.meta)

    @cached_property
    def vol_start(self) -> np.ndarray:
        return np.flatnonzero(np.r_[True, self.volume[1:] != self.volume[:-1]])

    @cached_property
    def vol_end(self) -> np.ndarray:
        return np.r_[self.vol_start[1:], self.n]

    @cached_property
    def csc(self) -> sp.csc_matrix:
        return self.codes.tocsc()

    @cached_property
    def active_count(self) -> np.ndarray:
        return np.bincount(self.codes.indices, minlength=self.codes.shape[1])

    @cached_property
    def always_on(self) -> np.ndarray:
        """Features active on every slice (the published 'minimum activation > 0')."""
        nonzero = np.bincount(
            self.codes.indices[self.codes.data > 0], minlength=self.codes.shape[1]
        )
        return nonzero >= self.n


def load_split(ws: Workspace, target: Target, split: str, slices: pd.DataFrame) -> SplitData:
    path = ws.activations(target.encoder, target.variant, target.sae_config, split)
    slice_ids, codes, _ = read_activations(path)
    if len(slice_ids) == 0:
        raise SailError(
            f"{path}: the {split} split has no slices ({ws.split_csv} assigns it no scan; with "
            "the default split.test_institutes A, D, E a dataset lacking those institutes has no "
            "test scans); set split.test_institutes to institutes in your data and rerun from "
            "`sail split`"
        )
    order = np.argsort(slice_ids, kind="stable")
    slice_ids, codes = slice_ids[order], codes[order]
    index = pd.Index(slices["slice_id"])
    rows = index.get_indexer(slice_ids)
    if (rows < 0).any():
        bad = slice_ids[rows < 0][0]
        raise SailError(f"{path}: slice_id {bad!r} is not in {ws.slices_table}")
    meta = slices.iloc[rows].reset_index(drop=True)
    wrong = meta["split"].astype(str) != split
    if wrong.any():
        raise SailError(
            f"{path}: slice {meta.slice_id[wrong].iloc[0]!r} belongs to split "
            f"{meta.split[wrong].iloc[0]!r} in {ws.split_csv}, not {split!r}"
        )
    structures = [c[4:] for c in meta.columns if c.startswith("has_")]
    codes = sp.csr_matrix(codes, dtype=np.float32)
    codes.eliminate_zeros()
    return SplitData(split, codes, meta, structures, path)


def dense_aligned(ws: Workspace, encoder: str, slice_ids: np.ndarray) -> np.ndarray:
    """The encoder's embeddings in the order of ``slice_ids`` (float32, L2-normalised rows)."""
    from sail.encoders.table import read_embeddings

    table = read_embeddings(ws.embeddings(encoder))
    rows = pd.Index(table.slice_ids).get_indexer(slice_ids)
    if (rows < 0).any():
        raise SailError(
            f"{ws.embeddings(encoder)}: no embedding for slice_id {slice_ids[rows < 0][0]!r}"
        )
    return table.x_ND[rows]
