"""The Celery tasks: thin wrappers over :mod:`worker.service`, registered on an app by :func:`register`.

Task names and keyword arguments are the contract in :mod:`cache_core.tasks`. Every task:

- takes keyword arguments only; unknown extra arguments are logged (by name) and ignored;
- rejects invalid input with :class:`~cache_core.errors.InvalidInput` (the task fails at once, is never retried,
  and the reason is logged without the offending text);
- sorts Redis errors with :func:`cache_core.rediserrors.redis_failure`: a refusal of the data is invalid input, a
  key of another type a configuration error (a dead letter at once), only an unavailable server is retried;
- retries errors whose ``retryable`` is true (Redis down, a write that kept conflicting) with exponential backoff
  and jitter, up to ``SEMCACHE_MAX_RETRIES``; then, and on any unexpected error, stores a dead letter
  (:mod:`cache_core.deadletters`) that ``semcache worker replay-dead`` or the admin UI can send again;
- returns a small JSON dict.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from typing import Any, Callable

import redis
from celery import Celery, Task
from celery.exceptions import Reject, Retry

from cache_core.deadletters import DeadLetter, push_dead_letter
from cache_core.errors import BackendUnavailable, InvalidInput, SemcacheError
from cache_core.rediserrors import is_transient, is_wrong_type, redis_failure
from cache_core.settings import Settings
from cache_core.tasks import FEEDBACK, PURGE, SET_STATUS, WRITE_ENTRY

from . import service
from .packing import unpack_embeddings

__all__ = ["register", "WRITE_ENTRIES", "backoff_seconds", "MAX_WORKER_LOSSES"]

log = logging.getLogger(__name__)

# kwargs: commands=[WriteCommand dicts], optionally embeddings=the commands' vectors as one base64 matrix
# (worker.packing: the write queue sends them so, 8 KB of float text less per command); batched embedding and writes
WRITE_ENTRIES = "semcache.write_entries"
MAX_BATCH = 1000
# A task whose worker process died this many times in a row while running it (the OOM killer, a crash in native
# code) is not run again but stored as a dead letter: late acknowledgement with task_reject_on_worker_lost requeues
# it after every death, which was forever for a task that kills every process it meets (issue 15). One death, the
# usual case (a deploy, a SIGKILL), is still redelivered and finished.
MAX_WORKER_LOSSES = 3
_STARTS_TTL_S = 24 * 3600

_SET_STATUS_FIELDS = frozenset({"entry_id", "status", "by", "reason", "response", "tenant"})
_PURGE_FIELDS = frozenset({"ids", "filter", "by", "reason", "tenant", "mode"})
_FEEDBACK_FIELDS = frozenset({"lookup_id", "entry_id", "correct", "by", "reason", "tenant"})


def kwargs_summary(kwargs: dict[str, Any]) -> str:
    """What a retried task's message headers show of its arguments: names and sizes, never their text.

    >>> kwargs_summary({"command": {"prompt": "my e-mail is a@b.c", "response": "ok"}, "commands": [1, 2]})
    "{'command': <2 fields>, 'commands': <2 items>}"
    """
    def shown(value: Any) -> str:
        if isinstance(value, dict):
            return f"<{len(value)} fields>"
        if isinstance(value, (list, tuple)):
            return f"<{len(value)} items>"
        return f"<{len(str(value))} chars>"

    return "{" + ", ".join(f"{str(name)[:40]!r}: {shown(value)}" for name, value in kwargs.items()) + "}"


def backoff_seconds(retries: int, settings: Settings) -> float:
    """Delay before retry number ``retries + 1``: exponential, capped, with "equal jitter" (half fixed, half random),
    so workers that failed together do not come back together.

    >>> s = Settings(retry_backoff_s=1, retry_backoff_max_s=60)
    >>> all(0.5 <= backoff_seconds(0, s) <= 1 for _ in range(100))
    True
    >>> all(30 <= backoff_seconds(9, s) <= 60 for _ in range(100))
    True
    """
    cap = min(settings.retry_backoff_max_s, settings.retry_backoff_s * (2 ** min(retries, 30)))
    return cap / 2 + random.uniform(0, cap / 2)


def _tenant_of(kwargs: dict[str, Any]) -> str | None:
    """The tenant a task is about, for filtering dead letters by tenant (best effort: kwargs may be garbage)."""
    for candidate in (
        (kwargs.get("command") or {}).get("scope", {}) if isinstance(kwargs.get("command"), dict) else {},
        kwargs,
        kwargs.get("filter") if isinstance(kwargs.get("filter"), dict) else {},
    ):
        tenant = candidate.get("tenant") if isinstance(candidate, dict) else None
        if isinstance(tenant, str):
            return tenant[:1024]
    commands = kwargs.get("commands")
    if isinstance(commands, list) and commands and isinstance(commands[0], dict):
        return _tenant_of({"command": commands[0]})
    return None


def _dead_letter(task: Task, kwargs: dict[str, Any], exc: BaseException, why: str) -> None:
    """Store the dead letter; if even that fails (Redis down), give the message back to the broker for later."""
    from .app import runtime_of

    runtime = runtime_of(task.app)
    letter = DeadLetter(task=task.name, kwargs=kwargs, reason=f"{why}: {exc}"[:2000], error_type=type(exc).__name__,
                        retries=task.request.retries or 0, task_id=task.request.id, tenant=_tenant_of(kwargs))
    try:
        letter_id = push_dead_letter(runtime.client, runtime.settings, letter)
    except SemcacheError as store_exc:
        pause = min(5.0, runtime.settings.retry_backoff_max_s)
        log.error("task %s[%s]: cannot store its dead letter (%s); requeued in %.1fs", task.name, task.request.id,
                  store_exc, pause)
        time.sleep(pause)  # no hot loop while Redis is away; the message waits in the broker meanwhile
        raise Reject(str(store_exc), requeue=True) from exc
    log.error("task %s[%s] failed for good (%s: %s); dead letter %s", task.name, task.request.id, why,
              type(exc).__name__, letter_id)


def _classified(body: Callable[[Any, dict[str, Any]], dict[str, Any]], runtime: Any, given: dict[str, Any],
                name: str) -> dict[str, Any]:
    """``body(runtime, given)``, with a Redis error sorted by :func:`~cache_core.rediserrors.redis_failure` even
    where a service function wrapped every Redis error as ``BackendUnavailable``: a refusal of the data is never
    retried, a key of another type is a dead letter at once (issue 15)."""
    try:
        return body(runtime, given)
    except BackendUnavailable as exc:
        cause = exc.__cause__
        if isinstance(cause, redis.RedisError) and (is_wrong_type(cause) or not is_transient(cause)):
            raise redis_failure(cause, name) from cause
        raise
    except redis.RedisError as exc:  # a Redis error no service function wrapped
        raise redis_failure(exc, name) from exc


def _starts_key(task: Task, settings: Settings) -> str:
    return settings.key(f"taskstarts:{task.request.id}")


def _started(task: Task, runtime: Any) -> int:
    """Count this start of the task; returns the starts that never finished before it (their process died).
    Best effort: a Redis failure counts nothing (the task itself then meets Redis's state)."""
    key = _starts_key(task, runtime.settings)
    try:
        pipe = runtime.client.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, _STARTS_TTL_S)
        return int(pipe.execute()[0]) - 1
    except redis.RedisError:
        return 0


