"""``GET /healthz`` (the process answers) and ``GET /readyz`` (Redis, the index and the broker answer)."""

from __future__ import annotations

import redis
from flask import Blueprint, jsonify

from cache_core.connection import make_client, text
from cache_core.index import alias_name

from .state import state

__all__ = ["bp"]

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    st = state()
    checks: dict[str, str] = {}
    try:
        st.redis.ping()
        checks["redis"] = "ok"
        try:
            info = st.redis.execute_command("FT.INFO", alias_name(st.settings))
            checks["index"] = "ok" if info else "missing"
        except redis.ResponseError as exc:
            checks["index"] = "missing" if "no such index" in str(exc).lower() or "unknown" in str(exc).lower() \
                else f"error: {text(str(exc))[:200]}"
    except redis.RedisError as exc:
        checks["redis"] = f"unreachable: {type(exc).__name__}"
        checks["index"] = "unknown"
    checks["broker"] = _broker_check(st)
    ready = all(value == "ok" for value in checks.values())
    response = jsonify({"ready": ready, "checks": checks})
    response.status_code = 200 if ready else 503
    return response


def _broker_check(st) -> str:
    url = st.handle.broker_url
    if url.startswith(("redis://", "rediss://", "unix://")):
        broker = make_client(url, timeout_ms=min(st.settings.redis_write_timeout_ms, 2000), max_connections=2)
        try:
            broker.ping()
            return "ok"
        except redis.RedisError as exc:
            return f"unreachable: {type(exc).__name__}"
        finally:
            broker.close()
    try:  # another transport (amqp...): let kombu try once
        with st.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return "ok"
    except Exception as exc:  # noqa: BLE001 - any transport error means "not ready"
        return f"unreachable: {type(exc).__name__}"
