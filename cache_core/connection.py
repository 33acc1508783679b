"""Where the Redis comes from: ``SEMCACHE_REDIS_URL``, or the embedded server for ``SEMCACHE_DATA_DIR``.

:class:`RedisHandle` owns the embedded server when it started one and hands out clients: the read path's with a
short socket timeout (a slow Redis is a miss, not a hang), and the writers' with a longer one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import redis

from .embedded import EmbeddedRedis
from .errors import BackendUnavailable, ConfigError
from .settings import Settings

__all__ = ["RedisHandle", "open_redis", "check_modules", "with_db", "make_client", "text"]

log = logging.getLogger(__name__)


def text(value: object) -> str:
    """A RESP value as str (replies are bytes; keys of RESP3 maps may be either)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def make_client(url: str, *, timeout_ms: int, max_connections: int = 64) -> redis.Redis:
    """A pooled RESP3 client. ``health_check_interval`` re-checks idle connections after a Redis restart."""
    timeout = timeout_ms / 1000
    return redis.Redis.from_url(
        url,
        protocol=3,
        socket_timeout=timeout,
        socket_connect_timeout=max(timeout, 0.05),
        max_connections=max_connections,
        health_check_interval=30,
        retry_on_timeout=False,
    )


def with_db(url: str, db: int) -> str:
    """The same server URL with another logical database (the broker uses db 1 of the cache's Redis)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


def check_modules(client: redis.Redis, url: str) -> None:
    """Fail loudly, with what to run, if the server lacks Search or JSON."""
    try:
        modules = {text(m.get(b"name", m.get("name"))) for m in client.execute_command("MODULE", "LIST")}
    except redis.ResponseError:
        modules = set()  # managed services may refuse MODULE LIST: probe the commands instead
        try:
            client.execute_command("FT._LIST")
            client.execute_command("JSON.GET", "semcache:__probe__")
            modules = {"search", "ReJSON"}
        except redis.ResponseError:
            pass
    except redis.RedisError as exc:
        raise BackendUnavailable(f"cannot reach Redis at {_safe(url)}: {exc}") from exc
    missing = {"search", "ReJSON"} - modules
    if missing:
        raise ConfigError(
            f"the Redis at {_safe(url)} lacks the module(s) {', '.join(sorted(missing))}",
            hint="semcache needs Search and JSON: run `docker run -p 6379:6379 redis:8` (or Redis Stack), "
            "or unset SEMCACHE_REDIS_URL to use the embedded server",
        )


def _safe(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit((parts.scheme, f"{host}{port}", parts.path, "", ""))


@dataclass
class RedisHandle:
    """The cache's Redis: its URL, the embedded server when semcache runs one, and client factories."""

    settings: Settings
    url: str
    embedded: EmbeddedRedis | None = None
    _clients: dict[str, redis.Redis] = field(default_factory=dict, repr=False)

    @property
    def broker_url(self) -> str:
        return self.settings.broker_url or with_db(self.url, 1)

    def reader(self) -> redis.Redis:
        """Client for the read path: short timeouts."""
        if "reader" not in self._clients:
            self._clients["reader"] = make_client(self.url, timeout_ms=self.settings.redis_timeout_ms)
        return self._clients["reader"]

    def writer(self) -> redis.Redis:
        """Client for writers, admin and the UI: generous timeouts."""
        if "writer" not in self._clients:
            self._clients["writer"] = make_client(self.url, timeout_ms=self.settings.redis_write_timeout_ms)
        return self._clients["writer"]

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        if self.embedded is not None:
            self.embedded.stop()

    def __enter__(self) -> RedisHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_redis(settings: Settings) -> RedisHandle:
    """Connect to ``SEMCACHE_REDIS_URL`` (checking it has Search and JSON) or start/join the embedded server."""
    embedded = None
    if settings.redis_url:
        url = settings.redis_url
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"SEMCACHE_REDIS_URL must start with redis://, rediss:// or unix://, not {url[:20]!r}")
    else:
        embedded = EmbeddedRedis(
            settings.data_dir,
            port=settings.embedded_port,
            appendonly=settings.embedded_appendonly,
            maxmemory=settings.embedded_maxmemory,
            maxmemory_policy=settings.embedded_maxmemory_policy,
        )
        url = embedded.start()
    handle = RedisHandle(settings=settings, url=url, embedded=embedded)
    try:
        check_modules(handle.writer(), url)
        _warn_eviction_policy(handle.writer())
    except Exception:
        handle.close()
        raise
    return handle


def _warn_eviction_policy(client: redis.Redis) -> None:
    try:
        conf = client.config_get("maxmemory-policy")
    except redis.RedisError:
        return  # managed services may refuse CONFIG
    policy = text(conf.get(b"maxmemory-policy", conf.get("maxmemory-policy", "")))
    if policy.startswith("allkeys"):
        log.warning(
            "Redis maxmemory-policy is %s: it may evict API keys, calibration, audit records and queued tasks; "
            "use a volatile-* policy (volatile-lfu) so only cache entries (which all carry a TTL) are evicted",
            policy,
        )