def _finished(task: Task, runtime: Any) -> None:
    with contextlib.suppress(redis.RedisError):
        runtime.client.delete(_starts_key(task, runtime.settings))


def _run(task: Task, args: tuple, kwargs: dict[str, Any], known: frozenset[str],
         body: Callable[[Any, dict[str, Any]], dict[str, Any]], *, counts_invalid: bool = False) -> dict[str, Any]:
    from .app import runtime_of

    runtime = runtime_of(task.app)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        log.warning("task %s[%s]: ignoring unknown arguments %s", task.name, task.request.id,
                    [str(name)[:40] for name in unknown[:10]])
    given = {k: v for k, v in kwargs.items() if k in known}
    lost = _started(task, runtime)  # a death of the process skips every exit of this function, so it stays counted
    if lost >= MAX_WORKER_LOSSES:
        exc = SemcacheError(f"the worker process died {lost} times while running this task; not run again")
        try:
            _dead_letter(task, given, exc, "worker lost")
        finally:
            _finished(task, runtime)
        raise exc
    try:
        return _attempt(task, args, given, runtime, body, counts_invalid=counts_invalid)
    finally:
        _finished(task, runtime)  # returned, failed, retrying or requeued: not a death of the process


def _attempt(task: Task, args: tuple, given: dict[str, Any], runtime: Any,
             body: Callable[[Any, dict[str, Any]], dict[str, Any]], *, counts_invalid: bool) -> dict[str, Any]:
    """One run of a task's body with its error handling (see the module docstring)."""
    settings = runtime.settings
    try:
        if args:
            raise InvalidInput(f"{len(args)} positional argument(s) given; {task.name} takes keyword arguments only")
        result = _classified(body, runtime, given, task.name)
        if task.request.retries:
            result["retries"] = task.request.retries
        return result
    except InvalidInput as exc:
        if counts_invalid:
            service.count_invalid(runtime.client, settings)
        log.warning("task %s[%s] rejected: %s", task.name, task.request.id, exc)
        raise
    except SemcacheError as exc:
        if not exc.retryable:
            _dead_letter(task, given, exc, "failed")
            raise
        retries = task.request.retries or 0
        if retries < settings.max_retries:
            countdown = backoff_seconds(retries, settings)
            log.warning("task %s[%s]: %s; retry %d of %d in %.1fs", task.name, task.request.id, exc, retries + 1,
                        settings.max_retries, countdown)
            try:
                # the retry is a new message: without these Celery would put repr(kwargs), prompts and answers
                # included, into its headers (the first send carries a summary: worker/queue.py, web/dispatch.py)
                raise task.retry(exc=exc, countdown=countdown, max_retries=settings.max_retries, argsrepr="()",
                                 kwargsrepr=kwargs_summary(task.request.kwargs or {}))
            except Retry:
                raise
            except Exception as publish_exc:  # noqa: BLE001 - the broker is down too: leave the message unacked
                log.error("task %s[%s]: cannot schedule the retry (%s); requeued", task.name, task.request.id,
                          publish_exc)
                time.sleep(min(countdown, 5.0))
                raise Reject(str(publish_exc), requeue=True) from exc
        _dead_letter(task, given, exc, f"gave up after {retries} retries")
        raise
    except Reject:
        raise
    except Exception as exc:
        log.exception("task %s[%s] failed unexpectedly", task.name, task.request.id)
        _dead_letter(task, given, exc, "unexpected error")
        raise


