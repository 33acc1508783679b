"""POST /api/v1/feedback through the real worker: a wrong exact hit demotes its entry; other tenants cannot rate."""

from __future__ import annotations

import time

import pytest

from .fixtures_web import unique_tenant, wait_task

pytestmark = pytest.mark.usefixtures("celery_worker")


def _feedback(client, headers, lookup_id, correct, deadline_s=15.0):
    """Post feedback, waiting for the lookup log (flushed off the hot path, about once a second)."""
    end = time.monotonic() + deadline_s
    while True:
        response = client.post("/api/v1/feedback", headers=headers, json={"lookup_id": lookup_id, "correct": correct})
        if response.status_code != 404 or time.monotonic() > end:
            return response
        time.sleep(0.2)


def test_wrong_answer_feedback_demotes_the_entry(worker_client, worker_api_headers, worker_seed):
    tenant, other = unique_tenant("fb"), unique_tenant("other")
    entry = worker_seed("What is the return window?", "30 days.", tenant=tenant)
    headers = worker_api_headers(tenant)
    hit = worker_client.post("/api/v1/lookup", headers=headers, json={"prompt": "What is the return window?", "scope": {"locale": "en"}}
                             ).get_json()
    assert hit["hit"] and hit["strategy"] == "exact"
    # another tenant cannot rate (or learn of) this lookup
    foreign = _feedback(worker_client, worker_api_headers(other), hit["lookup_id"], False, deadline_s=0)
    assert foreign.status_code == 404
    sent = _feedback(worker_client, headers, hit["lookup_id"], False)
    assert sent.status_code == 202, sent.get_json()
    assert sent.get_json()["entry_id"] == entry
    task = wait_task(worker_client, headers, sent.get_json()["task_id"])
    assert task["state"] == "success" and task["result"]["demoted"] is True, task
    assert worker_client.get(f"/api/v1/entries/{entry}", headers=headers).get_json()["status"] == "pending_review"
    again = worker_client.post("/api/v1/lookup", headers=headers, json={"prompt": "What is the return window?", "scope": {"locale": "en"}})
    assert again.get_json()["hit"] is False


def test_feedback_validation(worker_client, worker_api_headers):
    headers = worker_api_headers(unique_tenant())
    assert worker_client.post("/api/v1/feedback", headers=headers, json={"lookup_id": "x", "correct": True}
                              ).status_code == 400
    bad = worker_client.post("/api/v1/feedback", headers=headers, json={"lookup_id": "0" * 32, "correct": "yes"})
    assert bad.status_code == 400 and bad.get_json()["error"]["field"] == "correct"
    unknown = worker_client.post("/api/v1/feedback", headers=headers, json={"lookup_id": "0" * 32, "correct": True})
    assert unknown.status_code == 404 and "lookup_id" in unknown.get_json()["error"]["message"] + str(
        unknown.get_json()["error"].get("field"))
