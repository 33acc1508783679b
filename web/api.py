"""The HTTP API, ``/api/v1``: JSON in, JSON out, a bearer API key on every call but the OpenAPI document.

The key decides the tenant: a tenant key only ever reads, writes, purges or hits its own tenant's entries, and
another tenant's entry is "not found" (404), never "forbidden", so its existence does not leak. Admin keys act on
every tenant and are the only keys accepted by ``/api/v1/admin/...``. Writes are sent to the worker by task name
and answered 202 with a task id; reads go to Redis directly. Each key may make ``SEMCACHE_RATE_LIMIT_PER_MINUTE``
requests per minute (a counter in Redis, so it holds across server processes).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

import redis
from flask import Blueprint, current_app, g, jsonify, request
from pydantic import ValidationError

from cache_core import browse
from cache_core.apikeys import ApiKey, parse_key, verify_key
from cache_core.connection import make_client
from cache_core.counters import count_in_window
from cache_core.errors import BackendUnavailable
from cache_core.schema import ID_PATTERN, WriteCommand, entry_id
from cache_core.stats import read_stats
from cache_core.store import get_entry
from cache_core.feedback import lookup_record
from cache_core.tasks import (
    FEEDBACK,
    PURGE,
    SET_STATUS,
    WRITE_ENTRY,
    EntryFilter,
    FeedbackCommand,
    PurgeCommand,
    SetStatusCommand,
)

from .apimodels import (
    EntryRequest,
    FeedbackRequest,
    LookupRequest,
    PurgeRequest,
    StatusRequest,
    check_flags,
    filter_for,
    parse_body,
    parse_duration,
    scope_for,
)
from .dispatch import send_task, task_record, task_status
from .errors import ApiError, validation_error
from .keymemo import shared_memo
from .state import state

__all__ = ["bp"]

log = logging.getLogger(__name__)
bp = Blueprint("api", __name__, url_prefix="/api/v1")

_ID = re.compile(ID_PATTERN)
_PUBLIC = {"api.openapi"}


# --- authentication and rate limit -------------------------------------------------------------------------------
@bp.before_request
def _authenticate() -> None:
    if request.endpoint in _PUBLIC:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise ApiError(401, "send an API key: Authorization: Bearer <key> (create one with `semcache keys create`)",
                       headers={"WWW-Authenticate": 'Bearer realm="semcache"'})
    st = state()
    if request.endpoint == "api.lookup":  # issue 7: a lookup answers a degraded miss while Redis is down
        key = _lookup_key(presented.strip())
    else:
        key = verify_key(st.redis, st.settings, presented.strip())
        memo = _lookup_auth().memo  # issue 15: a key any endpoint verified keeps its lookups answering
        if key is None:
            memo.forget(presented.strip())
        else:
            memo.remember(presented.strip(), key)
    if key is None:
        raise ApiError(401, "invalid or revoked API key", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    if request.endpoint == "api.lookup" and _lookup_auth().known_down():
        g.api_key = key  # the rate limit fails open while Redis is down: its counter lives there
        return
    try:
        _rate_limit(key)
    except BackendUnavailable as exc:
        if request.endpoint != "api.lookup":
            raise
        # a lookup still answers when its counter cannot be counted: Redis went away between the key check and
        # the counter (then it is known down for the breaker's cooldown), or refuses the write while reads work
        # (out of memory, a read-only replica: only this request goes uncounted, other keys are not locked out)
        if isinstance(exc.__cause__, (redis.ConnectionError, redis.TimeoutError)):
            _lookup_auth().failed()
        log.warning("lookup answered without its rate-limit count: %s", exc)
    g.api_key = key


class _LookupAuth:
    """Keys verified recently, and whether Redis is known to be down, so lookups keep answering (a degraded miss).

    Writes and admin reads keep failing with 503 while Redis is down; only ``POST /lookup`` uses this. A key is
    remembered for ``SEMCACHE_PROXY_KEY_GRACE_S`` after its last successful check by any endpoint of any server
    process (:class:`web.keymemo.SharedKeyMemo`, digests in the data directory); its checks use a client with at
    most a 1 s timeout, and after a failure Redis is not asked again for ``SEMCACHE_BREAKER_COOLDOWN_MS``.
    """

    def __init__(self, st: Any) -> None:
        self.settings = st.settings
        self.memo = shared_memo(st.settings)
        self.client = make_client(st.handle.url, timeout_ms=min(st.settings.redis_write_timeout_ms, 1000))
        self.down_until = 0.0

    def known_down(self) -> bool:
        return time.monotonic() < self.down_until

    def failed(self) -> None:
        self.down_until = time.monotonic() + self.settings.breaker_cooldown_ms / 1000


def _lookup_auth() -> _LookupAuth:
    auth = current_app.extensions.get("semcache_api_lookup_auth")
    if auth is None:
        auth = current_app.extensions.setdefault("semcache_api_lookup_auth", _LookupAuth(state()))
    return auth


def _lookup_key(presented: str) -> ApiKey | None:
    if parse_key(presented) is None:
        return None  # malformed: 401 whether Redis is up or not
    auth = _lookup_auth()
    if not auth.known_down():
        try:
            key = verify_key(auth.client, auth.settings, presented)
        except BackendUnavailable:
            auth.failed()
        else:
            if key is None:
                auth.memo.forget(presented)
            else:
                auth.memo.remember(presented, key)
            return key
    key = auth.memo.recall(presented)
    if key is None:
        raise BackendUnavailable("Redis is unavailable, so this API key cannot be checked now; try again shortly")
    return key


def _rate_limit(key: ApiKey) -> None:
    st = state()
    now = time.time()
    minute = int(now // 60)
    try:  # a TTL-less counter: a volatile-* eviction must not reset a key's budget (issue 15)
        count = count_in_window(st.redis, st.settings.key("ratelimit"), key.id, 60, now=now)
    except redis.RedisError as exc:
        raise BackendUnavailable(f"rate limit counter: {exc}") from exc
    limit = st.settings.rate_limit_per_minute
    if count > limit:
        retry = max(1, int((minute + 1) * 60 - now) + 1)
        raise ApiError(429, f"more than {limit} requests this minute for this key; retry in {retry} s",
                       headers={"Retry-After": str(retry)})


def _key() -> ApiKey:
    return g.api_key


def _require_admin() -> ApiKey:
    key = _key()
    if not key.admin:
        raise ApiError(403, "this endpoint needs an admin key (semcache keys create --admin)")
    return key


def _body() -> Any:
    if request.content_length is not None and request.content_length > state().settings.max_request_bytes:
        raise ApiError(413, f"the request body is larger than {state().settings.max_request_bytes} bytes")
    try:
        body = request.get_json(force=True, silent=True)
    except RecursionError:  # issue 7: JSON nested deeper than the parser's recursion limit is bad input, not a 500
        body = None
    if body is None:
        raise ApiError(400, "the body must be a JSON object (Content-Type: application/json)", code="invalid_input",
                       field="body")
    return body


def _entry_id(value: str) -> str:
    if not _ID.fullmatch(value):
        raise ApiError(404, "not found")  # a malformed id names no entry: the same answer as a missing one
    return value


def _tenant_bound() -> str | None:
    key = _key()
    if not key.admin and not key.tenant:  # never "every tenant" for a non-admin key (ApiKey refuses such records)
        raise ApiError(403, "this API key is bound to no tenant", code="forbidden")
    return None if key.admin else key.tenant


def _send(name: str, kwargs: dict[str, Any], *, tenant: str | None, kind: str, label: str = "") -> str:
    st = state()
    return send_task(st.celery, st.redis, st.settings, name, kwargs, owner=_key().label, tenant=tenant, kind=kind,
                     label=label)


# --- the read path -----------------------------------------------------------------------------------------------
@bp.post("/lookup")
def lookup():
    body = parse_body(LookupRequest, _body())
    st = state()
    scope = scope_for(body.scope, _key(), st.settings)
    if len(body.prompt) > st.settings.max_prompt_chars:
        raise ApiError(400, f"prompt: longer than {st.settings.max_prompt_chars} characters", code="invalid_input",
                       field="prompt")
    try:
        result = st.cache().lookup(body.prompt, scope, min_similarity=body.min_similarity)
    except (BackendUnavailable, redis.RedisError) as exc:  # issue 7: Redis down or slow is a miss, not a 503
        _lookup_auth().failed()
        return jsonify({"hit": False, "entry": None, "similarity": None, "strategy": None,
                        "lookup_id": uuid.uuid4().hex, "nearest_similarity": None, "threshold": None,
                        "timings_ms": {"embed": 0.0, "search": 0.0, "total": 0.0},
                        "degraded": (str(exc) or type(exc).__name__)[:300]})
    return jsonify({
        "hit": result.hit,
        "entry": result.entry.model_dump(mode="json") if result.entry else None,
        "similarity": result.similarity if result.hit else None,
        "strategy": result.strategy,
        "lookup_id": result.lookup_id,
        "nearest_similarity": result.similarity,
        "threshold": result.threshold,
        "timings_ms": {"embed": round(result.embed_ms, 3), "search": round(result.search_ms, 3),
                       "total": round(result.total_ms, 3)},
        "degraded": result.degraded,
    })  # fmt: skip


@bp.post("/feedback")
def feedback():
    """Feedback on the answer a lookup served (within ``SEMCACHE_FEEDBACK_WINDOW_S``). The check that the lookup
    exists (and is the key's tenant's) is a read; the update itself is the worker's ``semcache.feedback`` task."""
    body = parse_body(FeedbackRequest, _body())
    st = state()
    tenant = _tenant_bound()
    try:
        record = lookup_record(st.redis, st.settings, body.lookup_id, tenant=tenant)
    except redis.RedisError as exc:
        raise BackendUnavailable(f"Redis failed: {exc}") from exc
    if record is None:
        raise ApiError(404, "no hit with this lookup_id in the feedback window (misses take no feedback)",
                       field="lookup_id")
    command = FeedbackCommand(lookup_id=body.lookup_id, correct=body.correct, by=_key().label,
                              tenant=record.get("tenant"))
    task_id = _send(FEEDBACK, command.model_dump(mode="json"), tenant=record.get("tenant"), kind="feedback",
                    label=f"feedback {record.get('entry', '')}")
    response = jsonify({"task_id": task_id, "entry_id": record.get("entry")})
    response.status_code = 202
    return response