def register(app: Celery) -> None:
    """Register the semcache tasks on ``app`` (called by :func:`worker.app.create_celery`)."""
    expected = (InvalidInput,)  # logged as expected failures (no traceback); never retried
    # shared=False: these closures belong to this app only (a process may hold several apps, e.g. in tests)

    @app.task(name=WRITE_ENTRY, bind=True, throws=expected, shared=False)
    def write_entry(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Validate, check and write one command: ``command`` = a WriteCommand dict."""
        return _run(self, args, kwargs, frozenset({"command"}), lambda rt, kw: service.write_one(
            rt.client, rt.settings, rt.embedder, rt.pipeline, kw.get("command"), task_id=self.request.id,
            judge=rt.judge,
        ), counts_invalid=True)  # fmt: skip

    @app.task(name=WRITE_ENTRIES, bind=True, throws=expected, shared=False)
    def write_entries(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Many commands at once (``commands`` = a list of WriteCommand dicts, ``embeddings`` = their vectors packed
        by :func:`worker.packing.pack_embeddings`, optional): one embedding batch, one write."""

        def body(rt: Any, kw: dict[str, Any]) -> dict[str, Any]:
            commands = kw.get("commands")
            if not isinstance(commands, list):
                raise InvalidInput(f"commands must be a JSON list, not {type(commands).__name__}")
            if len(commands) > MAX_BATCH:
                raise InvalidInput(f"commands has {len(commands)} items; at most {MAX_BATCH} per task")
            if kw.get("embeddings") is not None:
                commands = unpack_embeddings(commands, kw["embeddings"])
            return service.write_commands(rt.client, rt.settings, rt.embedder, rt.pipeline, commands,
                                          task_id=self.request.id, judge=rt.judge)

        return _run(self, args, kwargs, frozenset({"commands", "embeddings"}), body, counts_invalid=True)

    @app.task(name=SET_STATUS, bind=True, throws=expected, shared=False)
    def set_status(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Approve or reject one entry (``SetStatusCommand`` fields)."""
        return _run(self, args, kwargs, _SET_STATUS_FIELDS,
                    lambda rt, kw: service.change_status(rt.client, rt.settings, kw))

    @app.task(name=FEEDBACK, bind=True, throws=expected, shared=False)
    def feedback(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Feedback on an answer a lookup served (``FeedbackCommand`` fields)."""
        return _run(self, args, kwargs, _FEEDBACK_FIELDS,
                    lambda rt, kw: service.give_feedback(rt.client, rt.settings, kw))

    @app.task(name=PURGE, bind=True, throws=expected, shared=False)
    def purge(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Delete entries by ids or by filter (``PurgeCommand`` fields), reporting PROGRESS {done, total}."""

        def progress(done: int, total: int) -> None:
            self.update_state(state="PROGRESS", meta={"done": done, "total": total})

        return _run(self, args, kwargs, _PURGE_FIELDS,
                    lambda rt, kw: service.run_purge(rt.client, rt.settings, kw, progress=progress))
