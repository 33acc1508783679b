"""Issue 15: RediSearch's search timeout returns partial results by default (``ON_TIMEOUT RETURN``): a KNN cut short
holds some documents of the scope, not the nearest ones, and the policy would decide on them (a wrong neighbour
served, a competing group missing). The read path treats such a reply as a degraded miss.

The timeout is real: a server of this test's own (so its ``FT.CONFIG SET TIMEOUT 1`` touches no other test) holds a
scope of 8,000 entries searched with ``EF_RUNTIME 4096`` and k = 100 (about 14 ms on the 2-core reference machine,
far over the 1 ms budget); the test first checks that the server really answered with its timeout warning.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from cache_core.aio import AsyncSemanticCache
from cache_core.cache import SemanticCache
from cache_core.connection import make_client
from cache_core.embedded import EmbeddedRedis
from cache_core.errors import BackendUnavailable
from cache_core.index import IndexSpec, ensure_index
from cache_core.query import search_timed_out
from cache_core.schema import Scope, WriteCommand
from cache_core.store import build_entry, document_set_args
from cache_core.testing import HashingEmbedder, test_settings

SCOPE = Scope(tenant="big")
FILLER = 8_000
DIM = 384


@pytest.fixture(scope="module")
def big_scope(tmp_path_factory):
    """A server, settings and an index whose one scope holds :data:`FILLER` entries plus the one the test asks."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("timeout-redis"), appendonly=False)
    server.start()
    # a slow search on purpose (every HNSW node visited); int8 storage and a sparse graph keep the setup short
    settings = test_settings(server.url, redis_timeout_ms=5000, hybrid_batches_min=1, hnsw_ef_runtime=4096, knn_k=100,
                             embedding_storage="int8", hnsw_m=4, hnsw_ef_construction=8)
    embedder = HashingEmbedder(dim=DIM)
    client = make_client(server.url, timeout_ms=60_000)
    ensure_index(client, IndexSpec(settings=settings, dim=DIM, model_name=embedder.name))
    rng = np.random.default_rng(15)
    prompts = ["How do I reset my password?"] + [f"filler question {i}" for i in range(FILLER)]
    vectors = [embedder.embed(prompts[:1])[0]] + list(rng.standard_normal((FILLER, DIM)).astype(np.float32))
    pipe = client.pipeline(transaction=False)
    for n, (prompt, vector) in enumerate(zip(prompts, vectors)):
        entry = build_entry(WriteCommand(prompt=prompt, response="Use the reset link.", scope=SCOPE),
                            settings=settings, embedding=vector.tolist())
        for args in document_set_args(settings.key_prefix + entry.id, entry, settings):
            pipe.execute_command(*args)
        if n % 2000 == 0:
            pipe.execute()
    pipe.execute()
    client.execute_command("FT.CONFIG", "SET", "TIMEOUT", "1")
    yield settings, client, embedder
    client.close()
    server.stop()


def test_a_knn_cut_short_by_the_search_timeout_is_a_degraded_miss(big_scope):
    settings, client, embedder = big_scope
    cache = SemanticCache(settings, client, embedder)
    question = "how can I reset my password"
    # the situation is real: the read path's own query comes back partial, with the server's warning
    ctx = cache._begin(question, SCOPE, None)
    cache._exact_reply(ctx, [client.execute_command(*c) for c in cache._exact_request(ctx)])
    reply = client.execute_command(*cache._knn_request(ctx, embedder.embed([question])[0]))
    assert search_timed_out(reply), reply.get(b"warning")

    result = cache.lookup(question, SCOPE)
    assert not result.hit and result.degraded and "timed out" in result.degraded  # before: degraded None
    assert result.lookup_id
    with pytest.raises(BackendUnavailable, match="timed out"):
        SemanticCache(settings, client, embedder, strict=True).lookup(question, SCOPE)
    assert cache.lookup("How do I reset my password?", SCOPE).strategy == "exact"  # the exact path is unaffected

    async def through_asyncio():
        aio = AsyncSemanticCache(cache, AsyncSemanticCache.client_for(settings.redis_url, settings))
        try:
            return await aio.lookup(question, SCOPE)
        finally:
            await aio.client.aclose()

    # in a thread of its own: a session-wide Playwright (the browser tests) keeps an event loop in the main thread
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(asyncio.run, through_asyncio()).result().degraded


def test_search_timed_out_reads_the_resp3_warning():
    assert search_timed_out({b"warning": [b"Timeout limit was reached"], b"results": []})
    assert search_timed_out({"warning": ["Timeout limit was reached"]})
    assert not search_timed_out({b"warning": [], b"results": []})
    assert not search_timed_out([0])  # RESP2: no warning to read
