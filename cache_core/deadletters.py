"""Dead letters: tasks that failed for good (retries exhausted, or an unexpected error), kept for people to see
and replay.

The worker stores them; the admin UI lists, inspects and replays them, and so does ``semcache worker replay-dead``
(neither needs the worker package: replaying is sending the task again, by name, through a ``send`` callback).

Storage: the hash ``<index>:deadletters`` (id -> JSON record) and the sorted set ``<index>:deadletters:order``
(id -> time), so one letter is read or removed in O(1) and the list pages newest first. The list is bounded by
``SEMCACHE_DEADLETTER_MAXLEN`` (the oldest are dropped). A write command's embedding is not kept (it is recomputed
when the letter is replayed); its prompt and response are, so the list is as sensitive as the cache itself and only
ever shown to admins (never logged).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Callable

import redis
from pydantic import BaseModel, Field, ValidationError

from .connection import text
from .errors import BackendUnavailable
from .settings import Settings

__all__ = [
    "DeadLetter",
    "push_dead_letter",
    "list_dead_letters",
    "count_dead_letters",
    "get_dead_letter",
    "remove_dead_letter",
    "replay_dead_letters",
]

log = logging.getLogger(__name__)


class DeadLetter(BaseModel):
    """One failed task: what was asked (task name and keyword arguments) and why it failed."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    task: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    reason: str = Field("", max_length=2000)
    error_type: str = ""
    retries: int = 0
    task_id: str | None = None
    tenant: str | None = None
    at: float = Field(default_factory=time.time)


def _keys(settings: Settings) -> tuple[str, str]:
    return settings.key("deadletters"), settings.key("deadletters:order")


def _strip(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Drop embeddings (about 8 KB each as JSON, inline or packed by the write queue into ``embeddings``): a
    replay embeds the prompt again."""
    out = {k: v for k, v in kwargs.items() if k != "embeddings"}
    if isinstance(out.get("command"), dict):
        out["command"] = {k: v for k, v in out["command"].items() if k != "embedding"}
    if isinstance(out.get("commands"), list):
        out["commands"] = [{k: v for k, v in c.items() if k != "embedding"} if isinstance(c, dict) else c
                           for c in out["commands"]]
    return out


def push_dead_letter(client: redis.Redis, settings: Settings, letter: DeadLetter) -> str:
    """Store a dead letter (and drop the oldest beyond the bound). Returns its id."""
    letter = letter.model_copy(update={"kwargs": _strip(letter.kwargs)})
    data, order = _keys(settings)
    try:
        pipe = client.pipeline(transaction=True)
        pipe.hset(data, letter.id, letter.model_dump_json())
        pipe.zadd(order, {letter.id: letter.at})
        pipe.zcard(order)
        size = pipe.execute()[2]
        excess = int(size) - settings.deadletter_maxlen
        if excess > 0:
            oldest = [text(i) for i, _ in client.zpopmin(order, excess)]
            if oldest:
                client.hdel(data, *oldest)
    except redis.RedisError as exc:
        raise BackendUnavailable(f"cannot store the dead letter of task {letter.task_id}: {exc}") from exc
    return letter.id


def _load(raw: Any) -> DeadLetter | None:
    try:
        return DeadLetter.model_validate_json(raw)
    except (ValidationError, ValueError):
        log.warning("skipping an unreadable dead letter")
        return None


def list_dead_letters(client: redis.Redis, settings: Settings, *, offset: int = 0, limit: int = 100,
                      tenant: str | None = None) -> list[DeadLetter]:
    """Dead letters, newest first. With ``tenant``, only that tenant's (filtered after paging)."""
    data, order = _keys(settings)
    ids = [text(i) for i in client.zrevrange(order, offset, offset + max(limit, 0) - 1)] if limit > 0 else []
    if not ids:
        return []
    letters = [_load(raw) for raw in client.hmget(data, ids) if raw]
    return [d for d in letters if d is not None and (tenant is None or d.tenant == tenant)]


def count_dead_letters(client: redis.Redis, settings: Settings) -> int:
    return int(client.zcard(_keys(settings)[1]))


def get_dead_letter(client: redis.Redis, settings: Settings, letter_id: str) -> DeadLetter | None:
    raw = client.hget(_keys(settings)[0], letter_id)
    return _load(raw) if raw else None


def remove_dead_letter(client: redis.Redis, settings: Settings, letter_id: str) -> bool:
    """Delete one dead letter. True for the one caller that removed it (so two replays never send it twice)."""
    data, order = _keys(settings)
    pipe = client.pipeline(transaction=True)
    pipe.hdel(data, letter_id)
    pipe.zrem(order, letter_id)
    return bool(pipe.execute()[0])


def replay_dead_letters(client: redis.Redis, settings: Settings, send: Callable[[str, dict[str, Any]], str], *,
                        ids: list[str] | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Send dead letters again (oldest first), removing each one that was sent.

    ``send(task_name, kwargs)`` sends one task and returns its id (for example
    ``lambda name, kw: celery.send_task(name, kwargs=kw).id``). A letter whose send fails is put back.
    Returns ``[{"id", "task", "task_id"}]`` for the replayed letters.
    """
    data, order = _keys(settings)
    if ids is None:
        ids = [text(i) for i in client.zrange(order, 0, (limit or 0) - 1)]
    elif limit is not None:
        ids = ids[:limit]
    out = []
    for letter_id in ids:
        letter = get_dead_letter(client, settings, letter_id)
        if letter is None or not remove_dead_letter(client, settings, letter_id):
            continue  # gone, or another replayer took it
        try:
            task_id = send(letter.task, letter.kwargs)
        except Exception:
            push_dead_letter(client, settings, letter)
            raise
        log.info("replayed dead letter %s (%s) as task %s", letter.id, letter.task, task_id)
        out.append({"id": letter.id, "task": letter.task, "task_id": task_id})
    return out
