"""Running the whole system: ``semcache up`` (the supervisor) and ``semcache status``.

``semcache up`` starts the embedded Redis (unless ``SEMCACHE_REDIS_URL`` is set), one Celery worker and the web app
under gunicorn as child processes of one supervisor (:mod:`semcache.supervisor`), restarts any of them that dies,
and stops them all on Ctrl-C or SIGTERM. It writes what it runs to ``<data_dir>/up.json`` (mode 0600), which
``semcache status`` reads and checks against the live processes, so a state file left by a killed ``up`` is reported
as stale rather than believed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import click

from cache_core.settings import Settings

from .supervisor import (
    Command,
    EmbeddedRedisService,
    RestartPolicy,
    Supervisor,
    pid_alive,
    process_start_time,
)

__all__ = ["register", "STATE_FILE", "ADMIN_TOKEN_FILE", "admin_token_file", "read_status"]

log = logging.getLogger(__name__)

STATE_FILE = "up.json"
LOCK_FILE = "up.lock"
ADMIN_TOKEN_FILE = "admin-token"
STATE_VERSION = 1
HEARTBEAT_S = 5.0


def register(cli: click.Group) -> None:
    cli.add_command(up_cmd)
    cli.add_command(status_cmd)


# --- helpers shared by up and status ---------------------------------------------------------------------------
def _redact(url: str) -> str:
    """A Redis URL without its credentials (state files and terminals never show a password)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit((parts.scheme, f"{host}{port}", parts.path, "", ""))


def _embedded_url(redis_state: dict[str, Any], data_dir: Path) -> str | None:
    """The URL in ``up``'s state (shown without a password), with the embedded server's password put back."""
    from cache_core.embedded import EmbeddedRedis

    url = redis_state.get("url")
    if not url or not redis_state.get("embedded"):
        return url
    port = urlsplit(url).port
    return EmbeddedRedis(data_dir).url_for(port) if port else url


