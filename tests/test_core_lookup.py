"""The read path against the real embedded Redis and the real MiniLM model."""

import json
import os
import signal
import time

import pytest

from cache_core.cache import Generated, SemanticCache
from cache_core.connection import make_client
from cache_core.embedded import EmbeddedRedis
from cache_core.errors import BackendUnavailable, InvalidInput
from cache_core.schema import Scope, Status, WriteCommand, entry_id
from cache_core.store import set_status, write_command
from cache_core.testing import CountingEmbedder, test_settings
from cache_core.writequeue import SyncWriteQueue

HOSTILE = ["acme} | @tenant:{*", "*", "a,b", " spaced ", "@model:{x}", "-negate", "(x|y)", "$param", "\\{}", "東京",
           "'quoted\"", "%fuzzy%", "~opt", "a:b", "[1 2]"]


@pytest.fixture
def cache(settings, redis_client, embedder):
    counting = CountingEmbedder(embedder)
    c = SemanticCache(settings, redis_client, counting)
    c.write_queue = SyncWriteQueue(lambda cmd: write_command(redis_client, settings, embedder, cmd))
    yield c
    c.close()


def store(cache, prompt, response, status=Status.APPROVED, **scope):
    scope.setdefault("tenant", "acme")
    cmd = WriteCommand(prompt=prompt, response=response, scope=Scope(**scope))
    return write_command(cache.client, cache.settings, cache.embedder.inner, cmd, status=status)[0]


def test_paraphrase_hits_and_unrelated_prompt_misses(cache):
    store(cache, "How do I reset my password?", "Click 'Forgot password' on the login page.")
    hit = cache.lookup("how can i reset my password", {"tenant": "acme"})
    assert hit.hit and hit.strategy == "semantic" and hit.similarity >= 0.9
    assert hit.entry.response == "Click 'Forgot password' on the login page."
    assert hit.embed_ms > 0 and hit.search_ms > 0 and hit.total_ms >= hit.search_ms
    miss = cache.lookup("What is the weather in Paris tomorrow?", {"tenant": "acme"})
    assert not miss.hit and miss.entry is None and miss.similarity < 0.5 and miss.degraded is None


def test_threshold_is_per_call_and_per_scope(cache):
    store(cache, "How do I reset my password?", "answer")
    near = cache.lookup("I forgot my password, what now?", {"tenant": "acme"})
    assert not near.hit and 0.5 < near.similarity < 0.9
    assert cache.lookup("I forgot my password, what now?", {"tenant": "acme"}, min_similarity=0.5).hit
    # per-scope calibration record, read in the same round trip as the exact check
    token = Scope(tenant="acme").tags()["tenant"]
    cache.client.hset(cache.settings.key("calibration"), f"t:{token}", json.dumps({"min_similarity": 0.5}))
    calibrated = cache.lookup("I forgot my password, what now?", {"tenant": "acme"})
    assert calibrated.hit and calibrated.threshold == 0.5
    assert not cache.lookup("I forgot my password, what now?", {"tenant": "other"}).hit


@pytest.mark.parametrize("field", ["tenant", "locale", "model"])
def test_identical_prompt_misses_across_every_scope_boundary(cache, field):
    store(cache, "What is our refund policy?", "30 days.", tenant="acme", locale="en", model="v1")
    scope = {"tenant": "acme", "locale": "en", "model": "v1"}
    assert cache.lookup("What is our refund policy?", scope).hit
    other = {**scope, field: scope[field] + "-other"}
    result = cache.lookup("What is our refund policy?", other)
    assert not result.hit
    upper = {**scope, field: scope[field].upper()}  # scope values are case-sensitive
    assert not cache.lookup("What is our refund policy?", upper).hit


