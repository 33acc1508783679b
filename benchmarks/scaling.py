"""The scaling run: one index grown to each size in turn; at each size, lookup and search latency, memory per
entry, and the HNSW index's recall against an exact FLAT search over the same documents.

Entries are synthetic prompts (:func:`~benchmarks.workload.synthetic_prompts`), embedded in batches by semcache's
own embedder and written through ``cache_core.store.write_entries`` (the worker's storage function), 500 per
transaction. Their vectors are kept in ``<data_dir>/bench-cache/`` so a second run only pays for Redis.
Lookups are CLINC150 test prompts, the full read path (exact check, embedding, KNN).

Recall: after the latency and memory figures are taken, a FLAT index over the same key prefix is built (in the
background, as Redis does), both indexes answer the same KNN queries with the same tenant filter, and recall@k is
the share of the FLAT (exact) top k that HNSW also returns. The FLAT index is dropped before the next size.

A size is skipped, and the run stops, when the memory it would need (from the memory per entry measured so far,
plus a margin) is more than the machine has free: that is the limit the result reports.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cache_core.connection import open_redis
from cache_core.index import alias_name
from cache_core.query import knn_query, parse_knn, scope_filter, search_args
from cache_core.schema import Fields, Scope, WriteCommand, tag_token
from cache_core.settings import Settings
from cache_core.store import build_entry, write_entries

from .memory import bytes_per_entry, index_memory, used_memory
from .systems import TENANT, THRESHOLD, SemcacheSystem
from .timing import summarize
from .workload import clinc150, synthetic_prompts

__all__ = ["ScalingOptions", "run_scaling", "available_memory"]

_ANSWER = "[synthetic] " + "An answer of about two hundred characters, as a short LLM reply would be. " * 3


@dataclass
class ScalingOptions:
    sizes: list[int] = field(default_factory=lambda: [10_000, 100_000, 1_000_000])
    queries: int = 500
    k: int = 10
    seed: int = 0
    backend: str | None = None
    redis_url: str | None = None
    data_dir: Path | None = None
    overrides: dict[str, Any] | None = None
    ef_sweep: tuple[int, ...] = (10, 20, 50, 100, 200)  # EF_RUNTIME values whose recall and time are measured
    memory_reserve_gb: float = 6.0  # left free for everything else on the (shared) machine
    batch: int = 500


def available_memory() -> int:
    """Bytes the kernel says are available (MemAvailable), or 0 when unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class _VectorCache:
    """Embeddings of the synthetic prompts on disk (float32 .npy chunks), computed once per model and seed."""

    def __init__(self, directory: Path, embedder: Any, seed: int, chunk: int = 10_000) -> None:
        self.dir = directory / f"{embedder.name.replace('/', '_')}-seed{seed}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.embedder = embedder
        self.seed = seed
        self.chunk = chunk

    def vectors(self, start: int, count: int) -> np.ndarray:
        out = []
        i = start
        while i < start + count:
            c = i // self.chunk
            path = self.dir / f"{c:05d}.npy"
            if path.exists():
                block = np.load(path)
            else:
                prompts = synthetic_prompts(self.chunk, seed=self.seed, start=c * self.chunk)
                block = self.embedder.embed(prompts).astype(np.float32)
                tmp = path.with_suffix(".tmp.npy")
                np.save(tmp, block)
                os.replace(tmp, path)
            lo = i - c * self.chunk
            hi = min(self.chunk, start + count - c * self.chunk)
            out.append(block[lo:hi])
            i = c * self.chunk + hi
        return np.concatenate(out) if out else np.empty((0, self.embedder.dim), np.float32)


def _load(sc: SemcacheSystem, cache: _VectorCache, start: int, stop: int, batch: int, bar: Any) -> None:
    client = sc.cache.handle.writer()
    scope = Scope(tenant=TENANT)
    for lo in range(start, stop, batch):
        hi = min(stop, lo + batch)
        prompts = synthetic_prompts(hi - lo, seed=cache.seed, start=lo)
        vectors = cache.vectors(lo, hi - lo)
        entries = [
            build_entry(WriteCommand(prompt=p, response=_ANSWER, scope=scope, source="bench"), settings=sc.settings,
                        embedding=v.tolist())
            for p, v in zip(prompts, vectors)
        ]  # fmt: skip
        write_entries(client, sc.settings, entries)
        bar.update(hi - lo)


def _flat_index(client: Any, sc: SemcacheSystem) -> str:
    """A FLAT (exact) vector index over the same documents; returns its name once it has indexed them all."""
    s = sc.settings
    name = f"{s.index}-flat"
    client.execute_command(
        "FT.CREATE", name, "ON", "JSON", "PREFIX", "1", s.key_prefix, "SCHEMA",
        f"$.{Fields.EMBEDDING}", "AS", Fields.EMBEDDING, "VECTOR", "FLAT", "6", "TYPE", "FLOAT32",
        "DIM", str(sc.embedder.dim), "DISTANCE_METRIC", "COSINE",
        f"$.{Fields.TAGS}.tenant", "AS", "tenant", "TAG", "CASESENSITIVE",
    )  # fmt: skip
    while True:
        info = client.execute_command("FT.INFO", name)
        pct = info.get(b"percent_indexed", info.get("percent_indexed")) if isinstance(info, dict) else 1
        if float(pct) >= 1.0:
            return name
        time.sleep(0.5)


