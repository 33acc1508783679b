"""semcache against RedisVL's ``SemanticCache``, side by side in one run: same server, model, workload, threshold.

The phases, built so that a change in a shared machine's load hits both systems alike:

1. store: semcache through a real worker (or directly, see :class:`BenchOptions.store`), RedisVL through ``store``;
2. memory per entry, measured the same way for both (:mod:`benchmarks.memory`);
3. the mixed lookups (30% exact repeats) one at a time, the systems alternating every 100 lookups:
   p50/p95/p99 and lookups/s with one thread (lookups / seconds spent in the system's own calls);
4. the same lookups from ``threads`` threads, each system twice, alternating, the better pass kept;
5. the semantic-only lookups (fresh prompts, no repeats) one at a time, alternating the same way;
6. semcache only: its own timings (embedding, search), ``lookup_many`` and writes that carry their vectors.

Before every lookup phase semcache's embedding cache is emptied: RedisVL has none, and a phase must not profit from
the one before. Ratios are semcache / RedisVL; :func:`goals` says which of issue 6's goals the run meets.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from cache_core.connection import open_redis
from cache_core.settings import Settings

from .memory import bytes_per_entry, used_memory
from .systems import TENANT, THRESHOLD, Outcome, RedisVLSystem, SemcacheSystem, intent_of
from .timing import summarize, timed_interleaved, timed_threaded
from .workload import Workload, clinc150, make_workload

__all__ = ["BenchOptions", "run_comparison", "goals", "RATIO_KEYS"]

log = logging.getLogger(__name__)

# Lower is better for these; higher for the rest. Ratios are always semcache / RedisVL.
RATIO_KEYS = {
    "lookup_p50_ms": "lower", "lookup_p95_ms": "lower", "lookup_p99_ms": "lower",
    "lookups_per_s": "higher", "lookups_per_s_threads": "higher",
    "semantic_p50_ms": "lower", "semantic_p95_ms": "lower", "semantic_lookups_per_s": "higher",
    "store_per_s": "higher", "bytes_per_entry": "lower", "used_memory_per_entry": "lower",
    "hit_rate": "higher", "wrong_hit_rate": "lower",
}  # fmt: skip


@dataclass
class BenchOptions:
    entries: int = 2000
    lookups: int = 2000
    threads: int = 4
    against: str | None = "redisvl"
    seed: int = 42
    backend: str | None = None  # semcache's embedding backend; None: the settings' default
    store: str = "auto"  # worker | direct | auto (the worker when it starts, else direct)
    worker_concurrency: int | None = None
    redis_url: str | None = None  # SEMCACHE_REDIS_URL; None: an embedded server in a temp dir
    data_dir: Path | None = None  # where the ONNX export lives; None: the settings' data dir
    warmup: int = 30
    overrides: dict[str, Any] | None = None  # extra semcache settings (vector_type, hnsw_m, ...)
    default_policy: str = "threshold"  # the settings' policy: measured too when it is not "threshold"
    # "store" and "lookups"; ("store",) runs only the store phase of both systems (and memory per entry): about a
    # minute instead of five, for working on the write path (``python -m benchmarks.compare --phases store``)
    phases: tuple[str, ...] = ("store", "lookups")
    store_blocks: int = 4  # the store phase alternates the systems in this many blocks (see _store_phase)


def _quality(outcomes: list[Outcome], intents: list[str]) -> dict[str, float]:
    hits = [(o, i) for o, i in zip(outcomes, intents) if o.hit]
    wrong = sum(1 for o, i in hits if i == "oos" or intent_of(o.response) != i)
    return {
        "hit_rate": round(len(hits) / max(len(outcomes), 1), 4),
        "wrong_hit_rate": round(wrong / max(len(hits), 1), 4),
        "degraded": sum(1 for o in outcomes if o.degraded),
    }


class _Phase:
    """A progress bar (stderr) over the whole run, relabelled per phase."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="op", dynamic_ncols=True, disable=not enabled, leave=False)

    def label(self, text: str) -> Callable[[], None]:
        self.bar.set_description_str(text)
        return lambda: self.bar.update(1)

    def add(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def _machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "load_avg_1m_at_start": round(load[0], 2)}