def test_extra_scope_fields_are_hard_boundaries(make_settings, redis_client, embedder):
    settings = make_settings(extra_scope_fields="region")
    cache = SemanticCache(settings, redis_client, embedder)
    write_command(redis_client, settings, embedder, WriteCommand(
        prompt="Which plan fits me?", response="eu answer", scope=Scope(tenant="a", extra={"region": "eu"})))
    assert cache.lookup("which plan fits me", {"tenant": "a", "extra": {"region": "eu"}}).hit
    assert not cache.lookup("Which plan fits me?", {"tenant": "a", "extra": {"region": "us"}}).hit
    assert not cache.lookup("Which plan fits me?", {"tenant": "a"}).hit
    with pytest.raises(InvalidInput):
        cache.lookup("x", {"tenant": "a", "extra": {"undeclared": "1"}})


def test_exact_match_skips_the_embedder(cache):
    store(cache, "Where is my invoice?", "In Billing.")
    before = cache.embedder.texts
    result = cache.lookup("  WHERE is my invoice ", {"tenant": "acme"})
    assert result.hit and result.strategy == "exact" and result.similarity == 1.0 and result.embed_ms == 0
    assert cache.embedder.texts == before


def test_expired_entries_miss(cache):
    eid = store(cache, "What time does the shop open?", "9am.")
    key = cache.settings.key_prefix + eid
    assert cache.client.ttl(key) > 0  # every document carries its TTL
    # an entry whose expires_at has passed is never served, even before Redis reaps the key
    cache.client.execute_command("JSON.SET", key, "$.expires_at", json.dumps(time.time() - 1))
    assert not cache.lookup("What time does the shop open?", {"tenant": "acme"}).hit
    assert not cache.lookup("when does the shop open", {"tenant": "acme"}, min_similarity=0.5).hit
    # and a key Redis expires leaves the index
    eid2 = store(cache, "What time does the shop close?", "6pm.")
    cache.client.pexpire(cache.settings.key_prefix + eid2, 50)
    time.sleep(0.2)
    assert not cache.lookup("What time does the shop close?", {"tenant": "acme"}, min_similarity=0.5).hit


@pytest.mark.parametrize("status", [Status.PENDING_REVIEW, Status.REJECTED])
def test_held_and_rejected_entries_never_hit(cache, status):
    store(cache, "Tell me the admin password", "hunter2", status=status)
    assert not cache.lookup("Tell me the admin password", {"tenant": "acme"}).hit
    assert not cache.lookup("tell me the admin password please", {"tenant": "acme"}, min_similarity=0.1).hit


def test_approving_makes_an_entry_servable(cache):
    eid = store(cache, "How long is shipping?", "3 days.", status=Status.PENDING_REVIEW)
    assert not cache.lookup("How long is shipping?", {"tenant": "acme"}).hit
    assert set_status(cache.client, cache.settings, eid, Status.APPROVED, by="mod")
    assert cache.lookup("How long is shipping?", {"tenant": "acme"}).hit


@pytest.mark.parametrize("value", HOSTILE)
def test_query_syntax_in_scope_values_matches_only_itself(cache, value):
    store(cache, "What is the SLA?", f"sla for {value}", tenant=value, locale=value, model=value)
    same = {"tenant": value, "locale": value, "model": value}
    hit = cache.lookup("what's the SLA", same, min_similarity=0.5)
    assert hit.hit and hit.entry.response == f"sla for {value}"
    for other in ("*", "acme", value + "x", value.strip() or "y"):
        if other == value:
            continue
        assert not cache.lookup("What is the SLA?", {**same, "tenant": other}, min_similarity=-1).hit


@pytest.mark.parametrize("prompt", ["@tenant:{*}", "*", "=>[KNN 100 @embedding $vec]", "\\", "$vec", "}{)(|~%"])
def test_query_syntax_in_prompts_is_inert(cache, prompt):
    store(cache, prompt, "ok")
    assert cache.lookup(prompt, {"tenant": "acme"}).hit
    assert not cache.lookup(prompt, {"tenant": "someone-else"}).hit


def test_invalid_prompts_are_clear_errors(cache):
    for bad in ("", "   ", "x" * (cache.settings.max_prompt_chars + 1), "nul\x00byte"):
        with pytest.raises(InvalidInput):
            cache.lookup(bad, {"tenant": "acme"})
    with pytest.raises(InvalidInput):
        cache.lookup("ok", {"tenant": ""})
    with pytest.raises(InvalidInput):
        cache.lookup("ok", {"tenant": "a" * 1000})


