"""Where the read path hands the writes it does not do itself (CQRS).

``WriteQueue`` is the seam: the Celery implementation lives in ``worker`` (``worker.queue.CeleryWriteQueue``);
:class:`SyncWriteQueue` runs a writer function inline (tests, ``semcache eval``) and :class:`NullWriteQueue`
drops writes (a read-only client).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Protocol

from .schema import WriteCommand

__all__ = ["WriteQueue", "SyncWriteQueue", "NullWriteQueue"]

log = logging.getLogger(__name__)


class WriteQueue(Protocol):
    def enqueue(self, command: WriteCommand) -> str | None:
        """Hand a write over; return its task id (None if there is none). Must not block for long or raise."""


class SyncWriteQueue:
    """Runs ``writer(command)`` at once, in the caller's thread. Errors are logged and counted, not raised."""

    def __init__(self, writer: Callable[[WriteCommand], Any]) -> None:
        self.writer = writer
        self.failures = 0
        self.results: list[Any] = []

    def enqueue(self, command: WriteCommand) -> str | None:
        try:
            self.results.append(self.writer(command))
        except Exception:  # noqa: BLE001 - a failed write must not fail the caller's answer
            self.failures += 1
            log.exception("synchronous write failed")
        return None


class NullWriteQueue:
    def enqueue(self, command: WriteCommand) -> str | None:
        return None
