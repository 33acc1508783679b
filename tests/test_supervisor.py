"""The supervisor of ``semcache up``, with real child processes: small Python programs that run, crash, ignore
SIGTERM or leave subprocesses behind, and a real embedded Redis that is killed and comes back with its data.

Waits poll for a state with a generous deadline (a slow machine only makes them slower, never wrong); the backoff
schedule is checked on an injected clock, not by timing."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import redis

from cache_core.embedded import EmbeddedRedis, free_port, redacted
from cache_core.settings import Settings
from semcache.cli_ops import STATE_FILE, admin_token_file, read_status
from semcache.supervisor import (
    Command,
    EmbeddedRedisService,
    RestartPolicy,
    Supervisor,
    describe_exit,
    pid_alive,
    process_start_time,
    tail,
)

ROOT = Path(__file__).resolve().parent.parent

# a child that runs until told otherwise, writing its pid (and its subprocess's pid) where the test can read them
RUNNER = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    out = sys.argv[1]
    mode = sys.argv[2] if len(sys.argv) > 2 else ""
    if "ignore-term" in mode:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    grandchild = None
    if "grandchild" in mode:  # a subprocess in the same process group, that also ignores SIGTERM
        grandchild = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    with open(out + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {grandchild.pid if grandchild else 0}")
    os.replace(out + ".tmp", out)
    print("runner up", flush=True)
    time.sleep(600)
""")


