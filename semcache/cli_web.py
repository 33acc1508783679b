"""Web commands: ``semcache web`` (the admin UI and HTTP API under gunicorn) and
``semcache keys create|list|revoke``."""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import click

from cache_core.settings import Settings

__all__ = ["register"]

log = logging.getLogger(__name__)


# gunicorn's default format logs the request line ("%(r)s") and the referer, both with their query strings: search
# terms, filters and a login's "next" reached the log (issue 15). The path ("%(U)s") alone names what was asked.
ACCESS_LOG_FORMAT = '%(h)s %(l)s %(u)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s "%(a)s" %(M)sms'


def register(cli: click.Group) -> None:
    cli.add_command(web_cmd)
    cli.add_command(keys_group)


def _serve_gunicorn(settings: Settings, *, host: str, port: int, workers: int, threads: int, timeout: int) -> None:
    from gunicorn.app.base import BaseApplication

    class _App(BaseApplication):
        """gunicorn running ``create_app(settings)`` in each worker (made after the fork: no shared sockets)."""

        def load_config(self) -> None:
            config = {
                "bind": f"{host}:{port}",
                "workers": workers,
                "worker_class": "gthread",
                "threads": threads,
                "timeout": timeout,
                "graceful_timeout": 20,
                "keepalive": 5,
                "accesslog": "-",
                "access_log_format": ACCESS_LOG_FORMAT,
                "errorlog": "-",
                "loglevel": "info",
                "proc_name": "semcache-web",
                "limit_request_line": 8190,
                "post_worker_init": _warm_up,
            }
            if "control_socket_disable" in self.cfg.settings:  # gunicorn >= 25.1: no ~/.gunicorn/gunicorn.ctl
                config["control_socket_disable"] = True  # (several instances would fight over one socket)
            for name, value in config.items():
                self.cfg.set(name, value)

        def load(self) -> Any:
            from web import create_app

            return create_app(settings)

    _App().run()


def _warm_up(worker: Any) -> None:
    """Load the model in the background as soon as a worker starts, so the first lookup does not wait for it."""
    state = worker.wsgi.extensions.get("semcache")
    if state is not None:
        threading.Thread(target=state.warm_up, name="semcache-warm-up", daemon=True).start()


@click.command("web")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="Port to listen on.")
@click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True,
              help="gunicorn worker processes (each loads the embedding model once).")
@click.option("--threads", type=click.IntRange(1, 64), default=16, show_default=True,
              help="Threads per worker (proxy misses hold one for the whole LLM answer).")
@click.option("--timeout", type=click.IntRange(5, 3600), default=60, show_default=True,
              help="Seconds before a silent worker is restarted.")
@click.option("--debug", is_flag=True, help="Flask's development server instead of gunicorn (debugging only).")
def web_cmd(host: str, port: int, workers: int, threads: int, timeout: int, debug: bool) -> None:
    """Serve the admin UI and the HTTP API (/api/v1) with gunicorn."""
    from cache_core.connection import open_redis
    from web.security import secret_key

    from .cli import load_settings

    settings = load_settings()
    if not settings.admin_token and not settings.admin_password_hash:
        click.echo("warning: no SEMCACHE_ADMIN_TOKEN or SEMCACHE_ADMIN_PASSWORD_HASH is set: nobody can log in to the "
                   "UI (the API works with keys from `semcache keys create`)", err=True)
    if settings.cookie_secure and host not in ("127.0.0.1", "localhost", "::1"):
        click.echo("note: the session cookie is Secure: serve the UI through HTTPS (a TLS proxy), or set "
                   "SEMCACHE_COOKIE_SECURE=false for plain http", err=True)
    handle = None
    if not settings.redis_url:
        # Start (or join) the embedded server here, once; the workers connect to its URL.
        handle = open_redis(settings)
        settings = settings.model_copy(update={"redis_url": handle.url})
    secret_key(settings)  # made once here, before the workers race for it
    click.echo(f"semcache web on http://{host}:{port}/  (API: /api/v1, OpenAPI: /api/v1/openapi.json)", err=True)
    try:
        if debug:
            from web import create_app

            create_app(settings).run(host=host, port=port, debug=False, threaded=True)
        else:
            _serve_gunicorn(settings, host=host, port=port, workers=workers, threads=threads, timeout=timeout)
    finally:
        if handle is not None:
            handle.close()


@click.group("keys")
def keys_group() -> None:
    """Create, list and revoke API keys (stored hashed; a key is shown once, when it is created)."""


def _client(settings: Settings):
    from cache_core.connection import open_redis

    return open_redis(settings)


@keys_group.command("create")
@click.option("--tenant", default=None, help="The tenant the key is bound to.")
@click.option("--admin", is_flag=True, help="An admin key: acts on every tenant and may use /api/v1/admin.")
@click.option("--name", default="", help="A label to recognise the key by in `semcache keys list`.")
def keys_create(tenant: str | None, admin: bool, name: str) -> None:
    """Create a key and print it once (it is stored only as a hash and cannot be shown again)."""
    from cache_core.apikeys import create_key

    from .cli import load_settings

    if not admin and not tenant:
        raise click.UsageError("give --tenant T (a tenant key) or --admin (an admin key)")
    if admin and tenant:
        raise click.UsageError("an admin key acts on every tenant: give --admin or --tenant, not both")
    settings = load_settings()
    with _client(settings) as handle:
        key, record = create_key(handle.writer(), settings, tenant=tenant, admin=admin, name=name)
    click.echo(key)
    who = "admin (every tenant)" if admin else f"tenant {tenant!r}"
    click.echo(f"key {record.id} for {who}: keep it now, it is not shown again "
               f"(use it as `Authorization: Bearer <key>`)", err=True)


@keys_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
def keys_list(as_json: bool) -> None:
    """List keys: id, tenant or admin, name, creation time (never the keys themselves)."""
    from cache_core.apikeys import list_keys

    from .cli import load_settings

    settings = load_settings()
    with _client(settings) as handle:
        keys = list_keys(handle.writer(), settings)
    if as_json:
        click.echo(json.dumps([k.model_dump(mode="json") for k in keys], indent=2))
        return
    if not keys:
        click.echo("no API keys (create one with `semcache keys create --tenant T`)")
        return
    click.echo(f"{'id':<14}{'scope':<30}{'created (UTC)':<22}name")
    for key in keys:
        scope = "admin" if key.admin else f"tenant {key.tenant}"
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(key.created_at))
        click.echo(f"{key.id:<14}{scope[:28]:<30}{created:<22}{key.name}")


@keys_group.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by its id (or by the whole key); it stops working at once."""
    from cache_core.apikeys import parse_key, revoke_key

    from .cli import load_settings

    parsed = parse_key(key_id)
    key_id = parsed[0] if parsed else key_id.strip()
    settings = load_settings()
    with _client(settings) as handle:
        if not revoke_key(handle.writer(), settings, key_id):
            raise click.ClickException(f"no API key with id {key_id!r}")
    click.echo(f"revoked key {key_id}")