def _knn_ids(client: Any, index: str, vector: np.ndarray, k: int, ef: int | None, vector_type: str,
             batches: bool = False) -> list[str]:
    query = (f"(@tenant:{{$t}})=>[KNN {k} @{Fields.EMBEDDING} $v" + (f" EF_RUNTIME {ef}" if ef else "")
             + (" HYBRID_POLICY BATCHES" if batches else "") + " AS d]")
    blob = vector.astype(np.float16 if vector_type == "FLOAT16" else np.float32).tobytes()
    reply = client.execute_command("FT.SEARCH", index, query, "PARAMS", "4", "t", tag_token(TENANT), "v",
                                   blob, "SORTBY", "d", "NOCONTENT",
                                   "LIMIT", "0", str(k), "DIALECT", "2")
    rows = reply.get(b"results", reply.get("results", [])) if isinstance(reply, dict) else []
    return [(r.get(b"id") or r.get("id")).decode() if isinstance(r.get(b"id", r.get("id")), bytes)
            else str(r.get("id")) for r in rows]


def _batches(sc: SemcacheSystem, size: int) -> bool:
    """Whether the read path searches a scope of ``size`` with HYBRID_POLICY BATCHES (as cache.py decides)."""
    return bool(sc.settings.hybrid_batches_min) and size >= sc.settings.hybrid_batches_min


def _measure(sc: SemcacheSystem, queries: list[str], qvec: np.ndarray, k: int, size: int) -> dict[str, Any]:
    """Lookups through the read path, then the KNN alone, sent exactly as the read path sends it."""
    s = sc.settings
    client = sc.cache.handle.writer()  # generous timeouts: a slow search is measured, not cut off
    sc.clear_embedding_cache()
    lookups = [sc.cache.lookup(q, sc.scope, min_similarity=THRESHOLD) for q in queries]
    lookup = summarize([r.total_ms for r in lookups])
    parts = {"embed_p50_ms": summarize([r.embed_ms for r in lookups])["p50_ms"],
             "read_path_search_p50_ms": summarize([r.search_ms for r in lookups])["p50_ms"]}
    filt, params = scope_filter(sc.scope, s.extra_scope_fields, now=time.time())
    search_ms = []
    for v in qvec:
        query, p = knn_query(filt, params, v, k=s.knn_k, ef_runtime=s.hnsw_ef_runtime, vector_type=s.vector_type,
                             batches=_batches(sc, size))
        t0 = time.perf_counter()
        parse_knn(client.execute_command(*search_args(alias_name(s), query, p, s.knn_k)))
        search_ms.append((time.perf_counter() - t0) * 1000)
    search = summarize(search_ms)
    return {**parts, "lookup_p50_ms": lookup["p50_ms"], "lookup_p95_ms": lookup["p95_ms"],
            "lookup_p99_ms": lookup["p99_ms"],
            "search_p50_ms": search["p50_ms"], "search_p95_ms": search["p95_ms"], "search_p99_ms": search["p99_ms"],
            "hit_rate": round(sum(r.hit for r in lookups) / len(lookups), 4),
            "degraded": sum(1 for r in lookups if r.degraded), "degraded_reasons": sorted({r.degraded for r in lookups
                                                                                           if r.degraded})}


def _recall(sc: SemcacheSystem, qvec: np.ndarray, k: int, ef_sweep: tuple[int, ...], size: int) -> dict[str, Any]:
    """Recall of the HNSW index against the exact FLAT top k, at the settings' EF_RUNTIME and at each of
    ``ef_sweep`` (with the search time of each: the price of a better recall)."""
    client = sc.cache.handle.writer()
    s = sc.settings
    flat = _flat_index(client, sc)
    try:
        exact = [_knn_ids(client, flat, v, k, None, "FLOAT32") for v in qvec]  # exact, full precision
        sweep = {}
        for ef in sorted({s.hnsw_ef_runtime, *ef_sweep}):
            at_k, at_1, ms = [], [], []
            for v, truth in zip(qvec, exact):
                t0 = time.perf_counter()
                approx = _knn_ids(client, alias_name(s), v, k, ef, s.vector_type, _batches(sc, size))
                ms.append((time.perf_counter() - t0) * 1000)
                at_k.append(len(set(truth) & set(approx)) / max(len(truth), 1))
                at_1.append(1.0 if truth[:1] == approx[:1] else 0.0)
            t = summarize(ms)
            sweep[str(ef)] = {"recall": round(float(np.mean(at_k)), 4), "recall_at_1": round(float(np.mean(at_1)), 4),
                              "knn_p50_ms": t["p50_ms"], "knn_p95_ms": t["p95_ms"]}
        mine = sweep[str(s.hnsw_ef_runtime)]
        return {"recall": mine["recall"], "recall_at_1": mine["recall_at_1"], "ef_sweep": sweep}
    finally:
        client.execute_command("FT.DROPINDEX", flat)


