"""Request coalescing: concurrent misses for the same prompt and scope make one ``generate`` call.

Real Redis, real model, real threads. The leader's ``generate`` blocks until every follower is waiting for its
answer (observed on the in-flight future's condition, not guessed with a sleep), so the test does not depend on
the machine's speed.
"""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from cache_core.cache import SemanticCache
from cache_core.schema import entry_id
from cache_core.writequeue import SyncWriteQueue

N = 8


def _waiters(cache: SemanticCache, key: str) -> int:
    """Threads blocked in ``result()`` of the in-flight future of ``key`` (0 when there is none)."""
    future = cache._inflight.get(key)
    if future is None:
        return 0
    return len(future._condition._waiters)  # a Condition keeps one lock per waiting thread


def _wait_for(predicate, timeout: float = 30.0) -> bool:
    done = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return True
        done.wait(0.01)
    return predicate()


@pytest.fixture
def cache(settings, redis_client, embedder):
    written = []
    c = SemanticCache(settings, redis_client, embedder, write_queue=SyncWriteQueue(written.append))
    c.written = written
    yield c
    c.close()


def test_concurrent_misses_make_one_generate_call(cache):
    scope = {"tenant": f"coalesce-{uuid.uuid4().hex[:8]}"}
    prompt = "How many moons does Jupiter have?"
    key = entry_id(prompt, cache.scope(scope))
    calls = []

    def generate():
        calls.append(threading.get_ident())
        assert _wait_for(lambda: _waiters(cache, key) == N - 1), "the followers never waited for the leader"
        return "Jupiter has 95 known moons."

    with ThreadPoolExecutor(N) as pool:
        answers = list(pool.map(lambda _: cache.get_or_generate(prompt, scope, generate), range(N)))

    assert len(calls) == 1
    assert {a.response for a in answers} == {"Jupiter has 95 known moons."}
    assert sum(a.coalesced for a in answers) == N - 1
    assert not any(a.cached for a in answers)
    assert len(cache.written) == 1  # one write for the one generated answer, not N
    assert key not in cache._inflight  # nothing left behind


def test_different_scopes_are_not_coalesced(cache):
    prompt = "What is the boiling point of water?"
    tenants = [f"scope-{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
    started = threading.Barrier(len(tenants))
    calls = []

    def generate():
        calls.append(1)
        started.wait(timeout=30)  # all three generate at the same time: none waited for another
        return "100 degrees Celsius at sea level."

    with ThreadPoolExecutor(len(tenants)) as pool:
        answers = list(pool.map(lambda t: cache.get_or_generate(prompt, {"tenant": t}, generate), tenants))

    assert len(calls) == 3
    assert not any(a.coalesced for a in answers)


def test_followers_generate_themselves_when_the_leader_is_too_slow(cache):
    scope = {"tenant": f"slow-{uuid.uuid4().hex[:8]}"}
    prompt = "Summarize the plot of Hamlet."
    key = entry_id(prompt, cache.scope(scope))
    release = threading.Event()
    calls = []
    lock = threading.Lock()

    def generate():
        with lock:
            calls.append(1)
            leader = len(calls) == 1
        if leader:  # hold the leader until every follower gave up waiting and generated for itself
            assert _wait_for(lambda: len(calls) == N, timeout=60)
            release.set()
        return "A prince avenges his father."

    with ThreadPoolExecutor(N) as pool:
        answers = list(pool.map(
            lambda _: cache.get_or_generate(prompt, scope, generate, coalesce_timeout_s=0.05), range(N)))

    assert release.is_set()
    assert len(calls) == N  # the wait is bounded: nobody waited forever for the slow leader
    assert {a.response for a in answers} == {"A prince avenges his father."}
    assert key not in cache._inflight


def test_a_failing_leader_does_not_fail_the_followers(cache):
    scope = {"tenant": f"fail-{uuid.uuid4().hex[:8]}"}
    prompt = "Translate 'good morning' to Italian."
    key = entry_id(prompt, cache.scope(scope))
    calls = []
    lock = threading.Lock()

    def generate():
        with lock:
            calls.append(1)
            leader = len(calls) == 1
        if leader:
            assert _wait_for(lambda: _waiters(cache, key) == N - 1)
            raise RuntimeError("upstream LLM failed")
        return "Buongiorno."

    def call(_):
        try:
            return cache.get_or_generate(prompt, scope, generate).response
        except RuntimeError as exc:
            return f"error: {exc}"

    with ThreadPoolExecutor(N) as pool:
        results = list(pool.map(call, range(N)))

    assert results.count("error: upstream LLM failed") == 1  # only the leader's caller sees its failure
    assert results.count("Buongiorno.") == N - 1
    assert key not in cache._inflight