def wait_for(predicate, timeout_s: float = 20.0, interval_s: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out waiting for {what}")


def read_pids(path: Path) -> tuple[int, int] | None:
    try:
        leader, grandchild = path.read_text().split()
    except (OSError, ValueError):
        return None
    return int(leader), int(grandchild)


def runner(tmp_path: Path, name: str, mode: str = "") -> tuple[Command, Path]:
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    pidfile = tmp_path / f"{name}.pid"
    return Command(name, [sys.executable, str(script), str(pidfile), mode], log_path=tmp_path / f"{name}.log"), pidfile


def crasher(tmp_path: Path, name: str = "crasher", code: int = 3) -> Command:
    program = f"import sys; print('boom: the config is bad', flush=True); sys.exit({code})"
    return Command(name, [sys.executable, "-c", program], log_path=tmp_path / f"{name}.log")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def supervisors():
    """Every supervisor a test makes is stopped at the end, whatever the test did."""
    made: list[Supervisor] = []
    yield made
    for sup in made:
        sup.stop()


def test_backoff_doubles_and_is_capped():
    policy = RestartPolicy(backoff_initial_s=0.25, backoff_max_s=3)
    assert [policy.delay(n) for n in range(1, 8)] == [0.25, 0.5, 1.0, 2.0, 3, 3, 3]


def test_describe_exit_and_process_identity():
    assert describe_exit(0) == "exit code 0"
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(-15) == "killed by SIGTERM"
    assert process_start_time(os.getpid()) == process_start_time(os.getpid()) is not None
    assert pid_alive(os.getpid())
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not pid_alive(proc.pid)
    assert process_start_time(proc.pid) is None


def test_tail_reads_the_end_of_a_log(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert tail(log, lines=3) == "line 97\nline 98\nline 99"
    assert tail(tmp_path / "missing.log") == ""
    assert tail(None) == ""


def test_crashing_child_is_restarted_with_exponential_backoff_and_reported(tmp_path, supervisors, caplog):
    clock = FakeClock()
    policy = RestartPolicy(backoff_initial_s=1, backoff_max_s=4, min_uptime_s=10, crash_loop_after=3)
    changes = []
    sup = Supervisor([crasher(tmp_path)], policy, clock=clock, on_change=lambda: changes.append(1))
    supervisors.append(sup)
    child = sup.child("crasher")
    caplog.set_level(logging.INFO, logger="semcache.supervisor")
    sup.start()
    assert child.state == "running" and changes

    delays = []
    for attempt in range(1, 6):
        child.service.process.wait(20)  # the child exits at once with code 3
        assert sup.poll()
        assert child.last_exit == "exit code 3"
        assert child.streak == attempt
        delay = child.next_start_mono - clock.now
        delays.append(delay)
        clock.now += delay - 0.01
        assert not sup.poll(), "restarted before its backoff was over"
        assert child.restarts == attempt - 1
        clock.now += 0.01
        assert sup.poll()
        assert child.restarts == attempt and child.state == "running"
    assert delays == [1, 2, 4, 4, 4]

    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, "a crash loop is reported once per streak"
    message = errors[0].getMessage()
    assert "crasher keeps crashing right after start: 3 times in a row" in message
    assert "exit code 3" in message and "boom: the config is bad" in message  # the log tail says why
    assert sum("exited (exit code 3)" in r.getMessage() for r in caplog.records) == 5
    assert sum("crasher restarted" in r.getMessage() for r in caplog.records) == 5

    child.service.process.wait(20)
    sup.poll()
    snap = sup.snapshot()[0]
    assert snap["state"] == "crash-loop" and snap["restarts"] == 5 and snap["crash_streak"] == 6
    assert snap["pid"] is None and snap["last_exit"] == "exit code 3" and snap["next_restart_in_s"] == 4


def test_killed_child_is_restarted_and_a_long_run_resets_the_backoff(tmp_path, supervisors, caplog):
    clock = FakeClock()
    policy = RestartPolicy(backoff_initial_s=0.5, backoff_max_s=8, min_uptime_s=10)
    command, pidfile = runner(tmp_path, "steady")
    sup = Supervisor([command], policy, clock=clock)
    supervisors.append(sup)
    child = sup.child("steady")
    caplog.set_level(logging.INFO, logger="semcache.supervisor")
    sup.start()

    pids = []
    for streak in (1, 2, 3):  # three quick deaths: the delay doubles
        pid = wait_for(lambda: read_pids(pidfile), what="the runner's pid")[0]
        pids.append(pid)
        pidfile.unlink()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: sup.poll(), what="the supervisor to notice the death")
        assert child.last_exit == "killed by SIGKILL" and child.streak == streak
        assert child.next_start_mono - clock.now == 0.5 * 2 ** (streak - 1)
        clock.now = child.next_start_mono
        assert sup.poll() and child.state == "running"

    pid = wait_for(lambda: read_pids(pidfile), what="the runner's pid")[0]
    pidfile.unlink()
    clock.now += 60  # this run lasted longer than min_uptime: the next death is not part of a crash streak
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: sup.poll(), what="the supervisor to notice the death")
    assert child.streak == 1 and child.next_start_mono - clock.now == 0.5
    clock.now = child.next_start_mono
    sup.poll()
    new_pid = wait_for(lambda: read_pids(pidfile), what="the runner's pid")[0]
    assert len({*pids, pid, new_pid}) == 5 and child.restarts == 4
    assert pid_alive(new_pid) and not any(pid_alive(p) for p in pids)
    assert any(f"steady (pid {pid}) exited (killed by SIGKILL)" in r.getMessage() for r in caplog.records)
    assert any("steady restarted (pid" in r.getMessage() and "restart #4" in r.getMessage() for r in caplog.records)


def test_children_lead_their_own_process_group_and_log_to_their_file(tmp_path, supervisors):
    command, pidfile = runner(tmp_path, "grouped")
    sup = Supervisor([command])
    supervisors.append(sup)
    sup.start()
    pid = wait_for(lambda: read_pids(pidfile), what="the runner's pid")[0]
    assert os.getpgid(pid) == pid != os.getpgid(0)  # a Ctrl-C in the terminal reaches only the supervisor
    wait_for(lambda: "runner up" in (tmp_path / "grouped.log").read_text(), what="the child's output in its log")
    assert "--- semcache up: starting grouped" in (tmp_path / "grouped.log").read_text()


def test_stop_escalates_to_sigkill_and_leaves_nothing_of_the_group(tmp_path, supervisors):
    command, pidfile = runner(tmp_path, "stubborn", "ignore-term grandchild")
    sup = Supervisor([command], RestartPolicy(stop_timeout_s=0.5, leftover_grace_s=0.3))
    supervisors.append(sup)
    sup.start()
    leader, grandchild = wait_for(lambda: read_pids(pidfile), what="the runner's pids")
    assert os.getpgid(grandchild) == leader
    sup.stop()
    assert command.process.returncode == -signal.SIGKILL
    wait_for(lambda: not pid_alive(grandchild), timeout_s=10, what="the grandchild to be gone")
    assert sup.child("stubborn").state == "stopped"
    sup.stop()  # twice is harmless


