"""Crashes under load, with workers (and a Redis) of the test's own: the session worker and server are not touched.

- The worker's whole process group is SIGKILLed in the middle of a batch of writes; after a restart every command
  is written exactly once (keys and audit records counted): redelivered messages find their task id in the
  document and write nothing. Only the one message being popped at the kill may be lost, and then not written.
- The cache's Redis (also the broker) is restarted on the same port and data dir under a working worker: tasks
  fail, retry with backoff, and complete; again every command is written exactly once. The restart is a shutdown
  (SIGTERM, the append-only file written out); what a SIGKILL of Redis can lose is described in docs/worker.md.
"""

from __future__ import annotations

import time
import uuid

from cache_core.connection import make_client
from cache_core.embedded import EmbeddedRedis, free_port
from cache_core.tasks import WRITE_ENTRY
from cache_core.testing import test_settings
from tests.fixtures_worker import audit_writes, entry_keys, make_command
from worker.tasks import WRITE_ENTRIES

TOPICS = ("gravity", "magnetism", "friction", "buoyancy", "inertia", "entropy", "refraction", "momentum")


def _commands(tenant: str, n: int) -> list[dict]:
    # no vectors: each task runs the model, so the batch takes long enough to be interrupted
    return [make_command(tenant, f"Explain {TOPICS[i % len(TOPICS)]} in simple words, variant {i}",
                         f"A simple explanation, variant {i}.") for i in range(n)]


def _send(app, commands: list[dict], *, batched: int = 40, batch: int = 10) -> list:
    """One task per command, then the last ``batched`` commands as write_entries batches of ``batch``."""
    results = [app.send_task(WRITE_ENTRY, kwargs={"command": c}) for c in commands[:len(commands) - batched]]
    for start in range(len(commands) - batched, len(commands), batch):
        results.append(app.send_task(WRITE_ENTRIES, kwargs={"commands": commands[start : start + batch]}))
    return results


