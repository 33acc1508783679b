"""Issue 7, promise 7: cache poisoning, end to end through the HTTP API and the session's real worker.

Related proofs at the worker level: every safety check drops or holds
(tests/test_worker_safety.py::test_each_check_drops_or_holds_with_the_right_flags), held entries never hit until
approved (::test_held_entries_never_hit_until_a_moderator_approves_them), a late duplicate keeps the moderator's
status (tests/test_worker_pipeline.py, the ``kept_moderated`` outcome), B cannot write into A's scope through the
API (tests/test_api_isolation.py::test_b_cannot_write_into_a, sending side only).
"""

from __future__ import annotations

from .fixtures_web import unique_tenant, wait_task
from .fixtures_worker import BLOCKED_WORD, entry_keys


def _write(client, headers, body) -> dict:
    response = client.post("/api/v1/entries", headers=headers, json=body)
    assert response.status_code == 202, response.get_json()
    done = wait_task(client, headers, response.get_json()["task_id"])
    assert done["state"] == "success", done
    return {**done["result"], "entry_id": response.get_json()["entry_id"]}


def _lookup(client, headers, prompt) -> dict:
    response = client.post("/api/v1/lookup", headers=headers, json={"prompt": prompt, "min_similarity": 0.5})
    assert response.status_code == 200
    return response.get_json()


def test_responses_failing_the_safety_pipeline_are_never_served(worker_client, worker_api_headers):
    """A blocked word (dropped), a non-answer (dropped) and PII (held): none is served, exactly or semantically."""
    headers = worker_api_headers(unique_tenant("poison"))
    cases = [
        ("What is the best deal today?", f"Try {BLOCKED_WORD} now, it is great", "drop"),
        ("What is the weather in Paris?", "I'm sorry, but I can't help with that.", "drop"),
        ("Is the service up?", "Error: 429 Too Many Requests", "drop"),
        ("Who handles refunds?", "Write to refunds.person@example.org for refunds", "hold"),
    ]
    for prompt, response, decision in cases:
        result = _write(worker_client, headers, {"prompt": prompt, "response": response})
        assert result["decision"] == decision, (prompt, response, result)
        for asked in (prompt, prompt.lower().replace("?", " please?")):
            assert not _lookup(worker_client, headers, asked)["hit"], (prompt, asked)


def test_a_tenant_cannot_write_into_another_tenants_scope(worker_client, worker_api_headers, worker_web_settings,
                                                          redis_client):
    a, b = unique_tenant("victim"), unique_tenant("attacker")
    headers_b = worker_api_headers(b)
    prompt, poison = "How do I reset my password?", "Send your password to evil.example"
    for scope in ({"tenant": a}, {"tenant": a, "locale": "en"}):
        refused = worker_client.post("/api/v1/entries", headers=headers_b,
                                     json={"prompt": prompt, "response": poison, "scope": scope})
        assert refused.status_code in (400, 403), refused.get_json()
    # written in B's own scope, it never reaches A
    _write(worker_client, headers_b, {"prompt": prompt, "response": poison})
    assert entry_keys(redis_client, worker_web_settings, a) == []
    assert not _lookup(worker_client, worker_api_headers(a), prompt)["hit"]
    assert _lookup(worker_client, headers_b, prompt)["hit"]


def test_an_entry_a_moderator_rejected_stays_rejected_after_duplicate_writes(worker_client, worker_api_headers):
    """Rejected through the admin API; the same prompt written again (same response, then another one) by the
    tenant: still rejected, never served."""
    tenant = unique_tenant("mod")
    headers, admin = worker_api_headers(tenant), worker_api_headers(admin=True)
    prompt = "Which plan should I buy?"
    first = _write(worker_client, headers, {"prompt": prompt, "response": "The premium plan, always."})
    assert _lookup(worker_client, headers, prompt)["hit"]
    entry = first["entry_id"]
    rejected = worker_client.post(f"/api/v1/admin/entries/{entry}/status", headers=admin,
                                  json={"status": "rejected", "reason": "upsell"})
    assert rejected.status_code == 202
    assert wait_task(worker_client, admin, rejected.get_json()["task_id"])["state"] == "success"
    for response in ("The premium plan, always.", "The premium plan, definitely."):
        _write(worker_client, headers, {"prompt": prompt, "response": response})
        view = worker_client.get(f"/api/v1/entries/{entry}", headers=headers).get_json()
        assert view["status"] == "rejected", view
        assert not _lookup(worker_client, headers, prompt)["hit"]
