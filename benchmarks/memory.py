"""Redis memory per cache entry, measured the same way for every system.

``bytes_per_entry`` = the mean ``MEMORY USAGE`` of a sample of the system's keys (the documents themselves)
+ the index's memory from ``FT.INFO`` divided by its documents (``total_index_memory_sz_mb``, which covers the
inverted indexes, doc and key tables and tag/text overhead, plus ``vector_index_sz_mb``, which it does not).
``used_memory_per_entry`` is the server's ``used_memory`` growth over the whole load divided by the entries: it
also counts what a system writes besides its documents (semcache's audit stream, for example) and the
allocator's slack, so it is reported next to it, not instead of it.
"""

from __future__ import annotations

import random
from typing import Any

import redis

from cache_core.connection import text

__all__ = ["index_memory", "bytes_per_entry", "used_memory"]


def _field(info: Any, name: str) -> Any:
    if isinstance(info, dict):
        return info.get(name.encode(), info.get(name))
    items = list(info)
    for i in range(0, len(items) - 1, 2):
        if text(items[i]) == name:
            return items[i + 1]
    return None


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def index_memory(client: redis.Redis, index: str) -> dict[str, float]:
    """Documents and bytes of an index (FT.INFO)."""
    info = client.execute_command("FT.INFO", index)
    mb = 1024 * 1024
    vector = float(_field(info, "vector_index_sz_mb") or 0) * mb
    other = float(_field(info, "total_index_memory_sz_mb") or 0) * mb
    return {"num_docs": int(_field(info, "num_docs") or 0), "vector_bytes": vector, "other_bytes": other,
            "index_bytes": vector + other}


def bytes_per_entry(client: redis.Redis, index: str, key_pattern: str, *, sample: int = 500,
                    seed: int = 0) -> dict[str, float]:
    """Mean document bytes (``MEMORY USAGE key SAMPLES 0`` of up to ``sample`` keys) + index bytes per document."""
    keys = [k for k in client.scan_iter(match=key_pattern, count=2000)]
    if not keys:
        return {"bytes_per_entry": 0.0, "document_bytes": 0.0, "index_bytes_per_entry": 0.0, "sampled": 0}
    rng = random.Random(seed)
    chosen = rng.sample(keys, min(sample, len(keys)))
    pipe = client.pipeline(transaction=False)
    for k in chosen:
        pipe.memory_usage(k, samples=0)
    sizes = [int(s or 0) for s in pipe.execute()]
    doc = sum(sizes) / len(sizes)
    idx = index_memory(client, index)
    per_doc_index = idx["index_bytes"] / max(idx["num_docs"], 1)
    return {
        "bytes_per_entry": round(doc + per_doc_index, 1),
        "document_bytes": round(doc, 1),
        "index_bytes_per_entry": round(per_doc_index, 1),
        "vector_index_bytes_per_entry": round(idx["vector_bytes"] / max(idx["num_docs"], 1), 1),
        "keys": len(keys),
        "sampled": len(chosen),
    }
