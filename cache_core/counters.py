"""Fixed-window counters that a memory eviction cannot reset: failed logins and API rate limits.

Under a ``volatile-*`` policy Redis evicts keys that carry a TTL, so the usual ``INCR`` + ``EXPIRE`` counter is the
first thing to go under memory pressure, and whoever fills the cache resets their own login or rate limit (issue
15). These counters carry no TTL. Each is one hash per purpose (``<index>:ratelimit``, ``<index>:loginfail``...):
a ``~window`` field names the current window and one field per subject (a key id, a client address) counts in it;
the first count of a new window empties the hash. A hash holds at most ``cap`` subjects: past that, new subjects
share one ``~overflow`` count, so a flood of addresses is limited together instead of growing the hash. One Lua
script per count keeps the window change and the increment one step.
"""

from __future__ import annotations

import time
from typing import Sequence

import redis

__all__ = ["count_in_window", "read_in_window", "DEFAULT_CAP"]

DEFAULT_CAP = 100_000  # subjects per hash (about 60 bytes each): a few MB at most
_WINDOW, _OVERFLOW = "~window", "~overflow"

# KEYS[1]: the hash; ARGV: subject, window id, cap, amount. Returns the subject's count in the window.
_COUNT = """
local key, field = KEYS[1], ARGV[1]
if redis.call('HGET', key, '~window') ~= ARGV[2] then
  redis.call('DEL', key)
  redis.call('HSET', key, '~window', ARGV[2])
end
if redis.call('HEXISTS', key, field) == 0 and redis.call('HLEN', key) > tonumber(ARGV[3]) then
  field = '~overflow'
end
return redis.call('HINCRBY', key, field, tonumber(ARGV[4]))
"""


def _window(window_s: int, now: float | None) -> str:
    return str(int((time.time() if now is None else now) // window_s))


def count_in_window(client: redis.Redis, key: str, subject: str, window_s: int, *, amount: int = 1,
                    cap: int = DEFAULT_CAP, now: float | None = None) -> int:
    """Add ``amount`` to ``subject``'s count in the current ``window_s`` window and return the new count.

    Raises :class:`redis.RedisError` (the caller decides whether a failing counter fails open or closed).
    """
    return int(client.eval(_COUNT, 1, key, subject, _window(window_s, now), cap, amount))


def read_in_window(client: redis.Redis, key: str, subjects: Sequence[str], window_s: int, *,
                   cap: int = DEFAULT_CAP, now: float | None = None) -> list[int]:
    """The current window's counts of ``subjects`` (0 for none yet; the shared overflow count for a subject that
    did not fit). Raises :class:`redis.RedisError`."""
    pipe = client.pipeline(transaction=False)
    pipe.hmget(key, [_WINDOW, _OVERFLOW, *subjects])
    pipe.hlen(key)
    (window, overflow, *counts), size = pipe.execute()
    if window is None or (window.decode() if isinstance(window, bytes) else str(window)) != _window(window_s, now):
        return [0] * len(subjects)
    full = int(size) > cap
    return [int(c) if c is not None else (int(overflow or 0) if full else 0) for c in counts]
