"""The OpenAI-compatible proxy: ``POST /v1/chat/completions`` and ``GET /v1/models``.

An application points its OpenAI client at ``http://<semcache>/v1`` with a semcache API key instead of its LLM
key. For each chat completion the proxy:

1. takes the tenant from the key (``Authorization: Bearer <key>``, the keys of ``/api/v1``; admin keys are refused);
2. decides whether the request may be answered from the cache (:func:`web.openai_chat.cache_key`): a temperature
   above ``SEMCACHE_PROXY_MAX_TEMPERATURE``, tools, ``n > 1``, ``logprobs`` or a last message that is not the user's
   text bypass it (``X-Semcache: bypass``, with ``X-Semcache-Bypass-Reason``);
3. looks the last user message up in the scope (tenant, model + hash of the conversation before it);
4. answers a hit itself in the OpenAI format (``X-Semcache: hit``), streamed or not, and forwards a miss to
   ``SEMCACHE_UPSTREAM_URL`` (``X-Semcache: miss``), relaying the answer (a stream as it comes);
5. after a miss, hands the answer to the worker (task ``semcache.write_entry``, sent by name from a background
   thread) with the vector the lookup computed and the upstream's token counts in ``metadata`` (``prompt_tokens``,
   ``completion_tokens``: the stats count saved tokens from them). Only a complete, single, plain-text answer is
   written back; the worker's safety pipeline still decides whether it is approved, held or dropped.

Failures: an upstream error is relayed as an OpenAI-style error and never cached (:mod:`web.upstream`); Redis down
makes the lookup a miss that is forwarded (keys verified within ``SEMCACHE_PROXY_KEY_GRACE_S`` keep working), so
the application keeps getting answers. Counters (``proxy_hit``, ``proxy_miss``, ``proxy_bypass``,
``proxy_upstream_error``, ``proxy_writeback_*``) go to the stats hashes that ``/metrics`` reads.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import queue
import threading
import time
from collections import Counter
from typing import Any, Iterator

import httpx
import redis
from flask import Blueprint, Response, after_this_request, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from cache_core.apikeys import ApiKey, verify_key
from cache_core.cache import check_group
from cache_core.connection import make_client
from cache_core.counters import count_in_window
from cache_core.errors import BackendUnavailable, InvalidInput, SemcacheError
from cache_core.schema import LookupResult, WriteCommand, entry_id
from cache_core.settings import Settings
from cache_core.stats import record_counters
from cache_core.tasks import WRITE_ENTRY

from .openai_chat import (
    CacheKey,
    ChatRequest,
    ChatRequestError,
    cache_key,
    completion_body,
    completion_chunks,
    message_text,
    openai_error,
    parse_request,
    sse,
)
from .inflight import InFlight, Shared
from .state import WebState
from .upstream import Upstream, UpstreamFailure

__all__ = ["bp", "ProxyState", "WriteBack", "KeyMemo"]

log = logging.getLogger(__name__)

bp = Blueprint("proxy", __name__, url_prefix="/v1")

_SEND_RETRY = {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.3, "interval_max": 0.5}
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ProxyError(Exception):
    """An OpenAI-style error answer."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = openai_error(status, message, code=code, param=param)
        self.headers = headers or {}