def run_scaling(opts: ScalingOptions, *, progress: bool = True,
                checkpoint: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Grow one index through ``opts.sizes``; returns ``{"points": [...], "limit": {...}, "config": {...}}``.

    ``checkpoint`` gets the result so far after every size (a long run keeps what it measured if stopped).
    """
    from tqdm import tqdm

    base = Settings(**({"redis_url": opts.redis_url} if opts.redis_url else {}))
    data_dir = opts.data_dir or base.data_dir
    work_dir = Path(tempfile.mkdtemp(prefix="semcache-scaling-"))
    handle = open_redis(Settings(redis_url=opts.redis_url, data_dir=work_dir / "redis", embedded_appendonly=False))
    sizes = sorted(opts.sizes)
    bar = tqdm(total=sizes[-1], unit="entry", dynamic_ncols=True, disable=not progress, leave=False, mininterval=1)
    sc = None
    points: list[dict[str, Any]] = []
    limit: dict[str, Any] = {"reason": "all sizes ran"}
    try:
        sc = SemcacheSystem(handle.url, data_dir, backend=opts.backend, policy="threshold", **(opts.overrides or {}))
        client = handle.writer()
        cache = _VectorCache(Path(data_dir) / "bench-cache", sc.embedder, opts.seed)
        test = [r.text for r in clinc150() if r.split == "test"][: opts.queries]
        qvec = sc.embedder.embed(test)
        loaded = 0
        used0 = used_memory(client)
        for size in sizes:
            per_entry = (points[-1]["used_memory_per_entry"] if points else 20_000) * 1.2
            need = (size - loaded) * per_entry
            free = available_memory() - opts.memory_reserve_gb * 2**30
            if free and need > free:
                limit = {"reason": "memory", "size_skipped": size, "needed_gb": round(need / 2**30, 2),
                         "free_gb": round(max(free, 0) / 2**30, 2),
                         "max_entries_estimate": int(loaded + max(free, 0) / per_entry)}
                break
            bar.set_description_str(f"loading {size:,}")
            t0 = time.perf_counter()
            _load(sc, cache, loaded, size, opts.batch, bar)
            load_seconds = time.perf_counter() - t0
            loaded = size
            bar.set_description_str(f"measuring {size:,}")
            mem = bytes_per_entry(client, sc.index_name, sc.key_pattern, sample=300)
            used = used_memory(client)
            point = {"entries": size, "load_seconds": round(load_seconds, 1),
                     "bytes_per_entry": mem["bytes_per_entry"], "document_bytes": mem["document_bytes"],
                     "index_bytes_per_entry": mem["index_bytes_per_entry"],
                     "used_memory_mb": round(used / 2**20, 1),
                     "used_memory_per_entry": round((used - used0) / size, 1),
                     "index_mb": round(index_memory(client, sc.index_name)["index_bytes"] / 2**20, 1)}
            point.update(_measure(sc, test, qvec, opts.k, size))
            bar.set_description_str(f"recall {size:,}")
            point.update(_recall(sc, qvec, opts.k, opts.ef_sweep, size))
            point["hybrid_policy"] = "BATCHES" if _batches(sc, size) else "default"
            points.append(point)
            if checkpoint:
                checkpoint(_result(points, limit, opts, sc.describe()))
        cfg = sc.describe()
    finally:
        bar.close()
        if sc is not None:
            with contextlib.suppress(Exception):
                sc.drop()
            with contextlib.suppress(Exception):
                sc.close()
        handle.close()
        shutil.rmtree(work_dir, ignore_errors=True)
    return _result(points, limit, opts, cfg)


def _result(points: list[dict[str, Any]], limit: dict[str, Any], opts: ScalingOptions,
            cfg: dict[str, Any]) -> dict[str, Any]:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if points and limit.get("reason") != "memory":  # how many would fit: the machine's memory less the reserve
        per_entry = points[-1]["used_memory_per_entry"]
        limit = {**limit, "max_entries_estimate": int((total - opts.memory_reserve_gb * 2**30) / per_entry),
                 "estimate_basis": f"{total / 2**30:.1f} GiB - {opts.memory_reserve_gb:g} GiB reserve, "
                                   f"{per_entry:,.0f} bytes of used_memory per entry"}
    return {"points": points, "limit": limit, "k": opts.k, "queries": opts.queries, "config": cfg,
            "sizes": opts.sizes, "machine": {"cpus": os.cpu_count(), "mem_total_gb": round(total / 2**30, 1)},
            "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
