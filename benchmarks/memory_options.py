"""What each memory-per-entry option saves, and what it costs in answer quality.

Memory: for every option, the same ``entries`` CLINC150 train prompts are written as semcache documents (the
real :class:`~cache_core.schema.CacheEntry` document, transformed as the option says) into a fresh index built as
the option says, and measured like the comparison measures (:mod:`benchmarks.memory`). RedisVL's
``SemanticCache`` gets the same prompts, as the reference.

Quality: the stream protocol of ``/work/shared/ENVIRONMENT.md`` on all 23,700 CLINC150 prompts (shuffled with
seed 42; each prompt looks up the entries stored so far, a miss stores it, a hit is wrong when the entry's intent
differs or the prompt is out of scope), computed exactly in numpy with the vectors the option would store and
query. Besides hit rate and wrong hits at similarity 0.90, it reports the wrong-hit rate at the *baseline's* hit
rate (the threshold that gives the same hit rate, interpolated): an option that shifts similarities (a
projection does) must be compared on the same curve, not at the same number.

Quality is reported for both match policies, each swept over the knob values of ``semcache eval``: the
single-threshold baseline (nearest entry only) and the shipped default, the consensus policy (the k=8 nearest
entries vote with their answer group, :class:`~cache_core.policy.ConsensusPolicy` itself decides), as the best hit
rate within 1% and 0.5% wrong hits. The search time of each option (the read path's KNN, 300 queries over the
loaded entries) and the cosine error of the stored vectors (against the float vectors) are recorded beside it.

Options (``SEMCACHE_EMBEDDING_STORAGE`` and ``SEMCACHE_VECTOR_TYPE`` are product settings; the others are not):

- ``float32`` : the embedding as a JSON list of floats, a FLOAT32 HNSW index (M=16); the default until int8.
- ``float16-index``: the same document, a FLOAT16 index (the index converts; the document is unchanged).
- ``hnsw-m8``: HNSW M=8 (a smaller graph; recall is in the scaling run).
- ``lean-doc``: fields with empty default values (reasons, flags, metadata, moderation, hit counters) omitted.
- ``int16-json``: ``SEMCACHE_EMBEDDING_STORAGE=int16``, integers ``round(x / max|x| * 32767)``.
- ``int8-json``: ``SEMCACHE_EMBEDDING_STORAGE=int8`` (the default), integers in -127..127 scaled per vector;
  RedisJSON keeps integers that small in the array's own slots. Cosine similarity ignores the scale.
- ``pca<d>``: a projection to ``d`` dimensions (centred PCA fitted once on 3,000 train prompts, which would be
  stored with the index), combined with int8 and FLOAT16.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cache_core.connection import make_client, open_redis
from cache_core.evaluation import DEFAULT_KNOBS
from cache_core.index import IndexSpec, alias_name, drop_index, ensure_index
from cache_core.policy import ConsensusPolicy
from cache_core.query import Candidate, knn_query, scope_filter, search_args
from cache_core.schema import Scope, WriteCommand, quantize_embedding
from cache_core.settings import Settings
from cache_core.store import build_entry

from .memory import bytes_per_entry, used_memory
from .systems import TENANT, RedisVLSystem
from .workload import answer_for, clinc150

__all__ = ["MemoryOptions", "run_memory_options", "stream_quality", "consensus_stream_quality", "stored_vectors",
           "best_hit_rate", "quality_table", "search_ab"]

_LEAN_DROP = ("reasons", "flags", "metadata", "moderation", "hit_count", "last_hit_at")
_SEARCHES = 300  # KNN queries timed per option


@dataclass
class MemoryOptions:
    entries: int = 5000
    seed: int = 42
    redis_url: str | None = None
    data_dir: Path | None = None
    backend: str | None = None
    with_redisvl: bool = True
    pairs_dir: Path | None = None  # labelled pair sets (qqp/, stsb/, mrpc/ CSVs): out-of-domain check of the PCA


_PAIR_FILES = {"qqp": "qqp/qqp_sample_labeled.csv", "stsb": "stsb/stsb.csv", "mrpc": "mrpc/mrpc.csv"}


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: the chance that a random duplicate pair scores above a random other pair."""
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores)] = np.arange(1, len(scores) + 1)
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pair_auc(embedder: Any, pairs_dir: Path, fit: np.ndarray, dims: tuple[int, ...] = (256, 192, 128),
             limit: int = 3000) -> dict[str, dict[str, float]]:
    """How well cosine similarity separates duplicate from other pairs (ROC AUC) in data the projection was not
    fitted on, at full dimension and projected (fitted on CLINC150) to each of ``dims``."""
    import csv

    out: dict[str, dict[str, float]] = {}
    for name, rel in _PAIR_FILES.items():
        path = Path(pairs_dir) / rel
        if not path.exists():
            continue
        with open(path, encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))[:limit]
        a = embedder.embed([r["q1"] for r in rows])
        b = embedder.embed([r["q2"] for r in rows])
        y = np.array([int(r["is_duplicate"]) for r in rows])
        scores = {"full": _auc((a * b).sum(axis=1), y)}
        for d in dims:
            project = _pca(fit, d)
            scores[f"pca{d}"] = _auc((project(a) * project(b)).sum(axis=1), y)
        out[name] = {k: round(v, 4) for k, v in scores.items()} | {"pairs": len(rows)}
    return out


