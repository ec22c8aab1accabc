"""Autointerpretation: select features, show a describer their top slices, judge the descriptions.

Features are ranked by monosemanticity and probe importance (confound tasks excluded). Each gets 5
diverse slices from its top 20 volumes of the concept split and enrichment statistics of its top 200
slices, tested over their volumes (see enrichment.py), against the base rate; the describer
(metadata, openai or transformers) names its concept. The judge sees the feature's held-out slices
and ranks the true concept among seeded distractors' concepts (success = rank <= 2; chance
2/n_candidates), averaged over seeded label permutations. Distractors whose description equals the
target's are dropped; tied candidates share their mean rank. Failed calls are recorded and excluded
from metrics, never replaced by random ranks.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sail.artifacts import read_table
from sail.config import AutointerpSettings
from sail.errors import SailError
from sail.evaluate.top_slices import ranked_rows, top_per_volume
from sail.interpret import prompts
from sail.interpret.backends.base import CallBudget, CallCache, ChatRequest, call_validated
from sail.interpret.data import SplitData, Target
from sail.interpret.enrichment import Enrichment, EnrichmentTable, top_slices_for_enrichment
from sail.workspace import Workspace

log = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def select_features(
    ws: Workspace, target: Target, data: SplitData, cfg: AutointerpSettings
) -> pd.DataFrame:
    """Features ordered by the mean of their monosemanticity rank and probe-importance rank."""
    eligible = ~data.always_on & (data.active_count > 0)
    if cfg.selection == "custom":
        feats = np.asarray(cfg.features, dtype=int)
        bad = feats[(feats < 0) | (feats >= data.codes.shape[1])]
        if len(bad):
            raise SailError(
                f"interpret.autointerp.features: feature {int(bad[0])} "
                f"outside 0..{data.codes.shape[1] - 1}"
            )
        return pd.DataFrame(
            {"feature": feats, "selection_rank": np.arange(1, len(feats) + 1), "source": "custom"}
        )
    if cfg.selection == "all":
        feats = np.flatnonzero(eligible & (data.active_count >= cfg.min_active))
        return pd.DataFrame(
            {"feature": feats, "selection_rank": np.arange(1, len(feats) + 1), "source": "all"}
        )
    ranks = []
    mono_score, mono_split = _selection_monosemanticity(ws, target, data, cfg)
    if mono_score is not None and len(mono_score):
        # tied scores share a rank (many features tie at M = 0): never won by the lower index
        ranks.append(mono_score.rank(ascending=False, method="min").rename("monosem_rank"))
    coef_path = ws.eval.table("probe_coefficients")
    if coef_path.is_file():
        coef = pd.read_parquet(coef_path)
        coef = coef[
            (coef.encoder == target.encoder)
            & (coef.variant == target.variant)
            & (coef.sae_config.astype(str) == target.sae_config)
        ]
        coef = coef[~coef.task.isin(cfg.exclude_tasks) & (coef["rank"] <= cfg.coef_top)]
        if len(coef):
            lists = coef.groupby(["task", "target"]).ngroups
            # a feature missing from a list counts as rank coef_top + 1 there, so a feature seen
            # in one list at a good rank does not beat one that is important everywhere
            total = coef.groupby("feature")["rank"].sum() + (
                lists - coef.groupby("feature").size()
            ) * (cfg.coef_top + 1)
            avg = (total / lists).sort_values(kind="stable")
            ranks.append(
                pd.Series(avg.rank(method="min").to_numpy(), index=avg.index, name="coef_rank")
            )
    if ranks:
        table = pd.concat(ranks, axis=1)
        table = table.fillna(table.max() + 1)
        table["combined_rank"] = table.mean(axis=1)
        if "monosem_rank" in table:
            table["monosemanticity"] = mono_score.reindex(table.index).to_numpy()
            table["monosemanticity_split"] = mono_split
        table.index.name = "feature"
        table = table.reset_index()
        table["source"] = "eval"
    else:
        log.info(
            "autointerp %s: no eval tables; ranking features by the number of volumes they fire in",
            target.key,
        )
        n_vol = _volumes_active(data)
        table = pd.DataFrame(
            {
                "feature": np.arange(len(n_vol)),
                "combined_rank": (-n_vol).argsort(kind="stable").argsort() + 1.0,
                "source": "activity",
            }
        )
    table = table[table.feature.map(lambda f: 0 <= f < len(eligible) and eligible[f])]
    table = (
        table.sort_values(["combined_rank", "feature"], kind="stable")
        .head(cfg.n_features)
        .reset_index(drop=True)
    )
    table["selection_rank"] = np.arange(1, len(table) + 1)
    return table


def _selection_monosemanticity(
    ws: Workspace, target: Target, data: SplitData, cfg: AutointerpSettings
) -> tuple[pd.Series | None, str]:
    """Monosemanticity per feature from a split other than the judge's, and that split's name.

    Features chosen for a coherent top-N on the split that then judges them would score
    optimistically, so eval/'s table is used only when it was computed on another split; otherwise
    the score is computed here on the concept split (``data``), where the descriptions come from.
    """
    mono = read_table(ws.eval.table("monosemanticity_features"))
    if mono is None:
        return None, ""
    mono = mono[
        (mono.encoder == target.encoder)
        & (mono.variant == target.variant)
        & (mono.sae_config == target.sae_config)
    ]
    if not len(mono):
        return None, ""
    split = str(mono.split.iloc[0]) if "split" in mono else ""
    if "split" in mono and (mono.split != cfg.judge_split).any():
        split = (
            data.name
            if (mono.split == data.name).any()
            else str(mono.split[mono.split != cfg.judge_split].iloc[0])
        )
    elif data.name != cfg.judge_split:
        return _monosemanticity_on(data, cfg.monosemanticity_top_n, cfg.seed), data.name
    else:
        log.warning(
            "autointerp %s: concept_split = judge_split = %s; features are selected and judged "
            "on one split",
            target.key,
            data.name,
        )
    mono = mono[mono.split == split] if "split" in mono else mono
    sizes = sorted(mono.top_n.unique(), key=lambda t: (abs(t - cfg.monosemanticity_top_n), t))
    return mono[mono.top_n == sizes[0]].groupby("feature").monosemanticity.max(), split


def _monosemanticity_on(data: SplitData, top_n: int, seed: int) -> pd.Series:
    """The evaluate stage's monosemanticity M of every feature on one split, at ``top_n``
    volumes."""
    from sail.data.labels import VOCABULARY
    from sail.evaluate import monosemanticity as mono

    o, _, vocabulary_size = mono.structure_matrix(data.meta, VOCABULARY)
    null, _ = mono.null_coherence(o, top_n, 100, seed, data.volume)
    feats = mono.score_features(
        data.codes, data.volume, o, vocabulary_size, [top_n], {top_n: null}, [data.codes.shape[1]]
    )
    return feats.set_index("feature").monosemanticity


def _volumes_active(data: SplitData) -> np.ndarray:
    csc = data.csc
    out = np.zeros(csc.shape[1], dtype=int)
    for f in range(csc.shape[1]):
        rows = csc.indices[csc.indptr[f] : csc.indptr[f + 1]]
        out[f] = len(np.unique(data.volume[rows]))
    return out


def diverse_pick(codes: sp.csr_matrix, rows: np.ndarray, n: int) -> np.ndarray:
    """Greedy max-min cosine dissimilarity on full sparse codes, starting from the top activator."""
    if len(rows) <= n:
        return np.arange(len(rows))
    X = codes[rows].astype(np.float64)
    norms = np.sqrt(np.asarray(X.multiply(X).sum(1)).ravel())
    norms[norms == 0] = 1.0
    sim = (X @ X.T).toarray() / np.outer(norms, norms)
    picked = [0]
    max_sim = sim[0].copy()
    for _ in range(n - 1):
        cand = max_sim.copy()
        cand[picked] = np.inf
        nxt = int(np.argmin(cand))
        picked.append(nxt)
        max_sim = np.maximum(max_sim, sim[nxt])
    return np.asarray(picked)


@dataclass
class Evidence:
    feature: int
    rows: np.ndarray
    acts: np.ndarray
    enrichment: Enrichment
    n_active: int
    n_volumes: int


def gather(
    data: SplitData, table: EnrichmentTable, feature: int, cfg: AutointerpSettings
) -> Evidence:
    rows_all, _ = ranked_rows(data.csc, feature)  # n_active, n_volumes count every active slice
    cand_rows, cand_vals = top_per_volume(data.csc, feature, data.volume, cfg.n_candidates)
    pick = diverse_pick(data.codes, cand_rows, cfg.n_images)
    n_vol = len(np.unique(data.volume[rows_all]))
    return Evidence(
        feature,
        cand_rows[pick],
        cand_vals[pick],
        table.of(top_slices_for_enrichment(data.csc, feature, cfg.enrichment_top)),
        len(rows_all),
        n_vol,
    )


@dataclass
class Roles:
    """The model objects and shared state of one run."""

    describer: str
    describer_model: object | None
    judge: str
    judge_model: object | None
    cache: CallCache
    budget: CallBudget
    cfg: AutointerpSettings
    dry_run: bool = False
    dry_prompts: list[str] = field(default_factory=list)
    embedder: object | None = None


def _images(ws: Workspace, data: SplitData, rows: np.ndarray) -> list[bytes]:
    out = []
    for p in data.meta["png_path"].to_numpy()[rows]:
        path = ws.root / str(p)
        if not path.is_file():
            raise SailError(f"slice image not found: {path} (png_path in data/slices.parquet)")
        out.append(path.read_bytes())
    return out


def _concept_request(ws: Workspace, data: SplitData, ev: Evidence) -> ChatRequest:
    blocks = prompts.sample_blocks(data.meta, data.structures, data.H_NS, ev.rows, ev.acts)
    text = prompts.concept_prompt(len(ev.rows), blocks, prompts.enrichment_text(ev.enrichment))
    return ChatRequest(
        prompts.SYSTEM, text, _images(ws, data, ev.rows), prompts.CONCEPT_SCHEMA, "concept"
    )


def describe_all(
    ws: Workspace, data: SplitData, evidence: dict[int, Evidence], roles: Roles
) -> dict[int, dict]:
    """feature -> {status, description, raw, error, calls}."""
    from sail.interpret.backends.metadata_describer import describe

    if roles.describer == "metadata":
        return {
            f: {
                "status": "ok",
                "description": describe(ev.enrichment),
                "raw": "",
                "error": "",
                "calls": 0,
            }
            for f, ev in evidence.items()
        }

    def one(f: int) -> dict:
        ev = evidence[f]
        if ev.n_active == 0:
            return {
                "status": "skipped",
                "description": "",
                "raw": "",
                "error": "inactive on the concept split",
                "calls": 0,
            }
        req = _concept_request(ws, data, ev)
        if roles.dry_run:
            roles.dry_prompts.append(
                f"[describe feature {f}, {len(req.images)} images]\n{req.text}"
            )
            return {"status": "dry_run", "description": "", "raw": "", "error": "", "calls": 0}
        res = call_validated(
            roles.describer_model,
            roles.cache,
            roles.budget,
            req,
            prompts.TEMPLATE_VERSION,
            "describe",
            prompts.parse_concept,
            roles.cfg.parse_retries,
        )
        return {
            "status": "ok" if res.ok else "failed",
            "description": res.value if res.ok else "",
            "raw": res.raw,
            "error": res.error,
            "calls": res.calls,
        }

    workers = getattr(getattr(roles.describer_model, "settings", None), "concurrency", 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(evidence, pool.map(one, list(evidence)), strict=True))


def draw_distractors(feature: int, pool: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Seeded per target, independent of the processing order."""
    rng = np.random.default_rng([seed, int(feature)])
    cand = pool[pool != feature]
    return np.sort(rng.choice(cand, size=min(n, len(cand)), replace=False))


