"""The asyncio read path shares the sync path's logic: same answers, same boundaries, same degradation."""

import asyncio

import pytest

from cache_core.aio import AsyncSemanticCache
from cache_core.cache import SemanticCache
from cache_core.embedded import free_port
from cache_core.schema import Scope, Status, WriteCommand
from cache_core.store import write_command
from cache_core.testing import test_settings
from cache_core.writequeue import SyncWriteQueue


@pytest.fixture
def caches(settings, redis_client, redis_url, embedder):
    sync = SemanticCache(settings, redis_client, embedder)
    sync.write_queue = SyncWriteQueue(lambda cmd: write_command(redis_client, settings, embedder, cmd))
    return sync, AsyncSemanticCache(sync, AsyncSemanticCache.client_for(redis_url, settings))


def seed(cache, prompt, response, status=Status.APPROVED, tenant="acme"):
    write_command(cache.client, cache.settings, cache.embedder,
                  WriteCommand(prompt=prompt, response=response, scope=Scope(tenant=tenant)), status=status)


def test_async_lookups_equal_sync_lookups(caches):
    sync, aio = caches
    seed(sync, "How do I reset my password?", "Use the reset link.")
    seed(sync, "Where is my invoice?", "Held answer", status=Status.PENDING_REVIEW)
    prompts = ["How do I reset my password?", "how can i reset my password", "Where is my invoice?",
               "What is the weather tomorrow?"]

    async def run():
        out = [await aio.lookup(p, {"tenant": "acme"}) for p in prompts]
        out.append(await aio.lookup("How do I reset my password?", {"tenant": "other"}))
        await aio.client.aclose()
        return out

    got = asyncio.run(run())
    want = [sync.lookup(p, {"tenant": "acme"}) for p in prompts] + [
        sync.lookup("How do I reset my password?", {"tenant": "other"})]
    assert [(r.hit, r.strategy, r.entry and r.entry.id) for r in got] == [
        (r.hit, r.strategy, r.entry and r.entry.id) for r in want]
    assert [r.hit for r in got] == [True, True, False, False, False]
    assert got[1].similarity == pytest.approx(want[1].similarity, abs=1e-5)


def test_async_read_through_coalesces_concurrent_misses(caches):
    sync, aio = caches
    calls = []

    async def generate():
        calls.append(1)
        await asyncio.sleep(0.2)
        return "Forty-two."

    async def run():
        answers = await asyncio.gather(*(aio.get_or_generate("What is the answer to everything?",
                                                             {"tenant": "acme"}, generate) for _ in range(5)))
        again = await aio.get_or_generate("what is the answer to everything", {"tenant": "acme"}, generate)
        await aio.client.aclose()
        return answers, again

    answers, again = asyncio.run(run())
    assert calls == [1]
    assert {a.response for a in answers} == {"Forty-two."} and sum(a.coalesced for a in answers) == 4
    assert again.cached and again.lookup.strategy == "exact"


def test_async_lookup_with_redis_gone_is_a_degraded_miss(tmp_path, embedder, redis_client, settings):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    core = SemanticCache(settings, redis_client, embedder)  # index lives on the session server
    aio = AsyncSemanticCache(core, AsyncSemanticCache.client_for(dead, test_settings(dead)))

    async def run():
        result = await aio.lookup("anything at all", {"tenant": "acme"})
        answer = await aio.get_or_generate("anything else", {"tenant": "acme"}, _llm)
        await aio.client.aclose()
        return result, answer

    result, answer = asyncio.run(run())
    assert not result.hit and result.degraded
    assert answer.response == "from the LLM" and not answer.cached


async def _llm():
    return "from the LLM"