@dataclass
class _Option:
    name: str
    description: str
    settings: dict[str, Any]  # Settings overrides: embedding_storage, vector_type, hnsw_m
    dim: int | None = None  # projected dimension, None: the model's
    lean: bool = False

    @property
    def storage(self) -> str:
        return self.settings.get("embedding_storage", "float32")

    @property
    def vector_type(self) -> str:
        return self.settings.get("vector_type", "FLOAT32")


_F16 = {"vector_type": "FLOAT16"}
_I16 = {"embedding_storage": "int16"}
_I8 = {"embedding_storage": "int8"}


def _options() -> list[_Option]:
    return [
        _Option("float32", "float list in JSON, FLOAT32 HNSW M=16 (the default before int8)", {}),
        _Option("float16-index", "FLOAT16 index, same document", dict(_F16)),
        _Option("hnsw-m8", "HNSW M=8", {"hnsw_m": 8}),
        _Option("lean-doc", "document without empty default fields", {}, lean=True),
        _Option("int16-json", "embedding as JSON integers (x / max|x| * 32767)", dict(_I16)),
        _Option("int16-json + float16-index", "both", {**_I16, **_F16}),
        _Option("int8-json", "embedding as JSON integers in -127..127 (x / max|x| * 127): the default", dict(_I8)),
        _Option("int8-json + float16-index", "both", {**_I8, **_F16}),
        _Option("int8 + float16 + lean", "all three, full dimension", {**_I8, **_F16}, lean=True),
        _Option("pca256 + int8 + float16", "projection to 256 dims", {**_I8, **_F16}, 256),
        _Option("pca128 + int8 + float16", "projection to 128 dims", {**_I8, **_F16}, 128),
        _Option("pca128 + int8 + float16 + lean", "projection to 128 dims, lean document", {**_I8, **_F16}, 128,
                lean=True),
    ]


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _pca(fit: np.ndarray, dim: int) -> Callable[[np.ndarray], np.ndarray]:
    mean = fit.mean(axis=0)
    _, _, vt = np.linalg.svd(fit - mean, full_matrices=False)
    basis = vt[:dim].T.astype(np.float32)
    return lambda x: _normalize((x - mean) @ basis).astype(np.float32)


def stored_vectors(x: np.ndarray, storage: str, vector_type: str = "FLOAT32") -> np.ndarray:
    """Unit vectors as the index holds them: quantized as ``SEMCACHE_EMBEDDING_STORAGE`` stores them (with the
    product's own :func:`~cache_core.schema.quantize_embedding`), converted to the index's vector type, normalized
    (the COSINE metric normalizes)."""
    if storage != "float32":
        x = np.asarray([quantize_embedding(v, storage) for v in x], dtype=np.float32)
    return query_vectors(x, vector_type)


