"""The ``maps`` stage: spatial maps of the reported features and their grounding in the masks.

Per interpreted config (:func:`sail.interpret.data.select_targets`), the features the report pages
(:mod:`sail.report.selection`) get a map on each of their top valid slices (one per volume, the
report's tiles) and on their top train slices. The train maps choose each feature's structure, the
valid maps are scored against it (:mod:`sail.maps.grounding`); only the valid maps are stored
(maps.npz, with maps.json's provenance), the per-config grounding rows are assembled into
``eval/spatial_grounding.csv``. The encoder is rebuilt from the ``encode.encoders`` entry that made
the embeddings and reads the slice PNGs as the encode stage does, so a map's pooled embedding is
the stored one (maps.json records how close).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from sail.artifacts import read_table
from sail.config import SailConfig
from sail.console import track
from sail.encoders.encode import BatchDecoder, recorded_job
from sail.encoders.table import read_embeddings
from sail.errors import SailError
from sail.evaluate.inputs import EvalData, load_eval_data, load_sparse
from sail.evaluate.top_slices import top_volumes
from sail.interpret.data import Target, select_targets
from sail.maps import grounding as gr
from sail.maps.labels import LabelMaps, LabelStore
from sail.maps.methods import encoder_pass, maps_from_pass, pre_activations, resolve_method
from sail.report.selection import (
    paged_features,
    planted_by_unit,
    planted_rows,
    report_label_columns,
    report_rows,
    unit_key,
)
from sail.sae.api import SAE, load_sae
from sail.workspace import (
    StageRecord,
    Workspace,
    atomic_path,
    fingerprint,
    hash_config,
    is_done,
    mark_done,
    write_csv_atomic,
    write_json_atomic,
)

log = logging.getLogger(__name__)

STRUCTURE_LABEL = "structure="  # the report's enrichment label of a has_<structure> column
GROUNDING_COLUMNS = [
    "encoder",
    "variant",
    "sae_config",
    "feature",
    "method",
    "structure",
    "mass_share",
    "hit_rate",
    "null_hit_rate",
    "n_slices",
    "n_holding",
    "located_rate",
    "located_null_rate",
    "enrichment_structure",
    "enrichment_hit_rate",
    "enrichment_null_hit_rate",
    "enrichment_n_holding",
    "enrichment_located_rate",
    "enrichment_located_null_rate",
]


@dataclass
class TopSlices:
    """The reported features (K) and their top rows of ``EvalData`` (K x T, -1 padded)."""

    features_K: np.ndarray
    valid_KT: np.ndarray
    train_KT: np.ndarray


@dataclass
class ConfigMaps:
    """Maps of one config on the encoder grid, float32, NaN where a slot is padding."""

    method: str
    valid_KThw: np.ndarray
    train_KThw: np.ndarray
    pre_KT: np.ndarray  # re-encoded pre-activations of the valid top slices
    consistency: dict[str, float]


def run_maps(cfg: SailConfig, ws: Workspace, force: bool = False) -> None:
    """Pipeline stage: maps/<encoder>/<variant>/<config>/ per interpreted config, then
    eval/spatial_grounding.csv from their grounding rows."""
    if not cfg.maps.enabled:
        log.info("maps: disabled (maps.enabled: false)")
        return
    targets = select_targets(cfg, ws)
    data = load_eval_data(ws)
    planted = planted_by_unit(planted_rows(cfg, ws, read_table(ws.eval.table("concepts"))))
    labels = LabelMaps.open(ws, data.slices)
    if labels is None:
        log.info(
            "maps: no label maps in %s (prepare.label_maps off); maps are written, spatial "
            "grounding is skipped",
            ws.slices_table,
        )
    parts: list[pd.DataFrame] = []
    for table in sorted({t.encoder for t in targets}):
        units = [
            Unit(t, planted.get(unit_key(t.encoder, t.variant, t.sae_config), []))
            for t in targets
            if t.encoder == table
        ]
        parts += _map_encoder(cfg, ws, table, units, data, labels, force)
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    write_csv_atomic(ws.eval.spatial_grounding, table.reindex(columns=GROUNDING_COLUMNS))
    log.info("maps: %d grounding rows -> %s", len(table), ws.relative(ws.eval.spatial_grounding))


@dataclass
class Unit:
    """One config to map: its target, planted features and, once loaded, codes, tops and SAE."""

    target: Target
    planted: list[int]
    record: StageRecord | None = None
    codes: sp.csr_matrix | None = None
    top: TopSlices | None = None
    sae: SAE | None = None


def _record(cfg: SailConfig, ws: Workspace, target: Target, job, labels) -> StageRecord:
    t = target
    settings = cfg.maps.model_dump(mode="json", exclude={"device", "batch_size", "enabled"})
    config = {
        "maps": settings,
        "encoder": job.identity(),
        "report": cfg.report.model_dump(mode="json", include={"max_features", "top_slices"}),
        "enrichment": cfg.interpret.autointerp.model_dump(
            mode="json", include={"concept_split", "enrichment_top"}
        ),
        "planted": [cfg.evaluate.probe_structures, cfg.train.variants, cfg.evaluate.extra_tasks],
        "grounding_columns": GROUNDING_COLUMNS,  # a table of other columns is recomputed
    }
    inputs = {
        "slices": fingerprint(ws.slices_table),
        "split": fingerprint(ws.split_csv),
        "embeddings": fingerprint(ws.embeddings(t.encoder)),
        "sae": fingerprint(ws.sae(t.encoder, t.variant, t.sae_config).weights),
        **{
            f"activations_{s}": fingerprint(ws.activations(t.encoder, t.variant, t.sae_config, s))
            for s in ("train", "valid", "test")
        },
        **{n: fingerprint(ws.eval.table(n)) for n in ("monosemanticity_features", "concepts")},
        "ranking": fingerprint(ws.eval.ranking),
        "structure_ids": fingerprint(ws.structure_ids) if labels is not None else "none",
    }
    return StageRecord("maps", hash_config(config), inputs)


def _map_encoder(
    cfg: SailConfig,
    ws: Workspace,
    table: str,
    units: list[Unit],
    data: EvalData,
    labels: LabelMaps | None,
    force: bool,
) -> list[pd.DataFrame]:
    """The configs of one embeddings table: those not up to date share one encoder pass over the
    union of their top slices; returns every config's grounding rows."""
    settings = cfg.encode.model_copy(
        update={"device": cfg.maps.device, "batch_size": cfg.maps.batch_size}
    )
    job = recorded_job([cfg], ws, table, settings)
    if job is None:
        log.warning(
            "maps: no encode.encoders entry wrote embeddings/%s (imported embeddings?); no "
            "encoder to map its configs with, skipped",
            table,
        )
        return []
    parts, todo = [], []
    for unit in units:
        t = unit.target
        folder = ws.maps(t.encoder, t.variant, t.sae_config)
        unit.record = _record(cfg, ws, t, job, labels)
        if not force and is_done(folder.arrays, unit.record) and folder.grounding.is_file():
            log.info("maps %s: up to date (%s)", t.key, ws.relative(folder.path))
            parts.append(
                pd.read_csv(folder.grounding, dtype={"sae_config": str}, keep_default_na=False)
            )
            continue
        unit.codes = load_sparse(ws, t.encoder, t.variant, t.sae_config, data)
        unit.top = _top_slices(cfg, ws, t, data, unit.codes, unit.planted)
        if len(unit.top.features_K) == 0:
            log.warning("maps %s: no active feature on the report's rows; nothing to map", t.key)
            continue
        unit.sae = load_sae(ws.sae(t.encoder, t.variant, t.sae_config).path, job.device)
        todo.append(unit)
    if not todo:
        return parts
    encoder = job.build()
    method = resolve_method(encoder, cfg.maps.method)
    if method is None:
        log.warning(
            "maps: %s pools by %s and has no patch tokens: no exact or approximate map; its "
            "configs are skipped (maps.method: occlusion maps any encoder, slower)",
            job.name,
            encoder.pooled_by,
        )
        return parts
    for unit, maps in zip(todo, _compute(cfg, ws, data, todo, encoder, method, job), strict=True):
        t = unit.target
        rows = _ground(cfg, t, data, unit.codes, unit.top, maps, labels)
        _write(cfg, ws, t, data, unit.top, maps, job, encoder, rows, labels is not None)
        summary = {"features": len(unit.top.features_K), "method": method}
        mark_done(ws.maps(t.encoder, t.variant, t.sae_config).arrays, unit.record, summary)
        parts.append(rows)
    return parts


