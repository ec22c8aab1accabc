"""The ``evaluate`` stage: per-unit results under eval/units/, assembled into the eval/ tables.

A unit is one encoder's dense probe (fitted once per encoder, not per SAE config) or one SAE
config. Each unit writes its own part files with a manifest, so a rerun recomputes only the units
whose inputs or settings changed and every table is rebuilt from the parts: rows are replaced,
never appended, and units that finished earlier are never dropped from a summary.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from sail.artifacts import EVAL_TABLES, EVAL_UNIT_MAIN, SPLITS, EvalFolder, SaeFolder
from sail.config import EvaluateConfig, SailConfig
from sail.data.labels import VOCABULARY
from sail.errors import SailError
from sail.evaluate import concepts as concepts_mod
from sail.evaluate import monosemanticity as mono
from sail.evaluate.hierarchy import config_hierarchy
from sail.evaluate.inputs import (
    EvalData,
    discover_configs,
    discover_encoders,
    embedded,
    load_dense,
    load_eval_data,
    load_sae_info,
    load_sparse,
    read_final_metrics,
)
from sail.evaluate.probes import (
    PROBE_COLUMNS,
    as_design,
    build_tasks,
    coefficient_table,
    run_probes,
)
from sail.evaluate.ranking import RANKING_COLUMNS, rank_configs, table1_markdown
from sail.evaluate.recovery import run_recovery
from sail.evaluate.stability import config_stability, load_decoder
from sail.workspace import (
    StageRecord,
    Workspace,
    check_table,
    fingerprint,
    hash_config,
    is_done,
    mark_done,
    write_csv_atomic,
    write_parquet_atomic,
    write_text_atomic,
)

log = logging.getLogger(__name__)

DENSE = "dense"
# parts every SAE unit writes since seed stability and the hierarchy were added: a unit finished
# before lacks them and is recomputed
SPARSE_ONLY_PARTS = ("stability", "hierarchy")
# dense-unit part merged into concepts.csv (the raw-dimension control), not a table of its own
RAW_CONCEPTS = "raw_concepts"


def unit_dir(ws: Workspace, encoder: str, variant: str, config: str) -> Path:
    return ws.eval.unit(encoder, variant, None if variant == DENSE else config)


def _write_parts(folder: Path, parts: dict[str, pd.DataFrame]) -> None:
    for name, df in parts.items():
        if name == "probes":
            continue
        write_parquet_atomic(EvalFolder.part(folder, name), df.reset_index(drop=True))
    write_parquet_atomic(EvalFolder.unit_main(folder), parts["probes"].reset_index(drop=True))


def _unit_done(folder: Path, record: StageRecord, parts: tuple[str, ...] = ()) -> bool:
    return is_done(EvalFolder.unit_main(folder), record) and all(
        EvalFolder.part(folder, name).is_file() for name in parts
    )


def _probe_settings_hash(ecfg: EvaluateConfig) -> dict:
    return {
        "tasks": ecfg.tasks,
        "extra_tasks": ecfg.extra_tasks,
        "probe_structures": ecfg.probe_structures,
        "probe": ecfg.probe.model_dump(),
        "concepts": ecfg.concepts.model_dump(),
        "concept_controls": 1,  # raw-dimension and shuffled-label controls in concepts.csv
        "hierarchy": 2,  # co-activation parents chosen on train, measured on valid
        "monosemanticity": ecfg.monosemanticity.model_dump(),
    }


def run_dense_unit(
    ecfg: EvaluateConfig, encoder: str, data: EvalData, x_ND: np.ndarray
) -> dict[str, pd.DataFrame]:
    """Dense probes (once per encoder) and the monosemanticity null, shared by all its configs."""
    ids = {"encoder": encoder, "variant": DENSE, "sae_config": DENSE}
    tasks, skipped = build_tasks(data, ecfg)
    for reason in skipped:
        log.warning("probe task skipped: %s", reason)
    out = run_probes(tasks, as_design(x_ND), data, ecfg.probe, ids)
    ms = ecfg.monosemanticity
    rows = data.split_rows[ms.split]
    o, _, _ = mono.structure_matrix(data.slices.iloc[rows], VOCABULARY)
    nulls = []
    for n in sorted(set(ms.top_n)):
        mean, std = mono.null_coherence(o, n, ms.null_draws, ms.seed, data.volume[rows])
        nulls.append(
            {
                "encoder": encoder,
                "split": ms.split,
                "top_n": n,
                "null_mean": mean,
                "null_std": std,
                "draws": ms.null_draws,
            }
        )
    cc = ecfg.concepts
    parts = {
        "probes": pd.DataFrame(out.rows, columns=PROBE_COLUMNS),
        "probe_coefficients": coefficient_table(out.coefs, ids),
        "probes_breakdown": concepts_mod.breakdown(
            out.test_scores, data.slices, data.volume, cc.breakdown_by, cc.bootstrap, cc.seed, ids
        ),
        "null_baselines": pd.DataFrame(nulls),
        RAW_CONCEPTS: concepts_mod.raw_dimension_concepts(
            x_ND, data.slices, data.split_rows, encoder
        ),
    }
    return parts


def run_sparse_unit(
    ws: Workspace,
    ecfg: EvaluateConfig,
    encoder: str,
    variant: str,
    config: str,
    data: EvalData,
    dense_parts: dict[str, pd.DataFrame],
) -> dict[str, pd.DataFrame]:
    """Sparse probes, recovery, monosemanticity and concepts of one SAE config."""
    ids = {"encoder": encoder, "variant": variant, "sae_config": config}
    codes = load_sparse(ws, encoder, variant, config, data)
    info = load_sae_info(ws, encoder, variant, config, codes.shape[1])
    tasks, _ = build_tasks(data, ecfg)
    out = run_probes(tasks, as_design(codes), data, ecfg.probe, ids)
    dense = dense_parts["probes"]
    dense = dense[dense["split"] == "valid"]
    dense_auc = {(r.task, r.target): float(r.roc_auc) for r in dense.itertuples()}
    curves, summary, rec_bad = run_recovery(
        tasks, codes, data, out.coefs, dense_auc, ecfg.probe, ecfg.recovery, ids
    )

    ms = ecfg.monosemanticity
    rows = data.split_rows[ms.split]
    o, _, vocab_size = mono.structure_matrix(data.slices.iloc[rows], VOCABULARY)
    null = dense_parts["null_baselines"].set_index("top_n")["null_mean"].to_dict()
    sub = codes[rows]
    feats = mono.score_features(
        sub, data.volume[rows], o, vocab_size, ms.top_n, null, info.dict_sizes
    )
    n_dead = int((np.diff(sub.tocsc().indptr) == 0).sum())
    for k, v in reversed(list(ids.items())):
        feats.insert(0, k, v)
    feats.insert(3, "split", ms.split)
    mono_cfg = pd.DataFrame(
        [{**ids, **mono.config_scores(feats, n_dead)}], columns=mono.CONFIG_COLUMNS
    )

    cc = ecfg.concepts
    concepts, confounds = concepts_mod.ground_concepts(
        codes,
        data.slices,
        data.split_rows,
        ids,
        cc.confound_labels,
        cc.confound_min_auc,
        volume=data.volume,
        seed=cc.seed,
    )
    hierarchy = config_hierarchy(
        ids,
        _decoder_or_none(ws, ids),
        codes[data.split_rows["train"]],
        codes[data.split_rows["valid"]],
        info.dict_sizes,
    )
    log.info(
        "%s/%s/%s: %d probe fits (%d hit max_iter), %d recovery fits hit max_iter; "
        "vocabulary %d structures",
        encoder,
        variant,
        config,
        out.n_fits,
        out.n_unconverged,
        rec_bad,
        vocab_size,
    )
    return {
        "probes": pd.DataFrame(out.rows, columns=PROBE_COLUMNS),
        "probe_coefficients": coefficient_table(out.coefs, ids),
        "probes_breakdown": concepts_mod.breakdown(
            out.test_scores, data.slices, data.volume, cc.breakdown_by, cc.bootstrap, cc.seed, ids
        ),
        "monosemanticity_features": feats[mono.FEATURE_COLUMNS],
        "monosemanticity_configs": mono_cfg,
        "recovery_curves": curves,
        "recovery_summary": summary,
        "concepts": concepts,
        "confounds": confounds,
        "stability": config_stability(ws, encoder, variant, config, info.dict_sizes),
        "hierarchy": hierarchy,
    }


def _decoder_or_none(ws: Workspace, ids: dict[str, str]) -> np.ndarray | None:
    """The config's decoder rows, or None (warned) when its checkpoint is missing or unreadable."""
    sae_dir = ws.sae_dir(ids["encoder"], ids["variant"], ids["sae_config"])
    try:
        return load_decoder(sae_dir)[0]
    except SailError as exc:
        log.warning("%s: hierarchy without decoder parents (%s)", sae_dir, exc)
        return None