def query_vectors(x: np.ndarray, vector_type: str = "FLOAT32") -> np.ndarray:
    """Unit query vectors as the index compares them (a FLOAT16 index gets the query as float16)."""
    x = np.asarray(x, dtype=np.float32)
    if vector_type == "FLOAT16":
        x = x.astype(np.float16).astype(np.float32)
    return _normalize(x).astype(np.float32)


def stream_quality(vectors: np.ndarray, stored: np.ndarray, intents: list[str], oos: list[bool],
                   thresholds: Any, *, sims: np.ndarray | None = None) -> list[tuple[float, float, float]]:
    """(threshold, hit rate, wrong hits / hits) of the stream protocol: prompt ``i`` (as ``vectors[i]``) is
    looked up among the earlier misses (as ``stored[j]``); a miss is stored. The nearest entry against one
    threshold: the peers' rule (:class:`~cache_core.policy.ThresholdPolicy`, k=1).

    Exact, and fast: when prompt ``j`` is stored, every later prompt's best similarity so far is updated at once
    (one vector operation), instead of searching the stored set for every prompt.
    """
    sims = stored @ vectors.T if sims is None else sims  # sims[j, i]: stored entry j against prompt i
    n = sims.shape[1]
    intent = np.asarray(intents)
    is_oos = np.asarray(oos)
    out = []
    for th in thresholds:
        best = np.full(n, -np.inf, dtype=np.float32)
        arg = np.full(n, -1, dtype=np.int64)
        hits = wrong = 0
        for i in range(n):
            if best[i] >= th:
                hits += 1
                if is_oos[i] or intent[arg[i]] != intent[i]:
                    wrong += 1
                continue
            row = sims[i, i + 1 :]
            tail_best, tail_arg = best[i + 1 :], arg[i + 1 :]
            better = row > tail_best  # strictly: on a tie the earlier entry stays the nearest, as argmax would
            tail_best[better] = row[better]
            tail_arg[better] = i
        out.append((float(th), hits / n, wrong / max(hits, 1)))
    return out


def consensus_stream_quality(sims: np.ndarray, intents: list[str], oos: list[bool], knobs: Any, *, k: int = 8,
                             policy: ConsensusPolicy | None = None) -> list[tuple[float, float, float]]:
    """(knob, hit rate, wrong hits / hits) of the stream protocol with the shipped default policy: each prompt's
    ``k`` nearest stored entries (exact, kept up to date as entries are stored) go to
    :meth:`ConsensusPolicy.choose <cache_core.policy.ConsensusPolicy.choose>` with their answer group (the intent:
    the stream stores the intent as the answer). ``sims[j, i]`` is stored entry ``j`` against prompt ``i``.
    """
    policy = policy or ConsensusPolicy()
    n = sims.shape[1]
    intent = list(intents)
    is_oos = list(oos)
    out = []
    for knob in knobs:
        top_s = np.full((n, k), -np.inf, dtype=np.float32)  # nearest first
        top_i = np.full((n, k), -1, dtype=np.int64)
        hits = wrong = 0
        for i in range(n):
            if top_i[i, 0] >= 0:
                cands = [Candidate(key=str(j), fields={"group": intent[j]}, similarity=float(sv))
                         for j, sv in zip(top_i[i].tolist(), top_s[i].tolist()) if j >= 0]
                served = policy.choose(cands, float(knob), {})
                if served is not None:
                    hits += 1
                    if is_oos[i] or intent[int(served.key)] != intent[i]:
                        wrong += 1
                    continue
            row = sims[i, i + 1 :]
            better = np.nonzero(row > top_s[i + 1 :, -1])[0]
            if better.size:
                rows = better + i + 1
                cat_s = np.concatenate([top_s[rows], row[better, None]], axis=1)
                cat_i = np.concatenate([top_i[rows], np.full((better.size, 1), i, dtype=np.int64)], axis=1)
                order = np.argsort(-cat_s, axis=1, kind="stable")[:, :k]  # stable: an earlier entry wins a tie
                top_s[rows] = np.take_along_axis(cat_s, order, axis=1)
                top_i[rows] = np.take_along_axis(cat_i, order, axis=1)
        out.append((float(knob), hits / n, wrong / max(hits, 1)))
    return out


