"""Tenant isolation: tenant B's key against tenant A's entries, on every endpoint of the API.

B must not read, hit, write, delete or purge A's entries, nor learn that they exist: an id of A's answers exactly
like an id that names nothing.
"""

from __future__ import annotations

import pytest

from cache_core.schema import Status

from .fixtures_web import unique_tenant


@pytest.fixture
def tenants(api_headers, seed, client):
    a, b = unique_tenant("a"), unique_tenant("b")
    ids = {
        "approved": seed("What is the capital of France?", "Paris", tenant=a),
        "held": seed("How do I reset my password?", "Click reset", tenant=a, status=Status.PENDING_REVIEW),
    }
    headers_a, headers_b = api_headers(a), api_headers(b)
    task_a = client.post("/api/v1/entries", headers=headers_a, json={"prompt": "p", "response": "r"})
    return {"a": a, "b": b, "ids": ids, "A": headers_a, "B": headers_b, "task_a": task_a.get_json()["task_id"]}


def test_b_cannot_hit_as_entries(client, tenants):
    for scope in ({"locale": "en"}, {}):
        body = client.post("/api/v1/lookup", headers=tenants["B"],
                           json={"prompt": "What is the capital of France?", "scope": scope}).get_json()
        assert body["hit"] is False and body["entry"] is None
    # the same lookup with A's key hits: the entry is there
    assert client.post("/api/v1/lookup", headers=tenants["A"], json={
        "prompt": "What is the capital of France?", "scope": {"locale": "en"}}).get_json()["hit"] is True
    named = client.post("/api/v1/lookup", headers=tenants["B"],
                        json={"prompt": "What is the capital of France?", "scope": {"tenant": tenants["a"]}})
    assert named.status_code == 403


def test_b_cannot_read_or_delete_as_entries_nor_tell_they_exist(client, tenants):
    nothing = "f" * 32
    for ident in tenants["ids"].values():
        for method in ("get", "delete"):
            theirs = getattr(client, method)(f"/api/v1/entries/{ident}", headers=tenants["B"])
            absent = getattr(client, method)(f"/api/v1/entries/{nothing}", headers=tenants["B"])
            assert theirs.status_code == absent.status_code == 404
            assert theirs.get_data() == absent.get_data()
    assert client.get(f"/api/v1/entries/{tenants['ids']['held']}", headers=tenants["A"]).status_code == 200


def test_b_lists_none_of_as_entries(client, tenants):
    for query in ("", "?status=pending_review", "?text=capital", f"?tenant={tenants['a']}"):
        response = client.get(f"/api/v1/entries{query}", headers=tenants["B"])
        if query.startswith("?tenant"):
            assert response.status_code == 403  # naming another tenant is refused outright
            continue
        assert response.get_json()["total"] == 0, query


def test_b_cannot_write_into_a(client, tenants, queued):
    refused = client.post("/api/v1/entries", headers=tenants["B"],
                          json={"prompt": "p", "response": "r", "scope": {"tenant": tenants["a"]}})
    assert refused.status_code == 403
    accepted = client.post("/api/v1/entries", headers=tenants["B"],
                           json={"prompt": "What is the capital of France?", "response": "Lyon"})
    _, kwargs = queued(accepted.get_json()["task_id"])
    assert kwargs["command"]["scope"]["tenant"] == tenants["b"]  # B's own copy, never A's entry


def test_b_cannot_purge_a(client, tenants, queued):
    refused = client.post("/api/v1/purge", headers=tenants["B"], json={"scope": {"tenant": tenants["a"]}})
    assert refused.status_code == 403
    everything = client.post("/api/v1/purge", headers=tenants["B"], json={"scope": {}})
    assert everything.status_code == 202 and everything.get_json()["matched"] == 0  # A's two entries not counted
    _, kwargs = queued(everything.get_json()["task_id"])
    assert kwargs["tenant"] == tenants["b"] and kwargs["filter"]["tenant"] == tenants["b"]


def test_b_cannot_see_as_tasks(client, tenants):
    assert client.get(f"/api/v1/tasks/{tenants['task_a']}", headers=tenants["B"]).status_code == 404
    assert client.get(f"/api/v1/tasks/{tenants['task_a']}", headers=tenants["A"]).status_code == 200


def test_b_stats_count_only_b(client, tenants):
    stats = client.get("/api/v1/stats", headers=tenants["B"]).get_json()
    assert stats == {"tenant": tenants["b"], "entries": {"approved": 0, "pending_review": 0, "rejected": 0}}
    assert "lookups" not in stats  # deployment-wide lookup statistics are for admin keys only


def test_b_cannot_use_admin_endpoints_on_a(client, tenants):
    held = tenants["ids"]["held"]
    assert client.post(f"/api/v1/admin/entries/{held}/status", headers=tenants["B"],
                       json={"status": "approved"}).status_code == 403
    assert client.get("/api/v1/admin/tenants", headers=tenants["B"]).status_code == 403
    assert client.get("/api/v1/admin/deadletters", headers=tenants["B"]).status_code == 403