def _read_parts(folder: Path) -> dict[str, pd.DataFrame]:
    return {p.stem: pd.read_parquet(p) for p in folder.glob("*.parquet")}


def _select_encoders(ws: Workspace, ecfg: EvaluateConfig) -> list[str]:
    available = discover_encoders(ws)
    if ecfg.encoders is None:
        if not available:
            raise SailError(
                f"no embeddings tables in {ws.root / 'embeddings'}: run `sail encode` first"
            )
        return available
    for enc in ecfg.encoders:
        if not ws.embeddings(enc).is_file():
            raise SailError(
                f"evaluate.encoders: {ws.embeddings(enc)} not found "
                f"(have: {', '.join(available) or 'none'})"
            )
    return list(ecfg.encoders)


def _stage_inputs(
    ws: Workspace, encoders: list[str]
) -> tuple[dict[str, str], dict[str, list[tuple[str, str]]]]:
    inputs = {"slices": fingerprint(ws.slices_table), "split": fingerprint(ws.split_csv)}
    configs = {}
    for enc in encoders:
        inputs[f"embeddings/{enc}"] = fingerprint(ws.embeddings(enc))
        configs[enc] = discover_configs(ws, enc)
        for variant, cfg_name in configs[enc]:
            inputs.update(_sparse_inputs(ws, enc, variant, cfg_name))
    return inputs, configs


