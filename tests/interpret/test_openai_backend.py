"""A real OpenAI-compatible HTTP server on 127.0.0.1, driven through the real client."""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest

from sail.config import SailConfig
from sail.errors import SailError
from sail.interpret.stage import run_autointerp, run_language
from tests.interpret.conftest import Server

SECRET = "sk-test-DO-NOT-WRITE-7f3a9c"


def chat(content: str) -> dict:
    return {"choices": [{"message": {"role": "assistant", "content": content}}]}


def good_answer(body: dict) -> str:
    """Valid structured answers for the describe, judge and match schemas."""
    fmt = body.get("response_format", {}).get("json_schema", {})
    name, schema = fmt.get("name"), fmt.get("schema", {})
    if name == "concept":
        text = body["messages"][1]["content"][-1]["text"]
        # one description per prompt: the judge drops distractors that share the target's
        # description
        tag = hashlib.sha1(text.encode()).hexdigest()[:6]
        concept = "Axial CT of the liver" if "liver" in text else "CT of the pelvis"
        return json.dumps({"concept": f"{concept} ({tag})"})
    if name == "ranking":
        labels = schema["properties"]["ranking"]["items"]["enum"]
        return json.dumps({"ranking": labels})
    if name == "match":
        n = schema["properties"]["feature_numbers"]["minItems"]
        return json.dumps({"feature_numbers": list(range(1, n + 1))})
    raise AssertionError(name)


def _cfg(ws, url, **interpret):
    endpoint = {
        "base_url": url,
        "model": "tiny-vlm",
        "timeout_s": 2.0,
        "max_retries": 2,
        "backoff_s": 0.01,
        "concurrency": 2,
    }
    endpoint |= interpret.pop("endpoint", {})
    section = {
        "describer": "openai",
        "judge": "openai",
        "matcher": "llm",
        "openai": endpoint,
        "autointerp": {
            "n_features": 4,
            "n_distractors": 2,
            "judge_permutations": 2,
            "parse_retries": 1,
        },
        "language": {
            "published_queries": False,
            "queries": [{"name": "liver", "text": "Axial CT of the liver"}],
        },
    } | interpret
    return SailConfig(workspace=ws.root, interpret=section)


OUT = ("toyenc", "matryoshka", "D_16_64_K_4_8")


