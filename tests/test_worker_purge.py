"""Purges through the real worker: by scope filter, by ids, tenant-bound; batches and progress."""

from __future__ import annotations

import time
import uuid

import pytest

from cache_core.purge import count_matching, purge
from cache_core.tasks import PURGE, SET_STATUS, EntryFilter, PurgeCommand
from cache_core.testing import HashingEmbedder
from tests.fixtures_worker import entry_keys, make_command, run_task
from worker.tasks import WRITE_ENTRIES

_hashing = HashingEmbedder(dim=384)


def seed(app, tenant: str, n: int, *, locale: str = "en", model: str = "default", tag: str = "q") -> list[str]:
    """Write n approved entries for one scope through the worker (vectors supplied: no model needed)."""
    prompts = [f"{tag} question number {i} about {tenant} in {locale}" for i in range(n)]
    vectors = _hashing.embed(prompts)
    commands = [make_command(tenant, p, f"Answer {i}.", scope={"locale": locale, "model": model},
                             embedding=[float(x) for x in v]) for i, (p, v) in enumerate(zip(prompts, vectors))]
    ids = []
    for start in range(0, n, 500):
        result = run_task(app, WRITE_ENTRIES, commands=commands[start : start + 500])
        assert result.state == "SUCCESS", result.result
        ids += [r["id"] for r in result.result["results"]]
    return ids


def tenants(n: int) -> list[str]:
    return [f"p-{uuid.uuid4().hex[:10]}" for _ in range(n)]


def test_purge_by_scope_removes_exactly_the_matching_entries_and_nothing_of_another_tenant(
        worker_settings, celery_app, redis_client):
    a, b = tenants(2)
    seed(celery_app, a, 30, locale="fr")
    keep_a = seed(celery_app, a, 12, locale="en")
    keep_b = seed(celery_app, b, 25, locale="fr")
    result = run_task(celery_app, PURGE, mode="filter", filter={"tenant": a, "locale": "fr"}, by="ops", reason="gdpr")
    assert result.state == "SUCCESS", result.result
    assert result.result["deleted"] == 30 and result.result["matched"] == 30
    assert entry_keys(redis_client, worker_settings, a) == sorted(worker_settings.key_prefix + i for i in keep_a)
    assert entry_keys(redis_client, worker_settings, b) == sorted(worker_settings.key_prefix + i for i in keep_b)
    audit = [f for _, f in redis_client.xrevrange(worker_settings.key("audit"), count=50)
             if f.get(b"event") == b"delete" and f.get(b"reason") == b"gdpr"]
    assert sum(int(f[b"count"]) for f in audit) == 30


def test_a_tenant_bound_purge_never_touches_another_tenant(worker_settings, celery_app, redis_client):
    a, b = tenants(2)
    ids_a = seed(celery_app, a, 10)
    ids_b = seed(celery_app, b, 10)
    # an API key of tenant b asks to purge tenant a's scope: the key's tenant wins
    by_filter = run_task(celery_app, PURGE, mode="filter", filter={"tenant": a}, tenant=b)
    assert by_filter.result["deleted"] == 10
    assert len(entry_keys(redis_client, worker_settings, a)) == 10
    assert entry_keys(redis_client, worker_settings, b) == []
    # by ids: b's key naming a's ids deletes nothing
    ids_b = seed(celery_app, b, 5, tag="again")
    by_ids = run_task(celery_app, PURGE, mode="ids", ids=ids_a[:5] + ids_b[:2], tenant=b)
    assert by_ids.result["deleted"] == 2
    assert len(entry_keys(redis_client, worker_settings, a)) == 10
    assert len(entry_keys(redis_client, worker_settings, b)) == 3


def test_purge_by_status_flags_and_age(worker_settings, celery_app, redis_client):
    (a,) = tenants(1)
    ids = seed(celery_app, a, 6)
    run_task(celery_app, SET_STATUS, entry_id=ids[0], status="rejected", by="mod")
    vector = [float(x) for x in _hashing.embed(["ethics"])[0]]
    flagged = run_task(celery_app, "semcache.write_entry", command=make_command(
        a, "Where can I read about ethics?", "At the library.", flags=["from:import"], embedding=vector))
    assert flagged.result["outcome"] == "written"
    assert run_task(celery_app, PURGE, mode="filter", filter={"tenant": a, "status": "rejected"}).result["deleted"] == 1
    assert run_task(celery_app, PURGE, mode="filter", filter={"tenant": a, "flags": ["from:import"]}).result[
        "deleted"] == 1
    assert run_task(celery_app, PURGE, mode="filter", filter={"tenant": a, "older_than_s": 3600}).result["deleted"] == 0
    time.sleep(1.1)
    assert run_task(celery_app, PURGE, mode="filter", filter={"tenant": a, "older_than_s": 1}).result["deleted"] == 5
    assert entry_keys(redis_client, worker_settings, a) == []


@pytest.mark.parametrize("kwargs", [
    {"mode": "filter", "filter": {}},  # everything: refused
    {"mode": "filter"},
    {"mode": "ids", "ids": ["../../x"]},
    {"mode": "filter", "filter": {"tenant": "a", "colour": "red"}},
    {"mode": "sideways", "ids": ["0" * 32]},
])  # fmt: skip
def test_invalid_purges_are_rejected(celery_app, kwargs):
    result = run_task(celery_app, PURGE, **kwargs)
    assert result.state == "FAILURE" and type(result.result).__name__ == "InvalidInput"


def test_a_large_purge_runs_in_batches_and_reports_progress(worker_settings, celery_app, redis_client):
    """The plain function, with a small batch size, so that the progress callback is seen batch by batch."""
    (a,) = tenants(1)
    seed(celery_app, a, 1200)
    settings = worker_settings.model_copy(update={"purge_batch_size": 250})
    assert count_matching(redis_client, settings, EntryFilter(tenant=a)) == 1200
    seen: list[tuple[int, int]] = []
    result = purge(redis_client, settings, PurgeCommand(mode="filter", filter=EntryFilter(tenant=a)),
                   progress=lambda done, total: seen.append((done, total)))
    assert result["deleted"] == 1200 and result["batches"] == 5
    assert seen[0] == (0, 1200) and seen[-1] == (1200, 1200)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) == 6
    assert entry_keys(redis_client, worker_settings, a) == []


def test_the_purge_task_reports_progress_in_its_state(worker_settings, celery_app, redis_client):
    (a,) = tenants(1)
    seed(celery_app, a, 1500)
    result = celery_app.send_task(PURGE, kwargs={"mode": "filter", "filter": {"tenant": a}})
    states = set()
    while not result.ready():
        meta = result.backend.get_task_meta(result.id)  # state and info read together (the task may end between)
        states.add(meta["status"])
        if meta["status"] == "PROGRESS":
            assert set(meta["result"]) == {"done", "total"} and meta["result"]["total"] == 1500
        time.sleep(0.005)
    assert result.get(timeout=60) == {**result.result, "deleted": 1500, "matched": 1500, "batches": 3}
    assert "PROGRESS" in states  # three batches take long enough to be seen
