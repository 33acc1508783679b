"""Issue 15, item 7: the embedding LRU is no cross-tenant side channel.

Before, one LRU of prompt -> vector served every tenant: tenant B's lookup of a prompt tenant A had just asked
skipped the model, and the ``embed`` time of B's reply (and the reply's latency itself) told B that someone asked
exactly that. The LRU is now partitioned by tenant, so B's lookup runs the model like any first lookup, and a
tenant's own repeats keep the speedup. The tests count what the real model's LRU did (``counters``), not times.
"""

from __future__ import annotations

import base64
import json
import uuid

from cache_core.apikeys import create_key
from cache_core.cache import SemanticCache
from cache_core.connection import make_client, with_db
from semcache.fakellm import FakeLLMServer, SimulatedLLM

from .fixtures_web import UNCONSUMED, _make_app


def _delta(embedder, before: dict) -> dict:
    return {k: embedder.counters[k] - before[k] for k in ("cache_hits", "model_texts")}


def test_another_tenants_lookup_of_the_same_prompt_runs_the_model(settings, redis_client, embedder):
    cache = SemanticCache(settings, redis_client, embedder)
    prompt = f"Is the merger with Initech going ahead? {uuid.uuid4().hex}"
    cache.lookup(prompt, {"tenant": "a"})  # tenant A asks first: its vector is now in the LRU

    before = dict(embedder.counters)
    other = cache.lookup(prompt, {"tenant": "b"})
    assert not other.hit and other.embed_ms > 0
    assert _delta(embedder, before) == {"cache_hits": 0, "model_texts": 1}  # before the fix: 1 LRU hit, 0 texts

    before = dict(embedder.counters)
    cache.lookup(prompt, {"tenant": "a", "locale": "de"})  # the same tenant keeps the speedup, in any scope
    cache.lookup_many([prompt], {"tenant": "b"})
    assert _delta(embedder, before) == {"cache_hits": 2, "model_texts": 0}


def test_the_api_reply_to_tenant_b_does_not_reveal_what_tenant_a_asked(web_app, api_headers, embedder):
    client = web_app.test_client()
    prompt = f"When does the Globex layoff start? {uuid.uuid4().hex}"
    first = client.post("/api/v1/lookup", headers=api_headers("alpha"), json={"prompt": prompt})
    assert first.status_code == 200 and not first.get_json()["hit"]
    before = dict(embedder.counters)
    reply = client.post("/api/v1/lookup", headers=api_headers("beta"), json={"prompt": prompt})
    assert reply.status_code == 200 and reply.get_json()["timings_ms"]["embed"] > 0
    assert _delta(embedder, before) == {"cache_hits": 0, "model_texts": 1}
    before = dict(embedder.counters)
    client.post("/api/v1/lookup", headers=api_headers("alpha"), json={"prompt": prompt})
    assert _delta(embedder, before) == {"cache_hits": 1, "model_texts": 0}


def test_the_proxy_write_back_still_carries_the_lookups_vector(web_settings, embedder):
    """The proxy reads the vector its lookup computed back from the LRU (the worker need not embed again): it must
    ask the tenant's partition."""
    llm = SimulatedLLM(answer_for=lambda prompt: "Yes, daily.", base_ms=0, per_token_ms=0, model="sim")
    with FakeLLMServer(llm) as server:
        app = _make_app(web_settings.model_copy(update={"upstream_url": server.url}), embedder)
        try:
            question = f"Do you fly to Porto? {uuid.uuid4().hex}"
            state = app.extensions["semcache"]
            key, _ = create_key(state.redis, state.settings, tenant="gamma")
            body = {"model": "sim", "messages": [{"role": "user", "content": question}]}
            response = app.test_client().post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                              json=body)
            assert response.headers["X-Semcache"] == "miss"
            assert app.extensions["semcache_proxy"].writeback.flush()
        finally:
            app.extensions["semcache_proxy"].close()
            app.extensions["semcache"].close()
    broker = make_client(with_db(web_settings.redis_url, 1), timeout_ms=5000)
    try:
        commands = [json.loads(base64.b64decode(message["body"]))[1]["command"]
                    for message in map(json.loads, broker.lrange(UNCONSUMED, 0, -1))
                    if message["headers"]["task"] == "semcache.write_entry"]
    finally:
        broker.close()
    found = [c for c in commands if c["prompt"] == question]
    assert len(found) == 1 and found[0]["embedding"] is not None
    expected = embedder.embed([question])[0]
    assert max(abs(a - b) for a, b in zip(found[0]["embedding"], expected)) < 1e-6