# --- per-app state ---------------------------------------------------------------------------------------------------
class KeyMemo:
    """API keys verified recently, so the proxy keeps answering their owners while Redis is down.

    Only a digest of the presented key is kept, and only for ``grace_s`` after its last successful check against
    Redis: a revoked key stops working as soon as Redis answers again (a check that says "unknown" forgets it).
    """

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self._known: dict[str, tuple[ApiKey, float]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _digest(presented: str) -> str:
        return hashlib.sha256(presented.encode("utf-8", "replace")).hexdigest()

    def remember(self, presented: str, key: ApiKey) -> None:
        if self.grace_s <= 0:
            return
        with self._lock:
            if len(self._known) > 10_000:  # bounded: drop the stale ones, then the oldest
                now = time.monotonic()
                self._known = {d: v for d, v in self._known.items() if now - v[1] < self.grace_s}
                while len(self._known) > 10_000:
                    self._known.pop(next(iter(self._known)))
            self._known[self._digest(presented)] = (key, time.monotonic())

    def forget(self, presented: str) -> None:
        with self._lock:
            self._known.pop(self._digest(presented), None)

    def recall(self, presented: str) -> ApiKey | None:
        digest = self._digest(presented)
        with self._lock:
            found = None
            for known, value in self._known.items():  # constant-time comparison of every entry
                if hmac.compare_digest(known, digest):
                    found = value
        if found is None or time.monotonic() - found[1] > self.grace_s:
            return None
        return found[0]


class WriteBack:
    """Sends write-backs to the worker and adds the proxy's counters to the stats, from one background thread, so
    no answer waits for the broker or for Redis. Bounded: past ``SEMCACHE_PROXY_MAX_PENDING_WRITES`` waiting
    write-backs, new ones are dropped and counted."""

    def __init__(self, celery: Any, client: redis.Redis, settings: Settings) -> None:
        self.celery = celery
        self.client = client
        self.settings = settings
        self.submitted = self.sent = self.failed = self.dropped = 0
        self._queue: queue.Queue = queue.Queue(maxsize=settings.proxy_max_pending_writes)
        self._counts: Counter = Counter()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._last_log = 0.0
        self._closed = False
        self._atexit = False

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._pid != os.getpid():  # a fork (a gunicorn worker): the parent's thread and queue stay behind
                self._pid, self._thread = os.getpid(), None
                self._queue = queue.Queue(maxsize=self.settings.proxy_max_pending_writes)
                self._counts = Counter()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="semcache-proxy-writeback", daemon=True)
                self._thread.start()
                if not self._atexit:  # a process that used the proxy sends what it still holds before it exits
                    self._atexit = True
                    atexit.register(self.close)

    def submit(self, command: WriteCommand) -> bool:
        """Queue one write-back; False (and counted) when too many are already waiting."""
        self._ensure_thread()
        try:
            self._queue.put_nowait(command.model_dump(mode="json"))
        except queue.Full:
            self.dropped += 1
            self.count("proxy_writeback_dropped")
            return False
        self.submitted += 1
        return True

    def count(self, name: str, n: int = 1) -> None:
        self._ensure_thread()
        with self._lock:
            self._counts[name] += n

    def _run(self) -> None:
        last_flush = time.monotonic()
        while not self._closed:
            try:
                item = self._queue.get(timeout=0.25)
            except queue.Empty:
                item = None
            if item is not None:
                try:
                    self._send(item)
                finally:
                    self._queue.task_done()
            if time.monotonic() - last_flush >= 1.0:
                last_flush = time.monotonic()
                self.flush_counts()

    def _send(self, command: dict[str, Any]) -> None:
        try:
            # kwargsrepr: message headers and monitoring tools show a summary, never the prompt or the answer
            self.celery.send_task(WRITE_ENTRY, kwargs={"command": command}, kwargsrepr="{'command': <proxy write>}",
                                  retry=True, retry_policy=_SEND_RETRY)
        except Exception as exc:  # noqa: BLE001 - kombu raises many transport errors; the answer was already sent
            self.failed += 1
            self.count("proxy_writeback_failed")
            if time.monotonic() - self._last_log > 10:  # one line per 10 s while the broker is away
                self._last_log = time.monotonic()
                log.warning("proxy: a write-back could not be sent to the worker (%s: %s); %d failed so far",
                            type(exc).__name__, exc, self.failed)
            return
        self.sent += 1
        self.count("proxy_writeback_sent")

    def flush_counts(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, Counter()
        if not counts:
            return
        try:
            record_counters(self.client, self.settings, dict(counts))
        except redis.RedisError as exc:  # statistics are best effort
            log.debug("proxy counters not recorded (%s): %s", exc, dict(counts))

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued write-back was sent (or failed), then record the counters. True if drained."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        self.flush_counts()
        return not self._queue.unfinished_tasks

    def close(self) -> None:
        if self._pid == os.getpid() and not self._closed:
            self.flush(2.0)
            self._closed = True


class ProxyState:
    """What the proxy keeps per app (and per process): the upstream client, the key memo, the write-back thread,
    and a Redis client for keys and rate limits whose timeout sits between the read path's and the writers'."""

    def __init__(self, web: WebState) -> None:
        s = web.settings
        self.web = web
        self.settings = s
        self.upstream = Upstream(s)
        from .keymemo import shared_memo  # issue 15: keys verified by any endpoint or process (data_dir)

        self.memo = shared_memo(s)
        self.writeback = WriteBack(web.celery, web.redis, s)
        self.flights = InFlight()
        from .streamcap import StreamSlots  # issue 15: one key cannot take every thread with streams

        self.streams = StreamSlots(s.proxy_max_streams_per_key)
        self._auth_client: redis.Redis | None = None
        self._redis_down_until = 0.0

    def auth_client(self) -> redis.Redis:
        if self._auth_client is None:
            url = self.web.handle.url
            self._auth_client = make_client(url, timeout_ms=min(self.settings.redis_write_timeout_ms, 1000))
        return self._auth_client

    def redis_failed(self) -> None:
        self._redis_down_until = time.monotonic() + self.settings.breaker_cooldown_ms / 1000

    def redis_known_down(self) -> bool:
        return time.monotonic() < self._redis_down_until

    def close(self) -> None:
        self.writeback.close()
        self.upstream.close()
        if self._auth_client is not None:
            self._auth_client.close()


@bp.record_once
def _setup(setup_state: Any) -> None:
    app = setup_state.app
    app.extensions["semcache_proxy"] = ProxyState(app.extensions["semcache"])


def _proxy() -> ProxyState:
    return current_app.extensions["semcache_proxy"]


# --- errors in the OpenAI format --------------------------------------------------------------------------------------
@bp.errorhandler(ProxyError)
def _proxy_error(exc: ProxyError):
    return _json(exc.body, exc.status, exc.headers)


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException):
    status = exc.code or 500
    message = exc.description or exc.name
    if status == 413:
        message = f"the request body is larger than {current_app.config.get('MAX_CONTENT_LENGTH')} bytes"
    return _json(openai_error(status, message), status)