def best_hit_rate(curve: list[tuple[float, float, float]], target: float) -> dict[str, float] | None:
    """The highest hit rate of a curve whose wrong-hit rate is at most ``target`` (as ``semcache eval``'s
    summary picks it), with its knob; None when no knob gets there."""
    ok = [c for c in curve if c[1] > 0 and c[2] <= target + 1e-12]
    if not ok:
        return None
    knob, hit, wrong = max(ok, key=lambda c: (c[1], -c[0]))
    return {"knob": knob, "hit_rate": round(hit, 4), "wrong_rate": round(wrong, 4)}


def cosine_error(x: np.ndarray, storage: str, vector_type: str = "FLOAT32", *, pairs: int = 200_000,
                 seed: int = 0) -> dict[str, float]:
    """How far a stored vector is from the float original: ``1 - cos`` per vector, and the error of the
    similarity a float query sees (``|q . stored - q . original|`` over random pairs), mean / p99 / max."""
    original = _normalize(np.asarray(x, dtype=np.float64))
    stored = stored_vectors(x, storage, vector_type).astype(np.float64)
    query = query_vectors(x, vector_type).astype(np.float64)
    self_err = 1.0 - (original * stored).sum(axis=1)
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, len(x), pairs), rng.integers(0, len(x), pairs)
    sim_err = np.abs((query[a] * stored[b]).sum(axis=1) - (original[a] * original[b]).sum(axis=1))
    return {"one_minus_cos_mean": float(self_err.mean()), "one_minus_cos_max": float(self_err.max()),
            "similarity_error_mean": float(sim_err.mean()), "similarity_error_p99": float(np.percentile(sim_err, 99)),
            "similarity_error_max": float(sim_err.max())}


def _at_hit_rate(curve: list[tuple[float, float, float]], target: float) -> float:
    """Wrong-hit rate where the curve's hit rate equals ``target`` (linear interpolation)."""
    pts = sorted((h, w) for _, h, w in curve)
    hs = [h for h, _ in pts]
    ws = [w for _, w in pts]
    return float(np.interp(target, hs, ws))


def _search_ms(client: Any, settings: Settings, queries: np.ndarray, scope: Scope, entries: int) -> dict[str, float]:
    """p50/p95 of the read path's KNN (scope pre-filter, k=8, the settings' vector type) over ``queries``."""
    filt, params = scope_filter(scope, settings.extra_scope_fields, now=time.time())
    batches = bool(settings.hybrid_batches_min) and entries >= settings.hybrid_batches_min
    times = []
    for vector in queries:
        query, qparams = knn_query(filt, params, vector, k=settings.knn_k, ef_runtime=settings.hnsw_ef_runtime,
                                   vector_type=settings.vector_type, batches=batches)
        args = search_args(alias_name(settings), query, qparams, settings.knn_k)
        t0 = time.perf_counter()
        client.execute_command(*args)
        times.append((time.perf_counter() - t0) * 1000)
    return {"search_p50_ms": round(float(np.percentile(times, 50)), 3),
            "search_p95_ms": round(float(np.percentile(times, 95)), 3)}


def _clinc_vectors(embedder: Any, cache_dir: Path) -> tuple[list, np.ndarray]:
    rows = clinc150()
    path = cache_dir / f"clinc150-{embedder.name.replace('/', '_')}.npy"
    if path.exists():
        vectors = np.load(path)
    else:
        vectors = embedder.embed([r.text for r in rows]).astype(np.float32)
        cache_dir.mkdir(parents=True, exist_ok=True)
        np.save(path, vectors)
    return list(rows), vectors