def _top_slices(
    cfg: SailConfig,
    ws: Workspace,
    target: Target,
    data: EvalData,
    codes: sp.csr_matrix,
    planted: list[int],
) -> TopSlices:
    """The report's features and, per feature, its top slices (one per volume) on the report's
    rows (valid) and, by the same rule, on train."""
    rows = report_rows(data)
    sub = codes[rows].tocsc()
    sub.sort_indices()
    key = (target.encoder, target.variant, target.sae_config)
    features_K, _ = paged_features(ws, key, np.diff(sub.indptr), planted, cfg.report.max_features)
    n = cfg.report.top_slices

    def tops(split_rows: np.ndarray) -> np.ndarray:
        if len(split_rows) == 0:
            return np.full((len(features_K), n), -1, dtype=np.int64)
        local, _ = top_volumes(codes[split_rows][:, features_K], data.volume[split_rows], n)
        return np.where(local >= 0, split_rows[np.maximum(local, 0)], -1)

    return TopSlices(features_K, tops(rows), tops(data.split_rows["train"]))


class _Scatter:
    """One config's output arrays and where each of its (split, feature, slot) reads its map in
    the shared list of distinct slices."""

    def __init__(self, unit: Unit, unique_U: np.ndarray):
        top = unit.top
        self.unit = unit
        self.both_SKT = np.stack([top.valid_KT, top.train_KT])
        self.pos_SKT = np.where(self.both_SKT >= 0, np.searchsorted(unique_U, self.both_SKT), -1)
        self.maps: np.ndarray | None = None
        self.pre_SKT = np.full(self.both_SKT.shape, np.nan, dtype=np.float32)
        self.code_SKT = np.full(self.both_SKT.shape, np.nan, dtype=np.float32)
        self.mean_err = 0.0

    def add(self, run, lo: int, hi: int) -> None:
        result = maps_from_pass(run, self.unit.sae, self.unit.top.features_K)
        maps_BKhw = result.maps_BKhw.cpu().numpy()
        if self.maps is None:
            shape = (*self.both_SKT.shape, *maps_BKhw.shape[2:])
            self.maps = np.full(shape, np.nan, dtype=np.float32)
        s, k, t = np.nonzero((self.pos_SKT >= lo) & (self.pos_SKT < hi))
        b = self.pos_SKT[s, k, t] - lo
        self.maps[s, k, t] = maps_BKhw[b, k]
        self.pre_SKT[s, k, t] = result.pre_BK.cpu().numpy()[b, k]
        codes_BF = self.unit.sae.encode(run.pooled())  # the activations stage's rule
        self.code_SKT[s, k, t] = codes_BF[:, self.unit.top.features_K].cpu().numpy()[b, k]
        err = (result.maps_BKhw.mean(dim=(2, 3)) - result.pre_BK).abs().max()
        self.mean_err = max(self.mean_err, float(err))


