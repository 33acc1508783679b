"""Which Redis errors are worth retrying: the server being away or busy, or a refusal of what was sent.

Until issue 15 every :class:`redis.RedisError` of a write became :class:`~cache_core.errors.BackendUnavailable`, so
a document Redis refuses (metadata nested deeper than RedisJSON's 128 levels, an integer beyond 64 bits) was
retried ``SEMCACHE_MAX_RETRIES`` times and then dead-lettered, and a key holding another type was retried as if
Redis were down. :func:`redis_failure` sorts them:

- connection errors, timeouts and the replies of a server that cannot serve *now* (``OOM``, ``READONLY``,
  ``LOADING``, ``BUSY``, ``MISCONF``, ``TRYAGAIN``, cluster redirects and outages) -> ``BackendUnavailable``
  (retryable);
- a key of the wrong type (``WRONGTYPE``, RedisJSON's "wrong Redis type") or an ACL refusal (``NOPERM``) ->
  :class:`~cache_core.errors.ConfigError`: the same command fails the same way until someone changes the keys or
  the server, so it is not retried (a task stores its dead letter at once, to replay once that is fixed);
- any other error reply is Redis refusing the command's data -> :class:`~cache_core.errors.InvalidInput`, never
  retried and never dead-lettered (replaying it would fail again).
"""

from __future__ import annotations

import redis

from .errors import BackendUnavailable, ConfigError, InvalidInput, SemcacheError

__all__ = ["redis_failure", "is_transient", "is_wrong_type"]

# Reply prefixes of a server that cannot serve the command now but will later (redis-py maps some to their own
# classes, checked first; these arrive as plain ResponseError)
_TRANSIENT_PREFIXES = ("OOM", "READONLY", "LOADING", "BUSY", "MISCONF", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN",
                       "NOREPLICAS", "UNBLOCKED", "EXECABORT", "NOSCRIPT", "MOVED", "ASK")
_TRANSIENT_CLASSES = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.OutOfMemoryError,
                      redis.exceptions.ReadOnlyError, redis.exceptions.TryAgainError, redis.exceptions.ClusterError,
                      redis.exceptions.AskError, redis.exceptions.ExecAbortError, redis.exceptions.NoScriptError,
                      redis.WatchError)


def is_wrong_type(exc: BaseException) -> bool:
    """A command on a key that holds another type (core commands and RedisJSON word it differently).

    >>> is_wrong_type(redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"))
    True
    >>> is_wrong_type(redis.ResponseError("Existing key has wrong Redis type"))
    True
    """
    message = str(exc)
    return isinstance(exc, redis.ResponseError) and (message.startswith("WRONGTYPE") or "wrong Redis type" in message)


def is_transient(exc: BaseException) -> bool:
    """True when trying the same command again later can succeed.

    >>> is_transient(redis.ConnectionError("refused")), is_transient(redis.ResponseError("BUSY running a script"))
    (True, True)
    >>> is_transient(redis.ResponseError("number out of range at line 1 column 407"))
    False
    """
    if isinstance(exc, _TRANSIENT_CLASSES):
        return True
    if isinstance(exc, redis.ResponseError):
        return str(exc).lstrip().upper().startswith(_TRANSIENT_PREFIXES)
    return not isinstance(exc, redis.DataError)  # DataError: redis-py refused to encode an argument


def redis_failure(exc: redis.RedisError, what: str) -> SemcacheError:
    """The semcache error for a Redis error met while doing ``what`` (raise it ``from exc``).

    >>> type(redis_failure(redis.ResponseError("recursion limit exceeded at line 1 column 140"), "write")).__name__
    'InvalidInput'
    >>> redis_failure(redis.TimeoutError("timed out"), "write").retryable
    True
    """
    if is_wrong_type(exc):
        return ConfigError(f"{what} failed: a key holds another type than semcache wrote there ({exc})",
                           hint="remove that key, or change SEMCACHE_INDEX")
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return ConfigError(f"{what} failed: the Redis user may not run it ({exc})", hint="check the Redis ACL")
    if is_transient(exc):
        return BackendUnavailable(f"{what} failed: {exc}")
    return InvalidInput(f"{what} failed: Redis refused the data ({exc})")
