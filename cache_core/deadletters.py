"""Dead letters: tasks that failed for good (retries exhausted, or an unexpected error), kept for people to see
and replay.

The worker stores them; the admin UI lists, inspects and replays them, and so does ``semcache worker replay-dead``
(neither needs the worker package: replaying is sending the task again, by name, through a ``send`` callback).

Storage: the hash ``<index>:deadletters`` (id -> JSON record) and the sorted set ``<index>:deadletters:order``
(id -> time), so one letter is read or removed in O(1) and the list pages newest first. The list is bounded by
``SEMCACHE_DEADLETTER_MAXLEN`` letters, ``SEMCACHE_DEADLETTER_MAX_BYTES`` bytes of JSON (the running total in
``<index>:deadletters:bytes``) and ``SEMCACHE_DEADLETTER_TTL_S`` of age: the oldest go first. The keys carry no
Redis TTL, so a ``volatile-*`` eviction never takes them; the age limit is applied by every store and every read.
Storing, trimming and removing run as Lua scripts, so the total stays equal to what the hash holds. A letter whose
arguments alone exceed 1/16 of the byte bound keeps its reason but not its arguments (``kwargs_dropped_bytes``):
before issue 15 the bound was a count only, and one repeatedly failing 1,000-command task could fill Redis.

A write command's embedding is not kept (it is recomputed when the letter is replayed); its prompt and response
are, so the list is as sensitive as the cache itself and only ever shown to admins (never logged).
"""

from __future__ import annotations

import json
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
    "dead_letter_bytes",
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
    kwargs_dropped_bytes: int = Field(0, description="Bytes of arguments not kept (too large); 0: all kept.")


def _keys(settings: Settings) -> tuple[str, str]:
    return settings.key("deadletters"), settings.key("deadletters:order")


def _bytes_key(settings: Settings) -> str:
    return settings.key("deadletters:bytes")


# Shared by both scripts: drop one letter and take its bytes off the total (HSTRLEN, so letters stored before the
# total existed are accounted for too); a missing total is rebuilt from the hash once.
_LUA_COMMON = """
local data, order, total = KEYS[1], KEYS[2], KEYS[3]
if redis.call('EXISTS', total) == 0 then
  local sum = 0
  local all = redis.call('HKEYS', data)
  for _, id in ipairs(all) do sum = sum + redis.call('HSTRLEN', data, id) end
  redis.call('SET', total, sum)
end
local function drop(id)
  local size = redis.call('HSTRLEN', data, id)
  local removed = redis.call('HDEL', data, id)
  redis.call('ZREM', order, id)
  if removed == 1 then redis.call('DECRBY', total, size) end
  return removed
end
local function trim(maxlen, maxbytes, cutoff)
  local dropped = 0
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', order, '-inf', '(' .. cutoff)) do dropped = dropped + drop(id) end
  while redis.call('ZCARD', order) > maxlen or tonumber(redis.call('GET', total)) > maxbytes do
    local oldest = redis.call('ZRANGE', order, 0, 0)
    if #oldest == 0 then break end
    dropped = dropped + drop(oldest[1])
  end
  return dropped
end
"""
# ARGV: id, json, at, maxlen, maxbytes, cutoff. Returns how many letters were dropped to make room.
_PUSH = _LUA_COMMON + """
drop(ARGV[1])
redis.call('HSET', data, ARGV[1], ARGV[2])
redis.call('ZADD', order, ARGV[3], ARGV[1])
redis.call('INCRBY', total, string.len(ARGV[2]))
return trim(tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6])
"""
# ARGV: id ('' for none), maxlen, maxbytes, cutoff. Returns 1 when the letter was removed by this call.
_REMOVE = _LUA_COMMON + """
local removed = 0
if ARGV[1] ~= '' then removed = drop(ARGV[1]) end
trim(tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4])
return removed
"""


def _limits(settings: Settings, now: float | None = None) -> list[Any]:
    cutoff = (now if now is not None else time.time()) - settings.deadletter_ttl_s
    return [settings.deadletter_maxlen, settings.deadletter_max_bytes, repr(cutoff)]


def _script_keys(settings: Settings) -> list[str]:
    return [*_keys(settings), _bytes_key(settings)]


def _expire(client: redis.Redis, settings: Settings) -> None:
    """Apply the age (and size) bounds now: reads call it so a listing never shows a letter past its age."""
    client.eval(_REMOVE, 3, *_script_keys(settings), "", *_limits(settings))


def dead_letter_bytes(client: redis.Redis, settings: Settings) -> int:
    """Bytes of JSON the stored dead letters take (the total the bound applies to)."""
    return int(client.get(_bytes_key(settings)) or 0)


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
    """Store a dead letter (and drop the oldest beyond the count, byte and age bounds). Returns its id.

    Arguments larger than 1/16 of ``SEMCACHE_DEADLETTER_MAX_BYTES`` are not kept (``kwargs_dropped_bytes`` says how
    many bytes they were), so one letter never pushes out all the others.
    """
    letter = letter.model_copy(update={"kwargs": _strip(letter.kwargs)})
    raw = letter.model_dump_json()
    if len(raw.encode("utf-8", "surrogatepass")) > settings.deadletter_max_bytes // 16:
        dropped = len(json.dumps(letter.kwargs, default=str).encode("utf-8", "surrogatepass"))
        letter = letter.model_copy(update={"kwargs": {}, "kwargs_dropped_bytes": dropped,
                                           "reason": letter.reason[:2000]})
        raw = letter.model_dump_json()
    try:
        trimmed = client.eval(_PUSH, 3, *_script_keys(settings), letter.id, raw, repr(letter.at),
                              *_limits(settings))
    except redis.RedisError as exc:
        raise BackendUnavailable(f"cannot store the dead letter of task {letter.task_id}: {exc}") from exc
    if trimmed:
        log.info("dropped %d old dead letter(s) to stay within the bounds", int(trimmed))
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
    _expire(client, settings)
    ids = [text(i) for i in client.zrevrange(order, offset, offset + max(limit, 0) - 1)] if limit > 0 else []
    if not ids:
        return []
    letters = [_load(raw) for raw in client.hmget(data, ids) if raw]
    return [d for d in letters if d is not None and (tenant is None or d.tenant == tenant)]


def count_dead_letters(client: redis.Redis, settings: Settings) -> int:
    _expire(client, settings)
    return int(client.zcard(_keys(settings)[1]))


def get_dead_letter(client: redis.Redis, settings: Settings, letter_id: str) -> DeadLetter | None:
    raw = client.hget(_keys(settings)[0], letter_id)
    return _load(raw) if raw else None


def remove_dead_letter(client: redis.Redis, settings: Settings, letter_id: str) -> bool:
    """Delete one dead letter. True for the one caller that removed it (so two replays never send it twice)."""
    return bool(client.eval(_REMOVE, 3, *_script_keys(settings), letter_id, *_limits(settings)))


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