def test_leftovers_of_a_dead_leader_are_stopped_before_the_restart(tmp_path, supervisors):
    command, pidfile = runner(tmp_path, "leaky", "grandchild")
    sup = Supervisor([command], RestartPolicy(backoff_initial_s=0.01, leftover_grace_s=0.3))
    supervisors.append(sup)
    sup.start()
    leader, grandchild = wait_for(lambda: read_pids(pidfile), what="the runner's pids")
    pidfile.unlink()
    os.kill(leader, signal.SIGKILL)  # the grandchild (in the leader's group) ignores SIGTERM and survives its parent
    wait_for(lambda: sup.poll(), what="the supervisor to notice the death")
    assert not pid_alive(grandchild)  # killed before the restart: it would hold ports and files of the old run
    wait_for(lambda: (sup.poll(), sup.child("leaky").state == "running")[1], what="the restart")
    new_leader, new_grandchild = wait_for(lambda: read_pids(pidfile), what="the new pids")
    assert new_leader != leader and pid_alive(new_grandchild)


def test_a_service_that_cannot_start_stops_the_ones_already_started(tmp_path, supervisors):
    first, pidfile = runner(tmp_path, "first")
    broken = Command("broken", [str(tmp_path / "no-such-program")])
    sup = Supervisor([first, broken])
    supervisors.append(sup)
    with pytest.raises(FileNotFoundError):
        sup.start()
    assert first.process.poll() is not None


def test_a_failed_restart_counts_as_a_crash_and_is_retried(tmp_path, supervisors, caplog):
    clock = FakeClock()
    command, pidfile = runner(tmp_path, "fragile")
    sup = Supervisor([command], RestartPolicy(backoff_initial_s=1, crash_loop_after=2), clock=clock)
    supervisors.append(sup)
    child = sup.child("fragile")
    sup.start()
    pid = wait_for(lambda: read_pids(pidfile), what="the runner's pid")[0]
    good_argv = command.argv
    command.argv = [str(tmp_path / "vanished-program")]  # as if the program disappeared (a broken upgrade)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: sup.poll(), what="the supervisor to notice the death")
    clock.now = child.next_start_mono
    with caplog.at_level(logging.WARNING, logger="semcache.supervisor"):
        sup.poll()
    assert child.state == "crash-loop" and child.streak == 2 and "failed to start" in child.last_error
    assert child.next_start_mono - clock.now == 2
    assert any("fragile could not be restarted" in r.getMessage() for r in caplog.records)
    command.argv = good_argv  # the cause is gone: the next attempt heals it
    clock.now = child.next_start_mono
    sup.poll()
    assert child.state == "running" and wait_for(lambda: read_pids(pidfile), what="the restarted runner")


def test_poll_refuses_another_thread(tmp_path, supervisors):
    import threading

    command, _ = runner(tmp_path, "owner")
    sup = Supervisor([command])
    supervisors.append(sup)
    sup.start()
    errors = []

    def other() -> None:
        try:
            sup.poll()
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert errors and "thread" in str(errors[0])


DRIVER = textwrap.dedent("""
    import sys, threading
    sys.path.insert(0, sys.argv[1])
    from semcache.supervisor import Command, Supervisor
    out, script = sys.argv[2], sys.argv[3]
    children = [Command(f"c{i}", [sys.executable, script, f"{out}/c{i}.pid", "grandchild"]) for i in range(2)]
    sup = Supervisor(children)
    sup.start()
    sup.run(threading.Event(), interval_s=0.05)
""")