# --- entries -----------------------------------------------------------------------------------------------------
@bp.post("/entries")
def create_entry():
    body = parse_body(EntryRequest, _body())
    st = state()
    s = st.settings
    scope = scope_for(body.scope, _key(), s)
    if len(body.prompt) > s.max_prompt_chars:
        raise ApiError(400, f"prompt: longer than {s.max_prompt_chars} characters", code="invalid_input",
                       field="prompt")
    if len(body.response) > s.max_response_chars:
        raise ApiError(400, f"response: longer than {s.max_response_chars} characters", code="invalid_input",
                       field="response")
    check_flags(body.flags)
    try:
        command = WriteCommand(prompt=body.prompt, response=body.response, scope=scope, ttl_seconds=body.ttl_seconds,
                               flags=body.flags, metadata=body.metadata, source="api", group=body.group)
    except ValidationError as exc:  # the shared model's own checks (NUL characters, metadata size)
        raise validation_error(exc) from None
    task_id = _send(WRITE_ENTRY, {"command": command.model_dump(mode="json")}, tenant=scope.tenant, kind="write",
                    label=f"write {entry_id(body.prompt, scope)}")
    response = jsonify({"task_id": task_id, "entry_id": entry_id(body.prompt, scope)})
    response.status_code = 202
    return response