def _compute(
    cfg: SailConfig,
    ws: Workspace,
    data: EvalData,
    units: list[Unit],
    encoder,
    method: str,
    job,
) -> list[ConfigMaps]:
    """Maps of every config's features on each distinct top slice (valid and train) of all the
    configs: one encoder pass per batch of slices (decoded as the encode stage decodes them),
    shared by the configs' SAEs and scattered into the (feature, slot) places that need it."""
    both = np.concatenate([np.concatenate([u.top.valid_KT, u.top.train_KT]).ravel() for u in units])
    unique_U = np.unique(both[both >= 0])
    scatters = [_Scatter(u, unique_U) for u in units]
    pngs = data.slices["png_path"].to_numpy(dtype=str)[unique_U]
    batch = job.batch_size
    spans = [(0, lo, min(lo + batch, len(unique_U))) for lo in range(0, len(unique_U), batch)]
    loader = torch.utils.data.DataLoader(
        BatchDecoder(ws.root, pngs, spans, encoder.preprocess),
        batch_size=None,
        shuffle=False,
        num_workers=job.workers,
        prefetch_factor=2 if job.workers > 0 else None,
    )
    log.info(
        "maps %s: %d distinct slices for %d configs (%s)",
        job.name,
        len(unique_U),
        len(units),
        method,
    )
    for item in track(loader, f"maps {job.name} ({method})", total=len(spans)):
        if item["bad"]:
            row, msg = item["bad"][0]
            raise SailError(f"maps: cannot read {ws.root / pngs[row]}: {msg}")
        _, lo, hi = spans[item["index"]]
        run = encoder_pass(encoder, item["images"], method, cfg.maps.occlusion_grid, batch)
        for scatter in scatters:
            scatter.add(run, lo, hi)
    out = []
    stored = read_embeddings(ws.embeddings(units[0].target.encoder))  # once for all the configs
    for sc in scatters:
        assert sc.maps is not None
        consistency = {
            "max_abs_map_mean_minus_pre": sc.mean_err,
            **_stored_consistency(stored, data, sc),
        }
        out.append(ConfigMaps(method, sc.maps[0], sc.maps[1], sc.pre_SKT[0], consistency))
    return out


