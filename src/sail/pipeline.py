"""The stage DAG: the order stages run in and a driver that runs a range of them.

Each stage is ``run_<stage>(cfg, ws, force=False)``: it reads artifacts from the workspace,
writes its own, and skips itself when its manifest matches (see :mod:`sail.workspace`).
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from sail.config import ConfigError, SailConfig, dump_config
from sail.errors import SailError
from sail.workspace import Workspace, stage_lock, write_text_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    name: str
    target: str  # "module:function", imported only when the stage runs
    doc: str

    def run(self, cfg: SailConfig, ws: Workspace, force: bool) -> None:
        module, func = self.target.split(":")
        getattr(importlib.import_module(module), func)(cfg, ws, force)


# In DESIGN order; each stage module is imported only when it runs, so `sail --help` stays fast
# and a stage's heavy dependencies load only when needed.
STAGES: list[Stage] = [
    Stage(
        "phantom",
        "sail.data.prepare:run_phantom",
        "synthetic dataset into <workspace>/phantom when no prepare.source is set",
    ),
    Stage(
        "prepare", "sail.data.prepare:run_prepare", "volumes -> PNG slices + data/slices.parquet"
    ),
    Stage(
        "split", "sail.data.split:run_split", "scan-level train/valid/test split -> data/split.csv"
    ),
    Stage(
        "encode",
        "sail.encoders.encode:run_encode",
        "slices -> embeddings/<encoder>.parquet (one per encode.encoders entry)",
    ),
    Stage(
        "train",
        "sail.sae.train:run_train",
        "SAE grid per encoder -> sae/<encoder>/<variant>/<config>/",
    ),
    Stage(
        "activations",
        "sail.sae.activations:run_activations",
        "sparse SAE codes per split -> activations/",
    ),
    Stage(
        "evaluate",
        "sail.evaluate.stage:run_evaluate",
        "probes, monosemanticity, recovery, ranking, concepts -> eval/",
    ),
    Stage(
        "maps",
        "sail.maps.stage:run_maps",
        "spatial maps of the reported features + grounding in the masks -> maps/, "
        "eval/spatial_grounding.csv",
    ),
    Stage(
        "interpret",
        "sail.interpret.stage:run_interpret",
        "fingerprint retrieval, autointerpretation, language retrieval -> interpret/",
    ),
    Stage(
        "figures",
        "sail.report.figures:run_figures",
        "SAE quality and performance recovery figures -> figures/",
    ),
    Stage(
        "report", "sail.report.site:run_report", "static HTML feature browser -> report/index.html"
    ),
]


def _stages() -> list[Stage]:
    return STAGES


def run_pipeline(
    cfg: SailConfig,
    start: str | None = None,
    stop: str | None = None,
    force: bool = False,
) -> Workspace:
    """Run the stages from ``start`` to ``stop`` (inclusive) in order."""
    stages = _stages()
    names = [s.name for s in stages]
    for label, value in (("--from", start), ("--to", stop)):
        if value is not None and value not in names:
            raise SailError(f"{label} {value!r}: unknown stage; stages are {', '.join(names)}")
    lo = names.index(start) if start else 0
    hi = names.index(stop) if stop else len(names) - 1
    if lo > hi:
        raise SailError(f"--from {start} comes after --to {stop}")
    ws = Workspace(cfg.workspace).ensure()
    write_text_atomic(ws.config_yaml, dump_config(cfg))
    for stage in stages[lo : hi + 1]:
        log.info("stage %s: %s", stage.name, stage.doc)
        with stage_lock(ws.root, _lock_name(stage.name, cfg)):
            stage.run(cfg, ws, force)
    return ws


def _lock_name(stage: str, cfg: SailConfig) -> str:
    """One lock per stage, per shard (``--shard i/n``) and per torchrun rank: those never
    collide."""
    shard = {"encode": cfg.encode.shard, "train": cfg.train.shard}.get(stage)
    name = stage + ("-shard" + re.sub(r"\D+", "of", shard.strip()) if shard else "")
    rank = os.environ.get("RANK")
    return name + (f"-rank{rank}" if rank and os.environ.get("WORLD_SIZE", "1") != "1" else "")


def demo_config_path() -> Path:
    """The demo config shipped inside the package (also at configs/demo.yaml in a checkout)."""
    return Path(__file__).parent / "configs" / "demo.yaml"


# The phantom puts about this share of scans in the held-out test institutes (A, D, E).
_PHANTOM_TEST_SHARE = 0.2


def check_phantom_defines_metrics(cfg: SailConfig) -> None:
    """A phantom run needs enough validation volumes for per-feature monosemanticity (top-N
    slices from N distinct volumes); otherwise M_config and the ranking would be undefined."""
    if cfg.prepare.source is not None:
        return
    scans = cfg.phantom.n_ct + cfg.phantom.n_mri
    expected = scans * (1 - _PHANTOM_TEST_SHARE) * (1 - cfg.split.train_fraction)
    needed = min(cfg.evaluate.monosemanticity.top_n) + 2
    if expected < needed:
        raise ConfigError(
            f"phantom: {scans} scans give about {expected:.0f} validation volumes, but "
            f"monosemanticity needs at least {needed} (top_n "
            f"{min(cfg.evaluate.monosemanticity.top_n)} plus margin); raise "
            "phantom.n_ct/n_mri or lower split.train_fraction"
        )


def print_summary(ws: Workspace) -> None:
    """Ranking, dense-vs-sparse probe AUCs and where the report is, on the console."""
    from rich.table import Table

    from sail.artifacts import read_ranking, read_table
    from sail.console import console

    ranking = read_ranking(ws.eval.ranking)
    if ranking is not None:
        ranking = ranking.sort_values(["encoder", "final_rank"])
        table = Table(title="SAE ranking (Table 1)")
        cols = ["encoder", "variant", "sae_config", "m_config", "mean_n_features", "final_rank"]
        for col in cols:
            table.add_column(col)
        for row in ranking[cols].itertuples(index=False):
            table.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row])
        console.print(table)
    probes = read_table(ws.eval.table("probes"))
    if probes is not None:
        test = probes[probes.split == "test"].assign(
            kind=lambda d: d.sae_config.eq("dense").map({True: "dense", False: "sparse"})
        )
        summary = test.groupby(["encoder", "task", "kind"]).roc_auc.max().unstack("kind")
        table = Table(title="Test ROC-AUC per task: dense vs best sparse")
        for col in ["encoder", "task", *summary.columns]:
            table.add_column(col)
        for (enc, task), row in summary.iterrows():
            table.add_row(enc, task, *[f"{v:.3f}" for v in row])
        console.print(table)
    index = ws.report.index
    if index.is_file():
        console.print(f"report: {index.resolve()}")
