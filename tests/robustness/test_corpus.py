"""The robustness corpus: every bad input ends in exit code 2 and one ``error:`` line naming the
file / column / row / key, with no traceback, and leaves every earlier artifact byte-identical."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from typer.testing import CliRunner

from sail.cli import app

from .cases import CASES, Ctx
from .conftest import copy_workspace, snapshot


def test_corpus_size():
    per_stage = Counter(c.stage for c in CASES)
    assert len(CASES) >= 60 and min(per_stage.values()) >= 6, per_stage
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.stage}:{c.id}" for c in CASES])
def test_bad_input(case, golden, tmp_path, monkeypatch):
    src, golden_ws, cfg = golden
    ctx = Ctx(ws=copy_workspace(golden_ws, tmp_path / "ws"), tmp=tmp_path, src=src, cfg=cfg)
    args = case.setup(ctx)
    before = snapshot(ctx.ws)
    for target, replacement in ctx.patches:
        monkeypatch.setattr(target, replacement)
    result = CliRunner().invoke(app, args)
    monkeypatch.undo()
    out = result.output
    assert "Traceback" not in out and isinstance(result.exception, SystemExit), (
        out,
        result.exception,
    )
    assert result.exit_code == 2, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    assert re.search(case.expect, errors[0]), errors[0]
    after = snapshot(ctx.ws)
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not changed, f"earlier artifacts changed: {changed}"
