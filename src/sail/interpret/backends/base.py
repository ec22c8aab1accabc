"""The chat interface every model backend implements, and the content-addressed call cache.

A request is a system text, a user text, PNG images and optional JSON schema, plus the
(answer, feedback) pairs of earlier failed attempts. Its cache key hashes the model identity,
the prompt template version, the prompt, every image and the decoding parameters, so a rerun
finds every earlier answer in ``calls.jsonl`` and calls nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sail.errors import SailError

log = logging.getLogger(__name__)


class BackendError(SailError):
    """A model call that failed after its retries (timeouts, HTTP errors, malformed bodies)."""


@dataclass
class ChatRequest:
    system: str
    text: str
    images: list[bytes] = field(default_factory=list)
    schema: dict[str, Any] | None = None
    schema_name: str = "answer"
    history: list[tuple[str, str]] = field(default_factory=list)  # (model answer, our feedback)


class ChatModel(Protocol):
    identity: str  # model name as the cache sees it
    params: dict[str, Any]  # decoding parameters (part of the cache key)

    def complete(self, request: ChatRequest) -> str: ...


def sha(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def call_key(model: ChatModel, template: str, request: ChatRequest) -> dict[str, Any]:
    prompt = json.dumps(
        [request.system, request.text, request.history, request.schema], sort_keys=True
    )
    parts = {
        "model": model.identity,
        "template": template,
        "prompt_sha": sha(prompt)[:24],
        "image_shas": [sha(b)[:24] for b in request.images],
        "params": model.params,
    }
    if getattr(
        model, "endpoint", None
    ):  # another server may answer differently: never replay its answers
        parts["endpoint"] = model.endpoint
    parts["key"] = sha(json.dumps(parts, sort_keys=True))[:32]
    return parts


class CallCache:
    """Append-only JSONL of answers keyed by content; unreadable lines (a write cut short) are
    skipped with a warning that counts them, and those calls are made again."""

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self._answers: dict[str, str] = {}
        if path is not None and path.is_file():
            bad = []
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                try:
                    rec = json.loads(line)
                    self._answers[rec["key"]] = rec["response"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    bad.append(i)
            if bad:
                log.warning(
                    "%s: %d unreadable line(s) skipped (first: line %d); those calls will be made "
                    "again",
                    path,
                    len(bad),
                    bad[0],
                )

    def get(self, key: str) -> str | None:
        with self._lock:
            return self._answers.get(key)

    def put(self, parts: dict[str, Any], role: str, response: str, seconds: float) -> None:
        rec = dict(parts, role=role, response=response, seconds=round(seconds, 3))
        with self._lock:
            self._answers[parts["key"]] = response
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec, sort_keys=True) + "\n")
                    f.flush()


class CallBudget:
    """At most ``limit`` real model calls per run (cache hits are free); None = unlimited."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.limit is not None and self.used >= self.limit:
                return False
            self.used += 1
            return True


@dataclass
class CallResult:
    ok: bool
    value: Any = None
    raw: str = ""
    error: str = ""
    attempts: int = 0
    calls: int = 0  # real model calls made (not cache hits)


def call_validated(
    model: ChatModel,
    cache: CallCache,
    budget: CallBudget,
    request: ChatRequest,
    template: str,
    role: str,
    parse: Callable[[str], Any],
    retries: int,
) -> CallResult:
    """Ask, validate, and re-ask with the parse error fed back; never invents an answer."""
    import time

    result = CallResult(ok=False)
    req = ChatRequest(
        request.system,
        request.text,
        request.images,
        request.schema,
        request.schema_name,
        list(request.history),
    )
    for _ in range(retries + 1):
        result.attempts += 1
        parts = call_key(model, template, req)
        raw = cache.get(parts["key"])
        if raw is None:
            if not budget.take():
                result.error = f"call budget exhausted (interpret.max_calls={budget.limit})"
                return result
            t0 = time.perf_counter()
            try:
                raw = model.complete(req)
            except BackendError as exc:
                result.calls += 1
                result.error = str(exc)
                return result
            result.calls += 1
            cache.put(parts, role, raw, time.perf_counter() - t0)
        result.raw = raw
        try:
            result.value = parse(raw)
        except ValueError as exc:
            result.error = f"unparseable answer: {exc}"
            req.history.append(
                (
                    raw,
                    f"That answer could not be used ({exc}). Reply again with only the JSON "
                    "object the schema describes.",
                )
            )
            continue
        result.ok, result.error = True, ""
        return result
    return result


def extract_json(raw: str) -> Any:
    """The JSON object in an answer (code fences and surrounding prose tolerated)."""
    text = raw.strip()
    if text.startswith("```"):
        text = text.strip("`")
        text = text[text.find("\n") + 1 :] if "\n" in text else text
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        raise ValueError("no JSON object found")
    try:
        return json.loads(text[start : end + 1])
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc.msg})") from None
