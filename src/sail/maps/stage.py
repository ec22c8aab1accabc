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
from sail.encoders.encode import _BatchDecoder, make_job
from sail.encoders.table import read_embeddings
from sail.errors import SailError
from sail.evaluate.inputs import EvalData, load_eval_data, load_sparse
from sail.evaluate.top_slices import top_volumes
from sail.interpret.data import Target, select_targets
from sail.maps import grounding as gr
from sail.maps.labels import LabelMaps, LabelStore
from sail.maps.methods import compute_maps, pre_activations, resolve_method
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
    "enrichment_structure",
    "enrichment_hit_rate",
    "enrichment_null_hit_rate",
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
    parts = []
    for target in targets:
        key = unit_key(target.encoder, target.variant, target.sae_config)
        part = _map_config(cfg, ws, target, data, planted.get(key, []), labels, force)
        if part is not None:
            parts.append(part)
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    write_csv_atomic(ws.eval.spatial_grounding, table.reindex(columns=GROUNDING_COLUMNS))
    log.info("maps: %d grounding rows -> %s", len(table), ws.relative(ws.eval.spatial_grounding))


def _encode_entry(cfg: SailConfig, table: str):
    """The ``encode.encoders`` entry that wrote embeddings/<table>.parquet (None: imported)."""
    from sail.encoders.base import get_spec

    for entry in cfg.encode.encoders:
        if (entry.name or get_spec(entry.encoder).table_name) == table:
            return entry
    return None


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


def _map_config(
    cfg: SailConfig,
    ws: Workspace,
    target: Target,
    data: EvalData,
    planted: list[int],
    labels: LabelMaps | None,
    force: bool,
) -> pd.DataFrame | None:
    """One config's maps.npz, maps.json and grounding rows (read back when up to date)."""
    folder = ws.maps(target.encoder, target.variant, target.sae_config)
    entry = _encode_entry(cfg, target.encoder)
    if entry is None:
        log.warning(
            "maps %s: no encode.encoders entry wrote embeddings/%s (imported embeddings?); "
            "no encoder to map with, skipped",
            target.key,
            target.encoder,
        )
        return None
    settings = cfg.encode.model_copy(
        update={"device": cfg.maps.device, "batch_size": cfg.maps.batch_size, "workers": 0}
    )
    job = make_job(
        entry.encoder, settings, target.encoder, entry.weights, entry.image_size, entry.pooling
    )
    record = _record(cfg, ws, target, job, labels)
    if not force and is_done(folder.arrays, record) and folder.grounding.is_file():
        log.info("maps %s: up to date (%s)", target.key, ws.relative(folder.path))
        return pd.read_csv(folder.grounding, dtype={"sae_config": str}, keep_default_na=False)
    codes = load_sparse(ws, target.encoder, target.variant, target.sae_config, data)
    top = _top_slices(cfg, ws, target, data, codes, planted)
    if len(top.features_K) == 0:
        log.warning("maps %s: no active feature on the report's rows; nothing to map", target.key)
        return None
    encoder = job.build()
    sae = load_sae(ws.sae(target.encoder, target.variant, target.sae_config).path, job.device)
    method = resolve_method(encoder, cfg.maps.method)
    maps = _compute(cfg, ws, target, data, top, encoder, sae, method, codes)
    rows = _ground(cfg, target, data, codes, top, maps, labels)
    _write(cfg, ws, target, data, top, maps, job, encoder, rows, labels is not None)
    mark_done(folder.arrays, record, {"features": len(top.features_K), "method": method})
    return rows


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


def _compute(
    cfg: SailConfig,
    ws: Workspace,
    target: Target,
    data: EvalData,
    top: TopSlices,
    encoder,
    sae: SAE,
    method: str,
    codes: sp.csr_matrix,
) -> ConfigMaps:
    """Maps of every feature on each distinct top slice (valid and train), one encoder pass per
    batch of slices, scattered into the (K, T) slots that need them."""
    both_KT = np.stack([top.valid_KT, top.train_KT])
    unique_U = np.unique(both_KT[both_KT >= 0])
    pos_SKT = np.where(both_KT >= 0, np.searchsorted(unique_U, both_KT), -1)
    K, T = top.valid_KT.shape
    pngs = data.slices["png_path"].to_numpy(dtype=str)[unique_U]
    batch = cfg.maps.batch_size
    spans = [(0, lo, min(lo + batch, len(unique_U))) for lo in range(0, len(unique_U), batch)]
    decoder = _BatchDecoder(ws.root, pngs, spans, encoder.preprocess)
    out_SKThw: np.ndarray | None = None
    pre_SKT = np.full((2, K, T), np.nan, dtype=np.float32)
    mean_err = 0.0
    for i in track(range(len(spans)), f"maps {encoder.name} ({method})"):
        item = decoder[i]
        if item["bad"]:
            row, msg = item["bad"][0]
            raise SailError(f"maps: cannot read {ws.root / pngs[row]}: {msg}")
        _, lo, hi = spans[i]
        result = compute_maps(
            encoder, sae, item["images"], top.features_K, method, cfg.maps.occlusion_grid, batch
        )
        maps_BKhw = result.maps_BKhw.cpu().numpy()
        if out_SKThw is None:
            out_SKThw = np.full((2, K, T, *maps_BKhw.shape[2:]), np.nan, dtype=np.float32)
        s, k, t = np.nonzero((pos_SKT >= lo) & (pos_SKT < hi))
        b = pos_SKT[s, k, t] - lo
        out_SKThw[s, k, t] = maps_BKhw[b, k]
        pre_SKT[s, k, t] = result.pre_BK.cpu().numpy()[b, k]
        mean_err = max(
            mean_err, float((result.maps_BKhw.mean(dim=(2, 3)) - result.pre_BK).abs().max())
        )
    assert out_SKThw is not None
    consistency = {
        "max_abs_map_mean_minus_pre": mean_err,
        **_stored_consistency(ws, target, data, top, sae, codes, pre_SKT[0]),
    }
    return ConfigMaps(method, out_SKThw[0], out_SKThw[1], pre_SKT[0], consistency)