def _sparse_inputs(ws: Workspace, enc: str, variant: str, cfg_name: str) -> dict[str, str]:
    out = {}
    for split in SPLITS:
        out[f"activations/{enc}/{variant}/{cfg_name}/{split}"] = fingerprint(
            ws.activations(enc, variant, cfg_name, split)
        )
    sae = ws.sae(enc, variant, cfg_name)
    for path in (sae.cfg, sae.metrics):
        out[ws.relative(path)] = fingerprint(path)
    for folder in ws.replicate_dirs(enc, variant, cfg_name).values():  # seed stability
        replicate_cfg = SaeFolder(folder).cfg
        out[ws.relative(replicate_cfg)] = fingerprint(replicate_cfg)
    return out


def run_evaluate(cfg: SailConfig, ws: Workspace, force: bool = False) -> None:
    ecfg = cfg.evaluate
    encoders = _select_encoders(ws, ecfg)
    inputs, configs = _stage_inputs(ws, encoders)
    main = ws.eval.ranking
    record = StageRecord("evaluate", hash_config(ecfg.model_dump(mode="json")), inputs)
    # workspaces evaluated before stability and hierarchy existed lack them
    tables_there = all(ws.eval.table(name).is_file() for name in SPARSE_ONLY_PARTS)
    if not force and is_done(main, record) and tables_there:
        log.info("evaluate: up to date (%s)", ws.relative(main))
        return
    data_all = load_eval_data(ws)
    for enc in encoders:  # a damaged activations table fails before anything is written
        for table in sorted((ws.activations_root / enc).rglob("*.parquet")):
            check_table(table, "activations table")
    probe_hash = hash_config(_probe_settings_hash(ecfg))
    unit_hash = hash_config(
        {k: v for k, v in ecfg.model_dump(mode="json").items() if k not in ("ranking", "encoders")}
    )
    for enc in encoders:
        base = {
            "slices": inputs["slices"],
            "split": inputs["split"],
            "embeddings": inputs[f"embeddings/{enc}"],
        }
        dense_dir = unit_dir(ws, enc, DENSE, DENSE)
        dense_record = StageRecord("evaluate/dense", probe_hash, base)
        data = None
        if force or not _unit_done(dense_dir, dense_record):
            data, x_ND = load_dense(ws, enc, data_all, normalise=ecfg.probe.dense_input == "l2")
            log.info(
                "%s: dense probes on %d slices x %d dims", enc, len(data.slices), x_ND.shape[1]
            )
            t0 = time.perf_counter()
            _write_parts(dense_dir, run_dense_unit(ecfg, enc, data, x_ND))
            mark_done(
                EvalFolder.unit_main(dense_dir),
                dense_record,
                {"seconds": round(time.perf_counter() - t0, 2)},
            )
        dense_parts = _read_parts(dense_dir)
        keep = {dense_dir}
        for variant, cfg_name in configs[enc]:
            folder = unit_dir(ws, enc, variant, cfg_name)
            keep.add(folder)
            rec = StageRecord(
                "evaluate/sae",
                unit_hash,
                {
                    **base,
                    "dense_unit": fingerprint(EvalFolder.unit_main(dense_dir)),
                    **_sparse_inputs(ws, enc, variant, cfg_name),
                },
            )
            if not force and _unit_done(folder, rec, SPARSE_ONLY_PARTS):
                log.info("%s/%s/%s: up to date", enc, variant, cfg_name)
                continue
            if data is None:
                data, _ = embedded(ws, enc, data_all)
            t0 = time.perf_counter()
            parts = run_sparse_unit(ws, ecfg, enc, variant, cfg_name, data, dense_parts)
            _write_parts(folder, parts)
            mark_done(
                EvalFolder.unit_main(folder), rec, {"seconds": round(time.perf_counter() - t0, 2)}
            )
            log.info(
                "%s/%s/%s: evaluated in %.1f s", enc, variant, cfg_name, time.perf_counter() - t0
            )
        _prune(ws.eval.units / enc, keep)
    assemble(cfg, ws)
    mark_done(main, record)