def _stored_consistency(table, data: EvalData, scatter: _Scatter) -> dict[str, float]:
    """How far the re-encoded slices are from the stored pipeline's, on the stored (valid) slots:
    the SAE pre-activation of the stored embedding, and the activations stage's stored code."""
    unit = scatter.unit
    top = unit.top
    ok = top.valid_KT >= 0
    rows, k_idx = top.valid_KT[ok], np.nonzero(ok)[0]
    pos = pd.Index(table.slice_ids).get_indexer(data.slices["slice_id"].to_numpy()[rows])
    features = torch.as_tensor(top.features_K).to(unit.sae.device)
    stored_NK = pre_activations(unit.sae, torch.as_tensor(table.x_ND[pos]), features)
    stored_N = stored_NK.cpu().numpy()[np.arange(len(rows)), k_idx]
    code_N = np.asarray(unit.codes[rows, top.features_K[k_idx]]).ravel()
    return {
        "max_abs_pre_minus_stored_embedding_pre": float(
            np.abs(scatter.pre_SKT[0][ok] - stored_N).max()
        ),
        "max_abs_code_minus_stored_code": float(np.abs(scatter.code_SKT[0][ok] - code_N).max()),
    }


def _enrichment_structures(
    cfg: SailConfig, data: EvalData, codes: sp.csr_matrix, features_K: np.ndarray
) -> dict[int, str]:
    """Feature -> the structure its slice-level enrichment names: the report's top label (the
    feature card's), when that label is a structure. Same split, top slices and rule as the page."""
    from sail.report.site import ConceptSplit

    concept = ConceptSplit(cfg, data, codes, report_label_columns(cfg, data.slices))
    out = {}
    for f in features_K:
        rows = concept.of(int(f))["rows"]
        label = rows[0]["label"] if rows else ""
        if label.startswith(STRUCTURE_LABEL):
            out[int(f)] = label[len(STRUCTURE_LABEL) :]
    return out