def same_concept(a: str, b: str) -> bool:
    """Two descriptions name the same concept when they are equal up to case, spacing and end
    punctuation."""

    def norm(t: str) -> str:
        return " ".join(str(t).casefold().split()).rstrip(".;:!")

    return norm(a) == norm(b)


def judge_candidates(
    f: int, distractors: np.ndarray, concepts: dict[int, str]
) -> tuple[list[int], int]:
    """The target and the distractors whose concept differs from the target's, and how many were
    dropped.

    A distractor with the target's own description cannot be told apart from it by any judge; kept,
    it makes a tie that an order-based rank would break in the target's favour.
    """
    kept = [
        int(g)
        for g in distractors
        if not same_concept(concepts.get(int(g), ""), concepts.get(f, ""))
    ]
    return [f, *kept], len(distractors) - len(kept)


def tied_rank(scores: np.ndarray, index: int = 0) -> float:
    """1-based rank of ``scores[index]`` by descending score; tied candidates share their mean
    rank."""
    s = np.asarray(scores, dtype=np.float64)
    return float(1 + (s > s[index]).sum() + ((s == s[index]).sum() - 1) / 2)


def judge_all(
    ws: Workspace,
    judge_data: SplitData,
    judge_table: EnrichmentTable,
    targets: list[int],
    concepts: dict[int, str],
    distractors: dict[int, np.ndarray],
    roles: Roles,
) -> pd.DataFrame:
    """One row per (target, permutation): the true concept's rank among the candidates, or the
    failure.

    Candidates are the target and its distractors minus those sharing the target's description
    (``n_candidates`` records how many remain); tied similarities share their mean rank.
    """
    cfg = roles.cfg
    rows = []

    def one(f: int) -> list[dict]:
        ev = gather(judge_data, judge_table, f, cfg)
        feats, n_same = judge_candidates(f, distractors[f], concepts)
        out = []
        if ev.n_active == 0:
            return [
                {
                    "feature": f,
                    "permutation": 0,
                    "status": "skipped",
                    "error": f"inactive on the {cfg.judge_split} split",
                }
            ]
        if len(feats) < 2:
            return [
                {
                    "feature": f,
                    "permutation": 0,
                    "status": "skipped",
                    "n_candidates": 1,
                    "n_same_concept": n_same,
                    "error": "every distractor has the target's description",
                }
            ]
        if roles.judge == "embedding":
            from sail.interpret.backends.metadata_describer import describe
            from sail.interpret.text_embed import embed

            held_out = describe(ev.enrichment)
            e = embed([held_out, *[concepts[g] for g in feats]])
            sims = e[1:] @ e[0]
            return [
                {
                    "feature": f,
                    "permutation": 0,
                    "status": "ok",
                    "candidates": ";".join(map(str, feats)),
                    "n_candidates": len(feats),
                    "n_same_concept": n_same,
                    "true_rank": tied_rank(sims),
                    "held_out_description": held_out,
                    "error": "",
                }
            ]
        blocks = prompts.sample_blocks(
            judge_data.meta, judge_data.structures, judge_data.H_NS, ev.rows, ev.acts
        )
        images = _images(ws, judge_data, ev.rows)
        labels = list(LETTERS[: len(feats)])
        rng = np.random.default_rng([cfg.seed, f, 1])
        for p in range(cfg.judge_permutations):
            perm = rng.permutation(len(feats))
            shown = [concepts.get(feats[i], f"<concept of feature {feats[i]}>") for i in perm]
            true_label = labels[int(np.flatnonzero(perm == 0)[0])]
            req = ChatRequest(
                prompts.SYSTEM,
                prompts.judge_prompt(len(ev.rows), blocks, labels, shown),
                images,
                prompts.judge_schema(labels),
                "ranking",
            )
            base = {
                "feature": f,
                "permutation": p,
                "candidates": ";".join(str(feats[i]) for i in perm),
                "true_label": true_label,
                "n_candidates": len(feats),
                "n_same_concept": n_same,
            }
            if roles.dry_run:
                roles.dry_prompts.append(f"[judge feature {f}, permutation {p}]\n{req.text}")
                out.append(base | {"status": "dry_run"})
                continue
            res = call_validated(
                roles.judge_model,
                roles.cache,
                roles.budget,
                req,
                prompts.TEMPLATE_VERSION,
                "judge",
                prompts.make_parse_ranking(labels),
                cfg.parse_retries,
            )
            if res.ok:
                out.append(
                    base
                    | {
                        "status": "ok",
                        "ranking": "".join(res.value),
                        "true_rank": res.value.index(true_label) + 1,
                        "raw": res.raw,
                        "error": "",
                    }
                )
            else:
                out.append(base | {"status": "failed", "raw": res.raw, "error": res.error})
        return out

    if roles.judge == "embedding":
        from sail.interpret.backends.metadata_describer import describe
        from sail.interpret.text_embed import embed

        held = {f: describe(gather(judge_data, judge_table, f, cfg).enrichment) for f in targets}
        embed(
            sorted(
                set(held.values())
                | {concepts[g] for f in targets for g in [f, *map(int, distractors[f])]}
            )
        )
        for f in targets:
            rows += one(f)
    else:
        workers = getattr(getattr(roles.judge_model, "settings", None), "concurrency", 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for r in pool.map(one, targets):
                rows += r
    return pd.DataFrame(rows)


def judge_metrics(judged: pd.DataFrame, n_candidates: int, judge_name: str) -> dict:
    """Success (rank <= 2) and mean rank per feature, averaged; chance from each feature's own
    candidate count (distractors sharing the target's description are dropped, so it can be below
    ``n_candidates``)."""
    ok = judged[judged.status == "ok"] if len(judged) else judged
    if not len(ok):
        return {
            "judge": judge_name,
            "n_judged": 0,
            "n_judge_failures": int((judged.status == "failed").sum()) if len(judged) else 0,
        }
    n_cand = (
        ok["n_candidates"].astype(float)
        if "n_candidates" in ok
        else pd.Series(float(n_candidates), index=ok.index)
    )
    per_feature = pd.DataFrame(
        {
            "rank_mean": ok.groupby("feature").true_rank.mean(),
            "success": ok.groupby("feature").true_rank.apply(lambda r: float((r <= 2).mean())),
            "chance_success": (np.minimum(2.0, n_cand) / n_cand).groupby(ok.feature).mean(),
            "chance_rank": ((n_cand + 1) / 2).groupby(ok.feature).mean(),
        }
    )
    hist = ok.true_rank.astype(float).value_counts().sort_index()
    return {
        "judge": judge_name,
        "n_judged": int(len(per_feature)),
        "n_calls_ok": int(len(ok)),
        "n_judge_failures": int((judged.status == "failed").sum()),
        "n_judge_skipped": int((judged.status == "skipped").sum()),
        "success_rate": float(per_feature.success.mean()),
        "mean_rank": float(per_feature.rank_mean.mean()),
        "median_rank": float(ok.true_rank.median()),
        "rank_histogram": {f"{k:g}": int(v) for k, v in hist.items()},
        "chance_success_rate": float(per_feature.chance_success.mean()),
        "chance_mean_rank": float(per_feature.chance_rank.mean()),
    }
