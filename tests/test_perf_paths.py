"""The fast paths give the same answers as the plain ones: ``lookup_many`` equals ``lookup``, the exact path and
the embedding cache skip the model, and micro-batched embeddings equal one-at-a-time ones. Real Redis, real model."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from cache_core.cache import SemanticCache
from cache_core.schema import Scope, WriteCommand
from cache_core.store import write_command

STORED = {
    "How do I reset my password?": "Use 'Forgot password' on the login page.",
    "What are your opening hours?": "9 to 5, Monday to Friday.",
    "Can I get a refund after 30 days?": "No, refunds are possible within 30 days only.",
}
PROMPTS = [
    "How do I reset my password?",  # exact
    "  how do I RESET my password ",  # exact after normalization
    "how can i reset my password",  # semantic hit
    "When are you open?",  # semantic, maybe below threshold
    "What's the weather in Oslo tomorrow?",  # miss
    "What are your opening hours?",  # exact
    "how can i reset my password",  # a repeat inside the batch
]


@pytest.fixture
def cache(settings, redis_client, embedder):
    c = SemanticCache(settings, redis_client, embedder)
    yield c
    c.close()


@pytest.fixture
def tenant(cache, redis_client, embedder):
    name = f"paths-{uuid.uuid4().hex[:8]}"
    for prompt, response in STORED.items():
        write_command(redis_client, cache.settings, embedder,
                      WriteCommand(prompt=prompt, response=response, scope=Scope(tenant=name)))
    return name


def _summary(result):
    return (result.hit, result.strategy, result.entry.id if result.entry else None,
            None if result.similarity is None else round(result.similarity, 4), result.threshold)


def test_lookup_many_equals_lookup(cache, tenant):
    one_by_one = [_summary(cache.lookup(p, {"tenant": tenant})) for p in PROMPTS]
    batched = [_summary(r) for r in cache.lookup_many(PROMPTS, {"tenant": tenant})]
    assert batched == one_by_one
    assert [s[1] for s in one_by_one[:3]] == ["exact", "exact", "semantic"]
    assert one_by_one[4][0] is False


def test_lookup_many_respects_scope_and_threshold(cache, tenant):
    other = [r.hit for r in cache.lookup_many(PROMPTS, {"tenant": tenant + "-other"})]
    assert other == [False] * len(PROMPTS)
    strict = cache.lookup_many(PROMPTS, {"tenant": tenant}, min_similarity=0.999)
    assert [r.strategy for r in strict if r.hit] == ["exact", "exact", "exact"]  # semantic hits need 0.999 now


def test_lookup_many_embeds_the_misses_of_the_exact_check_in_one_batch(cache, tenant, embedder):
    embedder.clear_cache()
    before = dict(embedder.counters)
    cache.lookup_many(PROMPTS, {"tenant": tenant})
    calls = embedder.counters["model_calls"] - before["model_calls"]
    texts = embedder.counters["model_texts"] - before["model_texts"]
    assert calls == 1  # one forward pass for the whole batch
    assert texts == 3  # the three distinct prompts without an exact entry; the repeat is embedded once


def test_exact_hits_and_repeated_prompts_skip_the_model(cache, tenant, embedder):
    embedder.clear_cache()
    before = embedder.counters["model_texts"]
    assert cache.lookup("How do I reset my password?", {"tenant": tenant}).strategy == "exact"
    assert embedder.counters["model_texts"] == before  # the exact path needs no embedding
    first = cache.lookup("how can i reset my password", {"tenant": tenant})
    assert embedder.counters["model_texts"] == before + 1
    hits_before = embedder.counters["cache_hits"]
    again = cache.lookup("how can i reset my password", {"tenant": tenant})
    assert embedder.counters["model_texts"] == before + 1  # served from the embedding cache
    assert embedder.counters["cache_hits"] == hits_before + 1
    assert _summary(again) == _summary(first)


def test_embedding_cache_is_bounded_and_evicts_the_oldest(embedder):
    from cache_core.embedder import EmbeddingCache

    lru = EmbeddingCache(2)
    lru.put("a", np.zeros(2))
    lru.put("b", np.ones(2))
    assert lru.get("a") is not None  # a is now the most recent
    lru.put("c", np.ones(2))
    assert lru.get("b") is None and lru.get("a") is not None and len(lru) == 2
    assert EmbeddingCache(0).get("a") is None  # size 0 disables it


def test_concurrent_embeddings_are_batched_and_equal_sequential_ones(embedder):
    texts = [f"question number {i} about shipping to country {i % 7}" for i in range(24)]
    embedder.clear_cache()
    sequential = np.vstack([embedder.embed([t]) for t in texts])
    embedder.clear_cache()
    before = dict(embedder.counters)
    gate = threading.Barrier(8)

    def work(chunk):
        gate.wait(timeout=30)
        return [embedder.embed([t])[0] for t in chunk]

    with ThreadPoolExecutor(8) as pool:
        parts = list(pool.map(work, [texts[i::8] for i in range(8)]))
    concurrent = np.empty_like(sequential)
    for i in range(8):
        concurrent[i::8] = np.vstack(parts[i])
    assert np.allclose(concurrent, sequential, atol=1e-5)  # batching (and its padding) changes nothing
    calls = embedder.counters["model_calls"] - before["model_calls"]
    assert embedder.counters["model_texts"] - before["model_texts"] == len(texts)
    assert calls <= len(texts)  # never more passes than texts; usually far fewer


def test_a_failing_model_fails_every_waiting_caller(embedder):
    from cache_core.embedder import CachedEmbedder
    from cache_core.errors import EmbeddingError

    class Broken(CachedEmbedder):
        name, dim = "broken", 4

        def _encode(self, texts):
            raise RuntimeError("model crashed")

    broken = Broken(cache_size=0, batch_size=8)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(broken.embed, [f"t{i}"]) for i in range(4)]
    for f in futures:
        with pytest.raises(EmbeddingError, match="model crashed"):
            f.result(timeout=30)


def test_large_scopes_are_searched_by_walking_the_graph(make_settings, redis_client, embedder):
    """A scope at or above SEMCACHE_HYBRID_BATCHES_MIN gets HYBRID_POLICY BATCHES (brute force over a large scope is
    slow); a small one is left to RediSearch. Both answer the same hit."""
    from cache_core.cache import SemanticCache
    from cache_core.schema import Scope, WriteCommand
    from cache_core.store import write_command

    settings = make_settings(hybrid_batches_min=3)
    cache = SemanticCache(settings, redis_client, embedder)
    for i, prompt in enumerate(["How do I reset my password?", "Where is my invoice?", "How do I cancel?"]):
        write_command(redis_client, settings, embedder, WriteCommand(prompt=prompt, response=f"a{i}",
                                                                     scope=Scope(tenant="big")))
    write_command(redis_client, settings, embedder, WriteCommand(prompt="How do I reset my password?",
                                                                 response="small", scope=Scope(tenant="small")))
    seen = []
    original = redis_client.execute_command

    def spy(*args, **kwargs):
        if args and args[0] == "FT.SEARCH" and "KNN" in str(args[2]):
            seen.append(str(args[2]))
        return original(*args, **kwargs)

    redis_client.execute_command = spy
    try:
        assert cache.lookup("how can I reset my password", {"tenant": "big"}).entry.response == "a0"
        assert cache.lookup("how can I reset my password", {"tenant": "small"}).entry.response == "small"
    finally:
        del redis_client.execute_command
    assert "HYBRID_POLICY BATCHES" in seen[0] and "HYBRID_POLICY" not in seen[1]