@bp.get("/entries")
def list_entries():
    """Entries of the key's tenant (an admin key: of every tenant, or of ``?tenant=``), newest first."""
    key = _key()
    args = request.args
    scope = {name: args[name] for name in ("tenant", "locale", "model") if args.get(name)}
    flt, bound = filter_for(scope, key, state().settings, status=_status_arg(args.get("status")))
    flt = _with_list_args(flt, args)
    limit = _int_arg("limit", 50, 1, 500)
    offset = _int_arg("offset", 0, 0, browse.MAX_WINDOW)
    page = browse.list_entries(state().redis, state().settings, flt, tenant=bound, sort=args.get("sort", "created_at"),
                               order=args.get("order", "desc"), offset=offset, limit=limit)
    return jsonify({"total": page.total, "offset": page.offset, "limit": page.limit,
                    "entries": [e.model_dump(mode="json") for e in page.entries]})


def _status_arg(value: str | None) -> str | None:
    if value in (None, ""):
        return None
    if value not in ("approved", "pending_review", "rejected"):
        raise ApiError(400, "status: approved, pending_review or rejected", code="invalid_input", field="status")
    return value


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw in (None, ""):
        return default
    # ASCII digits only (issue 15): str.isdigit() is True for "²", which int() refuses (a 500), and int("٣") is 3
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise ApiError(400, f"{name}: an integer from {low} to {high}", code="invalid_input", field=name)
    return int(raw)


def _with_list_args(flt: EntryFilter, args: Any) -> EntryFilter:
    update: dict[str, Any] = {}
    if args.get("text"):
        update["text"] = args["text"]
    if args.getlist("flag"):
        update["flags"] = args.getlist("flag")
    try:
        return EntryFilter.model_validate({**flt.model_dump(), **update})
    except ValidationError as exc:
        raise validation_error(exc) from None


