"""Latency percentiles and throughput runs.

We report medians and tails (p50/p95/p99, max), not means: a cache's latency is bimodal (a repeated prompt costs a
round trip, a new one an embedding too), and one garbage-collection pause moves a mean but not a median.

>>> summarize([1.0, 2.0, 3.0, 4.0])["p50_ms"]
2.5
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["summarize", "timed_sequential", "timed_interleaved", "timed_threaded"]


def summarize(latencies_ms: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max/mean in milliseconds of a list of latencies."""
    a = np.asarray(latencies_ms, dtype=np.float64)
    if not len(a):
        return {"p50_ms": 0.0, "p95_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0, "mean_ms": 0.0}
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"p50_ms": round(float(p50), 4), "p95_ms": round(float(p95), 4), "p99_ms": round(float(p99), 4),
            "max_ms": round(float(a.max()), 4), "mean_ms": round(float(a.mean()), 4)}


def timed_sequential(items: Sequence[Any], call: Callable[[Any], Any], *,
                     tick: Callable[[], None] | None = None) -> tuple[list[float], list[Any], float]:
    """Call ``call(item)`` for every item in order, one at a time: (latencies in ms, results, wall seconds)."""
    latencies, results = [], []
    start = time.perf_counter()
    for item in items:
        t0 = time.perf_counter()
        results.append(call(item))
        latencies.append((time.perf_counter() - t0) * 1000)
        if tick:
            tick()
    return latencies, results, time.perf_counter() - start


def timed_interleaved(items: Sequence[Any], calls: Sequence[Callable[[Any], Any]], *, block: int = 100,
                      tick: Callable[[], None] | None = None) -> list[tuple[list[float], list[Any], float]]:
    """Like :func:`timed_sequential` for several systems at once, alternating in blocks of ``block`` items: every
    system meets nearly the same moments of a shared machine's load. Blocks, not single items, because a model
    runtime's threads keep spinning for a while after a call (OpenMP does): alternating item by item would make
    each system pay for the other's spin. Per system: (latencies, results, seconds spent in its own calls)."""
    out: list[tuple[list[float], list[Any]]] = [([], []) for _ in calls]
    for start in range(0, len(items), block):
        chunk = items[start : start + block]
        for (latencies, results), call in zip(out, calls):
            for item in chunk:
                t0 = time.perf_counter()
                results.append(call(item))
                latencies.append((time.perf_counter() - t0) * 1000)
                if tick:
                    tick()
    return [(lat, res, sum(lat) / 1000) for lat, res in out]


def timed_threaded(items: Sequence[Any], call: Callable[[Any], Any], threads: int, *,
                   tick: Callable[[], None] | None = None) -> tuple[list[float], float]:
    """``threads`` threads take the items in order from one shared cursor (so a repeat still comes after the
    prompt it repeats): (latencies in ms, wall seconds). An exception in any thread is re-raised."""
    cursor = itertools.count()
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(threads + 1)

    def worker() -> None:
        mine = []
        barrier.wait()
        try:
            while True:
                i = next(cursor)  # itertools.count is atomic under the GIL
                if i >= len(items):
                    break
                t0 = time.perf_counter()
                call(items[i])
                mine.append((time.perf_counter() - t0) * 1000)
                if tick:
                    tick()
        except BaseException as exc:  # noqa: BLE001 - surfaced to the caller below
            errors.append(exc)
        with lock:
            latencies.extend(mine)

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in pool:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    return latencies, wall