def _start_worker(sc: SemcacheSystem, opts: BenchOptions, url: str, work_dir: Path, phase: _Phase) -> Any:
    """A ready ``semcache worker`` for semcache's index (warmed up), or None when storing directly."""
    if opts.store == "direct":
        return None
    try:
        from .worker_store import WorkerStore

        runner = WorkerStore(sc.settings, url, concurrency=opts.worker_concurrency or sc.settings.worker_concurrency,
                             broker_db=1 if opts.redis_url is None else 14, log_path=work_dir / "worker.log")
    except ImportError as exc:  # worker/ not installed or not built
        if opts.store == "worker":
            raise
        log.warning("no worker (%s): storing directly", exc)
        return None
    phase.label("semcache: starting worker")
    try:
        runner.start()
        warm = [(f"warm-up prompt number {i} about nothing", "warm") for i in range(64)]
        runner.store(sc.cache.handle.writer(), sc.index_name, warm, "bench-warmup")  # connections, first write
        sc.drop_tenant("bench-warmup")
        return runner
    except Exception as exc:  # noqa: BLE001
        runner.stop()
        if opts.store == "worker":
            raise
        log.warning("the worker could not be used (%s): storing directly", exc)
        return None


def _store_semcache(sc: SemcacheSystem, entries: list[tuple[str, str]], runner: Any, phase: _Phase) -> dict[str, Any]:
    """Store one block of entries; seconds until the index holds them all."""
    if runner is not None:
        phase.label("semcache: store (worker)")
        out = runner.store(sc.cache.handle.writer(), sc.index_name, entries, TENANT, tick=phase.add)
        cpu = {k: v for k, v in out.items() if k.endswith("_cpu_seconds") and v is not None}
        return {"seconds": out["seconds"], "enqueue_seconds": out["enqueue_seconds"], "failures": out["failures"],
                **cpu}
    tick = phase.label("semcache: store (direct, no worker)")
    start = time.perf_counter()
    for prompt, answer in entries:
        sc.store_direct(prompt, answer)
        tick()
    return {"seconds": time.perf_counter() - start}


def _store_with_vectors(sc: SemcacheSystem, w: Workload, runner: Any, phase: _Phase) -> dict[str, Any]:
    """The read-through path's writes: a miss hands its query vector over with the answer, nothing to embed.
    Run last (under another tenant, deleted afterwards), so it changes none of the other figures."""
    phase.label("semcache: store with vectors (worker)")
    vectors = sc.embedder.embed([p for p, _ in w.stores]).tolist()
    out = runner.store(sc.cache.handle.writer(), sc.index_name, w.stores, "bench-vectors", vectors=vectors)
    sc.drop_tenant("bench-vectors")
    result: dict[str, Any] = {"store_with_vectors_per_s": round(out["store_per_s"], 2)}
    cpu = _cpu_per_entry(out, len(w.stores))
    if cpu:
        result["store_with_vectors_cpu_ms_per_entry"] = cpu
    return result


def _cpu_per_entry(totals: dict[str, Any], n: int) -> dict[str, float] | None:
    """CPU milliseconds per stored entry of the sender (this process), the worker's processes and the Redis
    server, from :meth:`WorkerStore.store`'s ``*_cpu_seconds``; None when they could not be read (no ``/proc``).

    Unlike entries/s, CPU per entry barely moves with a shared machine's load: ``cores / total`` is what idle
    cores would sustain, and comparing totals compares two versions of the write path under any load.
    """
    parts = {name: totals.get(f"{name}_cpu_seconds") for name in ("sender", "worker", "redis")}
    if any(v is None for v in parts.values()):
        return None
    out = {name: round(v / n * 1000, 3) for name, v in parts.items()}
    out["total"] = round(sum(out.values()), 3)
    return out


def _store_redisvl(vl: RedisVLSystem, entries: list[tuple[str, str]], phase: _Phase) -> dict[str, Any]:
    """Store one block of entries through ``store()``, one at a time (RedisVL's way)."""
    tick = phase.label("redisvl: store")
    start = time.perf_counter()
    for prompt, answer in entries:
        vl.store(prompt, answer)
        tick()
    return {"seconds": time.perf_counter() - start}


