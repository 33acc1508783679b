"""The application factory: ``create_app(settings)`` builds the admin UI and the HTTP API as one Flask app.

Nothing happens at import time. The factory connects to Redis lazily when ``SEMCACHE_REDIS_URL`` is set (so the app
starts while Redis is down and ``/readyz`` says so) and starts or joins the embedded server otherwise.
"""

from __future__ import annotations

import datetime as dt
import logging
from datetime import timedelta
from typing import Any

from celery import Celery
from flask import Flask, session

from cache_core.connection import RedisHandle, open_redis
from cache_core.feedback import entry_feedback
from cache_core.settings import Settings

from .dispatch import make_celery_client
from .errors import register_error_handlers
from .security import add_security_headers, csrf_token, secret_key
from .state import WebState

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def create_app(settings: Settings, *, redis_handle: RedisHandle | None = None, embedder: Any = None,
               celery: Celery | None = None) -> Flask:
    """Build the Flask app for ``settings``.

    ``redis_handle``, ``embedder`` and ``celery`` let a caller share resources it already has (the tests share the
    session's model); by default the app makes its own, and loads the model on its first lookup.
    """
    app = Flask(__name__)
    # "/api/v1/entries//x" is a malformed path (404), not a redirect to a path the client did not ask for
    app.url_map.merge_slashes = False
    owns = redis_handle is None
    if redis_handle is None:
        redis_handle = RedisHandle(settings=settings, url=settings.redis_url) if settings.redis_url \
            else open_redis(settings)
        if settings.redis_url:
            _check_server(redis_handle, settings)
    celery = celery or make_celery_client(settings, redis_handle.broker_url)
    app.config.update(
        SECRET_KEY=secret_key(settings),
        SESSION_COOKIE_NAME="semcache_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.cookie_secure,
        PERMANENT_SESSION_LIFETIME=timedelta(hours=settings.session_hours),
        MAX_CONTENT_LENGTH=settings.max_request_bytes,
        MAX_FORM_MEMORY_SIZE=settings.max_request_bytes,
        JSON_SORT_KEYS=False,
    )
    app.json.sort_keys = False
    app.extensions["semcache"] = WebState(settings, redis_handle, celery, embedder=embedder, owns_handle=owns)

    from . import actions, api, auth, deadletters, entries, feedback, health, overview, purge, review

    for module in (health, api, auth, overview, entries, feedback, review, purge, deadletters, actions):
        app.register_blueprint(module.bp)
    from . import metrics, proxy  # issue 8: /metrics and the OpenAI-compatible proxy (/v1)

    app.register_blueprint(metrics.bp)
    app.register_blueprint(proxy.bp)

    register_error_handlers(app)
    add_security_headers(app)
    _template_helpers(app)
    return app


def _template_helpers(app: Flask) -> None:
    @app.context_processor
    def _globals() -> dict[str, Any]:
        return {"csrf_token": csrf_token, "current_user": session.get("user")}

    # a global (not a context variable), so the macros of _macros.html see it when imported without context
    app.jinja_env.globals["feedback_of"] = entry_feedback

    @app.template_filter("ts")
    def _ts(value: float | None) -> str:
        if value in (None, ""):
            return "–"
        return dt.datetime.fromtimestamp(float(value), dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")

    @app.template_filter("ago")
    def _ago(value: float | None) -> str:
        if value in (None, ""):
            return "–"
        import time

        seconds = time.time() - float(value)
        future = seconds < 0
        seconds = abs(seconds)
        for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
            if seconds >= size:
                amount = f"{int(seconds // size)} {unit}"
                return f"in {amount}" if future else f"{amount} ago"
        return "in <1 min" if future else "just now"

    @app.template_filter("as_json")
    def _as_json(value: Any) -> str:
        """JSON as a plain string, so autoescaping applies (Jinja's ``tojson`` marks its output safe)."""
        import json

        return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)

    @app.template_filter("money")
    def _money(value: float) -> str:
        return f"${value:,.2f}" if value >= 1 else f"${value:,.4f}"

    @app.template_filter("num")
    def _num(value: float | int | None) -> str:
        if value is None:
            return "–"
        return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"


def _check_server(handle: RedisHandle, settings: Settings) -> None:
    """Refuse to start against a server without Search/JSON or whose KNN replies differ (a configuration error);
    an unreachable server is not one: the app starts, and /readyz reports it until Redis is back."""
    from cache_core.connection import check_modules
    from cache_core.errors import BackendUnavailable

    try:
        check_modules(handle.writer(), handle.url, key_prefix=settings.key(""))
    except BackendUnavailable as exc:  # its message names the server without credentials
        log.warning("%s; starting anyway: /readyz reports it until Redis answers", exc)
