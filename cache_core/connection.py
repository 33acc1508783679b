"""Where the Redis comes from: ``SEMCACHE_REDIS_URL``, or the embedded server for ``SEMCACHE_DATA_DIR``.

:class:`RedisHandle` owns the embedded server when it started one and hands out clients: the read path's with a
short socket timeout (a slow Redis is a miss, not a hang), and the writers' with a longer one.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import redis

from .embedded import EmbeddedRedis
from .errors import BackendUnavailable, ConfigError
from .settings import Settings

__all__ = ["RedisHandle", "open_redis", "check_modules", "check_union_return", "check_union_reply",
           "probe_union_return", "with_db", "make_client", "text"]

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


def check_modules(client: redis.Redis, url: str, *, key_prefix: str = "semcache:") -> None:
    """Fail loudly, with what to run, if the server lacks Search or JSON, or if its Search answers the read path's
    KNN differently (:func:`check_union_return`, whose scratch keys start with ``key_prefix``)."""
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
    check_union_return(client, url, key_prefix=key_prefix)


# --- the read path's KNN, checked once per process and server ------------------------------------------------------
# The read path's one FT.SEARCH returns every EntryView field as ONE JSONPath union (``$['id','v',...] AS view``,
# cache_core/query.py). Only DIALECT 3 returns every member of a union (DIALECT 2 returns the first), and Redis 8 lists
# DIALECT 3 as deprecated: a server that dropped it, or changed what a union returns, would turn every lookup into an
# error (a degraded miss) or a wrongly decoded entry. So at startup we run that query shape once on a scratch index.
_UNION_DOC = {"s": "semcache", "i": 7, "f": 0.5, "l": ["a"], "o": {"k": 1}, "n": None}  # every JSON type a view holds
_UNION_PATH = "$[" + ",".join(f"'{name}'" for name in _UNION_DOC) + "]"
_UNION_AS = "view"
_UNION_CHECKED: set[str] = set()  # servers (URL without credentials) that passed, in this process
_UNION_HINT = ("semcache's lookups need Redis 8.0-8.x with Search and JSON (or Redis Stack): use the "
               "docker-compose image (redis:8), or unset SEMCACHE_REDIS_URL to use the embedded server")


def check_union_return(client: redis.Redis, url: str, *, key_prefix: str = "semcache:") -> None:
    """Raise :class:`ConfigError` unless the server returns every member of a JSONPath union under the read path's
    dialect (``FT.SEARCH ... RETURN 3 $['s','i',...] AS view DIALECT 3``); once per process and server.

    A server that refuses to set the probe up (ACL, read-only replica, out of memory) is logged, not refused: the
    probe proves nothing there, and its lookups will tell. Connection failures raise :class:`BackendUnavailable`.
    """
    server = _safe(url)
    if server in _UNION_CHECKED:
        return
    from .query import KNN_DIALECT  # the dialect the read path sends (query imports this module: import here)

    try:
        reply = probe_union_return(client, key_prefix=key_prefix, dialect=KNN_DIALECT)
    except redis.ResponseError as exc:
        log.warning("could not check FT.SEARCH ... DIALECT %s on the Redis at %s (%s); lookups will fail as degraded "
                    "misses if the server answers it differently", KNN_DIALECT, server, exc)
        return
    check_union_reply(reply, server=f"{server} ({_server_version(client)})")
    _UNION_CHECKED.add(server)


def probe_union_return(client: redis.Redis, *, key_prefix: str, dialect: str) -> object:
    """The reply (or the :class:`redis.ResponseError` instance) of the probe's ``FT.SEARCH`` under ``dialect``.

    One pipelined round trip (well under a millisecond on the embedded server): a scratch index (``TEMPORARY``) and
    one document under a unique ``<key_prefix>union-probe:<uuid>:`` prefix, the query, then ``FT.DROPINDEX ... DD``
    and ``DEL``. Nothing is left behind, even by a process killed mid-probe (the index drops itself after 60 idle
    seconds, the document carries a 60 s TTL), and processes starting at once never share a name.

    Raises :class:`redis.ResponseError` when the index or the document could not be created (what failed, and why),
    :class:`BackendUnavailable` when Redis cannot be reached.
    """
    prefix = f"{key_prefix}union-probe:{uuid.uuid4().hex}:"
    index, key = f"{prefix}idx", f"{prefix}doc"
    pipe = client.pipeline(transaction=False)
    pipe.execute_command("FT.CREATE", index, "ON", "JSON", "PREFIX", "1", prefix, "TEMPORARY", "60", "SKIPINITIALSCAN",
                         "SCHEMA", "$.s", "AS", "s", "TAG")
    pipe.execute_command("JSON.SET", key, "$", json.dumps(_UNION_DOC))
    pipe.execute_command("PEXPIRE", key, "60000")
    pipe.execute_command("FT.SEARCH", index, "*", "RETURN", "3", _UNION_PATH, "AS", _UNION_AS, "LIMIT", "0", "1",
                         "DIALECT", dialect)
    pipe.execute_command("FT.DROPINDEX", index, "DD")
    pipe.execute_command("DEL", key)  # the document alone, when FT.CREATE failed
    try:
        created, stored, _, reply, _, _ = pipe.execute(raise_on_error=False)
    except redis.RedisError as exc:
        raise BackendUnavailable(f"Redis failed while checking FT.SEARCH ... DIALECT {dialect}: {exc}") from exc
    for step, result in (("FT.CREATE", created), ("JSON.SET", stored)):
        if isinstance(result, Exception):
            raise redis.ResponseError(f"{step} of the probe failed: {result}") from result
    return reply


def check_union_reply(reply: object, *, server: str) -> None:
    """Raise :class:`ConfigError` unless ``reply`` (the probe's ``FT.SEARCH``, RESP3 map or RESP2 list, or the error
    it raised) holds the probe document's every value, in order, as one JSON array."""
    if isinstance(reply, Exception):
        problem = f"refused it: {reply}"
    else:
        raw = _union_value(reply)
        try:
            values = json.loads(raw) if raw is not None else None
        except ValueError:
            values = None
        if values == list(_UNION_DOC.values()):
            return
        got = "no result" if raw is None else repr(raw)
        problem = f"returned {got} instead of the JSON array {json.dumps(list(_UNION_DOC.values()))}"
        if raw is not None and not isinstance(values, list):
            problem += " (one value: it returns only a union's first member, as DIALECT 2 does)"
    raise ConfigError(
        f"the Redis at {server} does not answer semcache's lookup query as expected: FT.SEARCH with a JSONPath "
        f"union RETURN ({_UNION_PATH}) and DIALECT 3 {problem}",
        hint=_UNION_HINT,
    )


