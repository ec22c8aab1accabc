"""Reruns do what they say (issue 16): failed calls are retried, another endpoint is another cache
key, and an endpoint set by environment variable is part of the stage's fingerprint."""

from __future__ import annotations

import pandas as pd

from sail.config import EndpointSettings, SailConfig
from sail.interpret.backends.base import ChatRequest, call_key
from sail.interpret.backends.openai_compat import OpenAIChat
from sail.interpret.stage import _model_identity, run_autointerp

from .test_openai_backend import OUT, _cfg, chat, good_answer


def test_failed_features_are_retried_on_the_next_run(toy_ws, server):
    state = {"down": True}
    srv = server(
        lambda body, n: (503, "", 0) if state["down"] else (200, chat(good_answer(body)), 0)
    )
    cfg = _cfg(toy_ws, srv.url, judge="none", endpoint={"max_retries": 0})
    run_autointerp(cfg, toy_ws)
    desc_csv = toy_ws.interpret_dir / "autointerp" / "/".join(OUT) / "descriptions.csv"
    assert (pd.read_csv(desc_csv).status == "failed").all()
    state["down"] = False
    n_before = len(srv.requests)
    run_autointerp(cfg, toy_ws)  # not "up to date": the failures are retried
    assert len(srv.requests) > n_before
    assert (pd.read_csv(desc_csv).status == "ok").all()
    n_after = len(srv.requests)
    run_autointerp(cfg, toy_ws)  # now it is up to date
    assert len(srv.requests) == n_after


def test_cache_key_includes_the_endpoint():
    req = ChatRequest("system", "text")
    a = OpenAIChat(EndpointSettings(base_url="http://127.0.0.1:8000/v1", model="m"), False)
    b = OpenAIChat(EndpointSettings(base_url="http://127.0.0.1:9000/v1", model="m"), False)
    assert call_key(a, "t", req)["key"] != call_key(b, "t", req)["key"]


def test_endpoint_from_environment_is_part_of_the_stage_hash(tmp_path, monkeypatch):
    cfg = SailConfig(workspace=tmp_path, interpret={"describer": "openai"})
    monkeypatch.setenv("SAIL_OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")
    monkeypatch.setenv("SAIL_OPENAI_MODEL", "model-a")
    first = _model_identity(cfg, "describer")
    monkeypatch.setenv("SAIL_OPENAI_BASE_URL", "http://127.0.0.1:9000/v1")
    second = _model_identity(cfg, "describer")
    monkeypatch.setenv("SAIL_OPENAI_MODEL", "model-b")
    assert len({str(first), str(second), str(_model_identity(cfg, "describer"))}) == 3
