"""The ``split`` stage: scan-level train/valid/test, shared by every encoder.

Published algorithm: scans from the held-out institutes (A, D, E) -> test; the rest split by
scan, stratified by modality x sex x age group (StratifiedShuffleSplit, train fraction 0.8, seed
42); scans with unknown sex or age split by a seeded shuffle. Fix: strata holding a single scan
are merged into their nearest stratum (same modality, then same sex) with a warning instead of
crashing. For manifests: a ``group`` (patient) column splits a patient's scans as one unit, and a
cohort without held-out institutes gets a seeded test split (never an empty one).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from sklearn.model_selection import StratifiedShuffleSplit

from sail.artifacts import SPLITS
from sail.config import SailConfig, SplitConfig
from sail.errors import SailError
from sail.workspace import (
    StageRecord,
    Workspace,
    check_table,
    fingerprint,
    hash_config,
    is_done,
    mark_done,
    write_csv_atomic,
)

log = logging.getLogger(__name__)


def _merge_singletons(strata: pd.Series) -> pd.Series:
    """Relabel each single-scan stratum to its nearest stratum: same modality first, then the
    most shared fields (sex, age group), then the largest."""
    strata = strata.copy()
    while True:
        counts = strata.value_counts()
        singles = sorted(counts[counts < 2].index)
        if not singles or len(counts) < 2:
            return strata
        label = singles[0]
        best = max(
            (o for o in counts.index if o != label),
            key=lambda o: (_nearness(label, o, int(counts[o])), o),
        )
        log.warning("split: stratum %s has a single scan; merged into %s", label, best)
        strata[strata == label] = best


def _nearness(label: str, other: str, size: int) -> tuple[bool, int, int]:
    """How close stratum ``other`` is to ``label`` (same modality first, then shared fields, then
    the larger stratum)."""
    fields, o = label.split("|"), other.split("|")
    return o[0] == fields[0], sum(a == b for a, b in zip(o, fields, strict=False)), size


def make_split(scans: pd.DataFrame, cfg: SplitConfig) -> pd.DataFrame:
    """scans: one row per (modality, image_id) with institute, sex, age_group (and optionally
    ``group``, a patient key) -> + split column.

    Scans sharing a ``group`` are split as one unit (described by its first scan; held out when
    any of its scans is), so a patient never sits on both sides. When no scan comes from a
    held-out institute, a seeded ``test_fraction`` of the units becomes the test split instead.
    """
    scans = scans.reset_index(drop=True).copy()
    if "group" not in scans.columns or scans["group"].isna().all():
        scans["split"] = _split_units(
            scans, scans["institute"].isin(cfg.test_institutes).to_numpy(), cfg
        )
        return scans
    own = "scan:" + scans["modality"].astype(str) + "/" + scans["image_id"].astype(str)
    codes, _ = pd.factorize(
        scans["group"].astype(object).where(scans["group"].notna(), own), sort=True
    )
    units = scans.assign(_unit=codes).groupby("_unit", sort=True).first().reset_index(drop=True)
    held = scans["institute"].isin(cfg.test_institutes).groupby(codes).any().sort_index().to_numpy()
    scans["split"] = _split_units(units, held, cfg)[codes]
    log.info(
        "split: %d scans in %d units (%d patient groups kept whole)",
        len(scans),
        len(units),
        scans["group"].nunique(),
    )
    return scans


def _split_units(units: pd.DataFrame, test: np.ndarray, cfg: SplitConfig) -> np.ndarray:
    """Published assignment of units (scans or patient groups) to splits; ``test`` = held out."""
    if not test.any() and len(units) >= 2:
        n_test = min(len(units) - 1, max(1, int(round(cfg.test_fraction * len(units)))))
        test = np.zeros(len(units), dtype=bool)
        test[np.random.default_rng([cfg.seed, 1]).permutation(len(units))[:n_test]] = True
        log.warning(
            "split: no scan from the held-out institutes %s; a seeded %d of %d units "
            "(test_fraction %g) form the test split",
            ", ".join(cfg.test_institutes) or "(none)",
            n_test,
            len(units),
            cfg.test_fraction,
        )
    split = np.full(len(units), "", dtype=object)
    split[test] = "test"
    rest = units.loc[~test]
    known = rest["sex"].notna() & rest["age_group"].notna() & rest["modality"].notna()
    kn, unk = rest[known], rest[~known]
    if len(kn) >= 2:
        strata = (
            kn["modality"].astype(str)
            + "|"
            + kn["sex"].astype(str)
            + "|"
            + kn["age_group"].astype(str)
        )
        strata = _merge_singletons(strata)
        n_train = int(np.floor(cfg.train_fraction * len(kn)))
        n_classes = strata.nunique()
        if n_classes > 1 and n_classes <= n_train and n_classes <= len(kn) - n_train:
            sss = StratifiedShuffleSplit(
                n_splits=1, train_size=n_train, test_size=len(kn) - n_train, random_state=cfg.seed
            )
            tr, va = next(sss.split(np.zeros(len(kn)), strata.to_numpy()))
        else:
            log.warning(
                "split: too few scans (%d) for %d strata; splitting without stratification",
                len(kn),
                n_classes,
            )
            perm = np.random.default_rng(cfg.seed).permutation(len(kn))
            tr, va = perm[:n_train], perm[n_train:]
        split[kn.index[tr]] = "train"
        split[kn.index[va]] = "valid"
    elif len(kn) == 1:
        split[kn.index] = "train"
    if len(unk):
        perm = np.random.default_rng(cfg.seed).permutation(len(unk))
        n_train = int(cfg.train_fraction * len(unk))
        split[unk.index[perm[:n_train]]] = "train"
        split[unk.index[perm[n_train:]]] = "valid"
        log.info("split: %d scans with unknown sex/age assigned by seed", len(unk))
    return split


def scans_of(slices: pd.DataFrame) -> pd.DataFrame:
    """One row per scan; a scan whose slices disagree on a field takes its first value."""
    cols = ["modality", "image_id", "institute", "sex", "age_group"]
    missing = [c for c in cols if c not in slices.columns]
    if missing:
        raise SailError(f"slices table lacks column(s) {', '.join(missing)}")
    cols += ["group"] if "group" in slices.columns else []
    return (
        slices[cols]
        .groupby(["modality", "image_id"], sort=True, dropna=False)
        .first()
        .reset_index()
    )


def run_split(cfg: SailConfig, ws: Workspace, force: bool = False) -> None:
    if not ws.slices_table.exists():
        raise SailError(f"{ws.slices_table} not found: run `sail prepare` first")
    record = StageRecord(
        "split",
        hash_config(cfg.split.model_dump(mode="json")),
        {"slices": fingerprint(ws.slices_table)},
    )
    if not force and is_done(ws.split_csv, record):
        log.info("split: up to date (%s)", ws.split_csv)
        return
    check_table(ws.slices_table, "slices table")
    names = pq.read_schema(ws.slices_table).names
    wanted = ["modality", "image_id", "institute", "sex", "age_group", "group"]
    slices = pd.read_parquet(ws.slices_table, columns=[c for c in wanted if c in names])
    scans = make_split(scans_of(slices), cfg.split)
    out = scans[["modality", "image_id", "split"]].sort_values(
        ["modality", "image_id"], kind="stable"
    )
    write_csv_atomic(ws.split_csv, out)
    counts = scans.groupby("split").size().reindex(SPLITS, fill_value=0)
    slice_counts = (
        slices.merge(out, on=["modality", "image_id"])
        .groupby("split")
        .size()
        .reindex(SPLITS, fill_value=0)
    )
    summary = {f"{s}_scans": int(counts[s]) for s in SPLITS} | {
        f"{s}_slices": int(slice_counts[s]) for s in SPLITS
    }
    mark_done(ws.split_csv, record, summary)
    for s in SPLITS:
        log.info("split: %-5s %4d scans %7d slices", s, counts[s], slice_counts[s])
    for s in (s for s in SPLITS if counts[s] == 0):
        hint = (
            f" (no scan from split.test_institutes {cfg.split.test_institutes})"
            if s == "test"
            else ""
        )
        log.warning(
            "split: the %s split is empty%s; evaluation and interpretation need every split",
            s,
            hint,
        )
