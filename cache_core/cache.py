"""The read path: :class:`SemanticCache`.

``lookup`` never writes an entry. It asks Redis at most twice:

1. one pipelined round trip for the exact match (``JSON.GET`` of the deterministic entry id: the normalized
   prompt's hash within the scope, no embedding needed) and the scope's calibrated parameters;
2. on no exact hit, the prompt is embedded and one ``FT.SEARCH`` KNN runs with the scope tags,
   ``@status:{approved}`` and the expiry as a pre-filter in the same query.

A slow or dead Redis makes a lookup a miss within ``SEMCACHE_REDIS_TIMEOUT_MS`` (then, for
``SEMCACHE_BREAKER_COOLDOWN_MS``, a miss at once); ``strict=True`` raises :class:`BackendUnavailable` instead.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import redis
from pydantic import BaseModel, Field, ValidationError, field_validator

from .embedder import CachedEmbedder, Embedder
from .errors import BackendUnavailable, InvalidInput
from .index import IndexSpec, alias_name, ensure_index
from .policy import MatchPolicy, make_policy
from .query import VIEW_PATHS, Candidate, knn_query, parse_knn, scope_filter, search_args, search_timed_out
from .schema import EntryView, LookupResult, Scope, Status, WriteCommand, entry_id, normalize_prompt
from .settings import Settings
from .stats import StatsRecorder
from .writequeue import NullWriteQueue, WriteQueue

__all__ = ["SemanticCache", "Generated", "Answer", "ScopeLike", "check_group", "GROUP_MAX_CHARS"]

log = logging.getLogger(__name__)

ScopeLike = Scope | Mapping[str, Any]


GROUP_MAX_CHARS = 128
_GROUP_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_group(value: str) -> str:
    """An explicit answer group as given, or ValueError: 1 to 128 characters, not blank, no control characters.

    The one rule for every place a write starts (``Generated``, ``POST /api/v1/entries``, the proxy's
    ``X-Semcache-Group`` header). Entries of one group are what the consensus policy counts as the same answer.

    >>> check_group("kb:doc-42#s3")
    'kb:doc-42#s3'
    >>> check_group(" ")
    Traceback (most recent call last):
    ...
    ValueError: group must not be blank
    """
    if not isinstance(value, str) or not 1 <= len(value) <= GROUP_MAX_CHARS:
        raise ValueError(f"group must be 1 to {GROUP_MAX_CHARS} characters")
    if not value.strip():
        raise ValueError("group must not be blank")
    if _GROUP_CONTROL.search(value):
        raise ValueError("group must not contain control characters")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("group contains a lone surrogate (invalid UTF-8)") from None
    return value


class Generated(BaseModel):
    """What a ``generate`` callback may return instead of a plain string.

    ``group`` names the answer's source when the app knows it (a RAG document id, a router's label): entries of
    one group count as the same answer for the consensus policy, and the worker does not ask its judge about them.
    """

    response: str
    flags: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)
    finish_reason: str | None = None
    ttl_seconds: int | None = None
    cacheable: bool = True
    group: str | None = None

    @field_validator("group")
    @classmethod
    def _group(cls, value: str | None) -> str | None:
        return None if value is None else check_group(value)


class Answer(BaseModel):
    """The result of :meth:`SemanticCache.get_or_generate`."""

    response: str
    cached: bool
    lookup: LookupResult
    task_id: str | None = None
    coalesced: bool = False


@dataclass
class _Breaker:
    cooldown_s: float
    open_until: float = 0.0
    failures: int = 0
    last_log: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def is_open(self) -> bool:
        return time.monotonic() < self.open_until

    def trip(self, exc: Exception) -> None:
        with self.lock:
            self.failures += 1
            self.open_until = time.monotonic() + self.cooldown_s
            if time.monotonic() - self.last_log > 10:  # one line per 10 s, not one per lookup
                self.last_log = time.monotonic()
                log.warning("Redis failed on the read path (%s); lookups are misses for %.1fs", exc, self.cooldown_s)


class SemanticCache:
    """Semantic cache over one Redis Search index.

    >>> cache = SemanticCache.open(Settings())                                # doctest: +SKIP
    >>> cache.lookup("What is the capital of France?", {"tenant": "acme"})    # doctest: +SKIP
    LookupResult(hit=False, ...)
    """

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        embedder: Embedder,
        *,
        write_queue: WriteQueue | None = None,
        policy: MatchPolicy | None = None,
        stats: StatsRecorder | None = None,
        ensure: bool = True,
        strict: bool | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.embedder = embedder
        self.write_queue = write_queue or NullWriteQueue()
        self.policy = policy or make_policy(settings.policy, settings)
        # a scope's calibration may name another policy (``semcache calibrate --policy``): built once, on demand
        self._policies: dict[str, MatchPolicy] = {self.policy.name: self.policy}
        self.stats = stats
        self.strict = settings.strict if strict is None else strict
        self.index_name = alias_name(settings)
        self.spec = IndexSpec(settings=settings, dim=embedder.dim, model_name=embedder.name)
        self._breaker = _Breaker(settings.breaker_cooldown_ms / 1000)
        self._inflight: dict[str, Future] = {}
        self._scope_sizes: dict[str, tuple[int, float]] = {}  # scope key -> (approved entries, re-count after)
        self._inflight_lock = threading.Lock()
        self.enqueue_failures = 0
        if ensure:
            ensure_index(client, self.spec)

    @classmethod
    def open(cls, settings: Settings, *, embedder: Embedder | None = None, write_queue: WriteQueue | None = None,
             stats: bool = True, **kwargs: Any) -> "SemanticCache":
        """Connect (or start the embedded Redis), load the model, check or create the index.

        The returned cache owns its Redis handle: call :meth:`close`.
        """
        from .connection import open_redis
        from .embedder import load_embedder

        handle = open_redis(settings)
        try:
            embedder = embedder or load_embedder(settings.model, backend=settings.embedding_backend,
                                                 cache_size=settings.embedding_cache_size, data_dir=settings.data_dir,
                                                 precision=settings.embedding_precision)
            ensure_index(handle.writer(), IndexSpec(settings=settings, dim=embedder.dim, model_name=embedder.name))
            recorder = StatsRecorder(handle.writer(), settings) if stats else None
            cache = cls(settings, handle.reader(), embedder, write_queue=write_queue, stats=recorder, ensure=False,
                        **kwargs)
        except Exception:
            handle.close()
            raise
        cache.handle = handle
        return cache

    def close(self) -> None:
        if self.stats:
            self.stats.close()
        handle = getattr(self, "handle", None)
        if handle is not None:
            handle.close()

    def __enter__(self) -> "SemanticCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- validation ----------------------------------------------------------------------------------------
    def scope(self, scope: ScopeLike) -> Scope:
        """Validate a scope (a :class:`Scope` or a mapping) against the settings."""
        try:
            value = scope if isinstance(scope, Scope) else Scope.model_validate(dict(scope))
        except ValidationError as exc:
            raise InvalidInput(f"invalid scope: {exc.errors()[0]['msg']}", field="scope") from exc
        except (TypeError, ValueError) as exc:  # not a mapping at all (None, a list, a number): issue 7 fuzzing
            raise InvalidInput(f"invalid scope: a mapping, not {type(scope).__name__}", field="scope") from exc
        limit = self.settings.max_scope_value_chars
        for name in ("tenant", "locale", "model"):
            if len(getattr(value, name)) > limit:
                raise InvalidInput(f"longer than {limit} characters", field=f"scope.{name}")
        unknown = set(value.extra) - set(self.settings.extra_scope_fields)
        if unknown:
            raise InvalidInput(f"unknown extra scope fields {sorted(unknown)} (declared: "
                               f"{self.settings.extra_scope_fields or 'none'})", field="scope.extra")
        if any(len(v) > limit for v in value.extra.values()):
            raise InvalidInput(f"longer than {limit} characters", field="scope.extra")
        return value

    def _check_prompt(self, prompt: str) -> None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidInput("must be a non-empty string", field="prompt")
        if len(prompt) > self.settings.max_prompt_chars:
            raise InvalidInput(f"longer than {self.settings.max_prompt_chars} characters", field="prompt")
        if "\x00" in prompt or any(0xD800 <= ord(c) <= 0xDFFF for c in prompt):
            raise InvalidInput("contains NUL or invalid UTF-8", field="prompt")

    # --- the read path -------------------------------------------------------------------------------------
    def lookup(self, prompt: str, scope: ScopeLike, *, min_similarity: float | None = None) -> LookupResult:
        """Exact match, else one KNN with the scope pre-filter. Never writes an entry."""
        return self._lookup(prompt, self.scope(scope), min_similarity)[0]

    def lookup_many(self, prompts: Sequence[str], scope: ScopeLike, *, min_similarity: float | None = None
                    ) -> list[LookupResult]:
        """Several prompts of one scope: the misses of the exact check are embedded in one batch."""
        sc = self.scope(scope)
        for p in prompts:
            self._check_prompt(p)
        pending = [self._exact_phase(p, sc, min_similarity) for p in prompts]
        todo = [i for i, (res, _) in enumerate(pending) if res is None]
        vectors: np.ndarray | None = None
        embed_ms = 0.0
        if todo:
            t0 = time.perf_counter()
            vectors = self._embed([prompts[i] for i in todo], sc)
            embed_ms = (time.perf_counter() - t0) * 1000 / len(todo)
        results: list[LookupResult] = []
        row = {i: n for n, i in enumerate(todo)}
        for i, (res, ctx) in enumerate(pending):
            if res is None:
                res = self._semantic_phase(ctx, vectors[row[i]], embed_ms)
            results.append(res)
        return results

    def _lookup(self, prompt: str, sc: Scope, min_similarity: float | None) -> tuple[LookupResult, np.ndarray | None]:
        self._check_prompt(prompt)
        result, ctx = self._exact_phase(prompt, sc, min_similarity)
        if result is not None:
            return result, None
        t0 = time.perf_counter()
        vector = self._embed([prompt], sc)[0]
        embed_ms = (time.perf_counter() - t0) * 1000
        return self._semantic_phase(ctx, vector, embed_ms), vector

    def _embed(self, texts: list[str], sc: Scope) -> np.ndarray:
        """The vectors of ``texts`` for a lookup in ``sc``: the model's LRU is asked in the tenant's own partition.

        Issue 15: a shared LRU answered tenant B at once with the vector of a prompt tenant A had just asked, and
        the time of B's lookup told B so. Same-tenant repeats keep the LRU's speedup.
        """
        if isinstance(self.embedder, CachedEmbedder):
            return self.embedder.embed(texts, partition=sc.tenant)
        return self.embedder.embed(texts)

    # Each phase is a request (the Redis commands to send) and a reply (what the answer means), so the sync path
    # here and the asyncio path (cache_core.aio) share everything but the I/O.
    def _begin(self, prompt: str, sc: Scope, min_similarity: float | None) -> dict:
        return {"t0": time.perf_counter(), "scope": sc, "prompt": prompt, "lookup_id": uuid.uuid4().hex,
                "min": min_similarity, "params": {}}

    def _exact_request(self, ctx: dict) -> list[tuple]:
        """The first round trip: the exact entry (by its deterministic id) and the scope's calibration."""
        sc = ctx["scope"]
        key = self.settings.key_prefix + entry_id(ctx["prompt"], sc)
        commands = [("JSON.GET", key, *(f"$.{p}" for p in VIEW_PATHS)),
                    ("HMGET", self.settings.key("calibration"), "*", f"t:{sc.tags()['tenant']}")]
        size = self._scope_sizes.get(self._scope_key(sc))
        if self.settings.hybrid_batches_min and (size is None or size[1] < time.monotonic()):
            # how many entries the scope holds (a count of the tag filter, no documents), re-read once a minute
            filt, params = scope_filter(sc, self.settings.extra_scope_fields, status=Status.APPROVED)
            args = [item for name, value in params.items() for item in (name, value)]
            commands.append(("FT.SEARCH", self.index_name, filt, "PARAMS", str(len(args)), *args,
                             "LIMIT", "0", "0", "DIALECT", "2"))
        return commands

    def _scope_key(self, sc: Scope) -> str:
        return "|".join(sc.tags(self.settings.extra_scope_fields).values())

    def _exact_reply(self, ctx: dict, replies: list[Any]) -> LookupResult | None:
        raw, calibration = replies[:2]
        if len(replies) > 2:
            self._scope_sizes[self._scope_key(ctx["scope"])] = (_total(replies[2]), time.monotonic() + 60)
            if len(self._scope_sizes) > 10_000:  # a bound on the memo, not an LRU: dropping it costs one count
                self._scope_sizes.clear()
        ctx["params"] = _merge_params(calibration)
        ctx["threshold"] = self._threshold(ctx)
        ctx["search_ms"] = (time.perf_counter() - ctx["t0"]) * 1000
        if raw:
            entry = _exact_entry(raw, ctx["scope"], ctx["prompt"])
            if entry is not None:
                return self._finish(ctx, entry, 1.0, "exact", embed_ms=0.0)
        return None

    def _exact_phase(self, prompt: str, sc: Scope, min_similarity: float | None):
        ctx = self._begin(prompt, sc, min_similarity)
        if self._breaker.is_open():
            return self._degraded(ctx, "redis unavailable (breaker open)"), ctx
        try:
            pipe = self.client.pipeline(transaction=False)
            for command in self._exact_request(ctx):
                pipe.execute_command(*command)
            replies = pipe.execute()
        except redis.RedisError as exc:
            return self._failed(ctx, exc), ctx
        return self._exact_reply(ctx, replies), ctx

    def _threshold(self, ctx: dict) -> float:
        if ctx["min"] is not None:
            return float(ctx["min"])
        return float(ctx["params"].get("min_similarity", self.settings.min_similarity))

    def _semantic_phase(self, ctx: dict, vector: np.ndarray, embed_ms: float) -> LookupResult:
        if "threshold" not in ctx:  # the exact phase already failed: ctx carries a degraded result
            return ctx["result"]
        t1 = time.perf_counter()
        try:
            reply = self.client.execute_command(*self._knn_request(ctx, vector))
        except redis.RedisError as exc:
            return self._failed(ctx, exc, embed_ms=embed_ms)
        ctx["search_ms"] += (time.perf_counter() - t1) * 1000
        return self._knn_answer(ctx, reply, embed_ms)

    def _knn_answer(self, ctx: dict, reply: Any, embed_ms: float) -> LookupResult:
        """What the KNN reply means; a reply the server's search timeout cut short is a degraded miss.

        Issue 15: under ``ON_TIMEOUT RETURN`` (RediSearch's default) a timed-out KNN answers with the documents it
        had found so far, not the nearest ones: the policy would serve a farther entry as the nearest, or widen
        its radius for want of the competing group it never saw. A timeout is a slow server, not a miss.
        """
        if search_timed_out(reply):
            return self._degraded(ctx, "search timed out (partial results are not served)", embed_ms=embed_ms)
        return self._knn_reply(ctx, parse_knn(reply), embed_ms)

    def _knn_reply(self, ctx: dict, candidates: list[Candidate], embed_ms: float) -> LookupResult:
        chosen = self._policy_for(ctx["params"]).choose(candidates, ctx["threshold"], ctx["params"])
        if chosen is None:
            best = candidates[0].similarity if candidates else None
            return self._finish(ctx, None, best, None, embed_ms=embed_ms, candidates=candidates)
        try:
            entry = EntryView.model_validate(chosen.fields)
        except ValidationError:  # a document from another writer or schema: never served, never crashed on
            log.warning("skipping malformed entry %s", chosen.key)
            return self._finish(ctx, None, chosen.similarity, None, embed_ms=embed_ms)
        return self._finish(ctx, entry, chosen.similarity, "semantic", embed_ms=embed_ms, candidates=candidates)

    def _knn_request(self, ctx: dict, vector: np.ndarray) -> list[Any]:
        """The one FT.SEARCH: the k nearest approved, unexpired entries of the scope, nearest first."""
        s = self.settings
        filt, params = scope_filter(ctx["scope"], s.extra_scope_fields, status=Status.APPROVED, now=time.time())
        k = _calibrated_k(ctx["params"], s.knn_k)
        size = self._scope_sizes.get(self._scope_key(ctx["scope"]), (0, 0.0))[0]
        batches = bool(s.hybrid_batches_min) and size >= s.hybrid_batches_min
        query, params = knn_query(filt, params, vector, k=k, ef_runtime=s.hnsw_ef_runtime, vector_type=s.vector_type,
                                  batches=batches)
        return search_args(self.index_name, query, params, k)

    def _knn(self, ctx: dict, vector: np.ndarray) -> list[Candidate]:
        reply = self.client.execute_command(*self._knn_request(ctx, vector))
        if search_timed_out(reply):  # partial neighbours would mislead an evaluation as much as a lookup
            raise BackendUnavailable("the search timed out: Redis returned partial results")
        return parse_knn(reply)

    def _policy_for(self, params: Mapping[str, Any]) -> MatchPolicy:
        name = params.get("policy")
        if not isinstance(name, str) or name == self.policy.name:
            return self.policy
        if name not in self._policies:
            try:
                self._policies[name] = make_policy(name, self.settings)
            except ValueError:
                log.warning("calibration names an unknown policy %r; using %s", name, self.policy.name)
                return self.policy
        return self._policies[name]

    def candidates(self, prompt: str, scope: ScopeLike, *, vector: np.ndarray | None = None
                   ) -> tuple[list[Candidate], float, dict[str, Any]]:
        """What the policy would see for ``prompt``: the k nearest approved entries (nearest first), the
        threshold and the scope's calibrated parameters. For evaluation and explanations; raises on Redis errors.
        """
        sc = self.scope(scope)
        self._check_prompt(prompt)
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(self.settings.key("calibration"), ["*", f"t:{sc.tags()['tenant']}"])
        try:
            (calibration,) = pipe.execute()
            ctx = {"scope": sc, "params": _merge_params(calibration), "min": None}
            if vector is None:
                vector = self._embed([prompt], sc)[0]
            return self._knn(ctx, vector), self._threshold(ctx), ctx["params"]
        except redis.RedisError as exc:
            raise BackendUnavailable(f"Redis failed while fetching candidates: {exc}") from exc

    def _finish(self, ctx: dict, entry: EntryView | None, similarity: float | None, strategy: str | None, *,
                embed_ms: float, candidates: list[Candidate] | None = None) -> LookupResult:
        total = (time.perf_counter() - ctx["t0"]) * 1000
        result = LookupResult(
            hit=entry is not None, entry=entry, similarity=similarity, strategy=strategy,
            lookup_id=ctx["lookup_id"], embed_ms=embed_ms, search_ms=ctx.get("search_ms", 0.0), total_ms=total,
            threshold=ctx.get("threshold"),
        )  # fmt: skip
        if self.stats is not None:
            saved = None
            if entry is not None:
                meta = entry.metadata
                saved = {k: float(meta[k]) for k in ("prompt_tokens", "completion_tokens")
                         if isinstance(meta.get(k), (int, float))}
            logged = None
            if entry is not None and self.settings.feedback_window_s > 0:  # what feedback on this hit will need
                logged = (ctx["lookup_id"], entry.id, float(similarity or 0.0), strategy, ctx["scope"])
            self.stats.record(outcome="hit" if entry else "miss", strategy=strategy, total_ms=total,
                              embed_ms=embed_ms, search_ms=result.search_ms,
                              entry_id=entry.id if entry else None, saved=saved, lookup=logged)
        return result

    def _failed(self, ctx: dict, exc: Exception, *, embed_ms: float = 0.0) -> LookupResult:
        self._breaker.trip(exc)
        if self.strict:
            raise BackendUnavailable(f"Redis failed during lookup: {exc}") from exc
        return self._degraded(ctx, f"redis error: {type(exc).__name__}", embed_ms=embed_ms)

    def _degraded(self, ctx: dict, why: str, *, embed_ms: float = 0.0) -> LookupResult:
        if self.strict:
            raise BackendUnavailable(why)
        total = (time.perf_counter() - ctx["t0"]) * 1000
        result = LookupResult(hit=False, lookup_id=ctx["lookup_id"], embed_ms=embed_ms, total_ms=total, degraded=why)
        ctx["result"] = result
        if self.stats is not None:
            self.stats.record(outcome="degraded", strategy=None, total_ms=total, embed_ms=embed_ms, search_ms=0.0)
        return result

    # --- read-through --------------------------------------------------------------------------------------
    def get_or_generate(
        self,
        prompt: str,
        scope: ScopeLike,
        generate: Callable[[], str | Generated],
        *,
        min_similarity: float | None = None,
        ttl_seconds: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        coalesce_timeout_s: float = 120.0,
    ) -> Answer:
        """Answer from the cache, or call ``generate()`` and hand the answer to the write queue.

        Concurrent misses for the same prompt and scope in this process make one ``generate`` call; the others
        wait for it (at most ``coalesce_timeout_s``, then call ``generate`` themselves).
        """
        sc = self.scope(scope)
        result, vector = self._lookup(prompt, sc, min_similarity)
        if result.hit:
            return Answer(response=result.entry.response, cached=True, lookup=result)
        key = entry_id(prompt, sc)
        with self._inflight_lock:
            leader = key not in self._inflight
            future = self._inflight.setdefault(key, Future()) if leader else self._inflight[key]
        if not leader:
            try:
                response = future.result(timeout=coalesce_timeout_s)
                return Answer(response=response, cached=False, lookup=result, coalesced=True)
            except Exception:  # noqa: BLE001 - the leader failed or was too slow: generate for ourselves
                return self._generate_and_enqueue(prompt, sc, generate, result, vector, ttl_seconds, metadata)
        try:
            answer = self._generate_and_enqueue(prompt, sc, generate, result, vector, ttl_seconds, metadata)
            future.set_result(answer.response)
            return answer
        except BaseException as exc:
            future.set_exception(exc)
            raise
        finally:
            with self._inflight_lock:
                self._inflight.pop(key, None)

    def _generate_and_enqueue(self, prompt, sc, generate, result, vector, ttl_seconds, metadata) -> Answer:
        produced = generate()
        gen = produced if isinstance(produced, Generated) else Generated(response=str(produced))
        task_id = self._enqueue(prompt, sc, gen, result, vector, ttl_seconds, metadata)
        return Answer(response=gen.response, cached=False, lookup=result, task_id=task_id)

    def _enqueue(self, prompt: str, sc: Scope, gen: Generated, result: LookupResult, vector: np.ndarray | None,
                 ttl_seconds: int | None, metadata: Mapping[str, Any] | None) -> str | None:
        """Hand a generated answer to the write queue (with the lookup's vector); never raises."""
        if not gen.cacheable:
            return None
        try:
            command = WriteCommand(
                prompt=prompt, response=gen.response, scope=sc,
                embedding=[float(x) for x in vector] if vector is not None else None,
                ttl_seconds=ttl_seconds or gen.ttl_seconds, flags=gen.flags,
                metadata={**(metadata or {}), **gen.metadata}, finish_reason=gen.finish_reason,
                lookup_id=result.lookup_id, group=gen.group,
            )  # fmt: skip
            return self.write_queue.enqueue(command)
        except Exception:  # noqa: BLE001 - the caller gets its answer whatever happens to the write
            self.enqueue_failures += 1
            log.exception("could not hand the write to the queue")
            return None