def test_valid_answers_cache_and_key_never_written(toy_ws, server, monkeypatch):
    monkeypatch.setenv("SAIL_OPENAI_API_KEY", SECRET)
    srv = server(lambda body, n: (200, chat(good_answer(body)), 0))
    cfg = _cfg(toy_ws, srv.url)
    run_autointerp(cfg, toy_ws)
    run_language(cfg, toy_ws)
    out = toy_ws.interpret_dir / "autointerp" / "/".join(OUT)
    desc = pd.read_csv(out / "descriptions.csv")
    assert (desc.status == "ok").all() and desc.description.str.contains("CT").all()
    metrics = json.loads((out / "metrics.json").read_text())
    # the server always ranks A first: success iff the true concept was shown as A or B
    judge = pd.read_csv(out / "judge.csv")
    assert (judge.true_rank == judge.true_label.map({"A": 1, "B": 2, "C": 3})).all()
    assert metrics["n_judged"] == 4 and metrics["chance_success_rate"] == pytest.approx(2 / 3)
    # images went as data URLs, the key as a header
    first = srv.requests[0]["messages"][1]["content"]
    assert sum(c["type"] == "image_url" for c in first) == 5
    assert first[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert all(h.get("Authorization") == f"Bearer {SECRET}" for h in srv.headers)
    n_calls = len(srv.requests)
    assert n_calls > 0
    # a second run (forced) finds every answer in calls.jsonl: zero calls
    run_autointerp(cfg, toy_ws, force=True)
    run_language(cfg, toy_ws, force=True)
    assert len(srv.requests) == n_calls
    lines = [json.loads(x) for x in (out / "calls.jsonl").read_text().splitlines()]
    assert {"key", "model", "template", "prompt_sha", "image_shas", "params"} <= set(lines[0])
    for path in toy_ws.root.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_http_500_retried_then_ok(toy_ws, server):
    def mode(body, n):
        return (500, {"error": "boom"}, 0) if n % 2 == 1 else (200, chat(good_answer(body)), 0)

    srv = server(mode)
    cfg = _cfg(toy_ws, srv.url, judge="none", endpoint={"concurrency": 1})
    run_autointerp(cfg, toy_ws)
    desc = pd.read_csv(toy_ws.interpret_dir / "autointerp" / "/".join(OUT) / "descriptions.csv")
    assert (desc.status == "ok").all()
    assert len(srv.requests) == 2 * len(desc)


def test_slow_and_failing_server_failures_recorded_not_invented(toy_ws, server):
    srv = server(lambda body, n: (200, chat(good_answer(body)), 5.0) if n <= 100 else (503, "", 0))
    cfg = _cfg(toy_ws, srv.url, judge="none", endpoint={"timeout_s": 0.3, "max_retries": 1})
    run_autointerp(cfg, toy_ws)
    out = toy_ws.interpret_dir / "autointerp" / "/".join(OUT)
    desc = pd.read_csv(out / "descriptions.csv")
    assert (desc.status == "failed").all() and desc.description.isna().all()
    assert desc.error.str.contains("timeout").all()
    assert json.loads((out / "metrics.json").read_text())["n_failed"] == len(desc)
    assert not (out / "calls.jsonl").exists()  # failures are not cached: a rerun retries them


def test_malformed_answers_retried_with_feedback_then_excluded(toy_ws, server):
    def mode(body, n):
        if body.get("response_format", {}).get("json_schema", {}).get("name") == "ranking":
            return 200, chat("Rationale: the first one, clearly"), 0
        if len(body["messages"]) == 2:  # first attempt: prose instead of JSON
            return 200, chat("I think this is the liver."), 0
        return 200, chat(good_answer(body)), 0

    srv = server(mode)
    cfg = _cfg(toy_ws, srv.url)
    run_autointerp(cfg, toy_ws)
    out = toy_ws.interpret_dir / "autointerp" / "/".join(OUT)
    desc = pd.read_csv(out / "descriptions.csv")
    assert (desc.status == "ok").all()
    retried = [
        r
        for r in srv.requests
        if r.get("response_format", {}).get("json_schema", {}).get("name") == "concept"
        and len(r["messages"]) == 4
    ]
    assert retried and "could not be used" in retried[0]["messages"][3]["content"]
    judge = pd.read_csv(out / "judge.csv")
    # every judge call failed: each is recorded as failed, none carries a rank (issue 12: the old
    # `A and B if "true_rank" in judge else True` asserted nothing when the column was absent)
    assert len(judge) == metrics_targets(out) * cfg.interpret.autointerp.judge_permutations
    assert (judge.status == "failed").all()
    assert "true_rank" not in judge or judge.true_rank.isna().all()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_judged"] == 0 and metrics["n_judge_failures"] == len(judge)  # no random ranks
    # the malformed body (not JSON at all) is a transport-level failure
    srv2 = Server(lambda body, n: (200, "<html>oops</html>", 0))
    try:
        from sail.interpret.backends.base import BackendError, ChatRequest
        from sail.interpret.backends.openai_compat import OpenAIChat

        client = OpenAIChat(_cfg(toy_ws, srv2.url).interpret.openai, allow_remote=False)
        with pytest.raises(BackendError, match="malformed"):
            client.complete(ChatRequest("s", "t"))
        assert len(srv2.requests) == 3
    finally:
        srv2.close()


def metrics_targets(out) -> int:
    """Judged targets: every target whose description and distractors' descriptions succeeded."""
    return json.loads((out / "metrics.json").read_text())["n_targets"]


def test_remote_endpoint_needs_allow_remote_and_dry_run_calls_nothing(toy_ws, server, capsys):
    cfg = _cfg(toy_ws, "http://10.1.2.3:8000/v1")
    with pytest.raises(SailError, match="allow-remote"):
        run_autointerp(cfg, toy_ws)
    srv = server(lambda body, n: (200, chat(good_answer(body)), 0))
    cfg = _cfg(toy_ws, srv.url, dry_run=True)
    run_autointerp(cfg, toy_ws)
    assert srv.requests == []
    assert not (toy_ws.interpret_dir / "autointerp").exists()
    text = capsys.readouterr().err
    assert "Sample 1:" in text and "model calls needed" in text


def test_call_budget(toy_ws, server):
    srv = server(lambda body, n: (200, chat(good_answer(body)), 0))
    cfg = _cfg(toy_ws, srv.url, judge="none", max_calls=2, endpoint={"concurrency": 1})
    run_autointerp(cfg, toy_ws)
    desc = pd.read_csv(toy_ws.interpret_dir / "autointerp" / "/".join(OUT) / "descriptions.csv")
    assert len(srv.requests) == 2 and (desc.status == "ok").sum() == 2
    assert desc.error.fillna("").str.contains("budget").sum() == len(desc) - 2


def test_unreadable_cache_lines_are_reported_not_silently_dropped(tmp_path, caplog):
    """Review of issue 12: a cut-short line in calls.jsonl was skipped without a word."""
    import logging

    from sail.interpret.backends.base import CallCache

    path = tmp_path / "calls.jsonl"
    path.write_text(
        json.dumps({"key": "k1", "response": "r1"}) + "\n" + '{"key": "k2", "resp' + "\n"
    )
    with caplog.at_level(logging.WARNING):
        cache = CallCache(path)
    assert cache.get("k1") == "r1" and cache.get("k2") is None
    assert "1 unreadable line(s) skipped (first: line 2)" in caplog.text
