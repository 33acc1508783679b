"""Issue 7, promises 1-3: Redis down or slow, no acknowledged write lost, memory pressure.

Each test runs its own embedded Redis (a fixed port and data directory, so it can be killed and restarted like
``semcache up``'s supervisor does) and injects the fault into that server only.

Faults tried: SIGSTOP (a hung server) and SIGKILL (a crash) during a small load run against a live web app; SIGKILL
right after the worker acknowledged writes (append-only file on); ``maxmemory`` far below the data written through
the worker's write path, with ``volatile-lfu`` (the embedded default) and, for the start-up warning, ``allkeys-lru``.

Related proofs elsewhere: the library's bounded miss and ``get_or_generate`` through a hung or dead server
(tests/test_core_lookup.py::test_redis_killed_or_hung_mid_run_gives_a_bounded_miss), the proxy forwarding misses
with Redis down (tests/test_proxy.py::test_redis_down_makes_misses_that_are_forwarded), the supervisor bringing the
embedded server back (tests/test_supervisor.py::test_embedded_redis_is_restarted_on_its_port_with_its_data,
::test_up_runs_heals_and_stops_the_whole_stack), a worker SIGKILL mid-batch writing every command exactly once
(tests/test_worker_crash.py::test_sigkill_of_the_worker_mid_batch_writes_every_command_exactly_once).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from cache_core.apikeys import create_key
from cache_core.celeryconf import task_queue
from cache_core.cache import SemanticCache
from cache_core.connection import make_client, open_redis, with_db
from cache_core.embedded import EmbeddedRedis, free_port
from cache_core.index import alias_name
from cache_core.schema import Scope
from cache_core.tasks import WRITE_ENTRY
from cache_core.testing import test_settings

from .fixtures_web import LiveServer, _make_app, _seeder
from .fixtures_worker import make_command, run_task

pytestmark = pytest.mark.slow


# --- helpers -----------------------------------------------------------------------------------------------------
class OwnRedis:
    """An embedded server on a fixed port and directory that a test may hang, kill and bring back."""

    def __init__(self, data_dir: Path, **kwargs) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.kwargs = kwargs
        self.server = EmbeddedRedis(data_dir, port=self.port, **kwargs)
        self.url = self.server.start()

    def stop_signal(self) -> None:
        os.kill(self.server.process.pid, signal.SIGSTOP)

    def cont(self) -> None:
        os.kill(self.server.process.pid, signal.SIGCONT)

    def crash(self) -> None:
        self.server.process.kill()
        self.server.process.wait(10)

    def restart(self) -> None:
        """Same port, same directory: what the supervisor of ``semcache up`` does."""
        self.server = EmbeddedRedis(self.data_dir, port=self.port, **self.kwargs)
        assert self.server.start() == self.url

    def close(self) -> None:
        process = self.server.process
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
        self.server.stop()


@pytest.fixture
def own_redis(tmp_path):
    servers: list[OwnRedis] = []

    def make(**kwargs) -> OwnRedis:
        server = OwnRedis(tmp_path / f"redis-{len(servers)}", **kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def http(url: str, method: str = "GET", headers: dict | None = None, body: dict | None = None,
         timeout: float = 30) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, {"raw": raw.decode(errors="replace")[:300]}


class Load:
    """Two client threads against a live app: one looks up a cached prompt, one writes entries, until stopped.

    Every answer is recorded with the phase it was sent in and how long it took."""

    def __init__(self, base: str, headers: dict, prompt: str) -> None:
        self.base, self.headers, self.prompt = base, headers, prompt
        self.phase = "up"
        self.records: list[dict] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(kind,), daemon=True) for kind in ("lookup", "write")]

    def _run(self, kind: str) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            phase = self.phase
            t0 = time.monotonic()
            if kind == "lookup":
                status, body = http(self.base + "/api/v1/lookup", "POST", self.headers,
                                    {"prompt": self.prompt, "scope": {"locale": "en"}})
            else:
                status, body = http(self.base + "/api/v1/entries", "POST", self.headers,
                                    {"prompt": f"load write {n} {uuid.uuid4().hex[:6]}", "response": "an answer"})
            with self._lock:
                # an answer counts for a phase only if it was sent and answered within it
                self.records.append({"kind": kind, "phase": phase if self.phase == phase else "transition",
                                     "status": status, "body": body, "seconds": time.monotonic() - t0})
            time.sleep(0.02)

    def start(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(60)

    def of(self, kind: str, phase: str) -> list[dict]:
        with self._lock:
            return [r for r in self.records if r["kind"] == kind and r["phase"] == phase]

    def wait_for(self, kind: str, phase: str, count: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.of(kind, phase)) < count and time.monotonic() < deadline:
            time.sleep(0.05)


def wait_until(check, timeout_s: float = 60.0, step: float = 0.1):
    """Poll ``check`` until it returns something truthy (a bound on a loaded machine, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


# --- promise 1 ---------------------------------------------------------------------------------------------------
def test_api_answers_misses_and_503_while_redis_hangs_or_dies_and_recovers_by_itself(own_redis, tmp_path, embedder):
    """A live web app under two client threads; its Redis is SIGSTOPped, resumed, SIGKILLed and restarted.

    While Redis is down: every lookup is 200 with ``hit: false`` and ``degraded`` set (never a 5xx), within a bound;
    writes are 503 (never 500). After Redis comes back (no restart of the app): lookups hit, writes are accepted."""
    server = own_redis(appendonly=True)
    settings = test_settings(server.url, data_dir=tmp_path, redis_timeout_ms=50, breaker_cooldown_ms=200,
                             redis_write_timeout_ms=300, enqueue_timeout_ms=300)
    app = _make_app(settings, embedder)  # tasks go to a queue no worker takes: 202 is the answer that matters
    seed = _seeder(settings, embedder)
    seed("What are your opening hours?", "9 to 5", tenant="acme")
    key, _ = create_key(make_client(server.url, timeout_ms=5000), settings, tenant="acme")
    headers = {"Authorization": f"Bearer {key}"}
    live = LiveServer(app).start()
    load = Load(live.url, headers, "What are your opening hours?").start()
    try:
        load.wait_for("lookup", "up", 3)
        load.wait_for("write", "up", 2)
        for phase, fault in (("hung", server.stop_signal), ("killed", server.crash)):
            load.phase = f"{phase}-start"
            fault()
            load.phase = phase
            load.wait_for("lookup", phase, 5)
            load.wait_for("write", phase, 2)
            load.phase = f"{phase}-recovering"
            server.cont() if phase == "hung" else server.restart()
            recovered = wait_until(lambda: (lambda s, b: s == 200 and b["hit"])(
                *http(live.url + "/api/v1/lookup", "POST", headers, {"prompt": "What are your opening hours?",
                                                           "scope": {"locale": "en"}})))
            assert recovered, f"lookups did not hit again after the server was {phase}"
            load.phase = f"after-{phase}"
            load.wait_for("lookup", f"after-{phase}", 3)
            load.wait_for("write", f"after-{phase}", 2)
    finally:
        load.stop()
        live.stop()
        app.extensions["semcache"].close()

    for record in load.records:  # not one 5xx but the writes' 503 while Redis is down, and no 500 at all
        assert record["status"] != 500, record
        if record["kind"] == "lookup":
            assert record["status"] == 200, record
        else:
            assert record["status"] in (202, 503), record
    for phase in ("hung", "killed"):
        lookups = load.of("lookup", phase)
        assert lookups and all(not r["body"]["hit"] and r["body"]["degraded"] for r in lookups), lookups
        # bounded: the key check's client times out within 0.3 s and the read path's within 50 ms (a generous
        # bound for a loaded 2-core machine, not a performance assertion)
        assert max(r["seconds"] for r in lookups) < 10, lookups
        writes = load.of("write", phase)
        assert writes and all(r["status"] == 503 and r["body"]["error"]["code"] == "unavailable" for r in writes)
        after = load.of("lookup", f"after-{phase}")
        assert after and all(r["body"]["hit"] and r["body"]["degraded"] is None for r in after), after
        assert all(r["status"] == 202 for r in load.of("write", f"after-{phase}"))


def test_library_keeps_answering_through_generate_while_redis_is_dead_and_recovers(own_redis, tmp_path, embedder):
    """``get_or_generate`` answers from ``generate`` with Redis killed, then the same cache object hits again once
    the server is back on its port (no new SemanticCache, no reconnect by the caller)."""
    server = own_redis(appendonly=True)
    settings = test_settings(server.url, data_dir=tmp_path, redis_timeout_ms=50, breaker_cooldown_ms=200)
    SemanticCache(settings, make_client(server.url, timeout_ms=5000), embedder)  # makes the index
    _seeder(settings, embedder)("hello there", "hi", tenant="a")
    cache = SemanticCache(settings, make_client(server.url, timeout_ms=50), embedder, ensure=False)
    scope = {"tenant": "a", "locale": "en"}
    assert cache.lookup("hello there", scope).hit
    server.crash()
    calls = []
    answer = cache.get_or_generate("hello there", scope, lambda: calls.append(1) or "from the LLM")
    assert answer.response == "from the LLM" and not answer.cached and answer.lookup.degraded and calls == [1]
    server.restart()
    assert wait_until(lambda: cache.lookup("hello there", scope).hit)


# --- promise 2 ---------------------------------------------------------------------------------------------------
def test_acknowledged_writes_survive_a_redis_sigkill_and_restart(own_redis, tmp_path, embedder, worker_factory):
    """Append-only file on (the embedded default): every entry the worker reported ``written`` is there after the
    server is SIGKILLed right after the acknowledgement and restarted on the same port and directory, and the index
    serves it again (exact and semantic lookups)."""
    server = own_redis()  # appendonly=True is EmbeddedRedis's default
    settings = test_settings(server.url, index="aof", data_dir=tmp_path, max_retries=3, retry_backoff_s=0.2,
                             retry_backoff_max_s=1.0, redis_timeout_ms=2000)
    worker = worker_factory(settings, concurrency=1)
    tenant = f"aof-{uuid.uuid4().hex[:8]}"
    prompts = [f"How do I reset password number {i}?" for i in range(5)]
    acked = []
    for prompt in prompts:
        result = run_task(worker.app, WRITE_ENTRY, command=make_command(tenant, prompt, f"Answer {prompt}"))
        assert result.successful() and result.result["outcome"] == "written", result.result
        acked.append(result.result["id"])
    worker.kill()  # nothing else writes while the server restarts
    server.crash()
    server.restart()
    client = make_client(server.url, timeout_ms=5000)
    for entry in acked:
        assert client.exists(settings.key_prefix + entry)
        assert client.ttl(settings.key_prefix + entry) > 0  # the TTL came back too
    cache = SemanticCache(settings, client, embedder)
    for prompt, entry in zip(prompts, acked):
        result = wait_until(lambda: (r := cache.lookup(prompt, {"tenant": tenant})).hit and r)
        assert result and result.entry.id == entry and result.strategy == "exact"
    semantic = wait_until(lambda: (r := cache.lookup("how can I reset my password number 3",
                                                     {"tenant": tenant})).hit and r)
    assert semantic and semantic.strategy == "semantic"  # the index itself (not only the keys) came back
    info = client.execute_command("FT.INFO", alias_name(settings))
    assert wait_until(lambda: _num_docs(client, settings) == len(acked)), info


def _num_docs(client, settings) -> int:
    info = client.execute_command("FT.INFO", alias_name(settings))
    if isinstance(info, dict):
        data = {(k.decode() if isinstance(k, bytes) else k): v for k, v in info.items()}
    else:
        data = {(info[i].decode() if isinstance(info[i], bytes) else info[i]): info[i + 1]
                for i in range(0, len(info), 2)}
    return int(float(data["num_docs"]))


# --- promise 3 ---------------------------------------------------------------------------------------------------
def _entry_keys(client, settings) -> list[str]:
    keys = []
    for k in client.scan_iter(match=f"{settings.key_prefix}*", count=1000):
        k = k.decode() if isinstance(k, bytes) else k
        if client.type(k) in (b"ReJSON-RL", "ReJSON-RL"):
            keys.append(k)
    return keys


def test_memory_pressure_evicts_only_entries_and_callers_see_no_error(own_redis, tmp_path, embedder):
    """``maxmemory`` about 3 MB above the empty server's use, ``volatile-lfu`` (the embedded default); 250 entries
    (about 3.5 MB) written through the worker's write path (``worker.service.write_commands``) in batches, looked up
    between batches. No write or lookup fails; entries were evicted; index count == entry key count; API keys, the
    calibration hash, the audit stream and a broker queue list are intact."""
    from worker.safety import SafetyPipeline
    from worker.service import write_commands

    server = own_redis(appendonly=False)
    client = make_client(server.url, timeout_ms=5000)
    assert client.config_get("maxmemory-policy")["maxmemory-policy"] in ("volatile-lfu", b"volatile-lfu")
    settings = test_settings(server.url, index="mem", data_dir=tmp_path)
    cache = SemanticCache(settings, make_client(server.url, timeout_ms=2000), embedder, strict=True)
    # the protected keys: none carries a TTL
    api_key, record = create_key(client, settings, tenant="acme")
    client.hset(settings.key("calibration"), mapping={"*": json.dumps({"threshold": 0.9})})
    broker = make_client(with_db(server.url, 1), timeout_ms=5000)
    broker.lpush(task_queue(settings), *[json.dumps({"task": WRITE_ENTRY, "n": i}) for i in range(50)])
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", str(used + 3_000_000))

    pipeline = SafetyPipeline.from_settings(settings)
    written = []
    for batch in range(10):
        raws = [make_command("acme", f"memory pressure question {batch}-{i} about topic {i * 7 + batch}",
                             f"A plain helpful answer number {batch}-{i}. " * 4) for i in range(25)]
        summary = write_commands(client, settings, embedder, pipeline, raws)
        assert not summary["invalid"] and all(r["outcome"] == "written" for r in summary["results"]), summary
        written += [r["id"] for r in summary["results"]]
        last = raws[-1]["prompt"]
        result = cache.lookup(last, Scope(tenant="acme"))  # strict: an error would raise, not be a miss
        assert result.degraded is None
    stats = client.info("stats")
    assert int(stats["evicted_keys"]) > 0, "the test did not fill past the limit"
    keys = _entry_keys(client, settings)
    assert 0 < len(keys) < len(written)
    assert wait_until(lambda: _num_docs(client, settings) == len(_entry_keys(client, settings)))
    # protected keys intact
    from cache_core.apikeys import verify_key

    assert verify_key(client, settings, api_key) is not None
    assert client.hget(settings.key("calibration"), "*")
    assert client.xlen(settings.key("audit")) >= len(written)
    assert broker.llen(task_queue(settings)) == 50
    # the most recent entry still hits (eviction took cold entries, and the cache kept serving)
    assert cache.lookup(last, Scope(tenant="acme")).hit


def test_startup_warns_when_the_eviction_policy_would_evict_protected_keys(own_redis, tmp_path, caplog):
    """``open_redis`` logs a warning for ``allkeys-*`` policies and none for the ``volatile-lfu`` default."""
    from cache_core.settings import Settings

    quiet = own_redis(appendonly=False)
    loud = own_redis(appendonly=False, maxmemory_policy="allkeys-lru")
    with caplog.at_level(logging.WARNING, logger="cache_core.connection"):
        open_redis(Settings(redis_url=quiet.url, data_dir=tmp_path)).close()
        assert not [r for r in caplog.records if "maxmemory-policy" in r.getMessage()]
        open_redis(Settings(redis_url=loud.url, data_dir=tmp_path)).close()
    warnings = [r.getMessage() for r in caplog.records if "maxmemory-policy" in r.getMessage()]
    assert len(warnings) == 1 and "allkeys-lru" in warnings[0] and "volatile" in warnings[0]
