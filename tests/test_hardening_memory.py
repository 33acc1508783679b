"""Issue 15 hardening of Redis memory and the shared broker (item 10 and parts of 14): each test injects the defect.

Hit-count hashes that kept the counts of expired entries forever, task results kept a day, an embedded server with
no memory cap, token counts in entry metadata that corrupted the savings metrics, and two deployments on one broker
database restoring each other's unacknowledged tasks (kombu's shared ``unacked`` keys).
"""

from __future__ import annotations

import time
import uuid

from cache_core.cache import SemanticCache
from cache_core.celeryconf import shared_config
from cache_core.connection import make_client, with_db
from cache_core.embedded import EmbeddedRedis
from cache_core.schema import Scope, WriteCommand
from cache_core.stats import StatsRecorder, read_cumulative, read_stats
from cache_core.store import build_entry, write_command, write_entries
from cache_core.tasks import WRITE_ENTRY
from worker.app import create_celery

from .fixtures_worker import make_command, run_task


# --- item 14: metadata cannot corrupt the savings metrics ----------------------------------------------------------
def test_corrupt_token_counts_of_an_old_entry_do_not_change_the_savings(settings, redis_client, embedder):
    """An entry written before the door checked token counts (built here past it) is a hit like any other, but its
    counts are not added: before, a hit added -1e9 prompt tokens and 1e300 completion tokens to the savings."""
    tenant = f"m-{uuid.uuid4().hex[:8]}"
    prompt = "What is the speed of light?"
    command = WriteCommand.model_construct(prompt=prompt, response="About 300,000 km/s.", scope=Scope(tenant=tenant),
                                           flags=[], ttl_seconds=None, group=None, source="test", lookup_id=None,
                                           embedding=None,
                                           metadata={"prompt_tokens": -10**9, "completion_tokens": 1e300})
    vector = [float(x) for x in embedder.embed([prompt])[0]]
    write_entries(redis_client, settings, [build_entry(command, settings=settings, embedding=vector)])
    good = WriteCommand(prompt="What is the speed of sound?", response="About 343 m/s.", scope=Scope(tenant=tenant),
                        metadata={"prompt_tokens": 9, "completion_tokens": 11}, source="test")
    write_command(redis_client, settings, embedder, good)
    stats = StatsRecorder(redis_client, settings, interval_s=3600)
    cache = SemanticCache(settings, redis_client, embedder, stats=stats)
    try:
        assert cache.lookup(prompt, {"tenant": tenant}).hit
        assert cache.lookup(good.prompt, {"tenant": tenant}).hit
        stats.flush()
    finally:
        stats.close()
    totals = read_stats(redis_client, settings, minutes=5)
    assert totals["hits"] == 2
    assert (totals["saved_prompt_tokens"], totals["saved_completion_tokens"]) == (9, 11)
    cumulative = read_cumulative(redis_client, settings)
    assert (cumulative["saved_prompt_tokens"], cumulative["saved_completion_tokens"]) == (9, 11)


# --- item 10: hit counts of expired entries do not stay forever ----------------------------------------------------
def test_hit_counts_of_entries_that_expired_are_swept(settings, redis_client, embedder):
    tenant = f"h-{uuid.uuid4().hex[:8]}"
    live, _ = write_command(redis_client, settings, embedder, WriteCommand(
        prompt="Still here?", response="Yes.", scope=Scope(tenant=tenant), source="test"))
    gone = [uuid.uuid4().hex for _ in range(700)]  # entries that expired after being hit (no key any more)
    redis_client.hset(settings.key("hits"), mapping={**{i: 3 for i in gone}, live: 5})
    redis_client.hset(settings.key("lasthit"), mapping={**{i: repr(time.time()) for i in gone}, live: "1.0"})
    stats = StatsRecorder(redis_client, settings, interval_s=3600, sweep_every_s=0)
    try:
        for _ in range(20):  # each flush sweeps a slice of the hashes
            stats.flush()
    finally:
        stats.close()
    assert redis_client.hgetall(settings.key("hits")) == {live.encode(): b"5"}
    assert redis_client.hkeys(settings.key("lasthit")) == [live.encode()]


# --- item 10: task results are kept SEMCACHE_TASK_RESULT_TTL_S, not a day ----------------------------------------
def test_task_results_expire_after_the_result_ttl(worker_settings, celery_app, redis_client):
    result = run_task(celery_app, WRITE_ENTRY, command=make_command(f"r-{uuid.uuid4().hex[:8]}", "Kept how long?"))
    assert result.state == "SUCCESS"
    broker = make_client(with_db(worker_settings.redis_url, 1), timeout_ms=5000)
    try:
        ttl = broker.ttl(f"celery-task-meta-{result.id}")
    finally:
        broker.close()
    assert 0 < ttl <= worker_settings.task_result_ttl_s == 3600  # before: 86,400


