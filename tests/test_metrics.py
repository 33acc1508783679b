"""``GET /metrics``: the Prometheus text format (checked with prometheus_client's own parser and a strict line
grammar), lookups by outcome and strategy, the latency histograms, writes by the worker's safety decision, the
broker's queue depth, dead letters, tokens and money saved; every replica reports the same totals because they all
come from Redis."""

from __future__ import annotations

import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cache_core.deadletters import DeadLetter, push_dead_letter
from cache_core.embedded import EmbeddedRedis
from cache_core.testing import test_settings

from .fixtures_web import _make_app, unique_tenant, wait_task

# One sample line of the text format 0.0.4: name, optional labels, a float value (no timestamps here).
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
SAMPLE = re.compile(rf"^({_NAME})(\{{{_LABEL}(?:,{_LABEL})*\}})? (-?[0-9.e+-]+|\+Inf|-Inf|NaN)$")


def scrape(client, headers=None) -> str:
    response = client.get("/metrics", headers=headers or {})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return response.get_data(as_text=True)


def check_format(text: str) -> None:
    """Strict: every family has HELP then TYPE before its samples, every sample line parses, no family repeats."""
    assert text.endswith("\n")
    declared: dict[str, str] = {}
    current = None
    for line in text.rstrip("\n").split("\n"):
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in declared, f"family {name} declared twice"
            current = name
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name == current and kind in ("counter", "gauge", "histogram")
            declared[name] = kind
        else:
            match = SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            family = match.group(1)
            base = re.sub(r"_(bucket|sum|count)$", "", family) if declared.get(current) == "histogram" else family
            assert base == current, f"{family} outside its family ({current})"


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample by (name, sorted labels), through prometheus_client's reference parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(data: dict, name: str, **labels: str) -> float:
    return data[(name, tuple(sorted(labels.items())))]


def histogram(data: dict, name: str) -> tuple[list[tuple[float, float]], float, float]:
    buckets = sorted((float(dict(labels)["le"]), v) for (n, labels), v in data.items() if n == f"{name}_bucket")
    return buckets, value(data, f"{name}_count"), value(data, f"{name}_sum")


def flush(app) -> None:
    """The stats recorder folds lookups into Redis once a second, off the hot path: fold them now."""
    app.extensions["semcache"].cache().stats.flush()


def test_lookups_latency_and_savings_in_the_prometheus_format(web_app, client, api_headers, seed, web_settings):
    tenant = unique_tenant()
    headers = api_headers(tenant)
    seed("How do I reset my password?", "Settings, then Security, then Reset password.", tenant=tenant,
         metadata={"prompt_tokens": 10, "completion_tokens": 30})
    before = scrape(client)
    check_format(before)
    assert value(samples(before), "semcache_lookups_total", outcome="hit", strategy="exact") == 0

    for prompt in ("How do I reset my password?", "how do i reset my password", "How can I reset my password",
                   "What is the capital of Peru?", "Which planet is the largest?"):
        client.post("/api/v1/lookup", headers=headers, json={"prompt": prompt, "scope": {"locale": "en"}})
    flush(web_app)
    text = scrape(client)
    check_format(text)
    data = samples(text)
    assert value(data, "semcache_redis_up") == 1
    assert value(data, "semcache_lookups_total", outcome="hit", strategy="exact") == 2
    assert value(data, "semcache_lookups_total", outcome="hit", strategy="semantic") == 1
    assert value(data, "semcache_lookups_total", outcome="miss", strategy="none") == 2
    assert value(data, "semcache_lookups_total", outcome="degraded", strategy="none") == 0
    for name, observed in (("semcache_lookup_duration_seconds", 5), ("semcache_search_duration_seconds", 5),
                           ("semcache_embed_duration_seconds", 3)):  # exact hits never embed
        buckets, count, total = histogram(data, name)
        assert count == observed, name
        assert buckets[-1] == (float("inf"), count)
        assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:])), f"{name} buckets must be cumulative"
        assert total > 0
    assert value(data, "semcache_saved_tokens_total", kind="prompt") == 30
    assert value(data, "semcache_saved_tokens_total", kind="completion") == 90
    expected = 30 / 1000 * web_settings.price_per_1k_input_tokens + 90 / 1000 * web_settings.price_per_1k_output_tokens
    assert value(data, "semcache_saved_cost_total") == pytest.approx(expected)
    assert value(data, "semcache_entries", status="approved") == 1
    assert value(data, "semcache_entries", status="pending_review") == 0


