"""Request coalescing for the proxy: concurrent misses for the same prompt and scope make one upstream call.

The first request of a key (the *leader*) forwards upstream; requests of the same key that arrive while it is in
flight (*followers*) wait for its answer, bounded by a timeout, and relay the same answer. When the leader's answer
is not a shareable success (an upstream error, a timeout, an answer that is not one plain completion), followers
forward on their own, as if there had been no leader: coalescing saves calls, it never turns a request into an
error. The registry is per process (a gunicorn deployment coalesces within each worker process).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

__all__ = ["Shared", "Flight", "InFlight"]


@dataclass(frozen=True)
class Shared:
    """A leader's answer as followers relay it."""

    body: bytes
    status: int
    content_type: str
    headers: dict[str, str]


@dataclass
class Flight:
    """One upstream call in progress; ``waiters`` counts the followers that joined it."""

    done: threading.Event = field(default_factory=threading.Event)
    answer: Shared | None = None
    waiters: int = 0

    def wait(self, timeout_s: float) -> Shared | None:
        """The leader's answer, or None when it failed or did not come within ``timeout_s``."""
        return self.answer if self.done.wait(timeout_s) else None


class InFlight:
    """The flights of one process, by key.

    >>> flights = InFlight()
    >>> flight, leader = flights.join("k")
    >>> leader, flights.join("k")[1]
    (True, False)
    >>> flights.finish("k", flight, Shared(b"{}", 200, "application/json", {}))  # one follower waited
    1
    >>> flights.join("k")[1]  # a finished flight is gone: the next request leads a new one
    True
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[str, Flight] = {}

    def join(self, key: str) -> tuple[Flight, bool]:
        """The flight of ``key`` and whether the caller leads it (True: it must call :meth:`finish`)."""
        with self._lock:
            flight = self._flights.get(key)
            if flight is not None:
                flight.waiters += 1
                return flight, False
            flight = self._flights[key] = Flight()
            return flight, True

    def finish(self, key: str, flight: Flight, answer: Shared | None) -> int:
        """Publish the leader's answer (None: followers forward on their own); returns how many waited."""
        with self._lock:
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.answer = answer
            flight.done.set()
            return flight.waiters

    def __len__(self) -> int:
        with self._lock:
            return len(self._flights)