def _union_value(reply: object) -> str | None:
    """The ``view`` attribute of the first result of an ``FT.SEARCH`` reply, or None (read as the read path reads
    its KNN replies: :func:`cache_core.query._knn_rows`)."""
    from .query import _attr, _knn_rows  # query imports this module: import here

    try:
        for _, attrs in _knn_rows(reply):
            value = _attr(attrs, _UNION_AS)
            return None if value is None else text(value)
    except (AttributeError, IndexError, KeyError, TypeError):
        pass
    return None


def _server_version(client: redis.Redis) -> str:
    """``redis 8.2.3, search 2.10.5`` (best effort: managed services may refuse INFO or MODULE LIST)."""
    parts = []
    try:
        parts.append(f"redis {text(client.info('server').get('redis_version', 'unknown'))}")
    except redis.RedisError:
        parts.append("redis version unknown")
    search = module_version(client, "search")
    if search is not None:
        parts.append(f"search {search}")
    return ", ".join(parts)


def module_version(client: redis.Redis, name: str) -> str | None:
    """A loaded module's version as ``major.minor.patch`` (``MODULE LIST`` ``ver`` 20803 -> ``2.8.3``); None when
    the module is not loaded or the server does not say (managed services may refuse ``MODULE LIST``)."""
    try:
        for module in client.execute_command("MODULE", "LIST"):
            fields = module if isinstance(module, dict) else dict(zip(module[::2], module[1::2]))
            fields = {text(k): v for k, v in fields.items()}
            if text(fields.get("name", "")) == name:
                ver = int(fields.get("ver", 0))
                return f"{ver // 10000}.{ver // 100 % 100}.{ver % 100}"
    except (redis.RedisError, ValueError, TypeError):
        pass
    return None


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
        check_modules(handle.writer(), url, key_prefix=settings.key(""))
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
