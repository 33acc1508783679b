"""Lookup statistics, recorded off the hot path.

``StatsRecorder.record`` appends to an in-memory buffer and returns; a daemon thread folds the buffer into Redis
once a second in one pipeline: per-minute counter hashes (``<index>:stats:<minute>``, kept 8 days), a latency
histogram per minute, per-entry hit counts (``<index>:hits``, ``<index>:lasthit``) and, for every hit, the lookup log
that feedback reads (``<index>:lookup:<lookup_id>``, kept ``SEMCACHE_FEEDBACK_WINDOW_S``). A lookup never waits for
Redis to count it, and a failing Redis loses statistics, never lookups. Entry documents are never touched here.

The hit-count hashes carry no TTL (a ``volatile-*`` eviction must not take them) and entries expire without telling
them, so every flush (at most every ``sweep_every_s``) also sweeps a slice of them, dropping the fields of entries
that no longer exist: they hold about as many fields as there are live entries (issue 15; before, they grew
forever). Saved tokens are only counted from an entry's ``prompt_tokens``/``completion_tokens`` that are whole
numbers from 0 to :data:`~cache_core.schema.MAX_TOKEN_COUNT` (what the write door admits; older entries may hold
anything).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, deque
from typing import Any

import redis

from .connection import text
from .schema import MAX_TOKEN_COUNT
from .settings import Settings

__all__ = ["StatsRecorder", "read_stats", "LATENCY_BUCKETS_MS", "hit_counts", "record_counters", "lookup_totals",
           "add_cumulative", "read_cumulative", "cumulative_key", "sweep_hit_counts", "valid_savings"]

log = logging.getLogger(__name__)

LATENCY_BUCKETS_MS = (0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 200, 500, 1000, 5000)
STATS_TTL_S = 8 * 24 * 3600


def _bucket(ms: float) -> str:
    for edge in LATENCY_BUCKETS_MS:
        if ms <= edge:
            return f"lat_le_{edge:g}"
    return "lat_le_inf"


def minute_key(settings: Settings, ts: float) -> str:
    return settings.key(f"stats:{int(ts // 60) * 60}")


def _increment(pipe: Any, key: str, name: str, value: float) -> None:
    """HINCRBYFLOAT for float counters (sums of milliseconds, tokens), HINCRBY for counts. By type, not by value:
    a float sum that happens to be whole must not be sent as HINCRBY to a field holding "12.5" (Redis refuses)."""
    if isinstance(value, float):
        pipe.hincrbyfloat(key, name, value)
    else:
        pipe.hincrby(key, name, int(value))


def record_counters(client: redis.Redis, settings: Settings, counters: dict[str, float], ts: float | None = None) -> None:
    """Add counters to the current minute (used by the worker for write decisions)."""
    key = minute_key(settings, ts or time.time())
    pipe = client.pipeline(transaction=False)
    for name, value in counters.items():
        _increment(pipe, key, name, value)
    pipe.expire(key, STATS_TTL_S)
    add_cumulative(pipe, settings, counters)
    pipe.execute()


class StatsRecorder:
    """Buffers lookup outcomes and flushes them to Redis from a background thread."""

    def __init__(self, client: redis.Redis, settings: Settings, *, interval_s: float = 1.0, max_buffer: int = 100_000,
                 sweep_every_s: float = 10.0):
        self.client = client
        self.settings = settings
        self.interval_s = interval_s
        self.sweep_every_s = sweep_every_s
        self._sweep_at = ("hits", 0)  # the hash being swept and the scan's cursor in it
        self._next_sweep = time.monotonic() + sweep_every_s
        self._buffer: deque[tuple] = deque(maxlen=max_buffer)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="semcache-stats", daemon=True)
        self.dropped_flushes = 0
        self._thread.start()

    def record(self, *, outcome: str, strategy: str | None, total_ms: float, embed_ms: float, search_ms: float,
               entry_id: str | None = None, saved: dict[str, float] | None = None, lookup: tuple | None = None) -> None:
        """Buffer one lookup. ``lookup`` is ``(lookup_id, entry_id, similarity, strategy, scope)`` of a hit, logged
        for :func:`cache_core.feedback.record_feedback`."""
        self._buffer.append((time.time(), outcome, strategy, total_ms, embed_ms, search_ms, entry_id,
                             valid_savings(saved), lookup))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.flush()

    def flush(self) -> None:
        self._sweep()
        if not self._buffer:
            return
        items = []
        while self._buffer:
            try:
                items.append(self._buffer.popleft())
            except IndexError:
                break
        per_minute: dict[str, Counter] = {}
        hits: Counter = Counter()
        last: dict[str, float] = {}
        logged = []
        totals: Counter = Counter()  # for the cumulative hash of /metrics (see lookup_totals)
        for ts, outcome, strategy, total_ms, embed_ms, search_ms, entry_id, saved, lookup in items:
            if lookup is not None:
                logged.append((ts, lookup))
            c = per_minute.setdefault(minute_key(self.settings, ts), Counter())
            c["lookups"] += 1
            c[outcome] += 1
            if strategy:
                c[f"hit_{strategy}"] += 1
            c[_bucket(total_ms)] += 1
            c["total_ms_sum"] += total_ms
            c["embed_ms_sum"] += embed_ms
            c["search_ms_sum"] += search_ms
            totals.update(lookup_totals(outcome, strategy, total_ms, embed_ms, search_ms, saved))
            for name, value in (saved or {}).items():
                c[f"saved_{name}"] += value
            if entry_id:
                hits[entry_id] += 1
                last[entry_id] = ts
        try:
            pipe = self.client.pipeline(transaction=False)
            for key, counter in per_minute.items():
                for name, value in counter.items():
                    _increment(pipe, key, name, value)
                pipe.expire(key, STATS_TTL_S)
            add_cumulative(pipe, self.settings, totals)
            for entry_id, n in hits.items():
                pipe.hincrby(self.settings.key("hits"), entry_id, n)
            if last:
                pipe.hset(self.settings.key("lasthit"), mapping={k: repr(v) for k, v in last.items()})
            if logged and self.settings.feedback_window_s > 0:
                from .feedback import log_lookup  # feedback owns the record's format

                for ts, lookup in logged:
                    log_lookup(pipe, self.settings, *lookup, at=ts)
            pipe.execute()
        except redis.RedisError as exc:
            self.dropped_flushes += 1
            log.debug("stats flush failed (%d lookups not counted): %s", len(items), exc)

    def _sweep(self) -> None:
        if time.monotonic() < self._next_sweep:
            return
        self._next_sweep = time.monotonic() + self.sweep_every_s
        which, cursor = self._sweep_at
        try:
            cursor, _ = sweep_hit_counts(self.client, self.settings, cursor, which=which)
            # a hash scanned to its end: the other one next (lasthit may hold fields hits lost)
            self._sweep_at = (which, cursor) if cursor else ("lasthit" if which == "hits" else "hits", 0)
        except redis.RedisError as exc:
            log.debug("hit-count sweep failed: %s", exc)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.flush()


def valid_savings(saved: dict[str, float] | None) -> dict[str, float] | None:
    """The token counts of a hit that the savings may add: whole numbers from 0 to ``MAX_TOKEN_COUNT``.

    >>> valid_savings({"prompt_tokens": 9.0, "completion_tokens": -5.0})
    {'prompt_tokens': 9.0}
    >>> valid_savings({"prompt_tokens": float("inf")}) is None
    True
    """
    if not saved:
        return saved
    kept = {name: value for name, value in saved.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and 0 <= value <= MAX_TOKEN_COUNT and value == int(value)}
    return kept or None


def sweep_hit_counts(client: redis.Redis, settings: Settings, cursor: int = 0, count: int = 200, *,
                     which: str = "hits") -> tuple[int, int]:
    """Drop the fields of about ``count`` entries that no longer exist from both hit-count hashes, scanning
    ``<index>:<which>`` (``hits`` or ``lasthit``) from ``cursor``. Returns ``(next cursor, entries dropped)``; a next
    cursor of 0 means that hash was scanned to its end."""
    hits, last = settings.key("hits"), settings.key("lasthit")
    next_cursor, fields = client.hscan(settings.key(which), cursor, count=count)
    ids = [text(f) for f in fields]
    if not ids:
        return int(next_cursor), 0
    pipe = client.pipeline(transaction=False)
    for entry in ids:
        pipe.exists(settings.key_prefix + entry)
    gone = [entry for entry, alive in zip(ids, pipe.execute()) if not alive]
    if gone:
        pipe = client.pipeline(transaction=False)
        pipe.hdel(hits, *gone)
        pipe.hdel(last, *gone)
        pipe.execute()
    return int(next_cursor), len(gone)


def hit_counts(client: redis.Redis, settings: Settings, ids: list[str]) -> dict[str, tuple[int, float | None]]:
    if not ids:
        return {}
    pipe = client.pipeline(transaction=False)
    pipe.hmget(settings.key("hits"), ids)
    pipe.hmget(settings.key("lasthit"), ids)
    counts, lasts = pipe.execute()
    return {
        i: (int(c) if c else 0, float(t) if t else None) for i, c, t in zip(ids, counts, lasts)
    }


def _percentile(buckets: dict[str, int], q: float) -> float | None:
    total = sum(buckets.values())
    if not total:
        return None
    need = q * total
    seen = 0
    for edge in (*LATENCY_BUCKETS_MS, float("inf")):
        seen += buckets.get(f"lat_le_{edge:g}" if edge != float("inf") else "lat_le_inf", 0)
        if seen >= need:
            return edge
    return float("inf")


def read_stats(client: redis.Redis, settings: Settings, *, minutes: int = 60, now: float | None = None) -> dict[str, Any]:
    """Totals and per-minute series over the last ``minutes``; latency percentiles are histogram upper bounds."""
    now = now or time.time()
    start = int(now // 60) * 60 - (minutes - 1) * 60
    stamps = [start + 60 * i for i in range(minutes)]
    pipe = client.pipeline(transaction=False)
    for ts in stamps:
        pipe.hgetall(settings.key(f"stats:{ts}"))
    rows = pipe.execute()
    totals: Counter = Counter()
    series = []
    for ts, row in zip(stamps, rows):
        values = {text(k): float(text(v)) for k, v in (row or {}).items()}
        totals.update(values)
        series.append({"minute": ts, **values})
    buckets = {k: int(v) for k, v in totals.items() if k.startswith("lat_le_")}
    lookups = totals.get("lookups", 0)
    hits = totals.get("hit", 0)
    saved_in = totals.get("saved_prompt_tokens", 0)
    saved_out = totals.get("saved_completion_tokens", 0)
    return {
        "minutes": minutes,
        "lookups": int(lookups),
        "hits": int(hits),
        "misses": int(totals.get("miss", 0)),
        "degraded": int(totals.get("degraded", 0)),
        "hit_rate": (hits / lookups) if lookups else 0.0,
        "hits_exact": int(totals.get("hit_exact", 0)),
        "hits_semantic": int(totals.get("hit_semantic", 0)),
        "latency_ms": {"p50": _percentile(buckets, 0.5), "p95": _percentile(buckets, 0.95),
                       "p99": _percentile(buckets, 0.99)},
        "mean_embed_ms": (totals.get("embed_ms_sum", 0) / lookups) if lookups else 0.0,
        "mean_search_ms": (totals.get("search_ms_sum", 0) / lookups) if lookups else 0.0,
        "saved_prompt_tokens": int(saved_in),
        "saved_completion_tokens": int(saved_out),
        "saved_money": saved_in / 1000 * settings.price_per_1k_input_tokens
        + saved_out / 1000 * settings.price_per_1k_output_tokens,
        "writes": {d: int(totals.get(f"write_{d}", 0)) for d in ("approve", "hold", "drop", "invalid")},
        "judge": {k: int(totals.get(f"judge_{k}", 0)) for k in ("yes", "no", "none", "skipped", "joined")},
        "series": series,
    }


# --- cumulative totals, for /metrics (issue 8) ----------------------------------------------------------------------
# Prometheus wants counters that only grow and that every replica reports alike. The per-minute hashes expire (a sum
# over them would shrink) and per-process counters differ between gunicorn workers, so every flush and every
# ``record_counters`` call also adds its counts to one hash without a TTL, ``<index>:stats:total``, in the same
# pipeline. Fields: ``lookups:<outcome>:<strategy|none>``, per timer (``total``, ``embed``, ``search``) the histogram
# ``<timer>_le_<edge>`` (per bucket, not cumulative; ``inf`` last) with ``<timer>_ms_sum`` and ``<timer>_ms_count``,
# ``saved_<kind>``, and whatever ``record_counters`` adds (``write_<decision>``, ``proxy_<result>``...).
def cumulative_key(settings: Settings) -> str:
    return settings.key("stats:total")


def lookup_totals(outcome: str, strategy: str | None, total_ms: float, embed_ms: float, search_ms: float,
                  saved: dict[str, float] | None) -> Counter:
    """The cumulative fields one lookup adds. ``embed`` is observed only when the lookup embedded (an exact hit or a
    lookup skipped for a broken Redis does not), ``search`` only when Redis was asked.

    >>> sorted(lookup_totals("hit", "exact", 0.4, 0.0, 0.3, {"prompt_tokens": 9}).items())[:4]
    [('lookups:hit:exact', 1), ('saved_prompt_tokens', 9), ('search_le_0.5', 1), ('search_ms_count', 1)]
    """
    out: Counter = Counter()
    out[f"lookups:{outcome}:{strategy or 'none'}"] += 1
    for timer, ms, observed in (("total", total_ms, True), ("embed", embed_ms, embed_ms > 0),
                                ("search", search_ms, outcome != "degraded")):
        if observed:
            out[f"{timer}_le_{_bucket(ms)[len('lat_le_'):]}"] += 1
            out[f"{timer}_ms_sum"] += ms
            out[f"{timer}_ms_count"] += 1
    for name, value in (saved or {}).items():
        out[f"saved_{name}"] += value
    return out


def add_cumulative(pipe: Any, settings: Settings, counters: dict[str, float]) -> None:
    """Queue the increments of ``counters`` to the cumulative hash on ``pipe`` (the caller executes it)."""
    key = cumulative_key(settings)
    for name, value in counters.items():
        if value:
            _increment(pipe, key, name, value)


def read_cumulative(client: redis.Redis, settings: Settings) -> dict[str, float]:
    """Every cumulative counter of the deployment (an empty dict before the first lookup or write)."""
    return {text(k): float(text(v)) for k, v in (client.hgetall(cumulative_key(settings)) or {}).items()}
