"""The Celery settings every sender and the worker must agree on, in one place.

``web`` (which sends tasks by name), the read path's write queue and the worker each build their own Celery app,
but the broker keeps the visibility timeout per queue, and a sender that publishes to another queue than the worker
consumes loses its tasks. So all of them take these values from here.

Tasks go to a queue named after the deployment's index (``SEMCACHE_INDEX``): two deployments that share one Redis
(and so, by default, one broker database) never take each other's tasks. kombu's Redis transport also keeps the
messages workers hold but have not acknowledged in one hash and one sorted set per database (``unacked``,
``unacked_index``), and every worker's sweep redelivers the entries older than *its own* visibility timeout: a
deployment with a short timeout re-ran another's tasks early. So those keys are named after the index too
(:func:`unacked_keys`). Messages held under the old shared names when a deployment upgrades are not swept by it.

Task results expire after ``SEMCACHE_TASK_RESULT_TTL_S`` (an hour by default; Celery's default, a day, kept them
competing with entries for memory).
"""

from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError
from .settings import Settings

__all__ = ["task_queue", "visibility_timeout", "shared_config", "unacked_keys"]


def task_queue(settings: Settings) -> str:
    """The broker queue of this deployment's tasks."""
    return f"{settings.index}-tasks"


def unacked_keys(settings: Settings) -> dict[str, str]:
    """kombu's Redis transport options naming this deployment's unacknowledged-message keys.

    >>> unacked_keys(Settings(index="shop"))["unacked_key"]
    'shop-tasks:unacked'
    """
    queue = task_queue(settings)
    return {"unacked_key": f"{queue}:unacked", "unacked_index_key": f"{queue}:unacked_index",
            "unacked_mutex_key": f"{queue}:unacked_mutex"}


def visibility_timeout(settings: Settings) -> int:
    """Seconds before the broker hands an unacknowledged message to another worker: above the task time limit plus
    the longest retry delay, or tasks waiting for a retry would run twice.

    >>> visibility_timeout(Settings(task_time_limit_s=300, retry_backoff_max_s=60))
    720
    """
    floor = settings.task_time_limit_s + math.ceil(settings.retry_backoff_max_s)
    if settings.broker_visibility_timeout_s:
        if settings.broker_visibility_timeout_s <= floor:
            raise ConfigError(
                f"SEMCACHE_BROKER_VISIBILITY_TIMEOUT_S={settings.broker_visibility_timeout_s} must exceed the task "
                f"time limit plus the longest retry delay ({floor}s), or tasks waiting for a retry run twice"
            )
        return settings.broker_visibility_timeout_s
    return 2 * floor


def shared_config(settings: Settings) -> dict[str, Any]:
    """Serializers, queue and broker transport options common to the worker and every sender."""
    write_timeout = settings.redis_write_timeout_ms / 1000
    queue = task_queue(settings)
    return {
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_default_queue": queue,
        "task_default_routing_key": queue,
        "task_track_started": True,
        "result_expires": settings.task_result_ttl_s,
        "broker_transport_options": {
            "visibility_timeout": visibility_timeout(settings),
            "socket_timeout": max(5.0, write_timeout),
            "socket_connect_timeout": 5.0,
            "health_check_interval": 10,
            **unacked_keys(settings),
        },
        "redis_socket_timeout": max(5.0, write_timeout),
        "redis_socket_connect_timeout": 5.0,
        "redis_backend_health_check_interval": 10,
    }
