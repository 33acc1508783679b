"""The Celery app of the write side, made by a factory from the settings, and the worker's entry point.

Broker and result backend are the same Redis URL: ``SEMCACHE_BROKER_URL``, else logical database 1 of the cache's
Redis (``RedisHandle.broker_url``). The configuration follows Celery's guide for idempotent tasks:

- JSON only (``task_serializer``, ``result_serializer``, ``accept_content``): a message is data, never code;
- ``task_acks_late`` + ``task_reject_on_worker_lost``: a task is acknowledged after it ran, so a worker killed
  mid-task leaves its message to be delivered again (the writes are idempotent, see ``cache_core.store``);
- ``worker_prefetch_multiplier=1``: a process holds one message at a time, so a crash strands few;
- a hard time limit (``SEMCACHE_TASK_TIME_LIMIT_S``) and a soft one shortly before it;
- the broker's ``visibility_timeout`` (after which an unacknowledged message is delivered again) is above the time
  limit plus the longest retry delay, else a task waiting for its retry would run twice.

Tasks travel on a queue named after the deployment's index (``<index>-tasks``, :mod:`cache_core.celeryconf`, which
every sender uses too), so two deployments can share one broker database.

>>> app = create_celery(Settings(redis_url="redis://127.0.0.1:6379/0"))
>>> app.conf.broker_url, app.conf.task_acks_late, app.conf.worker_prefetch_multiplier
('redis://127.0.0.1:6379/1', True, 1)
>>> sorted(name for name in app.tasks if name.startswith("semcache."))  # doctest: +NORMALIZE_WHITESPACE
['semcache.feedback', 'semcache.purge', 'semcache.set_status', 'semcache.write_entries', 'semcache.write_entry']
>>> app.conf.task_default_queue
'semcache-tasks'
"""

from __future__ import annotations

import logging
import warnings

from celery import Celery
from celery.exceptions import CPendingDeprecationWarning
from celery.signals import worker_process_init

from cache_core.celeryconf import shared_config, visibility_timeout
from cache_core.connection import open_redis, with_db
from cache_core.errors import ConfigError
from cache_core.index import IndexSpec, ensure_index
from cache_core.settings import Settings

from .runtime import WorkerRuntime, cache_url, load_embedder_for
from .safety import SafetyPipeline

__all__ = ["create_celery", "broker_url_for", "visibility_timeout", "run_worker", "runtime_of"]

log = logging.getLogger(__name__)


def broker_url_for(settings: Settings, redis_url: str | None = None) -> str:
    """``SEMCACHE_BROKER_URL``, else database 1 of the cache's Redis (``redis_url`` when the caller knows it)."""
    if settings.broker_url:
        return settings.broker_url
    return with_db(redis_url or cache_url(settings), 1)


def create_celery(settings: Settings, *, redis_url: str | None = None) -> Celery:
    """The Celery app for these settings, with the semcache tasks registered.

    The same app serves senders (the read path's write queue, the CLI, tests) and the worker. ``redis_url`` is the
    cache's Redis when the caller already resolved it (for example the embedded server it started).
    """
    from . import tasks

    url = broker_url_for(settings, redis_url)
    vt = visibility_timeout(settings)
    app = Celery("semcache", broker=url, backend=url, set_as_current=False)
    shared = shared_config(settings)
    transport = shared.pop("broker_transport_options")
    app.conf.update(
        **shared,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=settings.task_time_limit_s,
        task_soft_time_limit=max(1, settings.task_time_limit_s - max(1, settings.task_time_limit_s // 10)),
        # A retry is published while Redis may be restarting: keep trying for about 15 s before giving up.
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 10, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2},
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_transport_options={
            **transport,
            # look for messages of crashed workers often enough to redeliver them soon after they become visible
            "unacked_restore_interval": max(1, min(10, vt // 10)),
            "unacked_restore_throttle": 1,
            # the lock of that sweep outlives a crashed holder by this much (kombu's default is 5 minutes)
            "unacked_mutex_expire": min(300, vt),
        },
        result_backend_always_retry=True,
        result_backend_max_retries=30,
        result_backend_base_sleep_between_retries_ms=100,
        result_backend_max_sleep_between_retries_ms=2000,
        worker_send_task_events=False,
    )
    app.semcache_settings = settings
    app.semcache_redis_url = redis_url
    tasks.register(app)
    return app


def runtime_of(app: Celery) -> WorkerRuntime:
    """The app's :class:`WorkerRuntime` (made on first use when the worker was not started by :func:`run_worker`)."""
    runtime = getattr(app, "semcache_runtime", None)
    if runtime is None:
        runtime = WorkerRuntime(app.semcache_settings, redis_url=app.semcache_redis_url)
        app.semcache_runtime = runtime
    return runtime


def run_worker(settings: Settings, *, concurrency: int | None = None, loglevel: str = "INFO",
               hostname: str | None = None, pipeline: SafetyPipeline | None = None) -> None:
    """Start (or join) the cache's Redis, load the model, check the index, then run a Celery worker until stopped."""
    pipeline = pipeline or SafetyPipeline.from_settings(settings)  # a broken policy file stops us before anything
    visibility_timeout(settings)  # and so does an impossible visibility timeout
    handle = open_redis(settings)
    try:
        embedder = load_embedder_for(settings)
        ensure_index(handle.writer(), IndexSpec(settings=settings, dim=embedder.dim, model_name=embedder.name))
        app = create_celery(settings, redis_url=handle.url)
        runtime = WorkerRuntime(settings, redis_url=handle.url, embedder=embedder, pipeline=pipeline)
        runtime.load_judge()  # before the fork: a bad judge configuration stops the start, model weights are shared
        app.semcache_runtime = runtime
        processes = concurrency or settings.worker_concurrency

        def _after_fork(**_: object) -> None:
            runtime.after_fork(processes)

        worker_process_init.connect(_after_fork, weak=False)
        # We keep running tasks on a broker connection loss on purpose (they are idempotent and finish their write);
        # Celery warns about that choice on every reconnect.
        warnings.filterwarnings("ignore", message=r"\s*In Celery 5.1 we introduced an optional breaking change",
                                category=CPendingDeprecationWarning)
        argv = ["worker", f"--concurrency={processes}", f"--loglevel={loglevel.upper()}", "--pool=prefork",
                "--without-gossip", "--without-mingle", "--without-heartbeat"]
        if hostname:
            argv.append(f"--hostname={hostname}")
        log.info("semcache worker: index %s, broker %s, %d processes", settings.index,
                 broker_url_for(settings, handle.url).split("@")[-1], processes)
        app.worker_main(argv)
    finally:
        handle.close()