def _write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only, atomically (write a temporary file, then rename it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def admin_token_file(settings: Settings) -> tuple[str, Path]:
    """The admin token generated for this data directory, made once (mode 0600) and reused on every start."""
    path = Path(settings.data_dir) / ADMIN_TOKEN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            log.warning("%s was readable by other users: making it private (mode 0600)", path)
            path.chmod(0o600)
        token = path.read_text().strip()
        if len(token) < 32:
            raise click.ClickException(f"{path} does not hold a usable admin token; delete it to have one made")
        return token, path
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token, path


def _login(settings: Settings) -> tuple[dict[str, Any], dict[str, str]]:
    """How to log in to the admin UI, and what the web child needs in its environment for it."""
    if settings.admin_token:
        return {"method": "token", "source": "SEMCACHE_ADMIN_TOKEN"}, {}
    if settings.admin_password_hash:
        return {"method": "password", "user": settings.admin_user, "source": "SEMCACHE_ADMIN_PASSWORD_HASH"}, {}
    token, path = admin_token_file(settings)
    return ({"method": "token", "source": "generated", "token_file": str(path), "token": token},
            {"SEMCACHE_ADMIN_TOKEN": token})


def _browse_host(host: str) -> str:
    if host in ("0.0.0.0", "", "*"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _urls(host: str, port: int) -> dict[str, str]:
    base = f"http://{_browse_host(host)}:{port}"
    return {"ui": f"{base}/", "api": f"{base}/api/v1", "healthz": f"{base}/healthz", "readyz": f"{base}/readyz"}


def _http_get(url: str, timeout_s: float) -> tuple[int | None, Any]:
    """(status, parsed JSON body or None); status None when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - our own http:// URL
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except (OSError, ValueError):
        return None, None
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def _read_state(data_dir: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((data_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and state.get("version") == STATE_VERSION else None


def _same_process(pid: Any, start_time: Any) -> bool:
    """The recorded process still runs: same pid and same kernel start time (not a later process reusing the pid)."""
    if not isinstance(pid, int) or not pid_alive(pid):
        return False
    return start_time is None or process_start_time(pid) == start_time


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


# --- semcache up ---------------------------------------------------------------------------------------------
class _Up:
    """One run of ``semcache up``: the supervisor, its state file and its banner."""

    def __init__(self, settings: Settings, *, host: str, port: int, web_workers: int | None,
                 concurrency: int | None, as_json: bool, policy: RestartPolicy) -> None:
        self.settings = settings
        self.data_dir = Path(settings.data_dir)
        self.host, self.port = host, port
        self.as_json = as_json
        self.urls = _urls(host, port)
        self.logs_dir = self.data_dir / "logs"
        self.started_at = time.time()
        self.ready = False
        self._last_beat = 0.0
        self._last_probe = 0.0
        self.login, web_env = _login(settings)
        self.redis_url, self.redis_info, redis_service = self._redis()

        env = dict(os.environ)
        env.update({
            "SEMCACHE_REDIS_URL": self.redis_url,
            "SEMCACHE_DATA_DIR": str(self.data_dir),
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
            "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "false"),
        })  # fmt: skip
        web_only = ("SEMCACHE_ADMIN_TOKEN", "SEMCACHE_ADMIN_PASSWORD_HASH", "SEMCACHE_SECRET_KEY")
        worker_env = {k: v for k, v in env.items() if k not in web_only}  # the worker needs no UI credential
        # -P: the user's working directory is not put on sys.path, so a folder there named like one of our packages
        # (web/, worker/) cannot shadow them
        semcache = [sys.executable, "-P", "-m", "semcache"]
        worker_argv = semcache + ["worker"] + (["--concurrency", str(concurrency)] if concurrency else [])
        web_argv = semcache + ["web", "--host", host, "--port", str(port)]
        web_argv += ["--workers", str(web_workers)] if web_workers else []
        services: list[Any] = [redis_service] if redis_service is not None else []
        services.append(Command("worker", worker_argv, env=worker_env, log_path=self.logs_dir / "worker.log"))
        services.append(Command("web", web_argv, env={**env, **web_env}, log_path=self.logs_dir / "web.log"))
        self.supervisor = Supervisor(services, policy, on_change=self.write_state)

    def _redis(self) -> tuple[str, dict[str, Any], EmbeddedRedisService | None]:
        from cache_core.embedded import EmbeddedRedis, free_port

        s = self.settings
        if s.redis_url:
            self._check_external(s.redis_url, s.key(""))
            return s.redis_url, {"url": _redact(s.redis_url), "embedded": False, "supervised": False}, None
        server = EmbeddedRedis(self.data_dir, port=s.embedded_port, appendonly=s.embedded_appendonly,
                               maxmemory=s.embedded_maxmemory, maxmemory_policy=s.embedded_maxmemory_policy)
        running = server.running_url()
        if running:  # a `semcache redis` of this data dir: use it, but it is not ours to restart
            log.warning("an embedded redis for %s is already running at %s: using it (not supervised by up)",
                        self.data_dir, _redact(running))
            return running, {"url": _redact(running), "embedded": True, "supervised": False}, None
        server.port = s.embedded_port or free_port()  # fixed now: a restart comes back where the children point
        # with the data dir's password (issue 15); the state file and the banner show the URL without it
        url = server.url_for(server.port, create=True)
        return url, {"url": _redact(url), "embedded": True, "supervised": True,
                     "appendonly": s.embedded_appendonly}, EmbeddedRedisService(server)

    @staticmethod
    def _check_external(url: str, key_prefix: str = "semcache:") -> None:
        from cache_core.connection import check_modules, make_client
        from cache_core.errors import BackendUnavailable

        client = make_client(url, timeout_ms=2000, max_connections=2)
        try:
            check_modules(client, url, key_prefix=key_prefix)  # no Search/JSON is a configuration error: say so now
        except BackendUnavailable as exc:
            log.warning("%s; starting anyway, the children retry until it answers", exc)
        finally:
            client.close()

    # --- state file --------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        login = {k: v for k, v in self.login.items() if k != "token"}
        return {
            "version": STATE_VERSION,
            "pid": os.getpid(),
            "pid_start_time": process_start_time(os.getpid()),
            "started_at": self.started_at,
            "updated_at": time.time(),
            "ready": self.ready,
            "stopping": self.supervisor.stopping,
            "data_dir": str(self.data_dir),
            "index": self.settings.index,
            "host": self.host,
            "port": self.port,
            "urls": self.urls,
            "redis": self.redis_info,
            "login": login,
            "logs_dir": str(self.logs_dir),
            "children": self.supervisor.snapshot(),
        }

    def write_state(self) -> None:
        _write_private(self.data_dir / STATE_FILE, json.dumps(self.state(), indent=2))
        self._last_beat = time.monotonic()

    def tick(self) -> None:
        """Called between supervision rounds: notice when the web app first answers, keep the state file fresh."""
        try:
            self._tick()
        except Exception:  # noqa: BLE001 - a failed probe or state write must not stop the supervision
            log.exception("semcache up: periodic work failed")

    def _tick(self) -> None:
        now = time.monotonic()
        if not self.ready and now - self._last_probe >= 0.5:
            self._last_probe = now
            status, _ = _http_get(self.urls["healthz"], 0.5)
            if status == 200:
                self.ready = True
                self.write_state()
                self._announce_ready()
        if now - self._last_beat >= HEARTBEAT_S:
            self.write_state()

    # --- what the user sees ------------------------------------------------------------------------------------
    def banner(self) -> None:
        if self.as_json:
            return
        redis_line = self.redis_info["url"] + (
            f" (embedded, data in {self.data_dir}, append-only {'on' if self.redis_info.get('appendonly') else 'off'})"
            if self.redis_info["embedded"] else " (SEMCACHE_REDIS_URL)")
        if not self.redis_info["supervised"] and self.redis_info["embedded"]:
            redis_line += " - already running, not supervised"
        lines = [
            f"semcache up (pid {os.getpid()}), data dir {self.data_dir}",
            f"  admin UI   {self.urls['ui']}",
            f"  HTTP API   {self.urls['api']}  (API keys: semcache keys create --tenant NAME)",
            f"  health     {self.urls['healthz']}  {self.urls['readyz']}",
            f"  redis      {redis_line}",
            f"  log in     {self._login_text()}",
            f"  logs       {self.logs_dir}/ (worker.log, web.log) and {self.data_dir / 'redis.log'}",
            "Ctrl-C stops everything; `semcache status` shows what is running. Waiting for the web app...",
        ]
        click.echo("\n".join(lines))
        if self.host not in ("127.0.0.1", "localhost", "::1") and self.settings.cookie_secure:
            click.echo(f"note: the UI's session cookie is HTTPS-only (SEMCACHE_COOKIE_SECURE); on plain http to "
                       f"{self.host}, put a TLS proxy in front or set SEMCACHE_COOKIE_SECURE=false", err=True)

    def _login_text(self) -> str:
        login = self.login
        if login["method"] == "password":
            return f"user {login['user']!r} with the password of SEMCACHE_ADMIN_PASSWORD_HASH"
        if login["source"] == "generated":
            return f"admin token {login['token']}  (generated once, kept in {login['token_file']}, mode 0600)"
        return "the admin token of SEMCACHE_ADMIN_TOKEN"

    def _announce_ready(self) -> None:
        if self.as_json:
            out = self.state()
            if self.login.get("token"):
                out["login"] = dict(out["login"], token=self.login["token"])
            click.echo(json.dumps(out))
        else:
            click.echo(f"ready: {self.urls['ui']}")
        sys.stdout.flush()


def _acquire_lock(data_dir: Path):
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = open(data_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        state = _read_state(data_dir) or {}
        raise click.ClickException(
            f"semcache up is already running for {data_dir} (pid {state.get('pid', '?')}); "
            "see `semcache status`, or set SEMCACHE_DATA_DIR to run another one") from None
    return handle


@click.command("up")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the web app listens on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="Port of the web app.")
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="Web server (gunicorn) worker processes; default: that of `semcache web`.")
@click.option("--concurrency", type=click.IntRange(1, 64), default=None,
              help="Celery worker processes; default: SEMCACHE_WORKER_CONCURRENCY.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (URLs, pids, login) on stdout once the web app answers; logs go to stderr.")
def up_cmd(host: str, port: int, workers: int | None, concurrency: int | None, as_json: bool) -> None:
    """Run everything: the embedded Redis (unless SEMCACHE_REDIS_URL), the worker and the web app, supervised.

    A child that dies is restarted with backoff; Ctrl-C or SIGTERM stops them all.
    """
    from .cli import load_settings

    settings = load_settings()
    for name in ("semcache.supervisor", __name__):
        logging.getLogger(name).setLevel(logging.INFO)
    data_dir = Path(settings.data_dir)
    lock = _acquire_lock(data_dir)
    try:
        if not _port_free(host, port):
            raise click.ClickException(f"port {port} on {host} is already in use: pass another --port")
        up = _Up(settings, host=host, port=port, web_workers=workers, concurrency=concurrency, as_json=as_json,
                 policy=RestartPolicy())
        stop = threading.Event()
        received: list[str] = []

        def on_signal(signum: int, _frame: Any) -> None:
            received.append(signal.Signals(signum).name)
            stop.set()

        signals = [signal.SIGINT, signal.SIGTERM]
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # under nohup, a closed terminal is no reason
            signals.append(signal.SIGHUP)
        previous = {sig: signal.signal(sig, on_signal) for sig in signals}
        try:
            up.supervisor.start()
            up.banner()
            up.supervisor.run(stop, interval_s=0.2, on_tick=up.tick)
        finally:
            up.supervisor.stop()  # a no-op after run(); stops whatever start() left if it raised
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            with contextlib.suppress(OSError):
                (data_dir / STATE_FILE).unlink()
        if received:
            click.echo(f"stopped ({received[0]}): every child process has exited", err=True)
    finally:
        lock.close()


# --- semcache status -----------------------------------------------------------------------------------------
def _probe_redis(url: str, settings: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    from cache_core.connection import make_client
    from cache_core.index import index_info

    client = make_client(url, timeout_ms=1000, max_connections=2)
    try:
        client.ping()
        redis_out: dict[str, Any] = {"reachable": True}
    except Exception as exc:  # noqa: BLE001 - any failure is "unreachable", said in the report
        client.close()
        return {"reachable": False, "error": f"{type(exc).__name__}: {exc}"[:300]}, {"exists": None}
    try:
        info = index_info(client, settings)
        index_out = {"alias": info["alias"], "exists": info["exists"], "num_docs": info.get("num_docs")}
    except Exception as exc:  # noqa: BLE001
        index_out = {"exists": None, "error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        client.close()
    return redis_out, index_out


def _ping_workers(broker_url: str, timeout_s: float = 1.0) -> dict[str, Any]:
    """Celery's broadcast ping: every worker listening on this broker answers with its name."""
    from celery import Celery

    app = Celery("semcache-status", broker=broker_url, set_as_current=False)
    app.conf.update(broker_connection_retry_on_startup=False, broker_connection_timeout=1.0,
                    broker_connection_max_retries=0)
    try:
        replies = app.control.ping(timeout=timeout_s) or []
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "workers": [], "error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        with contextlib.suppress(Exception):
            app.close()
    names = sorted(name for reply in replies for name in reply)
    return {"ok": bool(names), "workers": names}


def read_status(settings: Settings, *, probe: bool = True) -> dict[str, Any]:
    """What runs for ``settings.data_dir``: the state file of ``semcache up``, checked against the live processes,
    and (with ``probe``) whether Redis, the index, the worker and the web app answer."""
    from cache_core.connection import with_db

    data_dir = Path(settings.data_dir)
    state = _read_state(data_dir)
    out: dict[str, Any] = {"data_dir": str(data_dir), "state_file": str(data_dir / STATE_FILE)}
    if state is None:
        return {**out, "running": False, "stale": False, "problems": ["semcache up is not running for this data dir"]}
    now = time.time()
    up_alive = _same_process(state.get("pid"), state.get("pid_start_time"))
    out.update(running=up_alive, stale=not up_alive, pid=state.get("pid"), started_at=state.get("started_at"),
               uptime_s=round(now - state["started_at"], 1) if up_alive and state.get("started_at") else None,
               state_age_s=round(now - float(state.get("updated_at", 0)), 1), ready=state.get("ready"),
               urls=state.get("urls", {}), login=state.get("login", {}), logs_dir=state.get("logs_dir"),
               index=state.get("index"))
    problems: list[str] = []
    if not up_alive:
        problems.append(f"stale state file: semcache up (pid {state.get('pid')}) is not running any more")
    elif out["state_age_s"] > 6 * HEARTBEAT_S:
        problems.append(f"semcache up has not updated its state for {out['state_age_s']:.0f}s (is it stuck?)")
    children = []
    for child in state.get("children", []):
        alive = child.get("state") == "running" and _same_process(child.get("pid"), child.get("pid_start_time"))
        started = child.get("started_at")
        children.append({**child, "alive": alive,
                         "uptime_s": round(now - started, 1) if alive and started else None})
        if up_alive and not alive:
            if child.get("state") == "running":
                problems.append(f"{child['name']} (pid {child.get('pid')}) has exited; the supervisor restarts it")
            else:
                problems.append(f"{child['name']} is {child.get('state')} (last: {child.get('last_exit')}, "
                                f"restarts {child.get('restarts', 0)}); see {child.get('log')}")
    out["children"] = children
    out["redis"] = dict(state.get("redis", {}))
    if probe and up_alive:
        url = settings.redis_url or _embedded_url(state.get("redis", {}), Path(settings.data_dir))
        index_settings = settings.model_copy(update={"index": state.get("index") or settings.index})
        redis_out, index_out = _probe_redis(url, index_settings)
        out["redis"].update(redis_out)
        out["index_info"] = index_out
        if not redis_out["reachable"]:
            problems.append(f"redis is unreachable: {redis_out.get('error')}")
        out["worker_ping"] = _ping_workers(settings.broker_url or with_db(url, 1))
        if not out["worker_ping"]["ok"]:
            problems.append("no Celery worker answered the ping")
        urls = state.get("urls", {})
        healthz, _ = _http_get(urls.get("healthz", ""), 2.0)
        readyz, body = _http_get(urls.get("readyz", ""), 3.0)
        out["web"] = {"healthz": healthz == 200, "readyz": readyz == 200,
                      "readyz_checks": (body or {}).get("checks") if isinstance(body, dict) else None}
        if healthz != 200:
            problems.append(f"the web app does not answer {urls.get('healthz')}")
        elif readyz != 200:
            problems.append(f"the web app is not ready: {out['web']['readyz_checks']}")
    out["problems"] = problems
    out["healthy"] = up_alive and not problems
    return out


def _print_status(report: dict[str, Any]) -> None:
    if "pid" not in report:
        click.echo(f"semcache up is not running for {report['data_dir']}")
        return
    if report["stale"]:
        click.echo(f"semcache up is NOT running: {report['state_file']} is stale (pid {report['pid']} is gone)")
    else:
        click.echo(f"semcache up: running (pid {report['pid']}, up {_duration(report.get('uptime_s'))}), "
                   f"data dir {report['data_dir']}")
    for child in report["children"]:
        pid = child.get("pid") if child["alive"] else "-"
        state = child["state"] if child["alive"] or child["state"] != "running" else "gone"
        last = f" (last: {child['last_exit']})" if child.get("last_exit") and child.get("restarts") else ""
        click.echo(f"  {child['name']:<7} {state:<11} pid {pid!s:<8} up {_duration(child.get('uptime_s')):<8} "
                   f"restarts {child.get('restarts', 0)}{last}")
    urls = report.get("urls", {})
    if urls:
        click.echo(f"  admin UI {urls.get('ui')}   API {urls.get('api')}")
    redis_info = report.get("redis", {})
    if redis_info:
        reach = {True: "reachable", False: "UNREACHABLE", None: "not checked"}[redis_info.get("reachable")]
        click.echo(f"  redis    {redis_info.get('url')} ({'embedded' if redis_info.get('embedded') else 'external'})"
                   f": {reach}")
    index = report.get("index_info")
    if index:
        docs = index.get("num_docs")
        click.echo(f"  index    {index.get('alias', report.get('index'))}: "
                   + (f"{docs:,} documents" if index.get("exists") else "not created yet" if index.get("exists") is
                      False else f"unknown ({index.get('error', '')})"))
    ping = report.get("worker_ping")
    if ping:
        click.echo(f"  worker   ping: " + (", ".join(ping["workers"]) if ping["ok"] else "no answer"))
    web = report.get("web")
    if web:
        click.echo(f"  web      /healthz {'ok' if web['healthz'] else 'FAILED'}, "
                   f"/readyz {'ok' if web['readyz'] else 'not ready: ' + json.dumps(web.get('readyz_checks'))}")
    login = report.get("login") or {}
    if login.get("token_file"):
        click.echo(f"  log in   with the admin token in {login['token_file']}")
    for problem in report["problems"]:
        click.echo(f"  problem: {problem}")


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def status_cmd(as_json: bool) -> None:
    """Tell what `semcache up` runs: pids, uptime, restarts, URLs, and whether Redis, the index, the worker and the
    web app answer. Exit code 0: running and healthy; 1: running with problems; 3: not running (or a stale state)."""
    from .cli import load_settings

    report = read_status(load_settings())
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_status(report)
    if not report.get("running"):
        sys.exit(3)
    if not report.get("healthy"):
        sys.exit(1)
