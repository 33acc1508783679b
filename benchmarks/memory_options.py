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

Options:

- ``float32`` : today's document: the embedding as a JSON list of floats, a FLOAT32 HNSW index (M=16).
- ``float16-index``: the same document, a FLOAT16 index (the index converts; the document is unchanged).
- ``hnsw-m8``: HNSW M=8 (a smaller graph; recall is in the scaling run).
- ``lean-doc``: fields with empty default values (reasons, flags, metadata, moderation, hit counters) omitted.
- ``int16-json``: the embedding stored as integers (round(x * 32767)); RedisJSON keeps small integers in less
  memory than floats, and cosine similarity does not care about the scale (max distance error measured 7e-5).
- ``pca<d>``: a projection to ``d`` dimensions (centred PCA fitted once on 3,000 train prompts, which would be
  stored with the index), combined with the int16 and FLOAT16 options.
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

from cache_core.connection import open_redis
from cache_core.index import IndexSpec, drop_index, ensure_index
from cache_core.schema import Scope, WriteCommand
from cache_core.settings import Settings
from cache_core.store import build_entry

from .memory import bytes_per_entry, used_memory
from .systems import TENANT, RedisVLSystem
from .workload import answer_for, clinc150

__all__ = ["MemoryOptions", "run_memory_options", "stream_quality"]

_LEAN_DROP = ("reasons", "flags", "metadata", "moderation", "hit_count", "last_hit_at")
_INT_SCALE = 32767


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
    settings: dict[str, Any]
    dim: int | None = None  # projected dimension, None: the model's
    int_json: bool = False
    lean: bool = False


def _options() -> list[_Option]:
    return [
        _Option("float32", "today: float list in JSON, FLOAT32 HNSW M=16", {}),
        _Option("float16-index", "FLOAT16 index, same document", {"vector_type": "FLOAT16"}),
        _Option("hnsw-m8", "HNSW M=8", {"hnsw_m": 8}),
        _Option("lean-doc", "document without empty default fields", {}, lean=True),
        _Option("int16-json", "embedding as JSON integers (x * 32767)", {}, int_json=True),
        _Option("int16-json + float16-index", "both", {"vector_type": "FLOAT16"}, int_json=True),
        _Option("int16 + float16 + lean", "all three, full dimension", {"vector_type": "FLOAT16"}, int_json=True,
                lean=True),
        _Option("pca256 + int16 + float16", "projection to 256 dims", {"vector_type": "FLOAT16"}, 256, True),
        _Option("pca192 + int16 + float16", "projection to 192 dims", {"vector_type": "FLOAT16"}, 192, True),
        _Option("pca128 + int16 + float16", "projection to 128 dims", {"vector_type": "FLOAT16"}, 128, True),
        _Option("pca128 + int16 + float16 + lean", "projection to 128 dims, lean document",
                {"vector_type": "FLOAT16"}, 128, True, True),
    ]


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _pca(fit: np.ndarray, dim: int) -> Callable[[np.ndarray], np.ndarray]:
    mean = fit.mean(axis=0)
    _, _, vt = np.linalg.svd(fit - mean, full_matrices=False)
    basis = vt[:dim].T.astype(np.float32)
    return lambda x: _normalize((x - mean) @ basis).astype(np.float32)


def stream_quality(vectors: np.ndarray, stored: np.ndarray, intents: list[str], oos: list[bool],
                   thresholds: np.ndarray) -> list[tuple[float, float, float]]:
    """(threshold, hit rate, wrong hits / hits) of the stream protocol: prompt ``i`` (as ``vectors[i]``) is
    looked up among the earlier misses (as ``stored[j]``); a miss is stored.

    Exact, and fast: when prompt ``j`` is stored, every later prompt's best similarity so far is updated at once
    (one vector operation), instead of searching the stored set for every prompt.
    """
    sims = stored @ vectors.T  # sims[j, i]: stored entry j against prompt i
    n = len(vectors)
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


def _at_hit_rate(curve: list[tuple[float, float, float]], target: float) -> float:
    """Wrong-hit rate where the curve's hit rate equals ``target`` (linear interpolation)."""
    pts = sorted((h, w) for _, h, w in curve)
    hs = [h for h, _ in pts]
    ws = [w for _, w in pts]
    return float(np.interp(target, hs, ws))


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


def _document(entry_doc: dict, vector: np.ndarray, opt: _Option) -> dict:
    doc = dict(entry_doc)
    doc["embedding"] = ([int(round(float(x) * _INT_SCALE)) for x in vector] if opt.int_json
                        else [float(x) for x in vector])
    if opt.lean:
        for name in _LEAN_DROP:
            if not doc.get(name):
                doc.pop(name, None)
    return doc