def _store_phase(sc: SemcacheSystem, vl: RedisVLSystem | None, w: Workload, runner: Any, opts: BenchOptions,
                 client: Any, used: dict[str, int], phase: _Phase) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Both systems store the same entries, alternating in ``opts.store_blocks`` blocks.

    On a shared machine the load changes within a minute; RedisVL stores about ten times slower, so storing all of
    one system and then all of the other measured them under different loads (a run measured RedisVL at 1.7
    entries/s while another job took the cores). Alternating blocks spreads a burst of load over both. Each
    block of semcache's ends when the index holds all of it (the worker's pipeline drains), which costs semcache a
    little; the memory each system adds is summed over its own blocks.
    """
    n_blocks = max(1, min(opts.store_blocks, len(w.stores)))
    size = -(-len(w.stores) // n_blocks)
    totals: dict[str, dict[str, float]] = {"semcache": {"seconds": 0.0, "enqueue_seconds": 0.0, "failures": 0},
                                           "redisvl": {"seconds": 0.0}}
    for k in range(0, len(w.stores), size):
        block = w.stores[k : k + size]
        before = used_memory(client)
        for key, value in _store_semcache(sc, block, runner, phase).items():
            totals["semcache"][key] = totals["semcache"].get(key, 0.0) + value
        _wait_indexed(client, sc.index_name, k + len(block))
        used["semcache_delta"] += used_memory(client) - before
        if vl is not None:
            before = used_memory(client)
            totals["redisvl"]["seconds"] += _store_redisvl(vl, block, phase)["seconds"]
            used["redisvl_delta"] += used_memory(client) - before
    n = len(w.stores)
    s = totals["semcache"]
    s_out: dict[str, Any] = {"store_per_s": round(n / s["seconds"], 2), "store_seconds": round(s["seconds"], 3),
                             "store_blocks": n_blocks}
    if runner is not None:
        s_out.update(store_mode="worker", worker_concurrency=runner.concurrency,
                     enqueue_seconds=round(s["enqueue_seconds"], 3), enqueue_failures=int(s["failures"]))
        cpu = _cpu_per_entry(s, n) if all(f"{k}_cpu_seconds" in s for k in ("sender", "worker", "redis")) else None
        if cpu:
            s_out["store_cpu_ms_per_entry"] = cpu
    else:
        s_out["store_mode"] = "direct, no worker"
    v_out = None
    if vl is not None:
        v = totals["redisvl"]
        v_out = {"store_per_s": round(n / v["seconds"], 2), "store_mode": "store()",
                 "store_seconds": round(v["seconds"], 3), "store_blocks": n_blocks}
    return s_out, v_out


def _sequential_phase(systems: list[tuple[Any, dict[str, Any]]], w: Workload, phase: _Phase, step: str) -> None:
    """The one-at-a-time lookups, the systems alternating in blocks of 100 lookups."""
    for system, _ in systems:
        getattr(system, "clear_embedding_cache", lambda: None)()
    prompts, intents = (w.lookups, w.lookup_intents) if step == "mixed" else (w.semantic_lookups, w.semantic_intents)
    tick = phase.label(f"lookups ({'mixed' if step == 'mixed' else 'semantic only'}), one at a time")
    runs = timed_interleaved(prompts, [system.lookup for system, _ in systems], tick=tick)
    for (system, out), (lat, res, seconds) in zip(systems, runs):
        s = summarize(lat)
        q = _quality(res, intents)
        if step == "mixed":
            out.update({"lookup_p50_ms": s["p50_ms"], "lookup_p95_ms": s["p95_ms"], "lookup_p99_ms": s["p99_ms"],
                        "lookup_max_ms": s["max_ms"], "lookups_per_s": round(len(lat) / seconds, 2), **q})
            out["repeat_p50_ms"] = summarize([x for x, r in zip(lat, w.repeats) if r])["p50_ms"]
            out["fresh_p50_ms"] = summarize([x for x, r in zip(lat, w.repeats) if not r])["p50_ms"]
            out["exact_hits"] = sum(1 for o in res if o.strategy == "exact")
        else:
            out.update({"semantic_p50_ms": s["p50_ms"], "semantic_p95_ms": s["p95_ms"],
                        "semantic_p99_ms": s["p99_ms"], "semantic_lookups_per_s": round(len(lat) / seconds, 2),
                        "semantic_hit_rate": q["hit_rate"], "semantic_degraded": q["degraded"]})


def _threaded_phase(system: Any, w: Workload, opts: BenchOptions, phase: _Phase, out: dict[str, Any]) -> None:
    """The mixed lookups from ``opts.threads`` threads (one system at a time: threads cannot interleave)."""
    getattr(system, "clear_embedding_cache", lambda: None)()
    outcomes: list[Outcome] = []

    def call(prompt: str) -> Outcome:
        o = system.lookup(prompt)
        outcomes.append(o)  # list.append is atomic under the GIL
        return o

    lat, wall = timed_threaded(w.lookups, call, opts.threads,
                               tick=phase.label(f"{system.name}: lookups ({opts.threads} threads)"))
    s = summarize(lat)
    out.update({"lookups_per_s_threads": round(len(lat) / wall, 2), "threads": opts.threads,
                "threads_p50_ms": s["p50_ms"], "threads_p95_ms": s["p95_ms"],
                "threads_degraded": sum(1 for o in outcomes if o.degraded)})


def _semcache_internals(sc: SemcacheSystem, w: Workload, phase: _Phase) -> dict[str, Any]:
    """Where a semcache lookup spends its time (from its own timings), and the batched path."""
    sc.clear_embedding_cache()
    tick = phase.label("semcache: timings")
    results = []
    for prompt in w.semantic_lookups:
        results.append(sc.cache.lookup(prompt, sc.scope, min_similarity=THRESHOLD))
        tick()
    answered = [r for r in results if r.degraded is None]  # a degraded lookup never searched: no timing
    search = summarize([r.search_ms for r in answered])
    embed = summarize([r.embed_ms for r in answered])
    sc.clear_embedding_cache()
    start = time.perf_counter()
    degraded = 0
    for i in range(0, len(w.semantic_lookups), 32):
        degraded += sum(1 for o in sc.lookup_many(w.semantic_lookups[i : i + 32]) if o.degraded)
    many = len(w.semantic_lookups) / (time.perf_counter() - start)
    return {"search_p50_ms": search["p50_ms"], "search_p95_ms": search["p95_ms"], "embed_p50_ms": embed["p50_ms"],
            "embed_p95_ms": embed["p95_ms"], "lookup_many_per_s": round(many, 2),
            "timings_degraded": len(results) - len(answered), "lookup_many_degraded": degraded}


def _memory(system: Any, client: Any, used_delta: int, n: int) -> dict[str, Any]:
    m = bytes_per_entry(client, system.index_name, system.key_pattern)
    return {"bytes_per_entry": m["bytes_per_entry"], "document_bytes": m["document_bytes"],
            "index_bytes_per_entry": m["index_bytes_per_entry"],
            "vector_index_bytes_per_entry": m["vector_index_bytes_per_entry"],
            "used_memory_per_entry": round(used_delta / max(n, 1), 1)}


def _wait_indexed(client: Any, index: str, n: int, timeout_s: float = 120) -> None:
    from .worker_store import count_tenant

    deadline = time.monotonic() + timeout_s
    while count_tenant(client, index, TENANT) < n and time.monotonic() < deadline:
        time.sleep(0.05)


def _lookup_phases(systems: list[tuple[Any, dict[str, Any]]], sc: SemcacheSystem, w: Workload, opts: BenchOptions,
                   phase: _Phase, warm: list[str]) -> None:
    """Phases 3 to 6: the mixed lookups, the threaded lookups, the semantic-only lookups, semcache's internals."""
    for system, _ in systems:  # first calls load kernels, open connections: not measured
        for prompt in warm:
            system.lookup(prompt)
    _sequential_phase(systems, w, phase, "mixed")
    for _ in range(2):  # alternated, twice each, the better pass kept: a burst of load hits one pass
        for system, out in systems:
            trial: dict[str, Any] = {}
            _threaded_phase(system, w, opts, phase, trial)
            if trial["lookups_per_s_threads"] > out.get("lookups_per_s_threads", 0):
                out.update(trial)
    _sequential_phase(systems, w, phase, "semantic")
    systems[0][1].update(_semcache_internals(sc, w, phase))


