"""Process supervision for ``semcache up``: start child processes, restart the ones that die, stop them all.

A :class:`Supervisor` runs a list of services in order (the Redis first, then the worker, then the web server) and
is driven by :meth:`Supervisor.poll`, called in a loop by its owner. A service whose process exits is restarted
after an exponential backoff (capped); a service that keeps dying right after it starts is reported as a crash loop
with the last lines of its log, and keeps being retried at the capped delay, so the stack heals without a human once
the cause (a Redis that was down, a port that was taken) is gone. :meth:`Supervisor.stop` stops the services in the
reverse order: SIGTERM, a grace period, then SIGKILL.

No orphan outlives the supervisor:

* every child runs in its own process group, so a stop reaches the processes it started (gunicorn's and Celery's
  own workers) with one ``killpg``, and a Ctrl-C in the terminal reaches only the supervisor, which then stops the
  children in order instead of letting them all die at once;
* every child asks the kernel (``PR_SET_PDEATHSIG``) for a SIGTERM when the supervisor dies, even by SIGKILL; the
  child then stops its own subprocesses (gunicorn, Celery and Redis all do on SIGTERM). The death signal is tied to
  the *thread* that forked the child, so children are started only from the thread that runs :meth:`poll`;
* when a child's leader dies, what is left of its process group is stopped before the child is started again (a
  gunicorn worker left behind would keep the port).

>>> policy = RestartPolicy(backoff_initial_s=0.5, backoff_max_s=30)
>>> [policy.delay(n) for n in (1, 2, 3, 4, 8, 20)]
[0.5, 1.0, 2.0, 4.0, 30, 30]
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

__all__ = [
    "RestartPolicy",
    "Service",
    "Command",
    "EmbeddedRedisService",
    "Supervisor",
    "ChildState",
    "describe_exit",
    "process_start_time",
    "pid_alive",
    "tail",
]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    # Loaded once in the parent: a child between fork and exec must not take the dynamic loader's lock.
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except OSError:  # pragma: no cover - not Linux/glibc: no death signal, the process group still works
        return None


_prctl = _load_prctl()


def _child_setup(parent_pid: int, death_signal: int | None) -> Callable[[], None]:
    """What a child runs between fork and exec: its own process group, and a signal when the parent dies."""

    def setup() -> None:
        os.setpgid(0, 0)
        if death_signal is not None and _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, int(death_signal))
            if os.getppid() != parent_pid:  # the parent died before prctl: the kernel will not tell us any more
                os.kill(os.getpid(), int(death_signal))

    return setup


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of a process (clock ticks since boot), to tell a process from a later one that reuses
    its pid. None when the process does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name in field 2 may hold spaces and parentheses: split after its closing parenthesis
    return int(stat.rsplit(")", 1)[1].split()[19])


def describe_exit(code: int) -> str:
    """``exit code 1`` or ``killed by SIGKILL``, from a :attr:`subprocess.Popen.returncode`."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def tail(path: Path | None, lines: int = 15, max_bytes: int = 16_384) -> str:
    """The last lines of a log file ('' if there is none)."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - max_bytes))
            data = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _clear_group(pgid: int, grace_s: float) -> None:
    """Stop what is left of a process group: SIGTERM, up to ``grace_s`` to exit, then SIGKILL."""
    if not _group_alive(pgid):
        return
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return
        time.sleep(0.05)
    _signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)


@dataclass(frozen=True)
class RestartPolicy:
    """When to restart a child, and when to call its deaths a crash loop.

    A child that dies less than ``min_uptime_s`` after it started (or fails to start) "crashed right after start";
    consecutive such crashes form a streak. The restart delay is ``backoff_initial_s * 2 ** (streak - 1)``, capped at
    ``backoff_max_s``; a child that ran longer than ``min_uptime_s`` before it died is restarted after the initial
    delay. ``crash_loop_after`` crashes in a row are reported as a crash loop.
    """

    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    min_uptime_s: float = 10.0
    crash_loop_after: int = 3
    stop_timeout_s: float = 10.0
    leftover_grace_s: float = 2.0

    def delay(self, streak: int) -> float:
        """Seconds to wait before restart number ``streak`` of a crash streak (``streak >= 1``)."""
        return min(self.backoff_max_s, self.backoff_initial_s * 2 ** max(0, streak - 1))


class Service(Protocol):
    """What the supervisor needs of a thing it runs. ``start`` raises when the service cannot start."""

    name: str

    @property
    def pid(self) -> int | None: ...

    @property
    def pgid(self) -> int | None: ...

    @property
    def log_path(self) -> Path | None: ...

    def start(self) -> None: ...

    def poll(self) -> int | None: ...

    def cleanup(self, grace_s: float) -> None: ...

    def stop(self, timeout_s: float) -> None: ...


@dataclass
class Command:
    """A child process from an argv, in its own process group, its output appended to ``log_path``.

    ``death_signal`` is what the kernel sends the child when the supervisor dies (None: nothing).
    """

    name: str
    argv: Sequence[str]
    env: dict[str, str] | None = None
    cwd: Path | None = None
    log_path: Path | None = None
    death_signal: int | None = signal.SIGTERM
    log_max_bytes: int = 20_000_000
    process: subprocess.Popen | None = field(default=None, init=False, repr=False)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def pgid(self) -> int | None:
        return self.process.pid if self.process else None  # the child leads its own group (setpgid(0, 0))

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"{self.name} is already running (pid {self.process.pid})")
        out = self._open_log()
        try:
            self.process = subprocess.Popen(
                list(self.argv),
                stdin=subprocess.DEVNULL,
                stdout=out if out is not None else None,
                stderr=subprocess.STDOUT if out is not None else None,
                env=self.env,
                cwd=self.cwd,
                preexec_fn=_child_setup(os.getpid(), self.death_signal),
                close_fds=True,
            )
        finally:
            if out is not None:
                out.close()

    def _open_log(self):
        if self.log_path is None:
            return None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # one generation of rotation keeps a runaway log bounded
            if self.log_path.stat().st_size > self.log_max_bytes:
                os.replace(self.log_path, self.log_path.with_name(self.log_path.name + ".1"))
        out = open(self.log_path, "ab")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        out.write(f"--- semcache up: starting {self.name} at {stamp}: {' '.join(self.argv)}\n".encode())
        out.flush()
        return out

    def poll(self) -> int | None:
        return self.process.poll() if self.process else None

    def cleanup(self, grace_s: float) -> None:
        """After the leader exited: stop what is left of its process group (its own subprocesses)."""
        if self.process is not None:
            _clear_group(self.process.pid, grace_s)

    def stop(self, timeout_s: float) -> None:
        """SIGTERM to the whole group, ``timeout_s`` for the leader to exit, then SIGKILL; nothing of it is left."""
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) did not stop within %.0fs: killing it", self.name, proc.pid, timeout_s)
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        _clear_group(proc.pid, 1.0)


class EmbeddedRedisService:
    """The embedded Redis (:class:`cache_core.embedded.EmbeddedRedis`) as a supervised service.

    The server must have a fixed port (it is chosen before the first start), so a restart comes back where the
    children already point, on the same data directory, and the append-only file brings the data back.
    ``EmbeddedRedis`` starts the server in its own process group with ``PR_SET_PDEATHSIG`` already.
    """

    name = "redis"

    def __init__(self, server: Any) -> None:
        if not server.port:
            raise ValueError("a supervised embedded Redis needs a fixed port")
        self.server = server

    @property
    def pid(self) -> int | None:
        return self.server.process.pid if self.server.process else None

    @property
    def pgid(self) -> int | None:
        return self.pid

    @property
    def log_path(self) -> Path | None:
        return Path(self.server.data_dir) / "redis.log"

    def start(self) -> None:
        self.server.start()
        if not self.server.owned:  # someone else's server answered for this data dir: not ours to supervise
            raise RuntimeError(f"another process already runs a Redis for {self.server.data_dir} at {self.server.url}")

    def poll(self) -> int | None:
        return self.server.process.poll() if self.server.process else None

    def cleanup(self, grace_s: float) -> None:
        self.server.stop(grace_s)  # forget the dead server: closes its pipe, removes its state file
        process = self.server.process
        if process is not None and process.stderr is not None and not process.stderr.closed:
            process.stderr.close()  # a server that failed to start is not "owned": close its pipe here

    def stop(self, timeout_s: float) -> None:
        self.server.stop(timeout_s)


@dataclass
class ChildState:
    """What the supervisor knows about one service."""

    service: Service
    state: str = "stopped"  # running | restarting | crash-loop | stopped
    started_at: float | None = None  # wall clock
    started_mono: float | None = None
    restarts: int = 0
    streak: int = 0
    next_start_mono: float | None = None
    last_exit: str | None = None
    last_exit_at: float | None = None
    last_error: str | None = None
    history: deque = field(default_factory=lambda: deque(maxlen=20))

    @property
    def name(self) -> str:
        return self.service.name


class Supervisor:
    """Runs services in order, restarts the ones that die, and stops them in reverse order.

    ``on_change`` is called (from the thread that calls :meth:`poll`) after every start, exit and restart, so the
    owner can write its state file.
    """

    def __init__(self, services: Sequence[Service], policy: RestartPolicy | None = None, *,
                 on_change: Callable[[], None] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        names = [s.name for s in services]
        if len(set(names)) != len(names):
            raise ValueError(f"service names repeat: {names}")
        self.policy = policy or RestartPolicy()
        self.children = [ChildState(service) for service in services]
        self.on_change = on_change
        self._clock = clock
        self._thread: int | None = None
        self.stopping = False

    def child(self, name: str) -> ChildState:
        for child in self.children:
            if child.name == name:
                return child
        raise KeyError(name)

    # --- starting --------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start every service in order; if one cannot start, stop the ones already started and raise."""
        self._thread = threading.get_ident()
        for index, child in enumerate(self.children):
            try:
                self._start(child)
            except Exception:
                for started in reversed(self.children[:index]):
                    self._stop(started)
                raise
        self._changed()

    def _start(self, child: ChildState) -> None:
        child.service.start()
        child.state = "running"
        child.started_at = time.time()
        child.started_mono = self._clock()
        child.next_start_mono = None
        child.last_error = None
        child.history.append(("start", child.started_at, child.service.pid))
        log.info("%s started (pid %s)", child.name, child.service.pid)

    # --- supervising -----------------------------------------------------------------------------------------
    def poll(self) -> bool:
        """Notice children that exited and restart the ones whose backoff is over. True if anything changed."""
        if self._thread is not None and threading.get_ident() != self._thread:
            # PR_SET_PDEATHSIG fires when the thread that forked the child exits: keep forking from one thread
            raise RuntimeError("Supervisor.poll must run in the thread that called start()")
        if self.stopping:
            return False
        changed = False
        for child in self.children:
            try:
                if child.state == "running":
                    code = child.service.poll()
                    if code is not None:
                        self._exited(child, code)
                        changed = True
                elif child.state in ("restarting", "crash-loop") and self._clock() >= (child.next_start_mono or 0):
                    self._restart(child)
                    changed = True
            except Exception:  # noqa: BLE001 - one child's trouble must not end the supervision of the others
                log.exception("supervising %s failed", child.name)
        if changed:
            self._changed()
        return changed

    def _exited(self, child: ChildState, code: int) -> None:
        now = self._clock()
        uptime = now - (child.started_mono or now)
        pid = child.service.pid
        child.last_exit = describe_exit(code)
        child.last_exit_at = time.time()
        child.history.append(("exit", child.last_exit_at, pid, code))
        child.service.cleanup(self.policy.leftover_grace_s)
        child.streak = child.streak + 1 if uptime < self.policy.min_uptime_s else 1
        self._schedule(child, f"{child.name} (pid {pid}) exited ({child.last_exit}) after {uptime:.1f}s")

    def _schedule(self, child: ChildState, what: str) -> None:
        delay = self.policy.delay(child.streak)
        child.next_start_mono = self._clock() + delay
        crash_loop = child.streak >= self.policy.crash_loop_after
        child.state = "crash-loop" if crash_loop else "restarting"
        log.warning("%s; restarting it in %.1fs (restart #%d)", what, delay, child.restarts + 1)
        if child.streak == self.policy.crash_loop_after:  # said once per streak; the state shows it meanwhile
            log.error(
                "%s keeps crashing right after start: %d times in a row within %.0fs of starting (last: %s); "
                "retrying every %.0fs at most. Last lines of %s:\n%s",
                child.name, child.streak, self.policy.min_uptime_s, child.last_error or child.last_exit,
                self.policy.backoff_max_s, child.service.log_path or "its output",
                _indent(tail(child.service.log_path)) or "    (empty)",
            )

    def _restart(self, child: ChildState) -> None:
        child.restarts += 1
        try:
            self._start(child)
        except Exception as exc:  # noqa: BLE001 - any failure to start is a crash of this child, not of the supervisor
            child.last_error = f"failed to start: {exc}"
            child.last_exit = child.last_error
            child.last_exit_at = time.time()
            child.history.append(("start-failed", child.last_exit_at, str(exc)[:500]))
            with contextlib.suppress(Exception):
                child.service.cleanup(self.policy.leftover_grace_s)
            child.streak += 1
            self._schedule(child, f"{child.name} could not be restarted: {exc}")
            return
        log.warning("%s restarted (pid %s, restart #%d)", child.name, child.service.pid, child.restarts)

    def run(self, stop: threading.Event, *, interval_s: float = 0.2, on_tick: Callable[[], None] | None = None) -> None:
        """Supervise until ``stop`` is set (for example by a signal handler), then stop every child."""
        try:
            while not stop.wait(interval_s):
                self.poll()
                if on_tick is not None:
                    on_tick()
        finally:
            self.stop()

    # --- stopping --------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every child, the last started first: SIGTERM, ``stop_timeout_s``, SIGKILL. Safe to call twice."""
        self.stopping = True
        for child in reversed(self.children):
            self._stop(child)
        self._changed()

    def _stop(self, child: ChildState) -> None:
        if child.state == "stopped" and child.service.pid is None:
            return
        with contextlib.suppress(Exception):
            if child.state == "running":
                log.info("stopping %s (pid %s)", child.name, child.service.pid)
            child.service.stop(self.policy.stop_timeout_s)
        child.state = "stopped"
        child.next_start_mono = None

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:  # noqa: BLE001 - a failed state write must not stop supervision
                log.exception("writing the supervisor state failed")

    # --- reporting -------------------------------------------------------------------------------------------
    def snapshot(self) -> list[dict[str, Any]]:
        """Plain data about every child, for the state file and ``semcache status``."""
        now = self._clock()
        out = []
        for child in self.children:
            pid = child.service.pid if child.state == "running" else None
            out.append({
                "name": child.name,
                "state": child.state,
                "pid": pid,
                "pid_start_time": process_start_time(pid) if pid else None,
                "started_at": child.started_at,
                "restarts": child.restarts,
                "crash_streak": child.streak,
                "last_exit": child.last_exit,
                "last_exit_at": child.last_exit_at,
                "next_restart_in_s": round(max(0.0, child.next_start_mono - now), 2)
                if child.next_start_mono is not None else None,
                "log": str(child.service.log_path) if child.service.log_path else None,
            })  # fmt: skip
        return out


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())
