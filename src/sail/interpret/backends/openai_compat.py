"""Any OpenAI-compatible chat-completions server (vLLM, Ollama, llama.cpp, TGI).

Images go as base64 PNG data URLs. Timeouts, connection errors, 429 and 5xx are retried with
exponential backoff; a server that rejects ``response_format`` is asked again without it (the
answer is still validated). The API key comes from the environment only and is sent as a
header; it is never part of an identity, a cache record, an error message or a log line.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import os
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import httpx

from sail.config import EndpointSettings
from sail.errors import SailError
from sail.interpret.backends.base import BackendError, ChatRequest

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_endpoint(url: str, allow_remote: bool, key: str) -> None:
    """Patient images must not leave the machine unless the user says so."""
    if urlsplit(url).scheme not in ("http", "https"):
        raise SailError(f"{key}: {url!r} is not an http(s) URL")
    if not allow_remote and not is_loopback(url):
        raise SailError(
            f"{key}: {urlsplit(url).hostname!r} is not a loopback address; images and metadata "
            "would leave this machine. Pass --allow-remote (interpret.allow_remote: true) to "
            "allow it"
        )


class OpenAIChat:
    def __init__(
        self, settings: EndpointSettings, allow_remote: bool, key: str = "interpret.openai"
    ):
        base_url = settings.base_url or os.environ.get("SAIL_OPENAI_BASE_URL")
        model = settings.model or os.environ.get("SAIL_OPENAI_MODEL")
        if not base_url:
            raise SailError(f"{key}.base_url is not set (nor SAIL_OPENAI_BASE_URL)")
        if not model:
            raise SailError(f"{key}.model is not set (nor SAIL_OPENAI_MODEL)")
        check_endpoint(base_url, allow_remote, f"{key}.base_url")
        self.settings = settings
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.identity = f"openai:{model}"
        self.endpoint = base_url.rstrip("/")  # part of the call-cache key
        self.params: dict[str, Any] = {
            "temperature": settings.temperature,
            "max_tokens": settings.max_tokens,
            "seed": settings.seed,
        }
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(settings.api_key_env)
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.Client(
            timeout=settings.timeout_s,
            headers=headers,
            limits=httpx.Limits(max_connections=settings.concurrency),
        )
        self._schema_ok = settings.json_schema
        self._lock = threading.Lock()

    def _messages(self, req: ChatRequest) -> list[dict[str, Any]]:
        content: list[dict[str, Any]] = [
            {
                "type": "image_url",
                "image_url": {
                    "url": "data:image/png;base64," + base64.b64encode(b).decode("ascii")
                },
            }
            for b in req.images
        ]
        content.append({"type": "text", "text": req.text})
        messages = [
            {"role": "system", "content": req.system},
            {"role": "user", "content": content if req.images else req.text},
        ]
        for answer, feedback in req.history:
            messages += [
                {"role": "assistant", "content": answer},
                {"role": "user", "content": feedback},
            ]
        return messages

    def _payload(self, req: ChatRequest, with_schema: bool) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": self._messages(req),
            **{k: v for k, v in self.params.items() if v is not None},
        }
        if with_schema and req.schema is not None:
            payload["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": req.schema_name, "schema": req.schema, "strict": True},
            }
        return payload

    def complete(self, req: ChatRequest) -> str:
        s = self.settings
        last = ""
        for attempt in range(s.max_retries + 1):
            if attempt:
                time.sleep(s.backoff_s * 2 ** (attempt - 1))
            with self._lock:
                with_schema = self._schema_ok
            try:
                resp = self._client.post(self.url, json=self._payload(req, with_schema))
            except httpx.TimeoutException:
                last = f"timeout after {s.timeout_s:g} s"
                continue
            except httpx.TransportError as exc:
                last = f"connection error ({type(exc).__name__})"
                continue
            if (
                resp.status_code == 400
                and with_schema
                and req.schema is not None
                and "response_format" in resp.text
            ):
                log.warning("%s: server rejects response_format; asking without a schema", self.url)
                with self._lock:
                    self._schema_ok = False
                continue
            if resp.status_code in RETRY_STATUS:
                last = f"HTTP {resp.status_code}"
                continue
            if resp.status_code != 200:
                raise BackendError(f"{self.url}: HTTP {resp.status_code}: {resp.text[:200]}")
            try:
                content = resp.json()["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                last = "malformed response body (no choices[0].message.content)"
                continue
            if not isinstance(content, str):
                last = "malformed response body (content is not text)"
                continue
            return content
        raise BackendError(f"{self.url}: {last} (after {s.max_retries + 1} attempts)")