def _prune(enc_root: Path, keep: set[Path]) -> None:
    """Remove unit folders whose SAE config no longer exists, so their rows leave the tables."""
    if not enc_root.is_dir():
        return
    for main in list(enc_root.rglob(EVAL_UNIT_MAIN)):
        if main.parent not in keep:
            log.info("dropping results of removed config %s", main.parent)
            shutil.rmtree(main.parent)


def assemble(cfg: SailConfig, ws: Workspace) -> None:
    """Rebuild every eval/ table from the unit parts, then the ranking and Table 1."""
    ecfg = cfg.evaluate
    collected: dict[str, list[pd.DataFrame]] = {name: [] for name in [*EVAL_TABLES, RAW_CONCEPTS]}
    columns: dict[str, list[str]] = {}
    for main in sorted(ws.eval.units.rglob(EVAL_UNIT_MAIN)):
        for name, df in _read_parts(main.parent).items():
            if name in collected:
                columns.setdefault(name, list(df.columns))  # empty tables still get their header
                if len(df):
                    collected[name].append(df)
    tables = {
        name: (
            pd.concat(collected[name], ignore_index=True)
            if collected[name]
            else pd.DataFrame(columns=columns.get(name, []))
        )
        for name in collected
    }
    mono_cfg, summary = tables["monosemanticity_configs"], tables["recovery_summary"]
    if len(mono_cfg) and len(summary):
        ranking = rank_configs(
            mono_cfg, summary, ecfg.recovery.thresholds, max(ecfg.recovery.n_features), ecfg.ranking
        )
    else:
        ranking = pd.DataFrame(columns=RANKING_COLUMNS)
    tables["concepts"] = concepts_mod.attach_controls(
        tables["concepts"],
        tables.pop(RAW_CONCEPTS),
        concepts_mod.chosen_configs(ranking, cfg.train.variants),
    )
    for name, (_, fmt) in EVAL_TABLES.items():
        write = write_csv_atomic if fmt == "csv" else write_parquet_atomic
        write(ws.eval.table(name), tables[name])
    metrics = {}
    for r in ranking.itertuples():
        metrics[(r.encoder, r.variant, r.sae_config)] = read_final_metrics(
            ws.sae(r.encoder, r.variant, r.sae_config).metrics
        )
    write_csv_atomic(ws.eval.ranking, ranking)
    write_text_atomic(
        ws.eval.table1,
        table1_markdown(
            ranking,
            metrics,
            ecfg.ranking,
            m_slices=min(ecfg.monosemanticity.top_n),
            stability=tables["stability"],
        ),
    )
