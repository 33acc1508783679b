"""Sending work to the worker and reading how it went, without importing ``worker``.

The web process has its own small Celery *client* app with the worker's broker, result backend and serializer. Tasks
are sent by name (:mod:`cache_core.tasks`) with JSON keyword arguments. Before a task is sent, who sent it (the API
key or the UI user, and the tenant) is written to ``<index>:webtask:<task id>``, so ``GET /api/v1/tasks/<id>`` can
answer only the key that owns the task, and nobody learns about other tenants' tasks.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis
from celery import Celery
from celery.backends.redis import RedisBackend
from celery.result import AsyncResult

from cache_core.celeryconf import shared_config
from cache_core.errors import BackendUnavailable
from cache_core.settings import Settings

__all__ = ["make_celery_client", "send_task", "task_record", "task_status", "kwargs_summary", "TASK_RECORD_TTL_S"]

TASK_RECORD_TTL_S = 24 * 3600  # the longest a record was kept before SEMCACHE_TASK_RESULT_TTL_S (kept: a name)

# Celery's states, as the API names them. PROGRESS is the purge task's own state: still running.
_STATES = {
    "PENDING": "pending",
    "RECEIVED": "pending",
    "STARTED": "started",
    "PROGRESS": "started",
    "RETRY": "retry",
    "SUCCESS": "success",
    "FAILURE": "failure",
    "REVOKED": "failure",
    "REJECTED": "failure",
}


_QUICK_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}


class PollingRedisBackend(RedisBackend):
    """Celery's Redis result backend without the result subscription it makes whenever a task is sent.

    The web only ever polls task states (``AsyncResult.state``) and never blocks on ``get()``: a subscription per
    sent task would pile up channels (and messages) on a pub/sub connection nobody reads, and with the broker down
    it made every send wait about 20 s for the subscription's retries.
    """

    def on_task_call(self, producer, task_id):  # noqa: ANN001 - Celery's signature
        return None


def make_celery_client(settings: Settings, broker_url: str) -> Celery:
    """A Celery app that only sends tasks and reads results; its broker, result backend, serializers and transport
    options come from :mod:`cache_core.celeryconf`, as the worker's do (same URL for both, JSON only, the
    deployment's queue)."""
    backend = broker_url
    if broker_url.startswith(("redis://", "rediss://", "unix://")):
        backend = f"web.dispatch:PollingRedisBackend+{broker_url}"  # Celery's "<class>+<url>" form
    app = Celery("semcache-web", broker=broker_url, backend=backend, set_as_current=False)
    app.conf.update(
        **shared_config(settings),
        broker_connection_retry_on_startup=False,
        broker_connection_timeout=max(settings.enqueue_timeout_ms / 1000, 0.5),
        result_backend_transport_options={"retry_policy": _QUICK_RETRY},  # a state read fails fast: 503, not a hang
    )
    return app


def _record_key(settings: Settings, task_id: str) -> str:
    return settings.key(f"webtask:{task_id}")


_SHOWN = {"mode", "status", "kind", "correct"}  # values that are never user text
_ID_CHARS = set("0123456789abcdef")


def _shown(value: Any, name: str = "") -> str:
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, str):
        is_id = len(value) == 32 and set(value) <= _ID_CHARS  # entry and lookup ids name no one
        return repr(value) if (name in _SHOWN and len(value) <= 32) or is_id else f"<{len(value)} chars>"
    if isinstance(value, list):
        return f"<{len(value)} items>"
    if isinstance(value, dict):
        if name == "command" and "prompt" in value:
            return "<1 write>"
        return f"<{len(value)} fields>"
    return f"<{type(value).__name__}>"


def kwargs_summary(kwargs: dict[str, Any]) -> str:
    """What a task's message headers show of its arguments: ids, modes and sizes, never prompts, answers, tenants or
    filters (Celery would put ``repr(kwargs)``, up to 1 KB of them, in the ``kwargsrepr`` header; issue 15).

    >>> kwargs_summary({"command": {"prompt": "my e-mail is a@b.c", "response": "ok"}})
    "{'command': <1 write>}"
    >>> kwargs_summary({"ids": ["0" * 32], "mode": "ids", "tenant": "acme", "reason": "api delete"})
    "{'ids': <1 items>, 'mode': 'ids', 'tenant': <4 chars>, 'reason': <10 chars>}"
    """
    return "{" + ", ".join(f"{name!r}: {_shown(value, name)}" for name, value in kwargs.items()) + "}"


def send_task(celery: Celery, client: redis.Redis, settings: Settings, name: str, kwargs: dict[str, Any], *,
              owner: str, tenant: str | None, kind: str, label: str = "") -> str:
    """Record who sends the task, then send it by name. Returns the task id.

    Raises :class:`BackendUnavailable` when Redis or the broker cannot take it (the caller answers 503).
    """
    task_id = uuid.uuid4().hex
    record = {"owner": owner, "tenant": tenant, "kind": kind, "label": label[:300], "name": name,
              "sent_at": time.time()}
    try:
        client.set(_record_key(settings, task_id), json.dumps(record, ensure_ascii=False),
                   ex=settings.task_result_ttl_s)  # as long as the result it describes (issue 15)
    except redis.RedisError as exc:
        raise BackendUnavailable(f"cannot record the task: {exc}") from exc
    try:
        celery.send_task(
            name, kwargs=kwargs, task_id=task_id, retry=True, retry_policy=_QUICK_RETRY,
            argsrepr="()", kwargsrepr=kwargs_summary(kwargs),
        )  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - kombu raises many transport errors; all mean "broker unavailable"
        client.delete(_record_key(settings, task_id))
        raise BackendUnavailable(f"the task queue is unavailable: {exc}") from exc
    return task_id


def task_record(client: redis.Redis, settings: Settings, task_id: str) -> dict[str, Any] | None:
    """Who sent a task (owner, tenant, kind, label), or None if the web never sent it or forgot it."""
    if not task_id or len(task_id) > 64:
        return None
    try:
        raw = client.get(_record_key(settings, task_id))
    except redis.RedisError as exc:
        raise BackendUnavailable(f"cannot read the task record: {exc}") from exc
    return json.loads(raw) if raw else None


def _plain(value: Any) -> Any:
    """A task result as JSON-able data (results are JSON already; exceptions become their message)."""
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}"
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def task_status(celery: Celery, task_id: str) -> dict[str, Any]:
    """``{"task_id", "state", "result"?, "error"?, "progress"?}`` of a task, from the result backend."""
    result = AsyncResult(task_id, app=celery)
    try:
        raw_state = result.state
        info = result.info
    except Exception as exc:  # noqa: BLE001 - an unreadable backend is "unavailable", not a crash
        raise BackendUnavailable(f"cannot read the task state: {exc}") from exc
    out: dict[str, Any] = {"task_id": task_id, "state": _STATES.get(raw_state, "pending")}
    if raw_state == "SUCCESS":
        out["result"] = _plain(info)
    elif raw_state in ("FAILURE", "REVOKED", "REJECTED"):
        out["error"] = _plain(info) if info is not None else raw_state.lower()
    elif raw_state == "RETRY":
        out["error"] = _plain(info)
    elif raw_state == "PROGRESS" and isinstance(info, dict):
        out["progress"] = {"done": int(info.get("done", 0) or 0), "total": int(info.get("total", 0) or 0)}
    return out