# --- item 10: the embedded server has a memory cap by default ------------------------------------------------------
def test_the_embedded_server_caps_its_memory_by_default(tmp_path):
    server = EmbeddedRedis(tmp_path / "r", appendonly=False)
    server.start()
    try:
        client = make_client(server.url, timeout_ms=5000)
        limit = int(client.config_get("maxmemory")["maxmemory"])
        policy = client.config_get("maxmemory-policy")["maxmemory-policy"]
        client.close()
    finally:
        server.stop()
    physical = _physical_memory()
    assert 0 < limit <= physical // 2 and policy == "volatile-lfu"  # before: 0, no cap at all


def _physical_memory() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


# --- item 14: two deployments on one broker database keep their own unacknowledged messages ------------------------
def _fetch_without_ack(app):
    """Take one message off the app's queue the way a worker does (recorded as unacknowledged), without acking it."""
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        message = channel.basic_get(app.conf.task_default_queue, no_ack=False)
        assert message is not None
        channel.qos._delivered.clear()  # forget it locally: a crashed worker never acks, never restores on close
        return message


def _restore(app) -> None:
    with app.connection_for_read() as conn:
        conn.default_channel.qos.restore_visible(num=100)


def test_two_deployments_on_one_broker_database_never_restore_each_others_tasks(make_settings, redis_url):
    """Deployment A waits an hour before it redelivers a task a crashed worker held; deployment B only 8 s. With
    kombu's default keys both use one ``unacked`` hash, so B's sweep redelivered A's task long before A's hour."""
    broker_url = with_db(redis_url, 15)
    broker = make_client(broker_url, timeout_ms=5000)
    broker.flushdb()
    a = make_settings(index=f"a{uuid.uuid4().hex[:8]}", broker_url=broker_url, broker_visibility_timeout_s=3600)
    b = make_settings(index=f"b{uuid.uuid4().hex[:8]}", broker_url=broker_url, task_time_limit_s=5,
                      retry_backoff_max_s=1, broker_visibility_timeout_s=8)
    app_a, app_b = create_celery(a), create_celery(b)
    try:
        app_a.send_task(WRITE_ENTRY, kwargs={"command": {}})
        _fetch_without_ack(app_a)  # A's worker took it and died
        queue_a = app_a.conf.task_default_queue
        assert broker.llen(queue_a) == 0
        for key in broker.scan_iter(match="*unacked_index*"):  # pretend B's 8 s (not A's hour) have passed
            broker.zadd(key, {member: time.time() - 60 for member in broker.zrange(key, 0, -1)})
        _restore(app_b)
        assert broker.llen(queue_a) == 0  # B left A's task alone
        transport = shared_config(a)["broker_transport_options"]
        assert broker.hlen(transport["unacked_key"]) == 1
        assert transport["unacked_key"] != shared_config(b)["broker_transport_options"]["unacked_key"]
    finally:
        app_a.close()
        app_b.close()
        broker.flushdb()
        broker.close()


# --- item 10: login-failure and rate-limit counters are not evictable ---------------------------------------------
def _ttls(client, pattern: str) -> dict[str, int]:
    return {key.decode(): client.ttl(key) for key in client.scan_iter(match=pattern, count=1000)}


def test_rate_limit_and_login_failure_counters_carry_no_ttl(client, api_headers, web_settings, redis_client):
    """Under volatile-* eviction a key with a TTL is evictable: before, whoever filled Redis reset their own rate
    limit and login lockout (INCR + EXPIRE 120 s / 15 min). Now the counters are TTL-less hashes."""
    from .fixtures_web import csrf_of

    response = client.post("/api/v1/lookup", headers=api_headers("acme"), json={"prompt": "a question"})
    assert response.status_code == 200
    page = client.get("/login").get_data(as_text=True)
    assert client.post("/login", data={"csrf_token": csrf_of(page), "token": "wrong"}).status_code == 401
    counters = {**_ttls(redis_client, web_settings.key("ratelimit*")),
                **_ttls(redis_client, web_settings.key("loginfail*"))}
    assert len(counters) >= 3 and set(counters.values()) == {-1}, counters


def test_window_counters_roll_over_and_hold_at_most_cap_subjects(redis_client, settings):
    from cache_core.counters import count_in_window, read_in_window

    key = settings.key("counter-test")
    for i in range(50):
        count_in_window(redis_client, key, f"addr-{i}", 60, cap=10, now=600.0)
    assert redis_client.hlen(key) <= 12  # 10 subjects, the window, the shared overflow
    assert read_in_window(redis_client, key, ["addr-0", "addr-49"], 60, cap=10, now=601.0) == [1, 40]
    assert count_in_window(redis_client, key, "addr-0", 60, cap=10, now=660.0) == 1  # a new window starts over
    assert read_in_window(redis_client, key, ["addr-49"], 60, cap=10, now=661.0) == [0]
    assert redis_client.ttl(key) == -1