def run_memory_options(opts: MemoryOptions, *, progress: bool = True) -> dict[str, Any]:
    """Measure every option; returns ``{"options": [...], "redisvl_bytes_per_entry": ..., ...}``."""
    from tqdm import tqdm

    from cache_core.embedder import load_embedder

    base = Settings(**({"redis_url": opts.redis_url} if opts.redis_url else {}))
    data_dir = Path(opts.data_dir or base.data_dir)
    embedder = load_embedder(base.model, backend=opts.backend or base.embedding_backend, data_dir=data_dir,
                             cache_size=0)
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
    thresholds = np.round(np.arange(0.80, 0.965, 0.02), 2)

    work_dir = Path(tempfile.mkdtemp(prefix="semcache-memopts-"))
    handle = open_redis(Settings(redis_url=opts.redis_url, data_dir=work_dir / "redis", embedded_appendonly=False))
    client = handle.writer()
    options = _options()
    bar = tqdm(total=len(options) * 2 + 1, unit="step", disable=not progress, leave=False)
    results: list[dict[str, Any]] = []
    baseline_curve = None
    peer: dict[str, Any] = {}
    try:
        scope = Scope(tenant=TENANT)
        for opt in options:
            bar.set_description_str(f"memory: {opt.name}")
            project = _pca(fit, opt.dim) if opt.dim else (lambda x: x)
            stored = project(vectors[chosen])
            settings = Settings(redis_url=handle.url, index=f"mo{len(results)}x{int(time.time()) % 10000}",
                                **opt.settings)
            used0 = used_memory(client)
            ensure_index(client, IndexSpec(settings=settings, dim=stored.shape[1], model_name=embedder.name))
            pipe = client.pipeline(transaction=False)
            for i, v in zip(chosen, stored):
                r = rows[i]
                entry = build_entry(WriteCommand(prompt=r.text, response=answer_for(r.intent), scope=scope),
                                    settings=settings, embedding=[float(x) for x in v])
                pipe.execute_command("JSON.SET", settings.key_prefix + entry.id, "$",
                                     json.dumps(_document(entry.document(), v, opt), ensure_ascii=False))
                pipe.expireat(settings.key_prefix + entry.id, int(entry.expires_at) + 1)
            pipe.execute()
            m = bytes_per_entry(client, f"{settings.index}-idx", f"{settings.key_prefix}*")
            used = (used_memory(client) - used0) / opts.entries
            drop_index(client, settings, delete_documents=True)
            bar.update(1)
            bar.set_description_str(f"quality: {opt.name}")
            if opt.name in ("hnsw-m8", "lean-doc"):  # same vectors as float32: same exact-search quality
                curve = baseline_curve
            else:
                q = project(stream_vectors)
                s = q
                if opt.int_json:
                    s = _normalize(np.round(s * _INT_SCALE) / _INT_SCALE)
                if opt.settings.get("vector_type") == "FLOAT16":
                    q = _normalize(q.astype(np.float16).astype(np.float32))
                    s = _normalize(s.astype(np.float16).astype(np.float32))
                curve = stream_quality(q.astype(np.float32), s.astype(np.float32), intents, oos, thresholds)
            if baseline_curve is None:
                baseline_curve = curve
            at90 = next(c for c in curve if abs(c[0] - 0.90) < 1e-9)
            base90 = next(c for c in baseline_curve if abs(c[0] - 0.90) < 1e-9)
            results.append({
                "name": opt.name, "description": opt.description, "dim": int(stored.shape[1]),
                "bytes_per_entry": m["bytes_per_entry"], "document_bytes": m["document_bytes"],
                "index_bytes_per_entry": m["index_bytes_per_entry"], "used_memory_per_entry": round(used, 1),
                "hit_rate": round(at90[1], 4), "wrong_hit_rate": round(at90[2], 4),
                "wrong_at_baseline_hit_rate": round(_at_hit_rate(curve, base90[1]), 4),
                "curve": [[t, round(h, 4), round(w, 4)] for t, h, w in curve],
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
                peer = {"redisvl_bytes_per_entry": m["bytes_per_entry"],
                        "redisvl_used_memory_per_entry": round((used_memory(client) - used0) / opts.entries, 1)}
            finally:
                with contextlib.suppress(Exception):
                    vl.drop()
                vl.close()
            bar.update(1)
    finally:
        bar.close()
        handle.close()
        shutil.rmtree(work_dir, ignore_errors=True)
    if opts.pairs_dir:
        peer["pair_auc"] = pair_auc(embedder, Path(opts.pairs_dir), fit)
    return {"entries": opts.entries, "options": results, **peer, "quality_protocol": (
        "CLINC150, all 23,700 prompts shuffled with seed 42, exact nearest neighbour, one threshold"),
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
