"""What one Flask app holds: its settings, its Redis handle, its Celery client and (lazily) one SemanticCache."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery
from redis import Redis
from flask import current_app

from cache_core.cache import SemanticCache
from cache_core.connection import RedisHandle
from cache_core.settings import Settings

__all__ = ["WebState", "state"]

log = logging.getLogger(__name__)


class WebState:
    """Per-app resources. The embedder is loaded once per process, on the first lookup (or by :meth:`warm_up`)."""

    def __init__(self, settings: Settings, handle: RedisHandle, celery: Celery, *, embedder: Any = None,
                 owns_handle: bool = False) -> None:
        self.settings = settings
        self.handle = handle
        self.celery = celery
        self._embedder = embedder
        self._cache: SemanticCache | None = None
        self._lock = threading.Lock()
        self._owns_handle = owns_handle

    @property
    def redis(self) -> Redis:
        """The writer client (generous timeouts): the UI's and the API's reads, task records, keys."""
        return self.handle.writer()

    def cache(self) -> SemanticCache:
        """The app's one SemanticCache: strict (a Redis failure raises; ``POST /lookup`` turns it into a degraded miss,
        other readers into a 503), counting stats."""
        if self._cache is None:
            with self._lock:
                if self._cache is None:
                    from cache_core.embedder import load_embedder
                    from cache_core.index import IndexSpec, ensure_index
                    from cache_core.stats import StatsRecorder

                    s = self.settings
                    embedder = self._embedder or load_embedder(s.model, backend=s.embedding_backend,
                                                               cache_size=s.embedding_cache_size,
                                                               precision=s.embedding_precision)
                    ensure_index(self.redis, IndexSpec(settings=s, dim=embedder.dim, model_name=embedder.name))
                    self._embedder = embedder
                    self._cache = SemanticCache(s, self.handle.reader(), embedder, ensure=False, strict=True,
                                                stats=StatsRecorder(self.redis, s))
        return self._cache

    def warm_up(self) -> None:
        """Load the model and check the index now (a server worker does this before its first request)."""
        try:
            self.cache()
        except Exception as exc:  # noqa: BLE001 - a cold start must not kill the worker; /readyz reports it
            log.warning("warm-up failed (the first lookup will retry): %s", exc)

    def close(self) -> None:
        if self._cache is not None and self._cache.stats is not None:
            self._cache.stats.close()
        if self._owns_handle:
            self.handle.close()


def state() -> WebState:
    """The :class:`WebState` of the current app."""
    return current_app.extensions["semcache"]