def _document(entry_doc: dict, opt: _Option) -> dict:
    doc = dict(entry_doc)
    if opt.lean:
        for name in _LEAN_DROP:
            if not doc.get(name):
                doc.pop(name, None)
    return doc


class _QualityCache:
    """Quality curves of earlier runs, on disk (``<data dir>/bench-cache``), keyed by model, dimension, storage,
    vector type and knobs: they depend on nothing else, and they are the slow part of a run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.data = {}

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def __getitem__(self, key: str) -> dict[str, Any]:
        item = self.data[key]
        return {"threshold": [tuple(c) for c in item["threshold"]], "consensus": [tuple(c) for c in item["consensus"]],
                "cosine_error": item["cosine_error"]}

    def __setitem__(self, key: str, value: dict[str, Any]) -> None:
        self.data[key] = value
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data))
        except OSError:
            pass


def run_memory_options(opts: MemoryOptions, *, progress: bool = True) -> dict[str, Any]:
    """Measure every option; returns ``{"options": [...], "redisvl_bytes_per_entry": ..., ...}``."""
    from tqdm import tqdm

    from cache_core.embedder import load_embedder

    import os

    load = {"start": [round(x, 2) for x in os.getloadavg()]}
    base = Settings(**({"redis_url": opts.redis_url} if opts.redis_url else {}))
    data_dir = Path(opts.data_dir or base.data_dir)
    embedder = load_embedder(base.model, backend=opts.backend or base.embedding_backend, data_dir=data_dir,
                             cache_size=0, precision=base.embedding_precision)
    rows, vectors = _clinc_vectors(embedder, data_dir / "bench-cache")
    train = [i for i, r in enumerate(rows) if r.split == "train"]
    rng = random.Random(opts.seed)
    chosen = rng.sample(train, opts.entries)
    fit = vectors[np.random.default_rng(0).choice(train, 3000, replace=False)]
    order = list(range(len(rows)))
    random.Random(42).shuffle(order)
    stream_vectors = vectors[order]
    intents = [rows[i].intent for i in order]
    oos = [rows[i].split.startswith("oos") for i in order]
    knobs = list(DEFAULT_KNOBS)
    test_rows = [i for i, r in enumerate(rows) if r.split == "test"]
    search_rows = random.Random(opts.seed + 1).sample(test_rows, min(_SEARCHES, len(test_rows)))

    work_dir = Path(tempfile.mkdtemp(prefix="semcache-memopts-"))
    handle = open_redis(Settings(redis_url=opts.redis_url, data_dir=work_dir / "redis", embedded_appendonly=False))
    # a long timeout: a pipeline of thousands of JSON.SETs into an HNSW index can take seconds on a busy machine
    client = make_client(handle.url, timeout_ms=600_000)
    quality_cache = _QualityCache(data_dir / "bench-cache" / "memory-options-quality.json")
    options = _options()
    bar = tqdm(total=len(options) * 2 + 1, unit="step", disable=not progress, leave=False)
    results: list[dict[str, Any]] = []
    quality: dict[tuple, dict[str, Any]] = {}  # options that store and query the same vectors share one quality
    baseline_curve = None
    peer: dict[str, Any] = {}
    try:
        scope = Scope(tenant=TENANT)
        for opt in options:
            bar.set_description_str(f"memory: {opt.name}")
            project = _pca(fit, opt.dim) if opt.dim else (lambda x: x)
            stored = project(vectors[chosen])
            settings = Settings(redis_url=handle.url, index=f"mo{len(results)}x{int(time.time()) % 10000}",
                                **{"embedding_storage": opt.storage, "vector_type": opt.vector_type,
                                   **opt.settings})  # explicit: never whatever the defaults are today
            used0 = used_memory(client)
            ensure_index(client, IndexSpec(settings=settings, dim=stored.shape[1], model_name=embedder.name))
            pipe = client.pipeline(transaction=False)
            for i, v in zip(chosen, stored):
                r = rows[i]  # build_entry stores the vector as the option's SEMCACHE_EMBEDDING_STORAGE says
                entry = build_entry(WriteCommand(prompt=r.text, response=answer_for(r.intent), scope=scope),
                                    settings=settings, embedding=[float(x) for x in v])
                pipe.execute_command("JSON.SET", settings.key_prefix + entry.id, "$",
                                     json.dumps(_document(entry.document(), opt), ensure_ascii=False))
                pipe.expireat(settings.key_prefix + entry.id, int(entry.expires_at) + 1)
                if len(pipe) >= 1000:
                    pipe.execute()
            pipe.execute()
            m = bytes_per_entry(client, f"{settings.index}-idx", f"{settings.key_prefix}*")
            used = (used_memory(client) - used0) / opts.entries
            speed = _search_ms(client, settings, project(vectors[search_rows]), scope, opts.entries)
            drop_index(client, settings, delete_documents=True)
            bar.update(1)
            bar.set_description_str(f"quality: {opt.name}")
            key = (opt.dim, opt.storage, opt.vector_type)
            cache_key = f"{embedder.name}|dim={opt.dim}|{opt.storage}|{opt.vector_type}|knobs={knobs}|v1"
            if key not in quality and cache_key in quality_cache:
                quality[key] = quality_cache[cache_key]
            if key not in quality:
                q = query_vectors(project(stream_vectors), opt.vector_type)
                st = stored_vectors(project(stream_vectors), opt.storage, opt.vector_type)
                sims = st @ q.T
                quality[key] = {
                    "threshold": stream_quality(q, st, intents, oos, knobs, sims=sims),
                    "consensus": consensus_stream_quality(sims, intents, oos, knobs),
                    "cosine_error": cosine_error(project(stream_vectors), opt.storage, opt.vector_type),
                }
                del sims
                quality_cache[cache_key] = quality[key]
            qual = quality[key]
            curve = qual["threshold"]
            if baseline_curve is None:
                baseline_curve = curve
            at90 = next(c for c in curve if abs(c[0] - 0.90) < 1e-9)
            base90 = next(c for c in baseline_curve if abs(c[0] - 0.90) < 1e-9)
            cons90 = next(c for c in qual["consensus"] if abs(c[0] - 0.90) < 1e-9)
            results.append({
                "name": opt.name, "description": opt.description, "dim": int(stored.shape[1]),
                "embedding_storage": opt.storage, "vector_type": opt.vector_type, "lean": opt.lean,
                "bytes_per_entry": m["bytes_per_entry"], "document_bytes": m["document_bytes"],
                "index_bytes_per_entry": m["index_bytes_per_entry"], "used_memory_per_entry": round(used, 1),
                **speed,
                "hit_rate": round(at90[1], 4), "wrong_hit_rate": round(at90[2], 4),
                "wrong_at_baseline_hit_rate": round(_at_hit_rate(curve, base90[1]), 4),
                "threshold_at_1pct": best_hit_rate(curve, 0.01),
                "threshold_at_0.5pct": best_hit_rate(curve, 0.005),
                "consensus_hit_rate": round(cons90[1], 4), "consensus_wrong_hit_rate": round(cons90[2], 4),
                "consensus_at_1pct": best_hit_rate(qual["consensus"], 0.01),
                "consensus_at_0.5pct": best_hit_rate(qual["consensus"], 0.005),
                "cosine_error": qual["cosine_error"],
                "curve": [[t, round(h, 4), round(w, 4)] for t, h, w in curve],
                "consensus_curve": [[t, round(h, 4), round(w, 4)] for t, h, w in qual["consensus"]],
            })  # fmt: skip
            bar.update(1)
        if opts.with_redisvl:
            bar.set_description_str("memory: redisvl")
            used0 = used_memory(client)
            vl = RedisVLSystem(handle.url)
            try:
                pipe_vectors = vectors[chosen]
                for i, v in zip(chosen, pipe_vectors):
                    r = rows[i]  # the same vectors as semcache's: RedisVL is measured for memory here, not speed
                    vl.cache.store(r.text, answer_for(r.intent), vector=[float(x) for x in v],
                                   filters={"tenant": TENANT})
                m = bytes_per_entry(client, vl.index_name, vl.key_pattern)
                peer.update({"redisvl_bytes_per_entry": m["bytes_per_entry"],
                             "redisvl_used_memory_per_entry": round((used_memory(client) - used0) / opts.entries, 1)})
            finally:
                with contextlib.suppress(Exception):
                    vl.drop()
                vl.close()
            bar.update(1)
        bar.set_description_str("search: FLOAT32 vs FLOAT16")  # last: its dropped documents are freed lazily
        try:
            peer["float16_search_ab"] = search_ab(client, handle.url, rows, vectors)
        except Exception as exc:  # noqa: BLE001 - a failed side measurement must not lose the whole run
            peer["float16_search_ab"] = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        bar.close()
        client.close()
        handle.close()
        shutil.rmtree(work_dir, ignore_errors=True)
    load["end"] = [round(x, 2) for x in os.getloadavg()]
    if opts.pairs_dir:
        peer["pair_auc"] = pair_auc(embedder, Path(opts.pairs_dir), fit)
    return {"entries": opts.entries, "options": results, **peer, "quality_protocol": (
        "CLINC150, all 23,700 prompts shuffled with seed 42, exact search in numpy with the vectors each option "
        "stores and queries; threshold: nearest entry against one threshold; consensus: the shipped policy over the "
        "8 nearest entries; knobs " + ", ".join(f"{k:.2f}" for k in knobs)),
        "search_protocol": f"{_SEARCHES} CLINC150 test prompts, the read path's KNN (k=8, scope pre-filter) over the "
        f"{opts.entries} loaded entries, one client, wall time per FT.SEARCH",
        "load_average": load, "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def search_ab(client: Any, url: str, rows: list, vectors: np.ndarray, *, queries: int = 2000, seed: int = 7,
              rounds: int = 2) -> dict[str, Any]:
    """FLOAT32 against FLOAT16 index, the same int8 documents (every CLINC150 prompt but ``queries``) in both,
    the read path's KNN with the queries interleaved (A, B, B, A, ...) so that the machine's load hits both alike.
    Also recall@1 of each against an exact search over the stored vectors (a tie counts as found)."""
    from cache_core.index import index_info
    from cache_core.schema import embedding_vector, entry_id

    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    asked, kept = order[:queries], order[queries:]
    scope = Scope(tenant=TENANT)
    indexes: dict[str, Settings] = {}
    try:
        for vt in ("FLOAT32", "FLOAT16"):
            s = Settings(redis_url=url, index=f"ab{vt.lower()}x{int(time.time()) % 10000}", vector_type=vt,
                         embedding_storage="int8")
            ensure_index(client, IndexSpec(settings=s, dim=vectors.shape[1], model_name="bench"))
            indexes[vt] = s
            pipe = client.pipeline(transaction=False)
            for n, i in enumerate(kept):  # "#n": CLINC150 repeats a few texts, every entry needs its own id
                e = build_entry(WriteCommand(prompt=f"{rows[i].text} #{n}", response=rows[i].intent, scope=scope),
                                settings=s, embedding=vectors[i])
                pipe.execute_command("JSON.SET", s.key_prefix + e.id, "$", json.dumps(e.document()))
                if n % 500 == 499:
                    pipe.execute()
            pipe.execute()
            while index_info(client, s)["percent_indexed"] < 1.0:
                time.sleep(0.1)
        filt, params = scope_filter(scope, [], now=time.time())
        times: dict[str, list[float]] = {vt: [] for vt in indexes}
        found: dict[str, list[str | None]] = {vt: [] for vt in indexes}
        for rnd in range(rounds):
            for n, qi in enumerate(asked):
                for vt in (("FLOAT32", "FLOAT16") if (n + rnd) % 2 else ("FLOAT16", "FLOAT32")):
                    s = indexes[vt]
                    query, qparams = knn_query(filt, params, vectors[qi], k=s.knn_k, ef_runtime=s.hnsw_ef_runtime,
                                               vector_type=vt, batches=len(kept) >= s.hybrid_batches_min)
                    args = search_args(alias_name(s), query, qparams, s.knn_k)
                    t0 = time.perf_counter()
                    reply = client.execute_command(*args)
                    times[vt].append((time.perf_counter() - t0) * 1000)
                    if rnd == 0:
                        best = next(iter(_result_ids(reply)), None)
                        found[vt].append(best)
        stored = np.stack([embedding_vector(quantize_embedding(vectors[i], "int8")) for i in kept])
        exact = vectors[asked].astype(np.float32) @ stored.T
        top = exact.max(axis=1)
        position = {entry_id(f"{rows[i].text} #{n}", scope): n for n, i in enumerate(kept)}
        out: dict[str, Any] = {"entries": len(kept), "queries": len(asked) * rounds}
        for vt, values in times.items():
            recall = np.mean([g in position and exact[k, position[g]] >= top[k] - 1e-6
                              for k, g in enumerate(found[vt])])
            out[vt] = {"search_p50_ms": round(float(np.percentile(values, 50)), 3),
                       "search_p95_ms": round(float(np.percentile(values, 95)), 3),
                       "search_p99_ms": round(float(np.percentile(values, 99)), 3),
                       "recall_at_1": round(float(recall), 4)}
        return out
    finally:
        for s in indexes.values():
            drop_index(client, s, delete_documents=True)


def _result_ids(reply: Any) -> list[str]:
    from cache_core.connection import text

    if isinstance(reply, dict):
        results = reply.get(b"results", reply.get("results", []))
        return [text((r.get(b"extra_attributes", r.get("extra_attributes")) or {}).get(b"$.id") or
                     (r.get(b"extra_attributes", r.get("extra_attributes")) or {}).get("$.id") or "")
                for r in results]
    return []


def _pct(point: dict[str, float] | None) -> str:
    return "none" if point is None else f"{point['hit_rate']:.1%} ({point['knob']:.2f})"


def quality_table(result: dict[str, Any]) -> str:
    """Markdown: each option's bytes per entry against RedisVL, search time, and the quality of both policies
    within 1% and 0.5% wrong hits (knob in brackets)."""
    peer = result.get("redisvl_bytes_per_entry")
    lines = ["| option | bytes/entry | vs RedisVL | search p50 / p95 (ms) | baseline: hits at <=1% / <=0.5% wrong "
             "| consensus: hits at <=1% / <=0.5% wrong | consensus @0.90: hits / wrong | similarity error, max |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for o in result["options"]:
        ratio = f"{o['bytes_per_entry'] / peer:.2f}x" if peer else "-"
        lines.append(
            f"| {o['name']} | {o['bytes_per_entry']:,.0f} | {ratio} | {o['search_p50_ms']:.2f} / "
            f"{o['search_p95_ms']:.2f} | {_pct(o['threshold_at_1pct'])} / {_pct(o['threshold_at_0.5pct'])} | "
            f"{_pct(o['consensus_at_1pct'])} / {_pct(o['consensus_at_0.5pct'])} | "
            f"{o['consensus_hit_rate']:.1%} / {o['consensus_wrong_hit_rate']:.2%} | "
            f"{o['cosine_error']['similarity_error_max']:.1e} |")
    if peer:
        lines.append(f"| RedisVL SemanticCache (HASH, FLOAT32 blob) | {peer:,.0f} | 1.00x | | | | | |")
    return "\n".join(lines)