def _ground(
    cfg: SailConfig,
    target: Target,
    data: EvalData,
    codes: sp.csr_matrix,
    top: TopSlices,
    maps: ConfigMaps,
    labels: LabelMaps | None,
) -> pd.DataFrame:
    """Grounding rows of one config (none without label maps)."""
    if labels is None:
        return pd.DataFrame(columns=GROUNDING_COLUMNS)
    enrichment = _enrichment_structures(cfg, data, codes, top.features_K)
    nulls = NullDraws(cfg, data, labels)
    draws_KTR = nulls.draw(top.valid_KT)
    store = labels.load(_distinct(top.train_KT))  # the train maps choose each structure
    chosen_K = [
        _choose(store, top.train_KT[k], maps.train_KThw[k]) for k in range(len(top.features_K))
    ]
    named_K = [enrichment.get(int(f), "") for f in top.features_K]
    # the pointing game on the slices that hold the structure, against other slices holding it
    held = {
        (k, name): nulls.draw_holding(top.valid_KT[k], name)
        for k, (label, _) in enumerate(chosen_K)
        for name in (labels.names[label], named_K[k])
        if name
    }
    held_draws = [draws for _, draws in held.values()]
    store = labels.load(_distinct(top.valid_KT, top.train_KT, draws_KTR, *held_draws))
    rows = []
    for k, feature in enumerate(top.features_K):
        label, share = chosen_K[k]
        valid = (top.valid_KT[k], maps.valid_KThw[k], draws_KTR[k])
        chosen = labels.names[label]
        rows.append(
            {
                "feature": int(feature),
                "structure": chosen,
                "mass_share": share,
                **_point(store, valid, labels.indices(chosen), held.get((k, chosen))),
                "enrichment_structure": named_K[k],
                **_point(
                    store,
                    valid,
                    labels.indices(named_K[k]),
                    held.get((k, named_K[k])),
                    "enrichment_",
                ),
            }
        )
    out = pd.DataFrame(rows).assign(
        encoder=target.encoder,
        variant=target.variant,
        sae_config=target.sae_config,
        method=maps.method,
    )
    return out[GROUNDING_COLUMNS]


def _distinct(*rows: np.ndarray) -> np.ndarray:
    """The distinct real rows (-1 = padding) of several row arrays."""
    every = np.concatenate([np.ravel(r) for r in rows])
    return np.unique(every[every >= 0])


class NullDraws:
    """Seeded draws of other valid slices of the same modality x plane: the pointing game's null.

    ``draw``: from every such slice (the layout alone). ``draw_holding``: only from those whose
    ``has_<structure>`` flag is set, for the slices that hold it themselves: where the structure
    lies once it is there, so a peak that merely sits where the structure usually is scores as
    high on the null.
    """

    def __init__(self, cfg: SailConfig, data: EvalData, labels: LabelMaps):
        self.slices = data.slices
        self.pool = report_rows(data)
        self.group = labels.groups(data.slices)
        self.n_draws = cfg.maps.null_permutations
        self.rng = np.random.default_rng(cfg.maps.seed)
        self.rng_holding = np.random.default_rng([cfg.maps.seed, 1])
        self._holds: dict[str, np.ndarray] = {}  # structure -> its has_ flag per row

    def draw(self, rows: np.ndarray, pool: np.ndarray | None = None, rng=None) -> np.ndarray:
        """(*rows.shape, R) drawn pool rows per row (-1: a padding row, or none to draw)."""
        pool = self.pool if pool is None else pool
        ok = rows >= 0
        draws = np.full((*rows.shape, self.n_draws), -1, dtype=np.int64)
        if not len(pool) or not ok.any():
            return draws
        self_N = np.searchsorted(pool, rows[ok])  # the row's own place in the pool, if any
        self_N = np.where(pool[np.minimum(self_N, len(pool) - 1)] == rows[ok], self_N, -1)
        local = gr.draw_null(
            self.group[rows[ok]], self_N, self.group[pool], self.n_draws, rng or self.rng
        )
        draws[ok] = np.where(local >= 0, pool[np.maximum(local, 0)], -1)
        return draws

    def holds(self, structure: str) -> np.ndarray:
        if structure not in self._holds:
            column = f"has_{structure}"
            if column not in self.slices.columns:
                raise SailError(f"spatial grounding: the slices table has no column {column!r}")
            self._holds[structure] = self.slices[column].fillna(False).to_numpy(dtype=bool)
        return self._holds[structure]

    def draw_holding(self, rows_T: np.ndarray, structure: str) -> tuple[np.ndarray, np.ndarray]:
        """Which top slices hold ``structure`` (T,) and, for those, (T, R) draws among the pool
        slices that hold it too (-1 elsewhere, and where the group holds no other)."""
        holds = self.holds(structure)
        holding_T = (rows_T >= 0) & holds[np.maximum(rows_T, 0)]
        rows = np.where(holding_T, rows_T, -1)
        return holding_T, self.draw(rows, self.pool[holds[self.pool]], self.rng_holding)