def test_children_die_when_the_supervisor_is_sigkilled(tmp_path):
    """PR_SET_PDEATHSIG: the kernel tells every child its supervisor died, even by SIGKILL, so none is orphaned."""
    # the children stop their own subprocess on SIGTERM, as gunicorn, Celery and Redis do
    (tmp_path / "runner.py").write_text(RUNNER.replace(
        'print("runner up", flush=True)',
        'signal.signal(signal.SIGTERM, lambda *a: (grandchild and grandchild.kill(), sys.exit(0)))\n'
        'print("runner up", flush=True)'))
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(ROOT), str(tmp_path), str(tmp_path / "runner.py")])
    try:
        pids = [wait_for(lambda i=i: read_pids(tmp_path / f"c{i}.pid"), what=f"child {i}") for i in range(2)]
        for leader, grandchild in pids:
            assert os.getpgid(leader) == leader and grandchild
        driver.kill()
        driver.wait(10)
        everyone = [pid for pair in pids for pid in pair]
        wait_for(lambda: not any(pid_alive(pid) for pid in everyone), timeout_s=15, what="every child to be gone")
    finally:
        if driver.poll() is None:
            driver.kill()
        for i in range(2):
            pair = read_pids(tmp_path / f"c{i}.pid")
            for pid in pair or ():
                if pid and pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)


def test_embedded_redis_is_restarted_on_its_port_with_its_data(tmp_path, supervisors, caplog):
    """A supervised embedded Redis killed with SIGKILL comes back on the same port and data dir; the AOF brings
    back every acknowledged write."""
    port = free_port()
    server = EmbeddedRedis(tmp_path / "data", port=port)
    service = EmbeddedRedisService(server)
    sup = Supervisor([service], RestartPolicy(backoff_initial_s=0.05))
    supervisors.append(sup)
    caplog.set_level(logging.INFO, logger="semcache.supervisor")
    sup.start()
    url = server.url_for(port)  # with the data dir's password (issue 15)
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        client.set("semcache-test:kept", "yes")
        client.set("semcache-test:ttl", "soon", ex=3600)
        old_pid = service.pid
        os.kill(old_pid, signal.SIGKILL)
        wait_for(lambda: (sup.poll(), sup.child("redis").state == "running" and service.pid != old_pid)[1],
                 timeout_s=30, what="the redis to run again")
        assert service.pid != old_pid and server.port == port
        assert client.get("semcache-test:kept") == b"yes"
        assert 0 < client.ttl("semcache-test:ttl") <= 3600
        assert sup.child("redis").last_exit == "killed by SIGKILL"
        assert any("redis restarted" in r.getMessage() for r in caplog.records)
        state = (tmp_path / "data" / "redis.json").read_text()
        assert str(service.pid) in state  # a plain `semcache` command on this data dir finds the new server
    finally:
        client.close()
    sup.stop()
    assert not pid_alive(service.server.process.pid)


def test_embedded_redis_service_needs_a_fixed_port(tmp_path):
    with pytest.raises(ValueError, match="fixed port"):
        EmbeddedRedisService(EmbeddedRedis(tmp_path, port=0))


# --- semcache up / semcache status --------------------------------------------------------------------------------


def child_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEMCACHE_")}
    env["SEMCACHE_DATA_DIR"] = str(data_dir)
    return env


