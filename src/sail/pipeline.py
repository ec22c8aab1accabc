"""The stage DAG: the order stages run in and a driver that runs a range of them.

Each stage is ``run_<stage>(cfg, ws, force=False)``: it reads artifacts from the workspace,
writes its own, and skips itself when its manifest matches (see :mod:`sail.workspace`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from sail.config import SailConfig, dump_config
from sail.errors import SailError
from sail.workspace import Workspace, write_text_atomic

log = logging.getLogger(__name__)

StageFn = Callable[[SailConfig, Workspace, bool], None]


@dataclass(frozen=True)
class Stage:
    name: str
    run: StageFn
    doc: str


def _stages() -> list[Stage]:
    # Imported lazily so `sail --help` stays fast and a stage's heavy deps load only when used.
    from sail.data.prepare import run_prepare
    from sail.data.split import run_split

    return [
        Stage("prepare", run_prepare, "volumes -> PNG slices + data/slices.parquet"),
        Stage("split", run_split, "scan-level train/valid/test split -> data/split.csv"),
    ]


def stage_names() -> list[str]:
    return [s.name for s in _stages()]


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
        stage.run(cfg, ws, force)
    return ws