def test_long_prompts_are_truncated_by_the_model_not_crashed_on(cache):
    long_prompt = "Explain the refund policy in detail. " * 200  # far beyond MiniLM's 256 word pieces
    result = cache.lookup(long_prompt, {"tenant": "acme"})
    assert not result.hit and result.degraded is None


def test_read_through_generates_once_then_hits(cache):
    calls = []

    def generate():
        calls.append(1)
        return Generated(response="Paris.", metadata={"prompt_tokens": 12, "completion_tokens": 3})

    first = cache.get_or_generate("What is the capital of France?", {"tenant": "acme"}, generate)
    assert not first.cached and first.response == "Paris." and calls == [1]
    second = cache.get_or_generate("what's the capital of france", {"tenant": "acme"}, generate)
    assert second.cached and second.response == "Paris." and calls == [1]
    third = cache.get_or_generate("Which city is the capital of France?", {"tenant": "acme"}, generate)
    assert third.cached and calls == [1]


def test_read_path_never_writes_entries(cache):
    cache.write_queue = SyncWriteQueue(lambda cmd: None)  # a queue that drops writes
    cache.get_or_generate("Nothing should be stored", {"tenant": "acme"}, lambda: "x")
    keys = list(cache.client.scan_iter(match=cache.settings.key_prefix + "*"))
    assert keys == []


def test_uncacheable_generations_are_not_enqueued(cache):
    seen = []
    cache.write_queue = SyncWriteQueue(seen.append)
    cache.get_or_generate("p1", {"tenant": "acme"}, lambda: Generated(response="r", cacheable=False))
    cache.get_or_generate("p2", {"tenant": "acme"}, lambda: "r2")
    assert [c.prompt for c in seen] == ["p2"] and len(seen[0].embedding) == 384


@pytest.fixture
def own_redis(tmp_path):
    server = EmbeddedRedis(tmp_path / "own", appendonly=False)
    server.start()
    yield server
    if server.process.poll() is None:
        os.kill(server.process.pid, signal.SIGCONT)
    server.stop()


def test_redis_killed_or_hung_mid_run_gives_a_bounded_miss(own_redis, tmp_path, embedder):
    settings = test_settings(own_redis.url, data_dir=tmp_path, redis_timeout_ms=50, breaker_cooldown_ms=200)
    client = make_client(own_redis.url, timeout_ms=settings.redis_timeout_ms)
    cache = SemanticCache(settings, client, embedder)
    write_command(client, settings, embedder, WriteCommand(prompt="hello there", response="hi",
                                                           scope=Scope(tenant="a")))
    assert cache.lookup("hello there", {"tenant": "a"}).hit
    # hung server (SIGSTOP): the socket timeout bounds the lookup
    os.kill(own_redis.process.pid, signal.SIGSTOP)
    try:
        hung = cache.lookup("hello there", {"tenant": "a"})
        assert not hung.hit and hung.degraded
        assert hung.total_ms < 2000  # bounded by the 50 ms socket timeout (generous margin for a loaded machine)
        fast = cache.lookup("hello there", {"tenant": "a"})  # breaker open: a miss at once, no Redis call
        assert fast.degraded and "breaker" in fast.degraded
        answer = cache.get_or_generate("hello there", {"tenant": "a"}, lambda: "from the LLM")
        assert answer.response == "from the LLM" and not answer.cached
    finally:
        os.kill(own_redis.process.pid, signal.SIGCONT)
    time.sleep(0.3)  # breaker cooldown passes; Redis answers again
    assert cache.lookup("hello there", {"tenant": "a"}).hit
    # killed server: connection refused is a miss too
    own_redis.process.kill()
    own_redis.process.wait()
    dead = cache.lookup("hello there", {"tenant": "a"})
    assert not dead.hit and dead.degraded
    strict = SemanticCache(settings, client, embedder, ensure=False, strict=True)
    with pytest.raises(BackendUnavailable):
        strict.lookup("hello there", {"tenant": "a"})
