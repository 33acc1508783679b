"""The Celery settings every sender and the worker must agree on, in one place.

``web`` (which sends tasks by name), the read path's write queue and the worker each build their own Celery app,
but the broker keeps the visibility timeout per queue, and a sender that publishes to another queue than the worker
consumes loses its tasks. So all of them take these values from here.

Tasks go to a queue named after the deployment's index (``SEMCACHE_INDEX``): two deployments that share one Redis
(and so, by default, one broker database) never take each other's tasks.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError
from .settings import Settings

__all__ = ["task_queue", "visibility_timeout", "shared_config"]


def task_queue(settings: Settings) -> str:
    """The broker queue of this deployment's tasks."""
    return f"{settings.index}-tasks"


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
        "result_expires": 24 * 3600,
        "broker_transport_options": {
            "visibility_timeout": visibility_timeout(settings),
            "socket_timeout": max(5.0, write_timeout),
            "socket_connect_timeout": 5.0,
            "health_check_interval": 10,
        },
        "redis_socket_timeout": max(5.0, write_timeout),
        "redis_socket_connect_timeout": 5.0,
        "redis_backend_health_check_interval": 10,
    }