def _wait_for_writes(client, settings, tenant: str, at_least: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = len(audit_writes(client, settings, tenant))
        if n >= at_least:
            return n
        time.sleep(0.02)
    raise AssertionError(f"fewer than {at_least} writes after {timeout}s")


def _wait_all_but_lost(results: list, worker, quiet_s: float, timeout: float = 300) -> list:
    """Wait until every task has a result, or until nothing has finished for ``quiet_s`` while the broker holds
    nothing for the worker (no message queued or unacknowledged): the tasks still without a result then are lost.
    Every finished task must have succeeded."""
    broker = make_client(worker.settings.broker_url, timeout_ms=5000)
    try:
        deadline = time.monotonic() + timeout
        done, last_change = -1, time.monotonic()
        while time.monotonic() < deadline:
            ready = sum(1 for r in results if r.ready())
            if ready == len(results):
                break
            if ready != done:
                done, last_change = ready, time.monotonic()
            elif time.monotonic() - last_change > quiet_s and not _broker_holds_work(broker):
                break
            time.sleep(0.25)
    finally:
        broker.close()
    failed = [r for r in results if r.ready() and r.state != "SUCCESS"]
    assert not failed, [(r.state, str(r.result)[:200]) for r in failed]
    return [r for r in results if not r.ready()]


def _broker_holds_work(broker) -> bool:
    """Whether any broker list holds a message or any unacknowledged message waits for redelivery."""
    for key in broker.scan_iter(count=1000):
        kind = broker.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if (kind == "list" and broker.llen(key)) or (kind == "zset" and broker.zcard(key)) \
                or (kind == "hash" and b"unacked" in (key if isinstance(key, bytes) else key.encode())
                    and broker.hlen(key)):
            return True
    return False


def _commands_of(result, results: list, commands: list[dict], *, batched: int = 40, batch: int = 10) -> list[dict]:
    """The commands that ``_send`` (with the same ``batched`` and ``batch``) put in the task of ``result``."""
    i = results.index(result)
    singles = len(commands) - batched
    if i < singles:
        return [commands[i]]
    start = singles + (i - singles) * batch
    return commands[start : start + batch]


def _assert_exactly_once(client, settings, tenant: str, commands: list[dict]) -> None:
    keys = entry_keys(client, settings, tenant)
    records = audit_writes(client, settings, tenant)
    assert len(keys) == len(commands)
    assert len(records) == len(commands), f"{len(records)} audit records for {len(commands)} commands"
    assert len({r["id"] for r in records}) == len(commands)
    assert {settings.key_prefix + r["id"] for r in records} == set(keys)


def test_sigkill_of_the_worker_mid_batch_writes_every_command_exactly_once(make_settings, worker_factory,
                                                                           redis_client):
    # a short visibility timeout, so that the messages the killed worker held come back within seconds
    settings = make_settings(task_time_limit_s=10, retry_backoff_s=0.2, retry_backoff_max_s=1.0,
                             broker_visibility_timeout_s=12)
    worker = worker_factory(settings, concurrency=2)
    tenant = f"k-{uuid.uuid4().hex[:8]}"
    commands = _commands(tenant, 240)
    results = _send(worker.app, commands)
    written = _wait_for_writes(redis_client, worker.settings, tenant, 30)
    worker.kill()
    at_kill = len(audit_writes(redis_client, worker.settings, tenant))
    assert written <= at_kill < len(commands), "the kill must land in the middle of the batch"
    worker.start()
    # the killed worker's main process may have been between kombu's BRPOP of a message and recording it as
    # unacknowledged (docs/guarantees.md): at most that one task is lost, and its commands are not written at all
    lost = _wait_all_but_lost(results, worker, quiet_s=30)
    assert len(lost) <= 1, f"{len(lost)} tasks lost"
    lost_commands = [c for r in lost for c in _commands_of(r, results, commands)]
    _assert_exactly_once(redis_client, worker.settings, tenant, [c for c in commands if c not in lost_commands])
    outcomes = [r.result.get("outcome") for r in results if r.ready() and "outcome" in r.result]
    assert set(outcomes) <= {"written", "duplicate"}


def test_redis_restart_under_the_worker_tasks_retry_with_backoff_and_complete(tmp_path, worker_factory):
    port = free_port()
    server = EmbeddedRedis(tmp_path / "redis", port=port, appendonly=True)
    url = server.start()
    restarted = None
    client = make_client(url, timeout_ms=5000)
    try:
        settings = test_settings(url, data_dir=tmp_path, task_time_limit_s=10, retry_backoff_s=0.5,
                                 retry_backoff_max_s=2.0, max_retries=10, broker_visibility_timeout_s=15)
        worker = worker_factory(settings, concurrency=2)
        tenant = f"r-{uuid.uuid4().hex[:8]}"
        # 20 one-command tasks, then batches of 20: the stop (after the 20th write) lands while both pool processes
        # are inside a batch (~0.1 s each). With one-command tasks only (~10 ms each with a warm model) it could
        # land while both waited for their next message, and then no task met the outage at all.
        commands = _commands(tenant, 160)
        layout = {"batched": 140, "batch": 20}
        results = _send(worker.app, commands, **layout)
        _wait_for_writes(client, worker.settings, tenant, 20)
        server.stop()  # SIGTERM: Redis writes its append-only file and drops every connection
        time.sleep(3)
        restarted = EmbeddedRedis(tmp_path / "redis", port=port, appendonly=True)
        assert restarted.start() == url
        lost = _wait_all_but_lost(results, worker, quiet_s=30)
        client.close()
        client = make_client(url, timeout_ms=5000)
        # kombu's Redis transport pops a message (BRPOP) and then records it as unacknowledged in a second command:
        # a server that stops between the two loses that one message (docs/guarantees.md). At most the message in
        # that window may be lost, and a lost command is not written at all (never half, never twice).
        assert len(lost) <= 1, f"{len(lost)} tasks lost"
        lost_commands = [c for r in lost for c in _commands_of(r, results, commands, **layout)]
        kept = [c for c in commands if c not in lost_commands]
        _assert_exactly_once(client, worker.settings, tenant, kept)
        retried = [r.result for r in results if r.ready() and r.result.get("retries")]
        # a task whose write landed just before the stop but whose acknowledgement did not comes back after the
        # visibility timeout and finds its own document: outcome "duplicate", nothing written twice
        redelivered = [r.result for r in results if r.ready() and r.result.get("outcome") == "duplicate"]
        log = worker.log_text()
        assert retried or lost or redelivered, \
            "some task must have met the outage: retried, redelivered, or lost in the pop window"
        if retried:
            assert "retry 1 of 10" in log
        worker.stop()
    finally:
        client.close()
        for s in (restarted, server):
            if s is not None:
                s.stop()