def test_every_replica_reports_the_same_totals(web_app, client, api_headers, web_settings, embedder):
    headers = api_headers(unique_tenant())
    for prompt in ("one question", "another question", "one question"):
        client.post("/api/v1/lookup", headers=headers, json={"prompt": prompt})
    flush(web_app)
    replica = _make_app(web_settings, embedder)  # a second process's app: nothing of the first one in memory
    try:
        first, second = samples(scrape(client)), samples(scrape(replica.test_client()))
        assert first == second
        assert value(first, "semcache_lookups_total", outcome="miss", strategy="none") == 3
    finally:
        replica.extensions["semcache"].close()


def test_queue_depth_and_dead_letters(web_app, client, api_headers, web_settings, redis_client):
    """``web_app`` sends its tasks to a queue no worker consumes: each write waits in the broker."""
    headers = api_headers(unique_tenant())
    before = samples(scrape(client))
    for i in range(3):
        assert client.post("/api/v1/entries", headers=headers,
                           json={"prompt": f"question {i}", "response": "answer"}).status_code == 202
    push_dead_letter(redis_client, web_settings, DeadLetter(task="semcache.write_entry", reason="test"))
    after = samples(scrape(client))
    assert value(after, "semcache_queue_depth") == value(before, "semcache_queue_depth") + 3
    assert value(after, "semcache_queue_unacked") >= 0
    assert value(after, "semcache_dead_letters") == value(before, "semcache_dead_letters") + 1 == 1


def test_writes_by_safety_decision_from_the_real_worker(make_settings, password_hash, embedder, worker_factory):
    """A worker and an index of this test's own: the review-queue gauge counts the whole index, so the session's
    shared worker index (whose entries other tests write, moderate and purge meanwhile) could move it under us."""
    from .fixtures_web import _key_factory, _web_overrides

    worker = worker_factory(make_settings(**_web_overrides(password_hash)), concurrency=1)
    app = _make_app(worker.settings, embedder, queue=None)
    worker_client = app.test_client()
    tenant = unique_tenant()
    headers = _key_factory(app)(tenant)
    try:
        _writes_by_decision(worker_client, headers)
    finally:
        app.extensions["semcache"].close()


def _writes_by_decision(worker_client, headers):
    before = samples(scrape(worker_client))
    writes = [("How long does delivery to Spain take?", "Three to five working days.", "approve"),
              ("Who do I call about a damaged parcel?", "Call our desk at +1 (555) 010-7788.", "hold"),
              ("Can you write my essay?", "I'm sorry, but I can't help with that.", "drop")]
    for prompt, response, decision in writes:
        sent = worker_client.post("/api/v1/entries", headers=headers, json={"prompt": prompt, "response": response})
        assert wait_task(worker_client, headers, sent.get_json()["task_id"])["result"]["decision"] == decision
    after = samples(scrape(worker_client))
    for decision in ("approve", "hold", "drop"):
        delta = value(after, "semcache_writes_total", decision=decision) - \
            value(before, "semcache_writes_total", decision=decision)
        assert delta == 1, decision
    assert value(after, "semcache_entries", status="pending_review") == \
        value(before, "semcache_entries", status="pending_review") + 1


def test_a_metrics_token_is_required_when_set(make_settings, embedder):
    app = _make_app(make_settings(metrics_token="scrape-secret-" + "x" * 20), embedder)
    try:
        client = app.test_client()
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        check_format(scrape(client, {"Authorization": "Bearer scrape-secret-" + "x" * 20}))
    finally:
        app.extensions["semcache"].close()


def test_redis_down_is_reported_not_crashed_on(tmp_path, embedder):
    server = EmbeddedRedis(tmp_path / "redis", appendonly=False)
    url = server.start()
    app = _make_app(test_settings(url, data_dir=tmp_path), embedder)
    try:
        client = app.test_client()
        assert value(samples(scrape(client)), "semcache_redis_up") == 1
        server.stop()
        text = scrape(client)
        check_format(text)
        assert samples(text) == {("semcache_redis_up", ()): 0.0}
    finally:
        app.extensions["semcache"].close()
        server.stop()
