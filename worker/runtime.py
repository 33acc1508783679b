"""What a worker process holds: its settings, a Redis client, the embedding model, the safety pipeline and the judge.

``semcache worker`` loads the model once in the main process, before the pool forks, so every pool process shares
its weights (copy-on-write) and starts at once. The main process never runs the model itself: a torch thread pool
started before a fork can hang the children. Redis clients are made per process (a connection must not cross a fork).
The judge (``SEMCACHE_JUDGE``) is built once too, in the main process when ``semcache worker`` starts it (a bad
judge configuration stops the start, a cross-encoder's weights are shared like the embedder's); the ``llm`` judge
makes its HTTP connections per process.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from cache_core.connection import make_client
from cache_core.embedded import EmbeddedRedis
from cache_core.embedder import Embedder, load_embedder
from cache_core.errors import ConfigError
from cache_core.judge import Judge, make_judge
from cache_core.settings import Settings

from .safety import SafetyPipeline

__all__ = ["WorkerRuntime", "cache_url", "load_embedder_for"]

log = logging.getLogger(__name__)

_WARM_UP_PROMPT = "semcache worker warm-up"


def cache_url(settings: Settings) -> str:
    """The cache's Redis URL: ``SEMCACHE_REDIS_URL``, else the embedded server already running for the data dir."""
    if settings.redis_url:
        return settings.redis_url
    url = EmbeddedRedis(settings.data_dir).running_url()
    if url is None:
        raise ConfigError(
            f"no SEMCACHE_REDIS_URL and no embedded Redis running for {settings.data_dir}",
            hint="start one with `semcache redis` (or `semcache worker`, which starts it), or set SEMCACHE_REDIS_URL",
        )
    return url


class WorkerRuntime:
    """Per-deployment collaborators of the tasks, created once per worker and safe across the pool's forks."""

    def __init__(self, settings: Settings, *, redis_url: str | None = None, embedder: Embedder | None = None,
                 pipeline: SafetyPipeline | None = None) -> None:
        self.settings = settings
        self.redis_url = redis_url or cache_url(settings)
        self._embedder = embedder
        self.pipeline = pipeline or SafetyPipeline.from_settings(settings)
        self._client: redis.Redis | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._threads = 0
        self._judge: Judge | None = None
        self._judge_built = False
        self._judge_lock = threading.Lock()  # not self._lock: building the embedding judge takes that one

    @property
    def client(self) -> redis.Redis:
        """A pooled writer client of this process (recreated after a fork)."""
        if self._client is None or self._pid != os.getpid():
            client = make_client(self.redis_url, timeout_ms=self.settings.redis_write_timeout_ms)
            # Ride out a blip in the client (under a second); a longer outage fails the task, which then retries
            # with the task's own backoff and jitter (and shows up as a retry in the logs and the result).
            client.set_retry(Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 3))
            self._client = client
            self._pid = os.getpid()
        return self._client

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            with self._lock:
                if self._embedder is None:
                    embedder = load_embedder_for(self.settings)
                    if self._threads:
                        _set_threads(embedder, self._threads)
                    self._embedder = embedder
        return self._embedder

    def load_judge(self) -> Judge | None:
        """Build the judge the settings name (None for ``off``) once; raises :class:`ConfigError` when it cannot
        be built (``semcache worker`` calls this before it starts, so a bad configuration stops it)."""
        if not self._judge_built:
            with self._judge_lock:
                if not self._judge_built:
                    name = self.settings.judge
                    self._judge = make_judge(self.settings, embedder=self.embedder if name == "embedding" else None,
                                             client=self.client if name == "llm" else None)
                    self._judge_built = True
        return self._judge

    @property
    def judge(self) -> Judge | None:
        """The judge, or None (``off``, or a judge that cannot be built: logged once, and entries keep their own
        groups; a write never fails for want of a judge)."""
        try:
            return self.load_judge()
        except ConfigError as exc:
            log.error("judge %s not available, entries keep their own groups: %s", self.settings.judge, exc)
            self._judge, self._judge_built = None, True
            return None

    def after_fork(self, processes: int) -> None:
        """In a pool process: its own Redis connections, and model threads sized to share the cores."""
        self._client = None
        self._pid = os.getpid()
        # One core is left to Redis and the worker's main process: an OpenMP pool that has to share its cores with
        # them waits at every barrier (measured: 2 threads on 2 busy cores embed at half the speed of 1).
        auto = max(1, ((os.cpu_count() or 1) - 1) // max(processes, 1))
        self._threads = self.settings.worker_model_threads or auto
        if self._embedder is not None:
            _set_threads(self._embedder, self._threads)
        if self._judge is not None and self._judge.name == "cross-encoder":
            _set_torch_threads(self._threads)  # the cross-encoder's torch pool shares the cores like the model's
        if self._embedder is not None:
            # off Celery's start-up path (a pool process must report ready within seconds); a task that comes
            # first waits for the model's lock, as it would for its own first run
            threading.Thread(target=self._warm_up, name="semcache-warm-up", daemon=True).start()

    def _warm_up(self) -> None:
        """Run the model once in this pool process, so that its first task does not pay for the start: the onnx
        backend makes its session per process (about 0.16 s of CPU), then the first run sizes its buffers."""
        start = time.perf_counter()
        try:
            self.embedder.embed([_WARM_UP_PROMPT])
        except Exception as exc:  # noqa: BLE001 - the first task meets (and reports) the same problem
            log.warning("pool process %d: model warm-up failed: %s", os.getpid(), exc)
            return
        log.info("pool process %d: model ready in %.0f ms", os.getpid(), 1000 * (time.perf_counter() - start))


def load_embedder_for(settings: Settings) -> Embedder:
    """The embedder the settings name (model, backend, cache size; the onnx export lives in the data dir)."""
    return load_embedder(settings.model, backend=settings.embedding_backend, cache_size=settings.embedding_cache_size,
                         data_dir=settings.data_dir, precision=settings.embedding_precision)


def _set_torch_threads(threads: int) -> None:
    try:
        import torch

        torch.set_num_threads(max(1, threads))
    except Exception as exc:  # noqa: BLE001 - thread sizing is an optimisation, never a reason to fail
        log.debug("could not size torch's threads: %s", exc)


def _set_threads(embedder: Embedder, threads: int) -> None:
    try:
        if hasattr(embedder, "set_num_threads"):
            embedder.set_num_threads(threads)
        else:  # a custom embedder: size torch's pool if torch is there
            import torch

            torch.set_num_threads(threads)
    except Exception as exc:  # noqa: BLE001 - thread sizing is an optimisation, never a reason to fail
        log.debug("could not size the model's threads: %s", exc)
