"""The two caches behind one small interface, so every measurement runs the same code for both.

Both look up with similarity 0.90 (RedisVL: ``distance_threshold=0.1``, cosine distance = 1 - similarity) within
the same tenant (semcache's scope, RedisVL's ``tenant`` tag filter), use the same packaged all-MiniLM-L6-v2 and
the same Redis server, and each gets a fresh index.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cache_core.settings import Settings

__all__ = ["Outcome", "SemcacheSystem", "RedisVLSystem", "THRESHOLD", "TENANT", "intent_of"]

log = logging.getLogger(__name__)

THRESHOLD = 0.90  # cosine similarity; RedisVL's distance_threshold is 1 - this
TENANT = "bench"


@dataclass(frozen=True)
class Outcome:
    hit: bool
    response: str | None = None
    degraded: bool = False
    strategy: str | None = None


def intent_of(response: str | None) -> str | None:
    """The intent an answer of the workload belongs to (answers start with ``[intent]``)."""
    if not response or not response.startswith("["):
        return None
    return response[1 : response.index("]")]


class SemcacheSystem:
    """semcache's :class:`~cache_core.cache.SemanticCache` on a fresh index of the bench's Redis."""

    name = "semcache"

    def __init__(self, redis_url: str, data_dir: Path, *, backend: str | None = None, policy: str | None = None,
                 index: str | None = None, **overrides: Any) -> None:
        from cache_core.cache import SemanticCache

        fields: dict[str, Any] = {"redis_url": redis_url, "data_dir": data_dir,
                                  "index": index or f"bsc{uuid.uuid4().hex[:8]}", **overrides}
        if backend:
            fields["embedding_backend"] = backend
        if policy:
            fields["policy"] = policy
        self.settings = Settings(**fields)
        self.cache = SemanticCache.open(self.settings)
        self.embedder = self.cache.embedder
        self.scope = self.cache.scope({"tenant": TENANT})
        self.index_name = self.cache.index_name
        self.key_pattern = f"{self.settings.key_prefix}*"

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {"index": self.index_name, "embedding_backend": s.embedding_backend,
                "embedding_precision": s.embedding_precision, "policy": s.policy,
                "vector_type": s.vector_type, "hnsw_m": s.hnsw_m, "hnsw_ef_runtime": s.hnsw_ef_runtime,
                "embedding_cache_size": s.embedding_cache_size, "min_similarity": THRESHOLD}

    def lookup(self, prompt: str) -> Outcome:
        r = self.cache.lookup(prompt, self.scope, min_similarity=THRESHOLD)
        return Outcome(r.hit, r.entry.response if r.entry else None, r.degraded is not None, r.strategy)

    def lookup_many(self, prompts: list[str]) -> list[Outcome]:
        results = self.cache.lookup_many(prompts, self.scope, min_similarity=THRESHOLD)
        return [Outcome(r.hit, r.entry.response if r.entry else None, r.degraded is not None, r.strategy)
                for r in results]

    def store_direct(self, prompt: str, response: str) -> None:
        """One entry through ``cache_core.store.write_command`` (embed + one MULTI), no worker."""
        from cache_core.schema import WriteCommand
        from cache_core.store import write_command

        command = WriteCommand(prompt=prompt, response=response, scope=self.scope, source="bench")
        write_command(self.cache.handle.writer(), self.settings, self.embedder, command)

    def clear_embedding_cache(self) -> None:
        """Forget every cached embedding, so a run starts as cold as RedisVL's (which has no such cache)."""
        clear = getattr(self.embedder, "clear_cache", None)
        if clear is not None:
            clear()

    def drop_tenant(self, tenant: str) -> int:
        """Delete every entry of ``tenant`` (the worker's warm-up writes)."""
        from cache_core.schema import tag_token

        client = self.cache.handle.writer()
        deleted = 0
        while True:
            reply = client.execute_command("FT.SEARCH", self.index_name, "@tenant:{$t}", "PARAMS", "2", "t",
                                           tag_token(tenant), "NOCONTENT", "LIMIT", "0", "5000", "DIALECT", "2")
            rows = reply.get(b"results", reply.get("results", [])) if isinstance(reply, dict) else []
            keys = [r.get(b"id", r.get("id")) for r in rows]
            if not keys:
                return deleted
            deleted += int(client.delete(*keys))

    def drop(self) -> None:
        from cache_core.index import drop_index

        client = self.cache.handle.writer()
        drop_index(client, self.settings, delete_documents=True)
        for key in client.scan_iter(match=f"{self.settings.index}:*", count=1000):
            client.delete(key)

    def close(self) -> None:
        self.cache.close()


class RedisVLSystem:
    """RedisVL's ``SemanticCache`` with ``HFTextVectorizer`` over the same packaged model, on a fresh index."""

    name = "redisvl"

    def __init__(self, redis_url: str, *, index: str | None = None) -> None:
        from redisvl.extensions.cache.llm import SemanticCache
        from redisvl.query.filter import Tag
        from redisvl.utils.vectorize import HFTextVectorizer

        from cache_core.embedder import packaged_model_path

        self.index_name = index or f"bvl{uuid.uuid4().hex[:8]}"
        self.vectorizer = HFTextVectorizer(model=packaged_model_path(), device="cpu")
        self.cache = SemanticCache(
            name=self.index_name, redis_url=redis_url, vectorizer=self.vectorizer,
            distance_threshold=round(1 - THRESHOLD, 6), filterable_fields=[{"name": "tenant", "type": "tag"}],
        )  # fmt: skip
        self.filter = Tag("tenant") == TENANT
        self.key_pattern = f"{self.index_name}:*"

    def describe(self) -> dict[str, Any]:
        import redisvl

        return {"index": self.index_name, "redisvl": redisvl.__version__, "vectorizer": "HFTextVectorizer (torch)",
                "distance_threshold": round(1 - THRESHOLD, 6), "storage": "HASH"}

    def lookup(self, prompt: str) -> Outcome:
        hits = self.cache.check(prompt=prompt, num_results=1, filter_expression=self.filter)
        if not hits:
            return Outcome(False)
        return Outcome(True, hits[0].get("response"), strategy="semantic")

    def store(self, prompt: str, response: str) -> None:
        self.cache.store(prompt, response, filters={"tenant": TENANT})

    def drop(self) -> None:
        self.cache.delete()

    def close(self) -> None:
        try:
            self.cache.disconnect()
        except Exception:  # noqa: BLE001 - closing is best effort
            log.debug("redisvl disconnect failed", exc_info=True)