@bp.get("/entries/<entry>")
def get_one(entry: str):
    st = state()
    view = get_entry(st.redis, st.settings, _entry_id(entry), tenant=_tenant_bound())
    if view is None:
        raise ApiError(404, "not found")
    return jsonify(view.model_dump(mode="json"))


@bp.delete("/entries/<entry>")
def delete_one(entry: str):
    st = state()
    entry = _entry_id(entry)
    view = get_entry(st.redis, st.settings, entry, tenant=_tenant_bound())
    if view is None:
        raise ApiError(404, "not found")
    command = PurgeCommand(ids=[entry], mode="ids", tenant=view.scope.tenant, by=_key().label, reason="api delete")
    task_id = _send(PURGE, command.model_dump(mode="json"), tenant=view.scope.tenant, kind="delete",
                    label=f"delete {entry}")
    response = jsonify({"task_id": task_id})
    response.status_code = 202
    return response


# --- purge -------------------------------------------------------------------------------------------------------
@bp.post("/purge")
def purge():
    body = parse_body(PurgeRequest, _body())
    st = state()
    older = parse_duration(body.older_than) if body.older_than is not None else None
    flt, bound = filter_for(body.scope, _key(), st.settings, older_than_s=older, status=body.status)
    if bound is None and flt.is_empty():
        raise ApiError(400, "scope: refusing to purge every tenant's entries; name at least one scope field",
                       code="invalid_input", field="scope")
    matched = browse.count_entries(st.redis, st.settings, flt, tenant=bound)
    tenant = bound or flt.tenant
    command = PurgeCommand(filter=flt, mode="filter", tenant=tenant, by=_key().label, reason="api purge")
    task_id = _send(PURGE, command.model_dump(mode="json"), tenant=tenant, kind="purge",
                    label=f"purge {matched} entries")
    response = jsonify({"task_id": task_id, "matched": matched})
    response.status_code = 202
    return response


# --- tasks and stats ---------------------------------------------------------------------------------------------
@bp.get("/tasks/<task_id>")
def get_task(task_id: str):
    st = state()
    key = _key()
    record = task_record(st.redis, st.settings, task_id)
    if record is None or (not key.admin and record.get("owner") != key.label):
        raise ApiError(404, "not found")
    return jsonify({**task_status(st.celery, task_id), "kind": record.get("kind")})


@bp.get("/stats")
def stats():
    """Entry counts of the key's tenant; lookup statistics (deployment-wide) only for admin keys."""
    st = state()
    key = _key()
    minutes = _int_arg("minutes", 60, 1, 8 * 24 * 60)
    counts = browse.count_by_status(st.redis, st.settings, tenant=_tenant_bound())
    out: dict[str, Any] = {"tenant": key.tenant, "entries": counts}
    if key.admin:
        data = read_stats(st.redis, st.settings, minutes=minutes)
        if request.args.get("series") not in ("1", "true"):
            data.pop("series", None)
        out["lookups"] = data
    return jsonify(out)


# --- admin -------------------------------------------------------------------------------------------------------
@bp.get("/admin/tenants")
def admin_tenants():
    _require_admin()
    st = state()
    return jsonify({"tenants": browse.tenant_summary(st.redis, st.settings)})


@bp.post("/admin/entries/<entry>/status")
def admin_status(entry: str):
    key = _require_admin()
    body = parse_body(StatusRequest, _body())
    st = state()
    entry = _entry_id(entry)
    view = get_entry(st.redis, st.settings, entry)
    if view is None:
        raise ApiError(404, "not found")
    if body.response is not None and len(body.response) > st.settings.max_response_chars:
        raise ApiError(400, f"response: longer than {st.settings.max_response_chars} characters",
                       code="invalid_input", field="response")
    command = SetStatusCommand(entry_id=entry, status=body.status, by=key.label, reason=body.reason,
                               response=body.response, tenant=view.scope.tenant)
    task_id = _send(SET_STATUS, command.model_dump(mode="json"), tenant=view.scope.tenant, kind="status",
                    label=f"{body.status} {entry}")
    response = jsonify({"task_id": task_id})
    response.status_code = 202
    return response


@bp.get("/admin/deadletters")
def admin_deadletters():
    _require_admin()
    from . import deadletters

    return jsonify({"deadletters": deadletters.list_json()})


@bp.post("/admin/deadletters/<letter>/replay")
def admin_replay(letter: str):
    key = _require_admin()
    from . import deadletters

    task_id = deadletters.replay(letter, by=key.label)
    response = jsonify({"task_id": task_id})
    response.status_code = 202
    return response


@bp.get("/openapi.json")
def openapi():
    from .openapi import document

    return jsonify(document(state().settings))
