"""Purges: delete entries by id or by an :class:`~cache_core.tasks.EntryFilter`, in batches.

A purge of 100k entries must neither block Redis nor run into the task time limit, so it never issues one big
command: it asks the index for at most ``SEMCACHE_PURGE_BATCH_SIZE`` matching keys (``FT.SEARCH ... NOCONTENT``),
deletes them with :func:`~cache_core.store.delete_entries` (one ``MULTI`` and one audit record per batch), and asks
again, until nothing matches. Deleted documents leave the index at once, so the next page starts at offset 0.

A tenant-bound purge (``PurgeCommand.tenant``, set from an API key) puts the tenant in the query *and* has
``delete_entries`` check each document's tenant again before deleting it: another tenant's entries are never
touched, whatever the filter says.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, Callable

import redis

from .connection import text
from .errors import BackendUnavailable, IndexMismatch, InvalidInput
from .index import alias_name
from .query import entry_filter_query
from .settings import Settings
from .store import delete_entries
from .tasks import EntryFilter, PurgeCommand

__all__ = ["purge", "count_matching", "matching_ids", "has_words", "check_text_filter"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


def _search(client: redis.Redis, settings: Settings, query: str, params: dict[str, str],
            limit: int) -> tuple[int, list[str]]:
    """``(total matches, entry ids of the first `limit`)`` of a filter query."""
    args: list[Any] = ["FT.SEARCH", alias_name(settings), query, "NOCONTENT"]
    if params:
        args += ["PARAMS", str(2 * len(params))]
        for name, value in params.items():
            args += [name, value]
    args += ["LIMIT", "0", str(limit), "DIALECT", "2"]
    try:
        reply = client.execute_command(*args)
    except redis.ResponseError as exc:
        if "no such index" in str(exc).lower() or "unknown index" in str(exc).lower():
            raise IndexMismatch(f"index {alias_name(settings)} does not exist",
                                hint="run `semcache index create`") from exc
        raise BackendUnavailable(f"purge search failed: {exc}") from exc
    except redis.RedisError as exc:
        raise BackendUnavailable(f"purge search failed: {exc}") from exc
    total, keys = _parse(reply)
    prefix = settings.key_prefix
    return total, [k[len(prefix):] for k in keys if k.startswith(prefix)]


def _parse(reply: Any) -> tuple[int, list[str]]:
    if isinstance(reply, dict):  # RESP3
        total = reply.get(b"total_results", reply.get("total_results", 0))
        rows = reply.get(b"results", reply.get("results", [])) or []
        return int(total), [text(r.get(b"id", r.get("id"))) for r in rows]
    items = list(reply)  # RESP2: [total, key, key, ...]
    return int(items[0]), [text(k) for k in items[1:]]


def has_words(text: str) -> bool:
    """Whether a text filter has a word the index can match (the query keeps only ``\\w+`` runs of it).

    >>> has_words("reset password?"), has_words("!!!"), has_words(" -- ")
    (True, False, False)
    """
    return re.search(r"\w", text) is not None


def check_text_filter(flt: EntryFilter | None) -> None:
    """Refuse a text filter without a word: the query drops it, so it would select every entry (issue 15)."""
    if flt is not None and flt.text is not None and not has_words(flt.text):
        raise InvalidInput("filter.text: give at least one letter or digit; punctuation alone matches every entry",
                           field="filter.text")


def count_matching(client: redis.Redis, settings: Settings, flt: EntryFilter, *, tenant: str | None = None,
                   now: float | None = None) -> int:
    """How many entries a filter selects (the preview count of a purge)."""
    check_text_filter(flt)
    query, params = entry_filter_query(flt, settings.extra_scope_fields, now=now, tenant=tenant)
    return _search(client, settings, query, params, 0)[0]


def matching_ids(client: redis.Redis, settings: Settings, flt: EntryFilter, *, tenant: str | None = None,
                 limit: int = 100, now: float | None = None) -> list[str]:
    """The ids of (at most ``limit``) entries a filter selects."""
    check_text_filter(flt)
    query, params = entry_filter_query(flt, settings.extra_scope_fields, now=now, tenant=tenant)
    return _search(client, settings, query, params, limit)[1]


def purge(client: redis.Redis, settings: Settings, command: PurgeCommand, *, progress: Progress | None = None,
          now: float | None = None) -> dict[str, Any]:
    """Delete what the command selects, batch by batch; ``progress(done, total)`` after each batch.

    Returns ``{"deleted", "matched", "batches", "seconds"}``. Safe to run twice (a redelivered purge deletes what
    is left). "Older than" is measured from the start of the purge, so entries written meanwhile are kept.
    """
    started = time.monotonic()
    batch = settings.purge_batch_size
    now = time.time() if now is None else now
    deleted = batches = 0
    if command.mode == "ids":
        ids = list(dict.fromkeys(command.ids))
        total = len(ids)
        for start in range(0, total, batch):
            deleted += _delete(client, settings, ids[start : start + batch], command)
            batches += 1
            if progress:
                progress(min(start + batch, total), total)
    else:
        check_text_filter(command.filter)
        query, params = entry_filter_query(command.filter, settings.extra_scope_fields, now=now,
                                           tenant=command.tenant)
        total, ids = _search(client, settings, query, params, batch)
        if progress:
            progress(0, total)
        # Each round deletes what the previous search returned; a bound on the rounds guards against a page that
        # keeps coming back (for example documents that disappear between the search and the delete).
        rounds_left = total // batch + 10
        while ids and rounds_left > 0:
            removed = _delete(client, settings, ids, command)
            deleted += removed
            batches += 1
            rounds_left -= 1
            if progress:
                progress(min(deleted, max(total, deleted)), max(total, deleted))
            if removed == 0:
                break
            ids = _search(client, settings, query, params, batch)[1]
    seconds = round(time.monotonic() - started, 3)
    log.info("purge by %s: %d of %d matched entries deleted in %d batches (%.2fs)", command.mode, deleted, total,
             batches, seconds)
    return {"deleted": deleted, "matched": total, "batches": batches, "seconds": seconds}


def _delete(client: redis.Redis, settings: Settings, ids: list[str], command: PurgeCommand) -> int:
    try:
        return delete_entries(client, settings, ids, by=command.by, reason=command.reason or f"purge ({command.mode})",
                              tenant=command.tenant)
    except redis.RedisError as exc:
        raise BackendUnavailable(f"purge delete failed: {exc}") from exc