def run_comparison(opts: BenchOptions, *, progress: bool = True) -> dict[str, Any]:
    """Run the side-by-side benchmark; returns ``{"semcache", "redisvl", "ratios", "goals", "workload", ...}``."""
    w = make_workload(opts.entries, opts.lookups, seed=opts.seed)
    base = Settings(**({"redis_url": opts.redis_url} if opts.redis_url else {}))
    data_dir = opts.data_dir or base.data_dir
    work_dir = Path(tempfile.mkdtemp(prefix="semcache-bench-"))
    machine = _machine()
    handle = open_redis(Settings(redis_url=opts.redis_url, data_dir=work_dir / "redis", embedded_appendonly=False))
    url = handle.url
    client = handle.writer()
    with_peer = opts.against == "redisvl"
    per_lookup_phases = 3 * len(w.lookups) + len(w.semantic_lookups) if "lookups" in opts.phases else 0
    total = (len(w.stores) + per_lookup_phases) * (2 if with_peer else 1) + 2 * len(w.semantic_lookups)
    phase = _Phase(total, progress)
    sc = vl = runner = None
    result: dict[str, Any] = {"semcache": {}, "redisvl": None, "ratios": {}}
    try:
        warm = [r.text for r in clinc150() if r.split == "val"][: opts.warmup]
        phase.label("loading models")
        used0 = used_memory(client)
        sc = SemcacheSystem(url, data_dir, backend=opts.backend, policy="threshold", **(opts.overrides or {}))
        s_out: dict[str, Any] = result["semcache"]
        runner = _start_worker(sc, opts, url, work_dir, phase)
        used = {"semcache_delta": used_memory(client) - used0, "redisvl_delta": 0}  # each system's own growth
        if with_peer:
            used1 = used_memory(client)
            vl = RedisVLSystem(url)
            used["redisvl_delta"] = used_memory(client) - used1
        s_store, v_store = _store_phase(sc, vl, w, runner, opts, client, used, phase)
        s_out.update(s_store)
        s_out.update(_memory(sc, client, used["semcache_delta"], len(w.stores)))
        v_out: dict[str, Any] | None = None
        if with_peer:
            v_out = result["redisvl"] = v_store
            v_out.update(_memory(vl, client, used["redisvl_delta"], len(w.stores)))
        systems = [(sc, s_out)] + ([(vl, v_out)] if with_peer else [])
        if "lookups" in opts.phases:
            _lookup_phases(systems, sc, w, opts, phase, warm)
        if runner is not None:
            s_out.update(_store_with_vectors(sc, w, runner, phase))
        default_policy = opts.default_policy
        if default_policy != "threshold" and "lookups" in opts.phases:  # the like-for-like run used "threshold"; show the default too
            s_out["default_policy"] = default_policy
            alt = SemcacheSystem(url, data_dir, backend=opts.backend, policy=default_policy, index=sc.settings.index,
                                 **(opts.overrides or {}))
            try:
                extra: dict[str, Any] = {}
                _sequential_phase([(alt, extra)], w, phase, "mixed")
                s_out["default_policy_results"] = {k: extra[k] for k in
                                                   ("lookup_p50_ms", "lookup_p95_ms", "hit_rate", "wrong_hit_rate")}
            finally:
                alt.close()
        s_out["config"] = sc.describe()
        if with_peer:
            v_out["config"] = vl.describe()
            result["ratios"] = ratios(s_out, v_out)
            result["goals"] = goals(s_out, v_out)
    finally:
        phase.close()
        if runner is not None:
            runner.stop()
        for system in (sc, vl):
            if system is not None:
                with contextlib.suppress(Exception):
                    system.drop()
                with contextlib.suppress(Exception):
                    system.close()
        handle.close()
        shutil.rmtree(work_dir, ignore_errors=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    machine["load_avg_1m_at_end"] = round(load[0], 2)
    result["workload"] = w.describe() | {"threshold": THRESHOLD, "threads": opts.threads}
    result["machine"] = machine
    result["options"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()
                         if k not in ("redis_url",)} | {"server": "external" if opts.redis_url else "embedded"}
    result["generated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return result


def ratios(s: dict[str, Any], v: dict[str, Any]) -> dict[str, float]:
    """semcache / RedisVL for every figure both have."""
    out = {}
    for key in RATIO_KEYS:
        a, b = s.get(key), v.get(key)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
            out[key] = round(a / b, 3)
    return out


def goals(s: dict[str, Any], v: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Issue 6's goals, each with its target, the measured value and whether this run meets it."""
    r = ratios(s, v)

    def goal(value: float | None, target: float, lower_is_better: bool, what: str) -> dict[str, Any]:
        met = value is not None and (value <= target if lower_is_better else value >= target)
        return {"what": what, "value": value, "target": target, "met": bool(met)}

    return {
        "lookup_p50": goal(r.get("lookup_p50_ms"), 0.5, True, "mixed lookup p50, semcache/RedisVL <= 0.5"),
        "lookup_p95": goal(r.get("lookup_p95_ms"), 0.8, True, "mixed lookup p95, semcache/RedisVL <= 0.8"),
        "lookups_per_s": goal(r.get("lookups_per_s"), 2.0, False, "lookups/s (1 thread), semcache/RedisVL >= 2"),
        "lookups_per_s_threads": goal(r.get("lookups_per_s_threads"), 2.0, False,
                                      "lookups/s (threads), semcache/RedisVL >= 2"),
        "semantic_p50": goal(r.get("semantic_p50_ms"), 1.0, True, "semantic-only p50, semcache/RedisVL <= 1"),
        "semantic_p95": goal(r.get("semantic_p95_ms"), 1.0, True, "semantic-only p95, semcache/RedisVL <= 1"),
        "store_per_s": goal(r.get("store_per_s"), 10.0, False, "store throughput, semcache/RedisVL >= 10"),
        "bytes_per_entry": goal(r.get("bytes_per_entry"), 1.0, True, "memory per entry, semcache/RedisVL <= 1"),
    }


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.compare --phases store``: the store phase of both systems, side by side, in a minute.

    Prints one JSON object: each system's store figures, the ratio and the load average around the run. The full
    benchmark (every phase, the README's table) is ``semcache bench --against redisvl``.
    """
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=2000, help="Prompts stored (CLINC150 train).")
    parser.add_argument("--phases", default="store", help="Comma-separated: store, lookups (default: store).")
    parser.add_argument("--worker-concurrency", type=int, default=None, help="Pool processes of the worker.")
    parser.add_argument("--backend", choices=["torch", "onnx"], default=None)
    parser.add_argument("--no-peer", action="store_true", help="semcache only (no RedisVL).")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    phases = tuple(p.strip() for p in args.phases.split(",") if p.strip())
    unknown = set(phases) - {"store", "lookups"}
    if unknown or "store" not in phases:
        parser.error(f"--phases takes store[,lookups], not {args.phases!r}")
    opts = BenchOptions(entries=args.entries, lookups=max(10, min(args.entries, 2000)), phases=phases,
                        against=None if args.no_peer else "redisvl", backend=args.backend,
                        worker_concurrency=args.worker_concurrency, seed=args.seed, store="worker")
    result = run_comparison(opts, progress=False)
    if phases == ("store",):
        keys = ("store_per_s", "store_seconds", "store_mode", "worker_concurrency", "enqueue_seconds",
                "store_cpu_ms_per_entry", "store_with_vectors_per_s", "store_with_vectors_cpu_ms_per_entry")
        result = {"semcache": {k: result["semcache"].get(k) for k in keys if k in result["semcache"]},
                  "redisvl": {k: (result["redisvl"] or {}).get(k) for k in ("store_per_s", "store_seconds")},
                  "ratios": {"store_per_s": result["ratios"].get("store_per_s")}, "machine": result["machine"],
                  "entries": args.entries}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