def _stored_consistency(
    ws: Workspace,
    target: Target,
    data: EvalData,
    top: TopSlices,
    sae: SAE,
    codes: sp.csr_matrix,
    pre_KT: np.ndarray,
) -> dict[str, float]:
    """How far the re-encoded pre-activations are from the stored pipeline's: the SAE on the
    stored embeddings, and the stored codes where active (a code is its pre-activation there)."""
    ok = top.valid_KT >= 0
    rows, k_idx = top.valid_KT[ok], np.nonzero(ok)[0]
    table = read_embeddings(ws.embeddings(target.encoder))
    pos = pd.Index(table.slice_ids).get_indexer(data.slices["slice_id"].to_numpy()[rows])
    features = torch.as_tensor(top.features_K).to(sae.device)
    stored_NK = pre_activations(sae, torch.as_tensor(table.x_ND[pos]), features).cpu().numpy()
    stored_N = stored_NK[np.arange(len(rows)), k_idx]
    code_N = np.asarray(codes[rows, top.features_K[k_idx]]).ravel()
    active = code_N > 0
    return {
        "max_abs_pre_minus_stored_embedding_pre": float(np.abs(pre_KT[ok] - stored_N).max()),
        "max_abs_pre_minus_stored_code_where_active": float(
            np.abs(pre_KT[ok][active] - code_N[active]).max() if active.any() else 0.0
        ),
    }


def _enrichment_structures(
    cfg: SailConfig, data: EvalData, codes: sp.csr_matrix, features_K: np.ndarray
) -> dict[int, str]:
    """Feature -> the structure its slice-level enrichment names: the report's top label (the
    feature card's), when that label is a structure. Same split, top slices and rule as the page."""
    from sail.report.site import _ConceptSplit

    concept = _ConceptSplit(cfg, data, codes, report_label_columns(cfg, data.slices))
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
    draws_KTR = _null_draws(cfg, data, top.valid_KT, labels)
    everything = np.concatenate([top.valid_KT.ravel(), top.train_KT.ravel(), draws_KTR.ravel()])
    store = labels.load(np.unique(everything[everything >= 0]))
    rows = []
    for k, feature in enumerate(top.features_K):
        named = enrichment.get(int(feature), "")
        scores = _ground_feature(
            store,
            (top.train_KT[k], maps.train_KThw[k]),
            (top.valid_KT[k], maps.valid_KThw[k]),
            draws_KTR[k],
            labels.index(named),
        )
        rows.append(
            {
                "feature": int(feature),
                "structure": labels.names[scores.pop("structure_index")],
                "enrichment_structure": named,
                **scores,
            }
        )
    out = pd.DataFrame(rows).assign(
        encoder=target.encoder,
        variant=target.variant,
        sae_config=target.sae_config,
        method=maps.method,
    )
    return out[GROUNDING_COLUMNS]


def _null_draws(
    cfg: SailConfig, data: EvalData, valid_KT: np.ndarray, labels: LabelMaps
) -> np.ndarray:
    """(K, T, R) rows of other valid slices of the same modality x plane, drawn per top slice."""
    pool = report_rows(data)
    group = labels.groups(data.slices)
    rng = np.random.default_rng(cfg.maps.seed)
    ok = valid_KT >= 0
    self_N = np.searchsorted(pool, valid_KT[ok])
    self_N = np.where(pool[np.minimum(self_N, len(pool) - 1)] == valid_KT[ok], self_N, -1)
    R = cfg.maps.null_permutations
    draws_KTR = np.full((*valid_KT.shape, R), -1, dtype=np.int64)
    local = gr.draw_null(group[valid_KT[ok]], self_N, group[pool], R, rng)
    draws_KTR[ok] = np.where(local >= 0, pool[np.maximum(local, 0)], -1)
    return draws_KTR


def _ground_feature(
    store: LabelStore,
    train: tuple[np.ndarray, np.ndarray],
    valid: tuple[np.ndarray, np.ndarray],
    draws_TR: np.ndarray,
    enrichment_index: int,
) -> dict[str, Any]:
    """One feature: structure chosen on its train maps, pointing game of its valid maps."""
    rows, maps_Thw = train
    ok = rows >= 0
    structure, share = 0, float("nan")
    if ok.any():
        labels_NHW = store.get(rows[ok])
        up = gr.upsample(maps_Thw[ok], labels_NHW.shape[1:])
        structure, share = gr.choose_structure(gr.positive_mass(up, labels_NHW, store.n_labels))
    rows, maps_Thw = valid
    ok = rows >= 0
    labels_NHW = store.get(rows[ok])
    peaks_N = gr.peak_pixels(maps_Thw[ok], labels_NHW.shape[1:])
    peak_labels_N = gr.labels_at(labels_NHW, np.arange(len(peaks_N)), peaks_N)
    null_NR = gr.labels_at(store.labels, store.positions(draws_TR[ok]), peaks_N[:, None])
    hit, null = gr.pointing(peak_labels_N, null_NR, structure)
    e_hit, e_null = gr.pointing(peak_labels_N, null_NR, enrichment_index)
    return {
        "structure_index": structure,
        "mass_share": share,
        "hit_rate": hit,
        "null_hit_rate": null,
        "n_slices": int(ok.sum()),
        "enrichment_hit_rate": e_hit,
        "enrichment_null_hit_rate": e_null,
    }


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
