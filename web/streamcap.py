"""A per-key cap on the proxy's concurrent streamed requests, in each web process.

A streamed completion holds one server thread for the whole LLM answer (seconds to minutes), and a web process has
``--threads`` of them for every tenant. The per-minute rate limit counts requests as they start, so one key could
still open streams until no thread is left for anyone else. Past ``SEMCACHE_PROXY_MAX_STREAMS_PER_KEY`` open streams
a key's next one is answered 429 ``too_many_streams`` (issue 15). The count is per process, in memory: it needs no
Redis (so it holds while Redis is down), and a slot is freed when its response is closed, which the WSGI server does
whether the stream ended or the client went away.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Callable

__all__ = ["StreamSlots"]


class StreamSlots:
    """Open streams per key id, at most ``cap`` each (0: no cap).

    >>> slots = StreamSlots(1)
    >>> release = slots.acquire("k1")
    >>> slots.acquire("k1") is None, slots.acquire("k2") is not None
    (True, True)
    >>> release(); release(); slots.acquire("k1") is not None   # releasing twice frees one slot
    True
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._open: Counter = Counter()
        self._lock = threading.Lock()

    def open(self, key_id: str) -> int:
        with self._lock:
            return self._open[key_id]

    def acquire(self, key_id: str) -> Callable[[], None] | None:
        """A function that frees the slot (idempotent), or None when the key has ``cap`` streams open."""
        with self._lock:
            if self.cap > 0 and self._open[key_id] >= self.cap:
                return None
            self._open[key_id] += 1
        done = threading.Event()

        def release() -> None:
            with self._lock:
                if done.is_set():
                    return
                done.set()
                self._open[key_id] -= 1
                if self._open[key_id] <= 0:
                    del self._open[key_id]

        return release