def _choose(store: LabelStore, rows: np.ndarray, maps_Thw: np.ndarray) -> tuple[int, float]:
    """The structure holding the most positive map mass over a feature's train top slices."""
    ok = rows >= 0
    if not ok.any():
        return 0, float("nan")
    labels_NHW = store.get(rows[ok])
    up = gr.upsample(maps_Thw[ok], labels_NHW.shape[1:])
    return gr.choose_structure(gr.positive_mass(up, labels_NHW, store.n_labels))


def _point(
    store: LabelStore,
    valid: tuple[np.ndarray, np.ndarray, np.ndarray],
    indices: np.ndarray,
    held: tuple[np.ndarray, np.ndarray] | None,
    prefix: str = "",
) -> dict[str, Any]:
    """The pointing game of a feature's valid maps on one structure: on every top slice against
    the layout null, and on the top slices that hold the structure against slices holding it."""
    rows, maps_Thw, draws_TR = valid
    ok = rows >= 0
    cells_T = np.full(len(rows), -1, dtype=np.int64)
    cells_T[ok] = gr.peak_cells(maps_Thw[ok])
    presence = store.presence(maps_Thw.shape[1:])
    hit, null = gr.pointing(
        presence, store.positions(rows[ok]), cells_T[ok], store.positions(draws_TR[ok]), indices
    )
    out = {f"{prefix}hit_rate": hit, f"{prefix}null_hit_rate": null}
    if not prefix:
        out["n_slices"] = int(ok.sum())
    holding_T, held_TR = held if held is not None else (np.zeros_like(ok), draws_TR)
    located, located_null = gr.pointing(
        presence,
        store.positions(rows[holding_T]),
        cells_T[holding_T],
        store.positions(held_TR[holding_T]),
        indices,
    )
    out |= {
        f"{prefix}n_holding": int(holding_T.sum()),
        f"{prefix}located_rate": located,
        f"{prefix}located_null_rate": located_null,
    }
    return out


def _write(
    cfg: SailConfig,
    ws: Workspace,
    target: Target,
    data: EvalData,
    top: TopSlices,
    maps: ConfigMaps,
    job,
    encoder,
    rows: pd.DataFrame,
    grounded: bool,
) -> None:
    """maps.npz (valid maps, float16), maps.json (provenance) and the grounding rows."""
    folder = ws.maps(target.encoder, target.variant, target.sae_config)
    ids = data.slices["slice_id"].to_numpy(dtype=str)
    slice_id_KT = np.where(top.valid_KT >= 0, ids[np.maximum(top.valid_KT, 0)], "")
    with atomic_path(folder.arrays) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(
            f,
            feature_K=top.features_K.astype(np.int64),
            slice_id_KT=slice_id_KT,
            maps_KThw=maps.valid_KThw.astype(np.float16),
            pre_KT=maps.pre_KT.astype(np.float32),
        )
    sae = ws.sae(target.encoder, target.variant, target.sae_config)
    provenance = {
        "method": maps.method,
        "approximate": maps.method != "exact",
        "encoder": target.encoder,
        "encode": job.identity(),
        "preprocessing": encoder.preprocess.to_dict(),
        "grid": list(maps.valid_KThw.shape[2:]),
        "image_size": job.image_size,
        "occlusion_grid": cfg.maps.occlusion_grid if maps.method == "occlusion" else None,
        "sae": ws.relative(sae.path),
        "sae_weights": fingerprint(sae.weights),
        "split": "valid",
        "top_slices": cfg.report.top_slices,
        "n_features": len(top.features_K),
        "structure_chosen_on": "train",
        "grounding": grounded,
        "null_permutations": cfg.maps.null_permutations,
        "seed": cfg.maps.seed,
        "consistency": maps.consistency,
    }
    write_json_atomic(folder.provenance, provenance)
    write_csv_atomic(folder.grounding, rows)
