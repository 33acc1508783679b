"""The read path for asyncio apps: :class:`AsyncSemanticCache`.

It runs the same request/reply code as :class:`~cache_core.cache.SemanticCache` (exact check, calibration, the one
KNN query, the match policy, statistics, circuit breaker) and differs only in the I/O: Redis through
``redis.asyncio`` and the embedding model in a worker thread, so the event loop never blocks.

>>> cache = await AsyncSemanticCache.open(Settings())                       # doctest: +SKIP
>>> answer = await cache.get_or_generate("What is 2+2?", {"tenant": "t"}, ask_llm)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, Mapping, Sequence

import numpy as np
import redis
import redis.asyncio as aioredis

from .cache import Answer, Generated, ScopeLike, SemanticCache
from .schema import LookupResult, Scope, entry_id
from .settings import Settings

__all__ = ["AsyncSemanticCache"]


class AsyncSemanticCache:
    """Async front of a :class:`SemanticCache` (which keeps the settings, embedder, policy, stats and queue)."""

    def __init__(self, core: SemanticCache, client: aioredis.Redis) -> None:
        self.core = core
        self.client = client
        self._inflight: dict[str, asyncio.Future] = {}

    @classmethod
    async def open(cls, settings: Settings, **kwargs: Any) -> "AsyncSemanticCache":
        """Like :meth:`SemanticCache.open` (embedded Redis or ``SEMCACHE_REDIS_URL``, model, index)."""
        core = await asyncio.to_thread(SemanticCache.open, settings, **kwargs)
        return cls(core, cls.client_for(core.handle.url, settings))

    @staticmethod
    def client_for(url: str, settings: Settings) -> aioredis.Redis:
        timeout = settings.redis_timeout_ms / 1000
        return aioredis.Redis.from_url(url, protocol=3, socket_timeout=timeout,
                                       socket_connect_timeout=max(timeout, 0.05))

    async def close(self) -> None:
        await self.client.aclose()
        await asyncio.to_thread(self.core.close)

    async def __aenter__(self) -> "AsyncSemanticCache":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def lookup(self, prompt: str, scope: ScopeLike, *, min_similarity: float | None = None) -> LookupResult:
        """Exact match, else one KNN with the scope pre-filter. Never writes an entry."""
        return (await self._lookup(prompt, self.core.scope(scope), min_similarity))[0]

    async def lookup_many(self, prompts: Sequence[str], scope: ScopeLike, *, min_similarity: float | None = None
                          ) -> list[LookupResult]:
        return list(await asyncio.gather(*(self.lookup(p, scope, min_similarity=min_similarity) for p in prompts)))

    async def _lookup(self, prompt: str, sc: Scope, min_similarity: float | None
                      ) -> tuple[LookupResult, np.ndarray | None]:
        core = self.core
        core._check_prompt(prompt)
        ctx = core._begin(prompt, sc, min_similarity)
        if core._breaker.is_open():
            return core._degraded(ctx, "redis unavailable (breaker open)"), None
        try:
            pipe = self.client.pipeline(transaction=False)
            for command in core._exact_request(ctx):
                pipe.execute_command(*command)
            replies = await pipe.execute()
        except (redis.RedisError, OSError, asyncio.TimeoutError) as exc:
            return core._failed(ctx, _as_redis_error(exc)), None
        result = core._exact_reply(ctx, replies)
        if result is not None:
            return result, None
        t0 = time.perf_counter()
        vector = (await asyncio.to_thread(core._embed, [prompt], sc))[0]
        embed_ms = (time.perf_counter() - t0) * 1000
        t1 = time.perf_counter()
        try:
            reply = await self.client.execute_command(*core._knn_request(ctx, vector))
        except (redis.RedisError, OSError, asyncio.TimeoutError) as exc:
            return core._failed(ctx, _as_redis_error(exc), embed_ms=embed_ms), vector
        ctx["search_ms"] += (time.perf_counter() - t1) * 1000
        return core._knn_answer(ctx, reply, embed_ms), vector

    async def get_or_generate(
        self,
        prompt: str,
        scope: ScopeLike,
        generate: Callable[[], Awaitable[str | Generated]],
        *,
        min_similarity: float | None = None,
        ttl_seconds: int | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Answer:
        """Answer from the cache, or await ``generate()`` and hand the answer to the write queue.

        Concurrent misses for the same prompt and scope on this event loop await one ``generate`` call.
        """
        sc = self.core.scope(scope)
        result, vector = await self._lookup(prompt, sc, min_similarity)
        if result.hit:
            return Answer(response=result.entry.response, cached=True, lookup=result)
        key = entry_id(prompt, sc)
        if key in self._inflight:
            response = await asyncio.shield(self._inflight[key])
            return Answer(response=response, cached=False, lookup=result, coalesced=True)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            produced = await generate()
            gen = produced if isinstance(produced, Generated) else Generated(response=str(produced))
            future.set_result(gen.response)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        finally:
            self._inflight.pop(key, None)
        # the write queue never blocks for long (WriteQueue contract): fine to call on the event loop
        task_id = self.core._enqueue(prompt, sc, gen, result, vector, ttl_seconds, metadata)
        return Answer(response=gen.response, cached=False, lookup=result, task_id=task_id)


def _as_redis_error(exc: BaseException) -> redis.RedisError:
    return exc if isinstance(exc, redis.RedisError) else redis.ConnectionError(str(exc) or type(exc).__name__)