def _calibrated_k(params: Mapping[str, Any], default: int) -> int:
    """A scope's calibrated k, within the settings' bounds (a bad record must not crash or slow the read path)."""
    k = params.get("k", default)
    return min(max(k, 1), 100) if isinstance(k, int) and not isinstance(k, bool) else default


def _total(reply: Any) -> int:
    """total_results of an FT.SEARCH reply (RESP3 map or RESP2 list); 0 for anything else."""
    try:
        if isinstance(reply, dict):
            return int(reply.get(b"total_results", reply.get("total_results", 0)))
        return int(list(reply)[0])
    except (TypeError, ValueError, IndexError):
        return 0


def _merge_params(calibration: list[Any]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for raw in calibration or []:
        if raw:
            try:
                params.update(json.loads(raw))
            except ValueError:
                log.warning("ignoring unreadable calibration record")
    return params


def _exact_entry(raw: Any, sc: Scope, prompt: str) -> EntryView | None:
    """The approved, unexpired entry of ``sc`` stored under the prompt's id, if it is an entry of this prompt."""
    try:
        # a client on which redis-py's ``client.json()`` was used decodes JSON replies itself
        found = raw if isinstance(raw, dict) else json.loads(raw)
        fields = {name: (found.get(f"$.{name}") or [None])[0] for name in VIEW_PATHS}
        fields = {k: v for k, v in fields.items() if v is not None}
        entry = EntryView.model_validate(fields)
    except (ValueError, TypeError, ValidationError, AttributeError):
        return None
    if entry.status != Status.APPROVED or entry.expires_at <= time.time() or entry.scope != sc:
        return None
    # Issue 15: the id is a hash of the normalized prompt, and documents written before the normalization stopped
    # merging confusables ("5²" was "52") sit under the id of another prompt; the stored prompt must agree.
    if normalize_prompt(entry.prompt) != normalize_prompt(prompt):
        return None
    return entry
