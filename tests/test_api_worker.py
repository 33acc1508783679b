"""The API's writes carried out by the session's real Celery worker: write, hold and approve, delete, purge, and a
task that fails. Each test uses its own tenants (the worker's index is shared by the session)."""

from __future__ import annotations

import pytest

from cache_core.schema import Status

from .fixtures_web import unique_tenant, wait_task

pytestmark = pytest.mark.usefixtures("celery_worker")


def _lookup(client, headers, prompt: str, **scope) -> dict:
    return client.post("/api/v1/lookup", headers=headers, json={"prompt": prompt, "scope": scope}).get_json()


def test_write_through_the_worker_then_hit(worker_client, worker_api_headers):
    tenant = unique_tenant()
    headers = worker_api_headers(tenant)
    sent = worker_client.post("/api/v1/entries", headers=headers, json={
        "prompt": "How many legs does a spider have?", "response": "Eight.", "scope": {"locale": "en"},
        "metadata": {"prompt_tokens": 9, "completion_tokens": 2}})
    assert sent.status_code == 202
    task = wait_task(worker_client, headers, sent.get_json()["task_id"])
    assert task["state"] == "success" and task["result"]["decision"] == "approve", task
    assert task["result"]["id"] == sent.get_json()["entry_id"]
    entry = worker_client.get(f"/api/v1/entries/{sent.get_json()['entry_id']}", headers=headers).get_json()
    assert entry["status"] == "approved" and entry["provenance"]["source"] == "api"
    hit = _lookup(worker_client, headers, "How many legs do spiders have?", locale="en")
    assert hit["hit"] and hit["entry"]["response"] == "Eight."


def test_held_entry_is_served_after_an_admin_approves_it(worker_client, worker_api_headers):
    tenant = unique_tenant()
    headers, admin = worker_api_headers(tenant), worker_api_headers(admin=True)
    sent = worker_client.post("/api/v1/entries", headers=headers, json={
        "prompt": "How long is the warranty on the X200 kettle?", "response": "Two years.",
        "flags": ["review"]}).get_json()
    assert wait_task(worker_client, headers, sent["task_id"])["result"]["decision"] == "hold"
    assert _lookup(worker_client, headers, "How long is the warranty on the X200 kettle?")["hit"] is False
    approve = worker_client.post(f"/api/v1/admin/entries/{sent['entry_id']}/status", headers=admin,
                                 json={"status": "approved", "response": "Two years, parts and labour.",
                                       "reason": "ok"})
    task = wait_task(worker_client, admin, approve.get_json()["task_id"])
    assert task["state"] == "success" and task["result"]["changed"] is True
    hit = _lookup(worker_client, headers, "How long is the warranty on the X200 kettle?")
    assert hit["hit"] and hit["entry"]["response"] == "Two years, parts and labour."
    assert hit["entry"]["moderation"]["by"].startswith("key:")


def test_delete_and_purge_with_progress(worker_client, worker_api_headers, worker_seed):
    a, b = unique_tenant("a"), unique_tenant("b")
    keep_b = worker_seed("What is the capital of France?", "Paris", tenant=b)
    one = worker_seed("What is the capital of Spain?", "Madrid", tenant=a)
    for i in range(5):
        worker_seed(f"old french question {i}", tenant=a, locale="fr")
    headers_a, headers_b = worker_api_headers(a), worker_api_headers(b)
    deleted = worker_client.delete(f"/api/v1/entries/{one}", headers=headers_a).get_json()
    assert wait_task(worker_client, headers_a, deleted["task_id"])["result"]["deleted"] == 1
    assert worker_client.get(f"/api/v1/entries/{one}", headers=headers_a).status_code == 404
    purge = worker_client.post("/api/v1/purge", headers=headers_a, json={"scope": {"locale": "fr"}}).get_json()
    assert purge["matched"] == 5
    done = wait_task(worker_client, headers_a, purge["task_id"])
    assert done["state"] == "success" and done["result"]["deleted"] == 5
    # tenant B purging "everything" removes only B's entries; A's purge never touched B
    assert worker_client.get(f"/api/v1/entries/{keep_b}", headers=headers_b).status_code == 200
    everything = worker_client.post("/api/v1/purge", headers=headers_b, json={"scope": {}}).get_json()
    assert wait_task(worker_client, headers_b, everything["task_id"])["result"]["deleted"] == 1
    assert worker_client.get("/api/v1/entries", headers=headers_a).get_json()["total"] == 0
    assert worker_client.get("/api/v1/entries", headers=headers_b).get_json()["total"] == 0


def test_a_failing_task_reports_failure(worker_client, worker_web_app, worker_api_headers):
    from web.dispatch import send_task

    state = worker_web_app.extensions["semcache"]
    admin = worker_api_headers(admin=True)
    key_label = "key:" + admin["Authorization"].split("_")[1]
    task_id = send_task(state.celery, state.redis, state.settings, "semcache.set_status",
                        {"entry_id": "not-an-id", "status": "approved"}, owner=key_label, tenant=None, kind="status")
    task = wait_task(worker_client, admin, task_id)
    assert task["state"] == "failure" and "entry_id" in task["error"]


def test_moderation_survives_a_rewrite(worker_client, worker_api_headers, worker_seed):
    tenant = unique_tenant()
    headers, admin = worker_api_headers(tenant), worker_api_headers(admin=True)
    ident = worker_seed("Is this answer good?", "maybe", tenant=tenant, status=Status.PENDING_REVIEW)
    reject = worker_client.post(f"/api/v1/admin/entries/{ident}/status", headers=admin, json={"status": "rejected"})
    assert wait_task(worker_client, admin, reject.get_json()["task_id"])["state"] == "success"
    rewrite = worker_client.post("/api/v1/entries", headers=headers,
                                 json={"prompt": "Is this answer good?", "response": "yes", "scope": {"locale": "en"}})
    wait_task(worker_client, headers, rewrite.get_json()["task_id"])
    entry = worker_client.get(f"/api/v1/entries/{ident}", headers=headers).get_json()
    assert entry["status"] == "rejected"  # a later write never overrides a moderator's decision