@bp.errorhandler(Exception)
def _unexpected(exc: Exception):
    log.exception("proxy: unexpected error in %s %s", request.method, request.path)
    return _json(openai_error(500, "internal error of the semcache proxy", code="internal_error"), 500)


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    response = jsonify(body)
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


# --- authentication -------------------------------------------------------------------------------------------------
def _authenticate(ps: ProxyState) -> ApiKey:
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    presented = presented.strip()
    if scheme.lower() != "bearer" or not presented:
        raise ProxyError(401, "send a semcache API key: Authorization: Bearer <key> (create one with `semcache keys "
                         "create --tenant NAME`)", code="missing_api_key",
                         headers={"WWW-Authenticate": 'Bearer realm="semcache"'})
    key: ApiKey | None
    if ps.redis_known_down():
        key = _remembered(ps, presented)
    else:
        try:
            key = verify_key(ps.auth_client(), ps.settings, presented)
        except BackendUnavailable:
            ps.redis_failed()
            key = _remembered(ps, presented)
        else:
            if key is None:
                ps.memo.forget(presented)
                raise ProxyError(401, "invalid or revoked API key", code="invalid_api_key",
                                 headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
            ps.memo.remember(presented, key)
    if key.admin or not key.tenant:
        raise ProxyError(403, "the proxy answers for one tenant: use a tenant key (semcache keys create --tenant "
                         "NAME), not an admin key", code="tenant_key_required")
    _rate_limit(ps, key)
    return key


def _remembered(ps: ProxyState, presented: str) -> ApiKey:
    key = ps.memo.recall(presented)
    if key is None:
        raise ProxyError(503, "Redis is unavailable, so this API key cannot be checked now; try again shortly",
                         code="unavailable", headers={"Retry-After": "5"})
    return key


def _rate_limit(ps: ProxyState, key: ApiKey) -> None:
    """The per-key budget of ``/api/v1`` (the same counter). Fails open: a broken Redis never blocks an answer."""
    if ps.redis_known_down():
        return
    now = time.time()
    minute = int(now // 60)
    try:  # the API's TTL-less counter (issue 15)
        count = count_in_window(ps.auth_client(), ps.settings.key("ratelimit"), key.id, 60, now=now)
    except redis.RedisError:
        ps.redis_failed()
        return
    limit = ps.settings.rate_limit_per_minute
    if count > limit:
        retry = max(1, int((minute + 1) * 60 - now) + 1)
        raise ProxyError(429, f"more than {limit} requests this minute for this key; retry in {retry} s",
                         code="rate_limit_exceeded", headers={"Retry-After": str(retry)})


def _body() -> dict[str, Any]:
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    if limit and request.content_length is not None and request.content_length > limit:
        raise ProxyError(413, f"the request body is larger than {limit} bytes")
    try:
        body = request.get_json(force=True, silent=True)
    except RecursionError:  # issue 7: JSON nested past the parser's recursion limit is bad input, not a 500
        body = None
    if not isinstance(body, dict):
        raise ProxyError(400, "the body must be a JSON object (Content-Type: application/json)")
    return body


# --- the views ------------------------------------------------------------------------------------------------------
@bp.get("/models")
def models():
    """The upstream's model list, relayed (the proxy adds no model of its own)."""
    ps = _proxy()
    _authenticate(ps)
    try:
        answer = ps.upstream.get("/models")
    except UpstreamFailure as failure:
        return _json(failure.body, failure.status, failure.headers)
    return Response(answer.content, status=answer.status, content_type="application/json", headers=answer.headers)


@bp.post("/chat/completions")
def chat_completions():
    ps = _proxy()
    key = _authenticate(ps)
    raw = _body()
    _hold_stream_slot(ps, key, raw)
    try:
        req = parse_request(raw)
    except ChatRequestError as exc:
        raise ProxyError(400, exc.message, param=exc.param) from None
    ck = cache_key(req, ps.settings, tenant=key.tenant)
    group = _group_header()  # checked on every request: a bad value is the client's mistake even on a bypass
    if group is not None and not ck.bypass:
        ck = _GroupedKey(**{f.name: getattr(ck, f.name) for f in dataclasses.fields(ck) if f.init}, group=group)
    if ck.bypass:
        ps.writeback.count("proxy_bypass")
        return _forward(ps, raw, req, None, None, {"X-Semcache": "bypass", "X-Semcache-Bypass-Reason": ck.reason})
    lookup, degraded = _lookup(ps, ck)
    if lookup is not None and lookup.hit:
        ps.writeback.count("proxy_hit")
        return _hit(req, lookup)
    ps.writeback.count("proxy_miss")
    headers = {"X-Semcache": "miss"}
    if lookup is not None:
        headers["X-Semcache-Lookup-Id"] = lookup.lookup_id
    if degraded:
        headers["X-Semcache-Degraded"] = degraded
    if req.stream or not ps.settings.proxy_coalesce:
        return _forward(ps, raw, req, ck, lookup, headers)
    return _forward_coalesced(ps, raw, req, ck, lookup, headers)


@dataclasses.dataclass(frozen=True)
class _GroupedKey(CacheKey):
    """A cache key with the answer group the client named (``X-Semcache-Group``) for the miss's write-back."""

    group: str | None = None


def _group_header() -> str | None:
    """``X-Semcache-Group`` (UTF-8), checked like every explicit group; a bad value is a 400."""
    raw = request.headers.get("X-Semcache-Group")
    if raw is None:
        return None
    try:
        value = raw.encode("latin-1").decode("utf-8")  # WSGI hands header bytes over as latin-1
    except UnicodeError:
        raise ProxyError(400, "X-Semcache-Group: not UTF-8", param="X-Semcache-Group") from None
    try:
        return check_group(value)
    except ValueError as exc:
        raise ProxyError(400, f"X-Semcache-Group: {exc}", param="X-Semcache-Group") from None


def _hold_stream_slot(ps: ProxyState, key: ApiKey, raw: dict[str, Any]) -> None:
    """Count a streamed request against its key's open streams until its response is closed (web.streamcap)."""
    if raw.get("stream") is not True:
        return
    release = ps.streams.acquire(key.id)
    if release is None:
        raise ProxyError(429, f"this API key already has {ps.streams.cap} streamed requests open in this server "
                         "process; wait for one to finish", code="too_many_streams", headers={"Retry-After": "1"})

    @after_this_request
    def _free_on_close(response: Response) -> Response:
        response.call_on_close(release)  # the WSGI server closes every response, also when the client went away
        return response


_OTHER_METHODS = ["GET", "PUT", "PATCH", "DELETE"]


@bp.route("/chat/completions", methods=_OTHER_METHODS, endpoint="chat_wrong_method")
@bp.route("/models", methods=["POST", "PUT", "PATCH", "DELETE"], endpoint="models_wrong_method")
def _wrong_method():
    allowed = "POST" if request.path.endswith("/chat/completions") else "GET"
    raise ProxyError(405, f"{request.method} is not allowed here: use {allowed} {request.path}",
                     headers={"Allow": allowed})


@bp.route("/<path:rest>", methods=["GET", "POST", *_OTHER_METHODS[1:]])
def _unknown(rest: str):
    """Other paths under /v1 answer in the OpenAI format too (not with the UI's error page)."""
    raise ProxyError(404, f"the semcache proxy serves POST /v1/chat/completions and GET /v1/models, not "
                     f"/v1/{rest[:100]}", code="unknown_url")


def _lookup(ps: ProxyState, ck: CacheKey) -> tuple[LookupResult | None, str | None]:
    """The lookup, or ``(None, why)`` when Redis (or the model) failed: then the request is a miss, forwarded."""
    began = time.perf_counter()
    try:
        return ps.web.cache().lookup(ck.prompt, ck.scope), None
    except InvalidInput as exc:  # cache_key checks what the cache checks; a difference must not fail the request
        log.warning("proxy: lookup refused the request (%s); forwarding it", exc)
        return None, "invalid"
    except SemcacheError as exc:
        # The app's cache is strict (the API answers 503), so it did not count this lookup: count it here as
        # "degraded" (a Redis that was only slow gets the count with the next flush; a dead one loses it).
        cache = getattr(ps.web, "_cache", None)
        if cache is not None and cache.stats is not None:
            cache.stats.record(outcome="degraded", strategy=None, total_ms=(time.perf_counter() - began) * 1000,
                               embed_ms=0.0, search_ms=0.0)
        return None, type(exc).__name__


def _hit(req: ChatRequest, lookup: LookupResult) -> Response:
    entry = lookup.entry
    meta = entry.metadata
    saved = {k: int(meta[k]) for k in ("prompt_tokens", "completion_tokens")
             if isinstance(meta.get(k), (int, float)) and not isinstance(meta.get(k), bool)}
    headers = {
        "X-Semcache": "hit",
        "X-Semcache-Strategy": lookup.strategy or "",
        "X-Semcache-Similarity": f"{lookup.similarity:.4f}" if lookup.similarity is not None else "",
        "X-Semcache-Entry": entry.id,
        "X-Semcache-Lookup-Id": lookup.lookup_id,
        "X-Semcache-Saved-Prompt-Tokens": str(saved.get("prompt_tokens", 0)),
        "X-Semcache-Saved-Completion-Tokens": str(saved.get("completion_tokens", 0)),
    }  # fmt: skip
    # A hit bills nothing: usage says zero tokens; what the cached answer cost is in the X-Semcache-Saved-* headers.
    if not req.stream:
        return _json(completion_body(entry.response, model=req.model, seed=lookup.lookup_id), 200, headers)

    def events() -> Iterator[bytes]:
        for chunk in completion_chunks(entry.response, model=req.model, seed=lookup.lookup_id,
                                       include_usage=req.include_usage):
            yield sse(chunk)
        yield sse("[DONE]")

    return Response(events(), status=200, mimetype="text/event-stream", headers={**_SSE_HEADERS, **headers})


# --- forwarding -----------------------------------------------------------------------------------------------------
def _forward(ps: ProxyState, raw: dict[str, Any], req: ChatRequest, ck: CacheKey | None,
             lookup: LookupResult | None, headers: dict[str, str]) -> Response:
    """Send the request upstream and relay the answer; ``ck`` set means "write it back when it is cacheable"."""
    if req.stream:
        return _forward_stream(ps, raw, req, ck, lookup, headers)
    try:
        answer = ps.upstream.complete(raw)
    except UpstreamFailure as failure:
        ps.writeback.count("proxy_upstream_error")
        return _json(failure.body, failure.status, {**failure.headers, **headers})
    if ck is not None:
        _write_back(ps, ck, lookup, req, _completion_of(answer.data))
    return Response(answer.content, status=answer.status, content_type="application/json",
                    headers={**answer.headers, **headers})


def _forward_coalesced(ps: ProxyState, raw: dict[str, Any], req: ChatRequest, ck: CacheKey,
                       lookup: LookupResult | None, headers: dict[str, str]) -> Response:
    """:func:`_forward`, once per prompt and scope among concurrent requests of this process (web/inflight.py).

    The key is the entry id the answer will be stored under (normalized prompt + scope, tenant and conversation
    context included), so exactly the requests that the write-back would answer later share the call now.
    """
    key = entry_id(ck.prompt, ck.scope)
    flight, leader = ps.flights.join(key)
    if not leader:
        s = ps.settings
        shared = flight.wait(s.upstream_timeout_s + s.upstream_connect_timeout_s)
        if shared is None:  # the leader failed or is stuck: this request goes upstream itself
            return _forward(ps, raw, req, ck, lookup, headers)
        ps.writeback.count("proxy_coalesced")
        return Response(shared.body, status=shared.status, content_type=shared.content_type,
                        headers={**shared.headers, **headers, "X-Semcache-Coalesced": "1"})
    answer: Shared | None = None
    try:
        response = _forward(ps, raw, req, ck, lookup, headers)
        if response.status_code == 200 and not response.is_streamed:
            upstream = {k: v for k, v in response.headers.items()
                        if not k.lower().startswith("x-semcache") and k.lower() not in _HOP_HEADERS}
            answer = Shared(response.get_data(), 200, response.content_type or "application/json", upstream)
        return response
    finally:
        ps.flights.finish(key, flight, answer)


_HOP_HEADERS = {"content-length", "content-type", "connection", "transfer-encoding", "date", "server"}


def _completion_of(data: dict[str, Any]) -> dict[str, Any] | None:
    """``{"content", "finish_reason", "usage", "model"}`` of a whole upstream answer, or None when it is not one
    plain text answer (several choices, tool calls, a refusal field, no text)."""
    choices = data.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return None
    message = choices[0].get("message")
    if not isinstance(message, dict) or message.get("tool_calls") or message.get("function_call") \
            or message.get("refusal"):
        return None
    content = message_text(message.get("content"))
    if not content or not content.strip():
        return None
    return {"content": content, "finish_reason": choices[0].get("finish_reason"), "usage": data.get("usage"),
            "model": data.get("model")}


def _tokens(usage: Any, req: ChatRequest, content: str) -> dict[str, Any]:
    """Token counts for the entry's metadata: the upstream's usage, else an estimate (about 4 characters a token)."""
    if isinstance(usage, dict) and all(isinstance(usage.get(k), int) and not isinstance(usage.get(k), bool)
                                       for k in ("prompt_tokens", "completion_tokens")):
        return {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"]}
    prompt_chars = sum(len(message_text(m.content) or "") for m in req.messages)
    return {"prompt_tokens": max(1, prompt_chars // 4), "completion_tokens": max(1, len(content) // 4),
            "tokens_estimated": True}


def _write_back(ps: ProxyState, ck: CacheKey, lookup: LookupResult | None, req: ChatRequest,
                done: dict[str, Any] | None) -> None:
    if done is None:
        ps.writeback.count("proxy_not_cacheable")
        return
    if len(done["content"]) > ps.settings.max_response_chars:
        ps.writeback.count("proxy_not_cacheable")
        return
    vector = None
    if lookup is not None and not lookup.degraded:
        # the lookup embedded this prompt a moment ago: its vector is in the embedder's LRU (no second model call)
        cached = getattr(ps.web.cache().embedder, "cached", None)
        found = cached(ck.prompt, partition=ck.scope.tenant) if cached is not None else None  # the lookup's tenant
        vector = [float(x) for x in found] if found is not None else None
    metadata: dict[str, Any] = {**_tokens(done["usage"], req, done["content"]), "via": "proxy"}
    if isinstance(done.get("model"), str):
        metadata["upstream_model"] = done["model"][:200]
    if ck.context_hash:
        metadata["context_hash"] = ck.context_hash
    try:
        command = WriteCommand(prompt=ck.prompt, response=done["content"], scope=ck.scope, embedding=vector,
                               metadata=metadata, source="proxy", group=getattr(ck, "group", None),
                               finish_reason=str(done["finish_reason"])[:64] if done.get("finish_reason") else None,
                               lookup_id=lookup.lookup_id if lookup is not None else None)
    except ValueError as exc:  # the shared model's own checks (NUL characters...): not cacheable, still answered
        log.info("proxy: answer not written back: %s", exc)
        ps.writeback.count("proxy_not_cacheable")
        return
    ps.writeback.submit(command)


def _forward_stream(ps: ProxyState, raw: dict[str, Any], req: ChatRequest, ck: CacheKey | None,
                    lookup: LookupResult | None, headers: dict[str, str]) -> Response:
    body = dict(raw)
    injected = False
    if ck is not None and not req.include_usage:
        # ask for the usage chunk (to count saved tokens) and keep it from a client that did not ask for it
        body["stream_options"] = {**(req.stream_options or {}), "include_usage": True}
        injected = True
    try:
        upstream = ps.upstream.open_stream(body)
    except UpstreamFailure as failure:
        ps.writeback.count("proxy_upstream_error")
        return _json(failure.body, failure.status, {**failure.headers, **headers})
    relay = _StreamRelay(injected)
    content_type = upstream.headers.get("content-type", "")

    def events() -> Iterator[bytes]:
        try:
            if "text/event-stream" not in content_type:  # a server that answered a whole completion anyway
                upstream.read()
                data = json.loads(upstream.content)
                done = _completion_of(data) if isinstance(data, dict) else None
                text = done["content"] if done else ""
                for chunk in completion_chunks(text, model=req.model, include_usage=req.include_usage,
                                               usage=data.get("usage") if isinstance(data, dict) else None):
                    yield sse(chunk)
                yield sse("[DONE]")
                relay.finish(done)
                return
            for out in relay.relay(upstream.iter_lines()):
                yield out
        except (httpx.HTTPError, ValueError) as exc:
            relay.broken = True
            ps.writeback.count("proxy_upstream_error")
            yield sse(openai_error(502, f"the upstream stream broke: {type(exc).__name__}: {exc}",
                                   code="upstream_error"))
        finally:
            upstream.close()
            if ck is not None and relay.complete:
                _write_back(ps, ck, lookup, req, relay.result())

    return Response(events(), status=200, mimetype="text/event-stream",
                    headers={**_SSE_HEADERS, **headers})


class _StreamRelay:
    """Relays an upstream SSE stream event by event while assembling the answer for the write-back."""

    def __init__(self, hide_usage: bool) -> None:
        self.hide_usage = hide_usage
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.usage: Any = None
        self.model: str | None = None
        self.cacheable = True
        self.done = False
        self.broken = False
        self._result: dict[str, Any] | None = None

    @property
    def complete(self) -> bool:
        return (self.done or self.finish_reason is not None) and not self.broken

    def finish(self, result: dict[str, Any] | None) -> None:
        self.done = True
        self._result = result
        self.cacheable = result is not None

    def result(self) -> dict[str, Any] | None:
        if self._result is not None:
            return self._result
        if not self.cacheable:
            return None
        content = "".join(self.parts)
        if not content.strip():
            return None
        return {"content": content, "finish_reason": self.finish_reason, "usage": self.usage, "model": self.model}

    def relay(self, lines: Iterator[str]) -> Iterator[bytes]:
        event: list[str] = []
        for line in lines:
            if line:
                event.append(line)
                continue
            if event:
                out = self._event(event)
                event = []
                if out:
                    yield out
                if self.done:
                    return
        if event:
            out = self._event(event)
            if out:
                yield out

    def _event(self, lines: list[str]) -> bytes | None:
        data_lines = [line[5:].lstrip() if line.startswith("data:") else None for line in lines]
        data = "\n".join(d for d in data_lines if d is not None)
        raw = ("\n".join(lines) + "\n\n").encode()
        if not data:
            return raw  # comments and keep-alives pass through
        if data.strip() == "[DONE]":
            self.done = True
            return raw
        try:
            chunk = json.loads(data)
        except ValueError:
            self.cacheable = False
            return raw
        if not isinstance(chunk, dict):
            self.cacheable = False
            return raw
        if chunk.get("error"):
            self.cacheable = False
            self.broken = True
            # issue 15: the upstream's error names the operator's account; the tenant gets a generic one
            error = chunk["error"] if isinstance(chunk["error"], dict) else {}
            log.warning("proxy: the upstream LLM sent an error in a stream (code %s)",
                        "".join(c for c in str(error.get("code") or "-") if c.isalnum() or c in "_.-")[:64])
            return sse(openai_error(502, "the upstream LLM sent an error in the stream", code="upstream_error"))
        self._absorb(chunk)
        if self.hide_usage:
            if chunk.get("usage") and not chunk.get("choices"):
                return None  # the usage chunk the client did not ask for
            if "usage" in chunk and chunk["usage"] is None:
                chunk.pop("usage")
                return sse(chunk)
        return raw

    def _absorb(self, chunk: dict[str, Any]) -> None:
        if isinstance(chunk.get("model"), str):
            self.model = chunk["model"]
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                self.cacheable = False
                continue
            delta = choice.get("delta") or {}
            if not isinstance(delta, dict) or delta.get("tool_calls") or delta.get("function_call") \
                    or delta.get("refusal"):
                self.cacheable = False
            elif isinstance(delta.get("content"), str):
                self.parts.append(delta["content"])
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])