def semcache(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "semcache", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def group_members(pgid: int) -> set[int]:
    """Every live process of a process group (children of children included), from /proc."""
    members = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.add(int(entry.name))
    return members


def read_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


class UpProcess:
    """`semcache up --json` in a temp data dir on a free port, as a user would run it."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.env = child_env(data_dir)
        self.stderr_path = data_dir.parent / f"{data_dir.name}-up.stderr"
        self.stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "semcache", "up", "--port", str(self.port), "--workers", "1", "--concurrency", "1",
             "--json"], env=self.env, stdout=subprocess.PIPE, stderr=self.stderr, cwd=ROOT)

    def ready_info(self, timeout_s: float = 180) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        assert ready, f"semcache up did not report ready:\n{self.log()}"
        line = self.proc.stdout.readline()
        assert line, f"semcache up exited ({self.proc.poll()}):\n{self.log()}"
        return json.loads(line)

    def status(self) -> tuple[int, dict]:
        result = semcache("status", "--json", env=self.env)
        return result.returncode, json.loads(result.stdout)

    def wait_healthy(self, timeout_s: float = 180) -> dict:
        last: list = []

        def healthy():
            code, report = self.status()
            last[:] = [report]
            return report if code == 0 else None

        try:
            return wait_for(healthy, timeout_s=timeout_s, interval_s=0.5, what="a healthy status")
        except AssertionError:
            raise AssertionError(f"never healthy: {json.dumps(last, indent=1)}\n{self.log()}") from None

    def log(self) -> str:
        self.stderr.flush()
        return self.stderr_path.read_text(errors="replace")[-6000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()
        self.proc.stdout.close()


@pytest.fixture
def up_runs(tmp_path):
    runs: list[UpProcess] = []

    def start() -> UpProcess:
        run = UpProcess(tmp_path / f"data{len(runs)}")
        runs.append(run)
        return run

    yield start
    for run in runs:
        state = run.data_dir / STATE_FILE
        children = json.loads(state.read_text()).get("children", []) if state.exists() else []
        run.close()
        for child in children:  # last resort: nothing of a failed test may outlive it
            for pid in group_members(child["pid"]) if child.get("pid") else ():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)


def test_up_runs_heals_and_stops_the_whole_stack(up_runs):
    up = up_runs()
    info = up.ready_info()
    assert {c["name"] for c in info["children"]} == {"redis", "worker", "web"}
    assert info["urls"]["ui"] == f"http://127.0.0.1:{up.port}/"
    token_file = up.data_dir / "admin-token"
    assert info["login"]["token"] == token_file.read_text().strip()
    assert token_file.stat().st_mode & 0o777 == 0o600
    with urllib.request.urlopen(info["urls"]["healthz"], timeout=10) as response:
        assert response.status == 200

    report = up.wait_healthy()
    children = {c["name"]: c for c in report["children"]}
    assert all(c["alive"] and c["restarts"] == 0 for c in children.values())
    assert report["redis"]["reachable"] and report["web"]["readyz"] and report["worker_ping"]["ok"]
    assert report["index_info"]["exists"] and report["index_info"]["num_docs"] == 0
    # the admin token reaches the web app only; every child points at the supervised Redis
    web_env, worker_env = read_environ(children["web"]["pid"]), read_environ(children["worker"]["pid"])
    assert web_env["SEMCACHE_ADMIN_TOKEN"] == info["login"]["token"]
    assert "SEMCACHE_ADMIN_TOKEN" not in worker_env
    redis_url = web_env["SEMCACHE_REDIS_URL"]  # with the password; info shows the URL without it (issue 15)
    assert redis_url == worker_env["SEMCACHE_REDIS_URL"] and redacted(redis_url) == info["redis"]["url"]
    assert EmbeddedRedis(up.data_dir).running_url() == redis_url
    assert os.getpgid(children["web"]["pid"]) == children["web"]["pid"]

    second = semcache("up", "--port", str(free_port()), env=up.env)  # one `up` per data dir
    assert second.returncode == 1 and "already running" in second.stderr

    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    client.set("semcache-e2e:kept", "yes")
    client.close()
    os.kill(children["redis"]["pid"], signal.SIGKILL)
    os.kill(children["worker"]["pid"], signal.SIGKILL)
    report = up.wait_healthy()  # /readyz, the worker ping and Redis answer again
    healed = {c["name"]: c for c in report["children"]}
    for name in ("redis", "worker"):
        assert healed[name]["restarts"] == 1 and healed[name]["alive"]
        assert healed[name]["pid"] != children[name]["pid"]
        assert healed[name]["last_exit"] == "killed by SIGKILL"
    assert healed["web"]["pid"] == children["web"]["pid"] and healed["web"]["restarts"] == 0
    assert report["redis"]["url"] == info["redis"]["url"]  # the same port: the children's URL still works
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    assert client.get("semcache-e2e:kept") == b"yes"  # same port, same data dir: the AOF brought it back
    client.close()
    log = up.log()
    assert "redis restarted" in log and "worker restarted" in log

    everyone = {pid for c in healed.values() for pid in group_members(c["pid"])}
    assert len(everyone) >= 5  # redis, worker + its pool process, gunicorn master + its worker
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(120) == 0, up.log()
    assert not [pid for pid in everyone if pid_alive(pid)], "a child outlived semcache up"
    assert not (up.data_dir / STATE_FILE).exists()
    code, report = up.status()
    assert code == 3 and report["running"] is False and not report["stale"]


def test_up_killed_with_sigkill_leaves_no_orphans(up_runs):
    up = up_runs()
    info = up.ready_info()
    report = up.wait_healthy()
    everyone = {pid for c in report["children"] for pid in group_members(c["pid"])}
    assert len(everyone) >= 5
    up.proc.kill()
    up.proc.wait(10)
    wait_for(lambda: not any(pid_alive(pid) for pid in everyone), timeout_s=90, interval_s=0.2,
             what="every child of the SIGKILLed supervisor to exit")
    code, report = up.status()  # the state file is still there, and is recognised as stale
    assert code == 3 and report["stale"] is True and report["pid"] == info["pid"]
    assert any("stale" in problem for problem in report["problems"])


def test_up_refuses_a_port_in_use(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = semcache("up", "--port", str(port), env=child_env(tmp_path / "data"))
    assert result.returncode == 1 and f"port {port}" in result.stderr and "already in use" in result.stderr
    assert not (tmp_path / "data" / STATE_FILE).exists()
    assert not (tmp_path / "data" / "redis.json").exists()  # failed before anything started


def test_status_without_up_and_with_a_stale_state(tmp_path):
    settings = Settings(data_dir=tmp_path)
    report = read_status(settings)
    assert report["running"] is False and not report["stale"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    state = {"version": 1, "pid": dead.pid, "pid_start_time": 1, "started_at": time.time(), "updated_at": time.time(),
             "children": [{"name": "web", "state": "running", "pid": dead.pid, "pid_start_time": 1}]}
    (tmp_path / STATE_FILE).write_text(json.dumps(state))
    report = read_status(settings)
    assert report["stale"] is True and report["running"] is False and report["children"][0]["alive"] is False
    # a live pid with another start time is a later process that reuses the pid: still stale
    state["pid"] = os.getpid()
    (tmp_path / STATE_FILE).write_text(json.dumps(state))
    assert read_status(settings)["stale"] is True
    result = semcache("status", env=child_env(tmp_path))
    assert result.returncode == 3 and "stale" in result.stdout


def test_admin_token_is_made_once_private_and_reused(tmp_path):
    settings = Settings(data_dir=tmp_path / "d")
    token, path = admin_token_file(settings)
    assert len(token) >= 32 and path.stat().st_mode & 0o777 == 0o600
    assert admin_token_file(settings) == (token, path)
    path.chmod(0o644)
    assert admin_token_file(settings)[0] == token and path.stat().st_mode & 0o777 == 0o600



def test_up_with_an_external_redis_supervises_only_the_worker_and_the_web_app(redis_url, tmp_path, monkeypatch):
    from semcache.cli_ops import _Up

    monkeypatch.setenv("SEMCACHE_ADMIN_TOKEN", "x" * 40)  # the children read the same environment as `up`
    settings = Settings(redis_url=redis_url, data_dir=tmp_path)
    up = _Up(settings, host="127.0.0.1", port=free_port(), web_workers=1, concurrency=1, as_json=True,
             policy=RestartPolicy())
    assert [child.name for child in up.supervisor.children] == ["worker", "web"]
    assert up.redis_info == {"url": redacted(redis_url), "embedded": False, "supervised": False}  # no password
    worker, web = (child.service for child in up.supervisor.children)
    assert worker.env["SEMCACHE_REDIS_URL"] == web.env["SEMCACHE_REDIS_URL"] == redis_url
    assert worker.argv[-3:] == ["worker", "--concurrency", "1"] and "-P" in worker.argv
    assert web.argv[web.argv.index("web"):] == ["web", "--host", "127.0.0.1", "--port", str(up.port), "--workers", "1"]
    assert up.login == {"method": "token", "source": "SEMCACHE_ADMIN_TOKEN"}  # configured: nothing generated
    assert not (tmp_path / "admin-token").exists()
    assert web.env["SEMCACHE_ADMIN_TOKEN"] == "x" * 40 and "SEMCACHE_ADMIN_TOKEN" not in worker.env
    assert "token" not in up.state()["login"]
