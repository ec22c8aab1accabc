"""The ``interpret`` stage and its three verbs; each writes under
interpret/<verb>/<enc>/<variant>/<cfg>/."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pandas as pd

from sail.artifacts import FINGERPRINT_TABLES, InterpretFolder, read_table
from sail.config import SailConfig
from sail.console import console
from sail.errors import SailError
from sail.interpret.data import (
    Target,
    dense_aligned,
    load_split,
    read_slices,
    select_targets,
)
from sail.workspace import (
    StageRecord,
    Workspace,
    fingerprint,
    hash_config,
    is_done,
    manifest_path,
    mark_done,
    write_csv_atomic,
    write_json_atomic,
)

log = logging.getLogger(__name__)


def _out_dir(ws: Workspace, verb: str, t: Target) -> InterpretFolder:
    return ws.interpret(verb, t.encoder, t.variant, t.sae_config)


def _backend_kind(cfg: SailConfig, role: str) -> str:
    """Which backend plays ``role`` (describer, judge or matcher)."""
    ic = cfg.interpret
    return {
        "describer": ic.describer,
        "judge": ic.judge,
        "matcher": ic.matcher_llm if ic.matcher == "llm" else ic.matcher,
    }[role]


def _model_identity(cfg: SailConfig, role: str) -> dict:
    """What of a backend's settings decides its answers (never the API key: only its variable
    name)."""
    ic = cfg.interpret
    kind = _backend_kind(cfg, role)
    if kind == "openai":
        s = ic.judge_openai if role == "judge" and ic.judge_openai else ic.openai
        ident = s.model_dump(
            mode="json",
            exclude={"api_key_env", "concurrency", "timeout_s", "max_retries", "backoff_s"},
        )
        # the environment fallbacks decide the answers as much as the config does
        ident["base_url"] = ident["base_url"] or os.environ.get("SAIL_OPENAI_BASE_URL")
        ident["model"] = ident["model"] or os.environ.get("SAIL_OPENAI_MODEL")
        return {"kind": kind, **ident}
    if kind == "transformers":
        s = ic.judge_transformers if role == "judge" and ic.judge_transformers else ic.transformers
        return {"kind": kind, **s.model_dump(mode="json", exclude={"device"})}
    return {"kind": kind}


def make_model(cfg: SailConfig, role: str):
    """A chat model for the describer, judge or llm matcher (None for the offline ones)."""
    ic = cfg.interpret
    kind = _backend_kind(cfg, role)
    if kind == "openai":
        from sail.interpret.backends.openai_compat import OpenAIChat

        if role == "judge" and ic.judge_openai:
            return OpenAIChat(ic.judge_openai, ic.allow_remote, "interpret.judge_openai")
        return OpenAIChat(ic.openai, ic.allow_remote)
    if kind == "transformers":
        from sail.interpret.backends.transformers_local import LocalVLM

        if role == "judge" and ic.judge_transformers:
            return LocalVLM(ic.judge_transformers, "interpret.judge_transformers")
        return LocalVLM(ic.transformers)
    return None


def run_fingerprint(cfg: SailConfig, ws: Workspace, force: bool = False) -> None:
    from sail.interpret.fingerprint import plot_k_sweep, run_fingerprint_retrieval

    fc = cfg.interpret.fingerprint
    slices = read_slices(ws)
    for t in select_targets(cfg, ws):
        out = _out_dir(ws, "fingerprint", t)
        summary_csv = out.summary
        act = ws.activations(t.encoder, t.variant, t.sae_config, fc.split)
        record = StageRecord(
            "interpret.fingerprint",
            hash_config(fc.model_dump(mode="json")),
            {
                "activations": fingerprint(act),
                "embeddings": fingerprint(ws.embeddings(t.encoder)),
                "slices": fingerprint(ws.slices_table),
                "split": fingerprint(ws.split_csv),
            },
        )
        if not force and is_done(summary_csv, record):
            log.info("fingerprint %s: up to date", t.key)
            continue
        if cfg.interpret.dry_run:
            console.print(
                f"fingerprint {t.key}: {fc.n_references} references x K {fc.k_values} "
                "(no model calls)"
            )
            continue
        data = load_split(ws, t, fc.split, slices)
        x = dense_aligned(ws, t.encoder, data.meta.slice_id.to_numpy())
        res = run_fingerprint_retrieval(data, x, fc)
        for name in FINGERPRINT_TABLES:
            write_csv_atomic(out.csv(name), res[name])
        from sail.workspace import atomic_path

        with atomic_path(out.k_sweep) as tmp:
            plot_k_sweep(
                res["summary"],
                tmp,
                f"{t.key} ({fc.split}, {res['per_reference'].reference.nunique()} references)",
            )
        write_csv_atomic(summary_csv, res["summary"])
        s = res["summary"]
        main = s[(s.method == "sparse") & (s.k == fc.k_main)].set_index("metric")
        mark_done(
            summary_csv,
            record,
            {
                m: round(float(main.loc[m, "mean"]), 4)
                for m in main.index
                if pd.notna(main.loc[m, "mean"])
            },
        )
        log.info(
            "fingerprint %s: quality %.3f, p_modality %.2f (chance %.2f)",
            t.key,
            main.loc["quality", "mean"],
            main.loc["p_modality", "mean"],
            main.loc["p_modality", "chance_mean"],
        )


def _check_endpoints(cfg: SailConfig) -> None:
    """A dry run still applies the remote-endpoint guard to the describer and judge, without
    calling them."""
    from sail.interpret.backends.openai_compat import check_endpoint

    ic = cfg.interpret
    for role, kind in (("describer", ic.describer), ("judge", ic.judge)):
        if kind != "openai":
            continue
        section = "judge_openai" if role == "judge" and ic.judge_openai else "openai"
        url = getattr(ic, section).base_url or os.environ.get("SAIL_OPENAI_BASE_URL") or ""
        if url:
            check_endpoint(url, ic.allow_remote, f"interpret.{section}.base_url")


def run_autointerp(cfg: SailConfig, ws: Workspace, force: bool = False) -> None:
    from sail.interpret import autointerp as ai
    from sail.interpret.backends.base import CallBudget, CallCache
    from sail.interpret.enrichment import EnrichmentTable

    ic, ac = cfg.interpret, cfg.interpret.autointerp
    slices = read_slices(ws)
    roles_cfg = {
        "settings": ac.model_dump(mode="json"),
        "describer": _model_identity(cfg, "describer"),
        "judge": _model_identity(cfg, "judge"),
    }
    describer_model = (
        None if ic.describer == "metadata" or ic.dry_run else make_model(cfg, "describer")
    )
    judge_model = (
        None if ic.judge in ("embedding", "none") or ic.dry_run else make_model(cfg, "judge")
    )
    if ic.dry_run:
        _check_endpoints(cfg)
    budget = CallBudget(ic.max_calls)
    for t in select_targets(cfg, ws):
        out = _out_dir(ws, "autointerp", t)
        desc_csv = out.descriptions
        inputs = {
            f"activations_{s}": fingerprint(ws.activations(t.encoder, t.variant, t.sae_config, s))
            for s in {ac.concept_split, ac.judge_split}
        }
        inputs |= {
            ws.eval.table(n).name: fingerprint(ws.eval.table(n))
            for n in ("monosemanticity_features", "probe_coefficients")
        }
        inputs |= {"slices": fingerprint(ws.slices_table), "split": fingerprint(ws.split_csv)}
        record = StageRecord("interpret.autointerp", hash_config(roles_cfg), inputs)
        if not force and not ic.dry_run and is_done(desc_csv, record):
            log.info("autointerp %s: up to date", t.key)
            continue
        concept = load_split(ws, t, ac.concept_split, slices)
        judge_data = (
            concept
            if ac.judge_split == ac.concept_split
            else load_split(ws, t, ac.judge_split, slices)
        )
        selected = ai.select_features(ws, t, concept, ac)
        table = EnrichmentTable(concept.meta, concept.H_NS, concept.structures)
        targets = selected.feature.astype(int).tolist()
        pool = np.flatnonzero(~concept.always_on & (concept.active_count >= ac.min_active))
        distractors = (
            {f: ai.draw_distractors(f, pool, ac.n_distractors, ac.seed) for f in targets}
            if ic.judge != "none"
            else {}
        )
        needed = sorted(set(targets) | {int(d) for ds in distractors.values() for d in ds})
        evidence = {f: ai.gather(concept, table, f, ac) for f in needed}
        cache = CallCache(None if ic.dry_run else out.calls)
        roles = ai.Roles(
            ic.describer,
            describer_model,
            ic.judge,
            judge_model,
            cache,
            budget,
            ac,
            dry_run=ic.dry_run,
        )
        described = ai.describe_all(ws, concept, evidence, roles)
        concepts = {f: d["description"] for f, d in described.items() if d["status"] == "ok"}
        judged_targets = [
            f
            for f in targets
            if f in concepts and all(int(g) in concepts for g in distractors.get(f, []))
        ]
        judge_name = {
            "embedding": (
                "minilm-metadata (offline: MiniLM similarity to a held-out metadata description)"
            ),
            "none": "not judged",
        }.get(ic.judge, _model_identity(cfg, "judge").get("model") or ic.judge)
        judged = pd.DataFrame()
        if ic.judge != "none" and (judged_targets or (ic.dry_run and ic.judge != "embedding")):
            judge_table = (
                table
                if judge_data is concept
                else EnrichmentTable(judge_data.meta, judge_data.H_NS, judge_data.structures)
            )
            judged = ai.judge_all(
                ws,
                judge_data,
                judge_table,
                judged_targets if not ic.dry_run else targets,
                concepts,
                distractors,
                roles,
            )
        if ic.dry_run:
            for p in roles.dry_prompts:
                console.print(p, markup=False, highlight=False)
            calls = sum(1 for p in roles.dry_prompts)
            console.print(
                f"autointerp {t.key}: dry run, {len(targets)} targets, {len(needed)} features to "
                f"describe, {calls} model calls needed (before cache hits and parse retries); "
                "nothing written"
            )
            continue
        rows = []
        for f in needed:
            ev, d = evidence[f], described[f]
            enr = ev.enrichment
            rows.append(
                {
                    "feature": f,
                    "role": "target" if f in set(targets) else "distractor",
                    "status": d["status"],
                    "description": d["description"],
                    "describer": ic.describer,
                    "model": getattr(describer_model, "identity", "metadata"),
                    "error": d["error"],
                    "n_active": ev.n_active,
                    "n_volumes": ev.n_volumes,
                    "mean_activation": float(ev.acts.mean()) if len(ev.acts) else 0.0,
                    "top_activation": float(ev.acts.max()) if len(ev.acts) else 0.0,
                    "top_modality": ";".join(
                        v for v, *_ in enr.categorical.get("modality", [])[:3]
                    ),
                    "top_plane": ";".join(v for v, *_ in enr.categorical.get("plane", [])[:3]),
                    "top_structures": ";".join(v for v, *_ in enr.enriched_structures()[:5]),
                    "enrichment": json.dumps(enr.to_json(), sort_keys=True),
                    "sample_slices": ";".join(concept.meta.slice_id.to_numpy()[ev.rows]),
                    "sample_activations": ";".join(f"{a:.4g}" for a in ev.acts),
                    "distractors": ";".join(map(str, distractors.get(f, []))),
                }
            )
        desc = pd.DataFrame(rows).merge(
            selected.drop(columns=["feature"], errors="ignore").assign(feature=selected.feature),
            on="feature",
            how="left",
        )
        if len(judged) and "true_rank" in judged:
            ok = judged[judged.status == "ok"].groupby("feature").true_rank
            desc["judge_rank_mean"] = desc.feature.map(ok.mean())
            desc["judge_success"] = desc.feature.map(ok.apply(lambda r: float((r <= 2).mean())))
            desc["judge_n"] = desc.feature.map(ok.size()).fillna(0).astype(int)
            desc["judge_failures"] = (
                desc.feature.map(judged[judged.status == "failed"].groupby("feature").size())
                .fillna(0)
                .astype(int)
            )
        desc["judge"] = judge_name
        desc = desc.sort_values(
            ["role", "selection_rank", "feature"], ascending=[False, True, True], kind="stable"
        )
        write_csv_atomic(out.selected, selected)
        if len(judged):
            write_csv_atomic(out.judge, judged)
        n_cand = 1 + ac.n_distractors
        metrics = {
            "encoder": t.encoder,
            "variant": t.variant,
            "sae_config": t.sae_config,
            "describer": ic.describer,
            "n_targets": len(targets),
            "n_described": int(sum(described[f]["status"] == "ok" for f in targets)),
            "n_failed": int(sum(described[f]["status"] == "failed" for f in needed)),
            "model_calls": int(sum(d["calls"] for d in described.values())),
            "seed": ac.seed,
            **ai.judge_metrics(judged, n_cand, judge_name),
        }
        write_json_atomic(out.metrics_json, metrics)
        write_csv_atomic(desc_csv, desc)
        if metrics[
            "n_failed"
        ]:  # not done: the next run retries the failed calls (answers are cached)
            manifest_path(desc_csv).unlink(missing_ok=True)
            log.warning(
                "autointerp %s: %d feature(s) failed (see the error column of %s); "
                "rerun to retry them",
                t.key,
                metrics["n_failed"],
                desc_csv,
            )
        else:
            mark_done(
                desc_csv,
                record,
                {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
            )
        log.info(
            "autointerp %s: %d described, %d failed; judge %s success %.2f",
            t.key,
            metrics["n_described"],
            metrics["n_failed"],
            ic.judge,
            metrics.get("success_rate", float("nan")),
        )


def _user_queries(cfg: SailConfig) -> list:
    import yaml

    lc = cfg.interpret.language
    queries = list(lc.queries)
    if lc.queries_file is not None:
        if not lc.queries_file.is_file():
            raise SailError(f"interpret.language.queries_file: {lc.queries_file} not found")
        loaded = yaml.safe_load(lc.queries_file.read_text(encoding="utf-8")) or []
        if not isinstance(loaded, list):
            raise SailError(f"{lc.queries_file}: expected a YAML list of queries")
        queries += loaded
    return queries


def _eligible_descriptions(desc_csv, eligible: str) -> pd.DataFrame:
    """The described target features language queries may match (judged rank <= 2 when
    ``eligible`` is ``judged`` and a judge ran), in selection order."""
    desc = read_table(desc_csv)
    if desc is None:
        raise SailError(f"{desc_csv}: empty; rerun `sail interpret autointerp`")
    desc = desc[(desc.role == "target") & (desc.status == "ok")]
    judged = "judge_rank_mean" in desc and desc.judge_rank_mean.notna().any()
    if eligible == "judged" and judged:
        desc = desc[desc.judge_rank_mean <= 2]
    desc = desc.sort_values(["selection_rank", "feature"], kind="stable").reset_index(drop=True)
    if desc.empty:
        raise SailError(
            f"{desc_csv}: no described (and judged rank <= 2) target features to match queries "
            "against"
        )
    return desc


def _print_match_dry_run(cfg: SailConfig, t: Target, queries: list, texts: list[str]) -> None:
    from sail.interpret import prompts

    ic, lc = cfg.interpret, cfg.interpret.language
    n_calls = len(queries) if ic.matcher == "llm" else 0
    if ic.matcher == "llm":
        for q in queries:
            prompt = prompts.match_prompt(q.text, texts, lc.n_features)
            console.print(prompt, markup=False, highlight=False)
    console.print(
        f"language {t.key}: dry run, {len(queries)} queries over {len(texts)} features, "
        f"{n_calls} model calls; nothing written"
    )


def _match_query(cfg: SailConfig, text: str, texts: list[str], n: int, llm) -> tuple:
    """(status, error, indices into ``texts``, scores) of the ``n`` descriptions matching ``text``;
    ``llm`` is (model, cache, budget) for the llm matcher."""
    from sail.interpret import language as lang
    from sail.interpret import prompts
    from sail.interpret.backends.base import ChatRequest, call_validated

    ic = cfg.interpret
    if ic.matcher == "embedding":
        return ("ok", "", *lang.match_embedding(text, texts, n))
    if ic.matcher == "lexical":
        return ("ok", "", *lang.match_lexical(text, texts, n))
    req = ChatRequest(
        "You match search queries to feature descriptions. Answer with JSON only.",
        prompts.match_prompt(text, texts, n),
        [],
        prompts.match_schema(n, len(texts)),
        "match",
    )
    parse = prompts.make_parse_match(n, len(texts))
    res = call_validated(
        *llm, req, prompts.TEMPLATE_VERSION, "match", parse, ic.autointerp.parse_retries
    )
    if not res.ok:
        return "failed", res.error, np.array([], int), np.array([])
    return "ok", "", np.asarray(res.value) - 1, np.ones(n)


def run_language(cfg: SailConfig, ws: Workspace, force: bool = False) -> None:
    from sail.interpret import language as lang
    from sail.interpret.backends.base import CallBudget, CallCache

    ic, lc = cfg.interpret, cfg.interpret.language
    slices = read_slices(ws)
    structures = [c[4:] for c in slices.columns if c.startswith("has_")]
    queries = lang.load_queries(lc.published_queries, _user_queries(cfg), structures)
    model = None if ic.matcher != "llm" or ic.dry_run else make_model(cfg, "matcher")
    budget = CallBudget(ic.max_calls)
    for t in select_targets(cfg, ws):
        out = _out_dir(ws, "language", t)
        metrics_csv = out.metrics_csv
        desc_csv = _out_dir(ws, "autointerp", t).descriptions
        if not desc_csv.is_file():
            raise SailError(f"{desc_csv} not found: run `sail interpret autointerp` first")
        record = StageRecord(
            "interpret.language",
            hash_config(
                {
                    "settings": lc.model_dump(mode="json"),
                    "queries": [q.row() for q in queries],
                    "matcher": _model_identity(cfg, "matcher"),
                }
            ),
            {
                "descriptions": fingerprint(desc_csv),
                "slices": fingerprint(ws.slices_table),
                "split": fingerprint(ws.split_csv),
                "activations": fingerprint(
                    ws.activations(t.encoder, t.variant, t.sae_config, lc.split)
                ),
            },
        )
        if not force and not ic.dry_run and is_done(metrics_csv, record):
            log.info("language %s: up to date", t.key)
            continue
        desc = _eligible_descriptions(desc_csv, lc.eligible)
        texts = desc.description.astype(str).tolist()
        if ic.dry_run:
            _print_match_dry_run(cfg, t, queries, texts)
            continue
        data = load_split(ws, t, lc.split, slices)
        cache = CallCache(out.calls)
        match_rows, hit_rows, metric_rows = [], [], []
        n = min(lc.n_features, len(texts))
        if ic.matcher == "embedding":
            from sail.interpret.text_embed import embed

            embed(
                sorted(set(texts) | {q.text for q in queries})
            )  # one batched pass; matching reads the cache
        for q in queries:
            status, error, idx, scores = _match_query(cfg, q.text, texts, n, (model, cache, budget))
            feats = desc.feature.to_numpy()[idx].astype(int)
            for r, (i, s) in enumerate(zip(idx, scores, strict=False), 1):
                match_rows.append(
                    {
                        "query": q.name,
                        "matcher": ic.matcher,
                        "rank": r,
                        "feature": int(desc.feature[i]),
                        "score": float(s),
                        "description": texts[i],
                    }
                )
            meets = lang.satisfies(q, data)
            chance = lang.chance_precision(meets["meets_all"], data)
            for scoring in lang.SCORINGS:
                base = {
                    "query": q.name,
                    "scoring": scoring,
                    "scoring_rule": lang.scoring_rule(scoring, len(feats)),
                    "matcher": ic.matcher,
                    "k": lc.top_k,
                    "chance": chance,
                    "status": status,
                    "error": error,
                }
                if status != "ok":
                    metric_rows.append(base)
                    continue
                score = lang.score_images(
                    data,
                    feats,
                    desc.mean_activation.to_numpy()[idx],
                    np.asarray(scores, float),
                    scoring,
                )
                rows, sc, boundary_tie = lang.rank_per_volume(score, data, lc.top_k)
                m = meets.iloc[rows]
                _, counts = np.unique(sc, return_counts=True)
                hit_rows.append(
                    pd.DataFrame(
                        {
                            "query": q.name,
                            "scoring": scoring,
                            "scoring_rule": base["scoring_rule"],
                            "rank": np.arange(1, len(rows) + 1),
                            "slice_id": data.meta.slice_id.to_numpy()[rows],
                            "score": sc,
                            "tied": pd.Series(sc).duplicated(keep=False).to_numpy(),
                            **{
                                c: data.meta[c].to_numpy()[rows]
                                for c in ("modality", "plane", "sex", "age")
                            },
                            **{c: m[c].to_numpy() for c in m.columns},
                        }
                    )
                )
                metric_rows.append(
                    base
                    | {
                        "n_hits": len(rows),
                        "precision": float(m.meets_all.mean()) if len(rows) else np.nan,
                        **{f"p_{c[6:]}": float(m[c].mean()) for c in m.columns if c != "meets_all"},
                        "n_tied_hits": int(counts[counts > 1].sum()),
                        "boundary_tie": boundary_tie,
                    }
                )
        write_csv_atomic(out.queries, pd.DataFrame([q.row() for q in queries]))
        write_csv_atomic(out.matches, pd.DataFrame(match_rows))
        write_csv_atomic(
            out.hits, pd.concat(hit_rows, ignore_index=True) if hit_rows else pd.DataFrame()
        )
        metrics = pd.DataFrame(metric_rows)
        write_csv_atomic(metrics_csv, metrics)
        mean_p = (
            metrics.groupby("scoring").precision.mean().round(4).to_dict()
            if "precision" in metrics
            else {}
        )
        mark_done(metrics_csv, record, {f"mean_precision_{k}": v for k, v in mean_p.items()})
        log.info("language %s: mean P@%d %s", t.key, lc.top_k, mean_p)


VERBS = {"fingerprint": run_fingerprint, "autointerp": run_autointerp, "language": run_language}


def run_interpret(cfg: SailConfig, ws: Workspace, force: bool = False) -> None:
    for verb in ("fingerprint", "autointerp", "language"):
        if verb in cfg.interpret.verbs:
            VERBS[verb](cfg, ws, force)
