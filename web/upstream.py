"""The proxy's client for the upstream LLM (``SEMCACHE_UPSTREAM_URL``: OpenAI, vLLM, Ollama, anything that speaks
the OpenAI chat-completions API).

Every way of not getting an answer becomes an :class:`UpstreamFailure` carrying the HTTP status and the OpenAI-style
error body the proxy answers with:

=============================================  =======  ==========================================================
what happened                                  status   body
=============================================  =======  ==========================================================
``SEMCACHE_UPSTREAM_URL`` is not set           503      ``upstream_not_configured``
nothing accepts the connection (or too slow)   502      ``upstream_unreachable``, with the URL and the error
no answer within ``SEMCACHE_UPSTREAM_TIMEOUT_S``  504   ``upstream_timeout``
the connection broke, or the answer is not     502      ``upstream_error``
JSON
the upstream rate-limits semcache (429)        429      ``upstream_rate_limited``
the upstream refused semcache's credentials    502      ``upstream_error`` (the upstream key is the operator's,
(401, 403, 407), or failed (5xx)                        not the tenant's)
the upstream refused the request (other 4xx)   same     ``upstream_rejected``
=============================================  =======  ==========================================================

Tenants never see the upstream's error body nor its rate-limit headers (issue 15): they describe the operator's
account (organisation, quota, key prefix) and may quote the prompt. What the upstream said is logged for the
operator instead: its status, its error ``code`` and ``type`` and its request id, never the message or the body.

One ``httpx.Client`` (a connection pool) per process, made on first use, again after a fork.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator
from urllib.parse import urlsplit, urlunsplit

import httpx

from cache_core.settings import Settings

from .openai_chat import openai_error

__all__ = ["Upstream", "UpstreamFailure", "UpstreamAnswer", "safe_url"]

log = logging.getLogger(__name__)

# No x-ratelimit-* nor retry-after: they are the operator's account limits, not the tenant's (issue 15)
_RELAYED_HEADERS = ("x-request-id", "openai-processing-ms")
_LABEL = re.compile(r"[^A-Za-z0-9_.:-]")


def safe_url(url: str) -> str:
    """A URL without its user info and query (error messages and logs never show a credential)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit((parts.scheme, f"{host}{port}", parts.path, "", ""))


class UpstreamFailure(Exception):
    """No usable answer from the upstream: what the proxy answers instead (status, OpenAI-style body, headers)."""

    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        super().__init__(body.get("error", {}).get("message", f"upstream failure {status}"))
        self.status = status
        self.body = body
        self.headers = headers or {}

    @property
    def code(self) -> str:
        return str(self.body.get("error", {}).get("code") or self.body.get("error", {}).get("type") or "error")


@dataclass
class UpstreamAnswer:
    """A successful (2xx) non-streamed answer: the raw bytes to relay and their parsed JSON."""

    status: int
    content: bytes
    data: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def _relayed(headers: httpx.Headers) -> dict[str, str]:
    return {name: headers[name] for name in _RELAYED_HEADERS if name in headers}


