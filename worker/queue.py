"""The read path's :class:`~cache_core.writequeue.WriteQueue` on Celery: hand a write over without waiting for it.

``enqueue`` only appends the command to an in-memory batch and returns the batch's task id; a background thread
publishes batches to the broker (one command as ``semcache.write_entry``, several as ``semcache.write_entries``,
so the worker embeds and writes them together). The caller of ``get_or_generate`` therefore never waits for the
broker, and a broker that is down costs it nothing: the publish fails in the background, and the failure is
counted (:attr:`CeleryWriteQueue.failures`) and logged (one line per 10 s, never the prompt).

Only when ``SEMCACHE_ENQUEUE_MAX_PENDING`` commands are already waiting does ``enqueue`` wait, at most
``SEMCACHE_ENQUEUE_TIMEOUT_MS``, for room; then the write is dropped and counted (the caller still has its answer).
A batch is sent when it has ``SEMCACHE_ENQUEUE_BATCH_SIZE`` commands or is ``SEMCACHE_ENQUEUE_LINGER_MS`` old.

>>> queue = CeleryWriteQueue(create_celery(settings), settings)    # doctest: +SKIP
>>> cache = SemanticCache.open(settings, write_queue=queue)        # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from celery import Celery

from cache_core.schema import WriteCommand
from cache_core.settings import Settings
from cache_core.tasks import WRITE_ENTRY

from .packing import pack_embeddings
from .tasks import WRITE_ENTRIES

__all__ = ["CeleryWriteQueue"]

log = logging.getLogger(__name__)

# Publishing runs in the background, so it may try a little harder than a caller could wait.
_PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.3, "interval_max": 0.5}


def _publisher(app: Celery) -> Celery:
    """A send-only twin of ``app`` without a result backend.

    Sending through an app with a Redis result backend first subscribes to the task's result channel; with Redis
    down that alone retries for about 20 s. The worker still stores every result: read them with ``app``.
    """
    publisher = Celery("semcache-write-queue", broker=app.conf.broker_url, set_as_current=False)
    publisher.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=app.conf.task_default_queue,
        task_default_routing_key=app.conf.task_default_routing_key,
        broker_transport_options=dict(app.conf.broker_transport_options or {}),
        broker_connection_retry_on_startup=False,
    )
    return publisher


@dataclass
class _Batch:
    task_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    commands: list[WriteCommand] = field(default_factory=list)
    opened: float = field(default_factory=time.monotonic)


class CeleryWriteQueue:
    """Sends write commands to the worker in batches, from a background thread. Never raises from ``enqueue``."""

    def __init__(self, app: Celery, settings: Settings, *, batch_size: int | None = None,
                 linger_ms: int | None = None, max_pending: int | None = None) -> None:
        self.app = app
        self.publisher = _publisher(app)
        self.settings = settings
        self.batch_size = batch_size or settings.enqueue_batch_size
        self.linger_s = (settings.enqueue_linger_ms if linger_ms is None else linger_ms) / 1000
        self.max_pending = max_pending or settings.enqueue_max_pending
        self.timeout_s = settings.enqueue_timeout_ms / 1000
        self.sent = 0  # commands published
        self.failures = 0  # commands that could not be published (or found no room)
        self.tasks_sent = 0
        self._cond = threading.Condition()
        self._open: _Batch | None = None
        self._ready: deque[_Batch] = deque()
        self._pending = 0  # commands enqueued and not yet published (or failed)
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._closed = False
        self._last_log = 0.0

    # --- the caller's side -----------------------------------------------------------------------------------
    def enqueue(self, command: WriteCommand) -> str | None:
        """Queue one write; return the id of the task that will carry it (None if it was dropped)."""
        try:
            with self._cond:
                self._ensure_thread()
                if self._closed:
                    self._fail(1, "the write queue is closed")
                    return None
                deadline = time.monotonic() + self.timeout_s
                while self._pending >= self.max_pending:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._fail(1, f"{self._pending} writes already waiting for the broker")
                        return None
                    self._cond.wait(left)
                if self._open is None:
                    self._open = _Batch()
                batch = self._open
                batch.commands.append(command)  # serialized by the publisher, off the caller's path
                self._pending += 1
                if len(batch.commands) >= self.batch_size or self.linger_s == 0:
                    self._ready.append(batch)
                    self._open = None
                self._cond.notify_all()
                return batch.task_id
        except Exception:  # noqa: BLE001 - a write that cannot be queued must never fail the caller's answer
            self._fail(1, "unexpected error while queueing", exc_info=True)
            return None

    def flush(self, timeout: float = 10.0) -> bool:
        """Send what is queued now and wait until it is published (or failed). True if nothing is left."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._open is not None:
                self._ready.append(self._open)
                self._open = None
                self._cond.notify_all()
            while self._pending and time.monotonic() < deadline:
                self._cond.wait(min(0.05, max(deadline - time.monotonic(), 0.001)))
            return self._pending == 0

    def close(self, timeout: float = 10.0) -> None:
        """Flush, then stop the background thread."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def pending(self) -> int:
        return self._pending

    # --- the publisher ----------------------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        """Start the publisher (again after a fork: threads do not survive one, and queued commands stay behind)."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._thread, self._open, self._ready, self._pending = None, None, deque(), 0
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="semcache-write-queue", daemon=True)
            self._thread.start()

    def _next_batch(self) -> _Batch | None:
        with self._cond:
            while True:
                if self._ready:
                    return self._ready.popleft()
                if self._open is not None:
                    due = self._open.opened + self.linger_s
                    if time.monotonic() >= due:
                        batch, self._open = self._open, None
                        return batch
                    self._cond.wait(max(due - time.monotonic(), 0.0005))
                    continue
                if self._closed:
                    return None
                self._cond.wait(0.5)

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._publish(batch)

    def _publish(self, batch: _Batch) -> None:
        n = len(batch.commands)
        try:
            data = [c.model_dump(mode="json") for c in batch.commands]
            if n == 1:
                name, kwargs, shown = WRITE_ENTRY, {"command": data[0]}, "{'command': <1 write>}"
            else:
                # the vectors as one base64 matrix, not 384 floats of JSON text per command (worker.packing)
                data, packed = pack_embeddings(data)
                name, kwargs, shown = WRITE_ENTRIES, {"commands": data}, f"{{'commands': <{n} writes>}}"
                if packed is not None:
                    kwargs["embeddings"] = packed
            # kwargsrepr: the message headers (and monitoring tools) show a summary, never prompts or responses
            self.publisher.send_task(name, kwargs=kwargs, task_id=batch.task_id, kwargsrepr=shown, retry=True,
                                     retry_policy=_PUBLISH_RETRY)
            ok = True
        except Exception as exc:  # noqa: BLE001 - kombu raises many kinds of transport errors
            ok = False
            self._fail(n, f"cannot publish to the broker: {type(exc).__name__}: {exc}")
        with self._cond:
            self._pending -= n
            if ok:
                self.sent += n
                self.tasks_sent += 1
            self._cond.notify_all()

    def _fail(self, n: int, why: str, exc_info: bool = False) -> None:
        self.failures += n
        now = time.monotonic()
        if now - self._last_log > 10:  # one line per 10 s while the broker is away, not one per write
            self._last_log = now
            log.warning("write queue: %d write(s) not sent (%s); %d failed so far", n, why, self.failures,
                        exc_info=exc_info)