class Upstream:
    """Sends chat-completion requests to the upstream and turns failures into :class:`UpstreamFailure`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.base = settings.upstream_url.rstrip("/") if settings.upstream_url else None
        self._client: httpx.Client | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()

    @property
    def shown(self) -> str:
        return safe_url(self.base) if self.base else "(none)"

    def client(self) -> httpx.Client:
        with self._lock:
            if self._client is None or self._pid != os.getpid():
                s = self.settings
                self._pid = os.getpid()
                self._client = httpx.Client(
                    timeout=httpx.Timeout(s.upstream_timeout_s, connect=s.upstream_connect_timeout_s),
                    limits=httpx.Limits(max_connections=256, max_keepalive_connections=32),
                    follow_redirects=False,
                    headers={"User-Agent": "semcache-proxy"},
                )
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None and self._pid == os.getpid():
                self._client.close()
            self._client = None

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json, text/event-stream"}
        if self.settings.upstream_api_key:
            headers["Authorization"] = f"Bearer {self.settings.upstream_api_key}"
        return headers

    def _url(self, path: str) -> str:
        if self.base is None:
            raise UpstreamFailure(503, openai_error(
                503, "the proxy has no upstream LLM: set SEMCACHE_UPSTREAM_URL (for example https://api.openai.com/v1)",
                code="upstream_not_configured"))
        return f"{self.base}{path}"

    # --- calls -------------------------------------------------------------------------------------------------
    def complete(self, body: dict[str, Any]) -> UpstreamAnswer:
        """POST ``/chat/completions`` (not streamed); the answer, or :class:`UpstreamFailure`."""
        url = self._url("/chat/completions")
        with self._errors():
            response = self.client().post(url, json=body, headers=self._headers())
        return self._answer(response)

    def get(self, path: str) -> UpstreamAnswer:
        """GET ``path`` (``/models``); the answer, or :class:`UpstreamFailure`."""
        url = self._url(path)
        with self._errors():
            response = self.client().get(url, headers=self._headers())
        return self._answer(response)

    def open_stream(self, body: dict[str, Any]) -> httpx.Response:
        """POST ``/chat/completions`` with ``stream: true``; the open 2xx response (the caller reads and closes it),
        or :class:`UpstreamFailure` (an error status is read and relayed whole)."""
        url = self._url("/chat/completions")
        client = self.client()
        with self._errors():
            response = client.send(client.build_request("POST", url, json=body, headers=self._headers()), stream=True)
            if response.status_code >= 300:
                try:
                    response.read()
                finally:
                    response.close()
                raise self._failure(response)
        return response

    def _answer(self, response: httpx.Response) -> UpstreamAnswer:
        if response.status_code >= 300:
            raise self._failure(response)
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            log.warning("proxy: the upstream LLM at %s answered %d with something that is not a JSON object",
                        self.shown, response.status_code)
            raise UpstreamFailure(502, openai_error(
                502, f"the upstream LLM at {self.shown} answered {response.status_code} with something that is not a "
                "JSON object", code="upstream_error"))
        return UpstreamAnswer(response.status_code, response.content, data, _relayed(response.headers))

    def _failure(self, response: httpx.Response) -> UpstreamFailure:
        """An error answer of the upstream as a generic semcache error of the same class (the body is logged as its
        code and type only, never shown to the tenant)."""
        status = response.status_code
        code = kind = ""
        try:
            data = json.loads(response.content)
        except ValueError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            code, kind = (_LABEL.sub("", str(data["error"].get(name) or ""))[:64] for name in ("code", "type"))
        log.warning("proxy: the upstream LLM at %s answered %d (code %s, type %s, request id %s)", self.shown, status,
                    code or "-", kind or "-", _LABEL.sub("", response.headers.get("x-request-id", ""))[:64] or "-")
        headers = {k: v for k, v in _relayed(response.headers).items() if k == "x-request-id"}
        if status == 429:
            return UpstreamFailure(429, openai_error(
                429, "the upstream LLM is rate-limiting this semcache deployment; retry later",
                code="upstream_rate_limited"), headers)
        if 400 <= status <= 499 and status not in (401, 403, 407):
            return UpstreamFailure(status, openai_error(
                status, f"the upstream LLM refused the request ({status}): check the model name and the parameters",
                code="upstream_rejected"), headers)
        what = "refused semcache's credentials" if status in (401, 403, 407) else f"failed ({status // 100}xx)"
        return UpstreamFailure(502, openai_error(
            502, f"the upstream LLM at {self.shown} {what}; the operator's log has the details",
            code="upstream_error"), headers)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise UpstreamFailure(502, openai_error(
                502, f"the upstream LLM at {self.shown} is unreachable ({type(exc).__name__}: {exc}); check "
                "SEMCACHE_UPSTREAM_URL and that the server is up", code="upstream_unreachable")) from exc
        except httpx.TimeoutException as exc:
            raise UpstreamFailure(504, openai_error(
                504, f"the upstream LLM at {self.shown} did not answer within {self.settings.upstream_timeout_s:g}s "
                "(SEMCACHE_UPSTREAM_TIMEOUT_S)", code="upstream_timeout")) from exc
        except httpx.HTTPError as exc:
            raise UpstreamFailure(502, openai_error(
                502, f"the upstream LLM at {self.shown} failed: {type(exc).__name__}: {exc}",
                code="upstream_error")) from exc
