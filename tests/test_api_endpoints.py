"""The HTTP API through Flask's test client: every endpoint, its answers and its error paths.

Tasks sent here go to a queue no worker consumes: these tests check what is sent (and to whom it
belongs); ``test_api_worker.py`` checks what the real worker then does.
"""

from __future__ import annotations

import json

import pytest

from cache_core.apikeys import revoke_key
from cache_core.schema import Status, entry_id, Scope

from .fixtures_web import unique_tenant


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    body = response.get_json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
    assert "Traceback" not in response.get_data(as_text=True)
    return body["error"]


# --- health ------------------------------------------------------------------------------------------------------
def test_healthz_and_readyz(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.get_json() == {"ready": True, "checks": {"redis": "ok", "index": "ok", "broker": "ok"}}


def test_readyz_reports_a_missing_index(make_settings, embedder):
    from web import create_app

    app = create_app(make_settings(), embedder=embedder)  # nobody created this index
    body = app.test_client().get("/readyz")
    assert body.status_code == 503 and body.get_json()["checks"]["index"] == "missing"


# --- authentication ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("header", [None, "Basic abc", "Bearer ", "Bearer not-a-key",
                                    "Bearer sc_0123456789ab_" + "A" * 43])
def test_requests_without_a_valid_key_are_401(client, header):
    headers = {"Authorization": header} if header is not None else {}
    for method, path in [("post", "/api/v1/lookup"), ("get", "/api/v1/stats"), ("get", "/api/v1/entries/" + "0" * 32),
                         ("post", "/api/v1/purge"), ("get", "/api/v1/tasks/abc"), ("get", "/api/v1/admin/tenants")]:
        response = getattr(client, method)(path, headers=headers, json={})
        assert error_of(response, 401)["code"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_a_revoked_key_stops_working(client, web_app, api_headers):
    headers = api_headers("acme")
    assert client.get("/api/v1/stats", headers=headers).status_code == 200
    key_id = headers["Authorization"].split("_")[1]
    state = web_app.extensions["semcache"]
    assert revoke_key(state.redis, state.settings, key_id)
    error_of(client.get("/api/v1/stats", headers=headers), 401)


# --- lookup ------------------------------------------------------------------------------------------------------
def test_lookup_exact_semantic_and_miss(client, api_headers, seed):
    tenant = unique_tenant()
    seed("What is the capital of France?", "Paris", tenant=tenant)
    headers = api_headers(tenant)
    exact = client.post("/api/v1/lookup", headers=headers,
                        json={"prompt": "what is the capital of france", "scope": {"locale": "en"}}).get_json()
    assert exact["hit"] and exact["strategy"] == "exact" and exact["similarity"] == 1.0
    assert exact["entry"]["response"] == "Paris" and exact["entry"]["scope"]["tenant"] == tenant
    assert "embedding" not in exact["entry"] and exact["lookup_id"]
    semantic = client.post("/api/v1/lookup", headers=headers,
                           json={"prompt": "Which city is the capital of France?", "scope": {"locale": "en"},
                                 "min_similarity": 0.8}).get_json()
    assert semantic["hit"] and semantic["strategy"] == "semantic" and 0.8 <= semantic["similarity"] < 1.0
    miss = client.post("/api/v1/lookup", headers=headers,
                       json={"prompt": "How tall is Mount Everest?", "scope": {"locale": "en"}}).get_json()
    assert miss == {**miss, "hit": False, "entry": None, "similarity": None, "strategy": None}
    other_locale = client.post("/api/v1/lookup", headers=headers,
                               json={"prompt": "What is the capital of France?", "scope": {"locale": "fr"}})
    assert other_locale.get_json()["hit"] is False


def test_lookup_never_serves_held_or_rejected_entries(client, api_headers, seed):
    tenant = unique_tenant()
    seed("Is this held?", "held", tenant=tenant, status=Status.PENDING_REVIEW)
    seed("Is this rejected?", "rejected", tenant=tenant, status=Status.REJECTED)
    headers = api_headers(tenant)
    for prompt in ("Is this held?", "Is this rejected?"):
        body = client.post("/api/v1/lookup", headers=headers, json={"prompt": prompt, "scope": {"locale": "en"}})
        assert body.get_json()["hit"] is False


@pytest.mark.parametrize("body, field", [
    ({}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "hi", "scope": "en"}, "scope"),
    ({"prompt": "hi", "scope": {"locale": 1}}, "scope.locale"),
    ({"prompt": "hi", "scope": {"locale": ""}}, "scope.locale"),
    ({"prompt": "hi", "scope": {"region": "eu"}}, "scope.region"),
    ({"prompt": "hi", "scope": {"extra": []}}, "scope.extra"),
    ({"prompt": "hi", "min_similarity": 2}, "min_similarity"),
    ({"prompt": "hi", "min_similarity": "0.5"}, "min_similarity"),
    ({"prompt": "hi", "surprise": 1}, "surprise"),
    ({"prompt": "a\x00b"}, "prompt"),
    ({"prompt": "x" * 8001}, "prompt"),
])  # fmt: skip
def test_lookup_input_errors_name_the_field(client, api_headers, body, field):
    error = error_of(client.post("/api/v1/lookup", headers=api_headers("acme"), json=body), 400)
    assert error["code"] == "invalid_input" and error["field"] == field, error


@pytest.mark.parametrize("data, content_type", [("not json", "application/json"), ("[1, 2]", "application/json"),
                                                ("", "application/json"), (b"\xff\xfe", "application/json"),
                                                ("prompt=hi", "application/x-www-form-urlencoded")])
def test_bodies_that_are_not_json_objects_are_400(client, api_headers, data, content_type):
    response = client.post("/api/v1/lookup", headers=api_headers("acme"), data=data, content_type=content_type)
    assert error_of(response, 400)["field"] == "body"


def test_a_tenant_key_may_not_name_another_tenant(client, api_headers):
    headers = api_headers("acme")
    same = client.post("/api/v1/lookup", headers=headers, json={"prompt": "hi", "scope": {"tenant": "acme"}})
    assert same.status_code == 200
    error = error_of(client.post("/api/v1/lookup", headers=headers, json={"prompt": "hi", "scope": {"tenant": "b"}}),
                     403)
    assert error["code"] == "forbidden"


def test_admin_keys_name_the_tenant(client, api_headers, seed):
    tenant = unique_tenant()
    seed("What is the capital of France?", "Paris", tenant=tenant)
    admin = api_headers(admin=True)
    error = error_of(client.post("/api/v1/lookup", headers=admin, json={"prompt": "hi"}), 400)
    assert error["field"] == "scope.tenant"
    hit = client.post("/api/v1/lookup", headers=admin, json={"prompt": "What is the capital of France?",
                                                              "scope": {"tenant": tenant, "locale": "en"}})
    assert hit.get_json()["hit"] is True


# --- entries -----------------------------------------------------------------------------------------------------
def test_post_entry_queues_a_write_for_the_keys_tenant(client, api_headers, queued):
    headers = api_headers("acme")
    response = client.post("/api/v1/entries", headers=headers, json={
        "prompt": "What is 2+2?", "response": "4", "scope": {"locale": "en", "model": "gpt"}, "ttl_seconds": 60,
        "flags": ["from-api"], "metadata": {"prompt_tokens": 5}})
    assert response.status_code == 202
    body = response.get_json()
    assert body["entry_id"] == entry_id("What is 2+2?", Scope(tenant="acme", locale="en", model="gpt"))
    name, kwargs = queued(body["task_id"])
    assert name == "semcache.write_entry"
    command = kwargs["command"]
    assert command["scope"] == {"tenant": "acme", "locale": "en", "model": "gpt", "extra": {}}
    assert command["prompt"] == "What is 2+2?" and command["ttl_seconds"] == 60 and command["source"] == "api"
    task = client.get(f"/api/v1/tasks/{body['task_id']}", headers=headers).get_json()
    assert task == {"task_id": body["task_id"], "state": "pending", "kind": "write"}


@pytest.mark.parametrize("body, field", [
    ({"prompt": "p"}, "response"),
    ({"prompt": "p", "response": "r", "flags": ["Bad Flag"]}, "flags.0"),
    ({"prompt": "p", "response": "r", "flags": "x"}, "flags"),
    ({"prompt": "p", "response": "r", "ttl_seconds": 0}, "ttl_seconds"),
    ({"prompt": "p", "response": "r", "ttl_seconds": 1.5}, "ttl_seconds"),
    ({"prompt": "p", "response": "x" * 100_001}, "response"),
    ({"prompt": "p", "response": "r", "metadata": {"k": "v" * 10_001}}, "metadata"),
    ({"prompt": "p", "response": "r", "scope": {"tenant": 7}}, "scope.tenant"),
])  # fmt: skip
def test_post_entry_input_errors(client, api_headers, body, field):
    error = error_of(client.post("/api/v1/entries", headers=api_headers("acme"), json=body), 400)
    assert error["field"] == field, error


def test_oversize_bodies_are_413(client, api_headers):
    response = client.post("/api/v1/entries", headers=api_headers("acme"),
                           json={"prompt": "p", "response": "r" * 1_100_000})
    assert error_of(response, 413)["code"] == "payload_too_large"


def test_get_and_delete_one_entry(client, api_headers, seed, queued):
    tenant = unique_tenant()
    ident = seed("What is the capital of France?", "Paris", tenant=tenant)
    headers = api_headers(tenant)
    entry = client.get(f"/api/v1/entries/{ident}", headers=headers).get_json()
    assert entry["id"] == ident and entry["response"] == "Paris" and entry["status"] == "approved"
    assert "embedding" not in entry and "tags" not in entry and entry["hit_count"] == 0
    for bad in ("0" * 32, "nothex", ident.upper(), ident + "0"):
        error_of(client.get(f"/api/v1/entries/{bad}", headers=headers), 404)
        error_of(client.delete(f"/api/v1/entries/{bad}", headers=headers), 404)
    deleted = client.delete(f"/api/v1/entries/{ident}", headers=headers)
    assert deleted.status_code == 202
    name, kwargs = queued(deleted.get_json()["task_id"])
    assert name == "semcache.purge" and kwargs["ids"] == [ident] and kwargs["tenant"] == tenant


def test_list_entries_of_the_keys_tenant(client, api_headers, seed):
    tenant = unique_tenant()
    seed("first question", tenant=tenant)
    seed("second question", tenant=tenant, status=Status.PENDING_REVIEW)
    seed("someone else's question", tenant=unique_tenant())
    headers = api_headers(tenant)
    listing = client.get("/api/v1/entries", headers=headers).get_json()
    assert listing["total"] == 2 and {e["scope"]["tenant"] for e in listing["entries"]} == {tenant}
    held = client.get("/api/v1/entries?status=pending_review", headers=headers).get_json()
    assert [e["prompt"] for e in held["entries"]] == ["second question"]
    assert client.get("/api/v1/entries?text=first", headers=headers).get_json()["total"] == 1
    assert error_of(client.get("/api/v1/entries?status=bogus", headers=headers), 400)["field"] == "status"
    assert error_of(client.get("/api/v1/entries?limit=0", headers=headers), 400)["field"] == "limit"
    assert error_of(client.get("/api/v1/entries?sort=prompt", headers=headers), 400)["field"] == "sort"


# --- purge -------------------------------------------------------------------------------------------------------
def test_purge_is_bound_to_the_keys_tenant(client, api_headers, seed, queued):
    tenant = unique_tenant()
    seed("old one", tenant=tenant, locale="fr")
    seed("other", tenant=tenant, locale="en")
    response = client.post("/api/v1/purge", headers=api_headers(tenant),
                           json={"scope": {"locale": "fr"}, "older_than": "0s"})
    assert response.status_code == 202 and response.get_json()["matched"] == 1
    name, kwargs = queued(response.get_json()["task_id"])
    assert name == "semcache.purge" and kwargs["mode"] == "filter" and kwargs["tenant"] == tenant
    assert kwargs["filter"]["tenant"] == tenant and kwargs["filter"]["locale"] == "fr"
    assert kwargs["filter"]["older_than_s"] == 0.0


@pytest.mark.parametrize("body, field", [
    ({"scope": {}, "older_than": "soon"}, "older_than"),
    ({"scope": {}, "older_than": -5}, "older_than"),
    ({"scope": {}, "older_than": True}, "older_than"),
    ({"scope": {}, "status": "gone"}, "status"),
    ({"scope": [], "older_than": 5}, "scope"),
    ({"older_than": 5, "extra": 1}, "extra"),
])  # fmt: skip
def test_purge_input_errors(client, api_headers, body, field):
    assert error_of(client.post("/api/v1/purge", headers=api_headers("acme"), json=body), 400)["field"] == field


def test_an_admin_purge_needs_a_filter(client, api_headers):
    admin = api_headers(admin=True)
    assert error_of(client.post("/api/v1/purge", headers=admin, json={"scope": {}}), 400)["field"] == "scope"
    assert client.post("/api/v1/purge", headers=admin, json={"scope": {"model": "old"}}).status_code == 202


# --- tasks, stats, errors ----------------------------------------------------------------------------------------
def test_tasks_are_visible_to_their_key_only(client, api_headers):
    mine, other_same_tenant, admin = api_headers("acme"), api_headers("acme"), api_headers(admin=True)
    task_id = client.post("/api/v1/entries", headers=mine, json={"prompt": "p", "response": "r"}).get_json()["task_id"]
    assert client.get(f"/api/v1/tasks/{task_id}", headers=mine).get_json()["state"] == "pending"
    error_of(client.get(f"/api/v1/tasks/{task_id}", headers=other_same_tenant), 404)
    assert client.get(f"/api/v1/tasks/{task_id}", headers=admin).status_code == 200
    error_of(client.get("/api/v1/tasks/no-such-task", headers=mine), 404)
    error_of(client.get("/api/v1/tasks/" + "x" * 300, headers=mine), 404)


def test_stats_for_tenant_and_admin_keys(client, api_headers, seed):
    tenant = unique_tenant()
    seed("a question", tenant=tenant)
    headers = api_headers(tenant)
    client.post("/api/v1/lookup", headers=headers, json={"prompt": "a question", "scope": {"locale": "en"}})
    stats = client.get("/api/v1/stats", headers=headers).get_json()
    assert stats == {"tenant": tenant, "entries": {"approved": 1, "pending_review": 0, "rejected": 0}}
    admin = client.get("/api/v1/stats?minutes=5", headers=api_headers(admin=True)).get_json()
    assert admin["tenant"] is None and admin["lookups"]["minutes"] == 5 and "series" not in admin["lookups"]
    assert error_of(client.get("/api/v1/stats?minutes=0", headers=headers), 400)["field"] == "minutes"


def test_rate_limit_per_key(make_settings, redis_url, embedder, password_hash):
    from .fixtures_web import _key_factory, _make_app

    app = _make_app(make_settings(rate_limit_per_minute=3), embedder)
    client = app.test_client()
    make_key = _key_factory(app)
    limited, fresh = make_key("acme"), make_key("acme")
    assert [client.get("/api/v1/stats", headers=limited).status_code for _ in range(3)] == [200, 200, 200]
    response = client.get("/api/v1/stats", headers=limited)
    assert error_of(response, 429)["code"] == "rate_limited" and 1 <= int(response.headers["Retry-After"]) <= 61
    assert client.get("/api/v1/stats", headers=fresh).status_code == 200  # the limit is per key
    app.extensions["semcache"].close()


def test_a_failing_rate_limit_counter_never_fails_a_lookup(make_settings, redis_client, embedder, password_hash):
    """A rate-limit counter Redis refuses to count (a full Redis, a read-only replica; here for real: a hash where
    INCR expects a number; since issue 15, a string where the counters' hash should be): the lookup still
    answers, other endpoints say 503, and Redis is not taken for down, so another key is not locked out. (Redis
    going away between the key check and the counter, seen in CI as a 503 lookup, is
    tests/test_reliability_redis.py's hang and kill.)"""

    from .fixtures_web import _key_factory, _make_app

    settings = make_settings()
    app = _make_app(settings, embedder)
    client = app.test_client()
    headers = _key_factory(app)("acme")
    redis_client.set(settings.key("ratelimit"), "not a hash")  # the counter's every increment now fails
    response = client.post("/api/v1/lookup", headers=headers, json={"prompt": "a question", "scope": {"locale": "en"}})
    assert response.status_code == 200 and response.get_json()["hit"] is False
    assert error_of(client.get("/api/v1/stats", headers=headers), 503)["code"] == "unavailable"
    other = _key_factory(app)("acme")  # never looked anything up: its key check needs Redis, which is fine
    response = client.post("/api/v1/lookup", headers=other, json={"prompt": "a question", "scope": {"locale": "en"}})
    assert response.status_code == 200
    app.extensions["semcache"].close()


def test_unknown_paths_and_methods_are_json(client, api_headers):
    headers = api_headers("acme")
    assert error_of(client.get("/api/v1/nothing", headers=headers), 404)["code"] == "not_found"
    response = client.put("/api/v1/lookup", headers=headers, json={})
    assert error_of(response, 405)["code"] == "method_not_allowed" and "POST" in response.headers["Allow"]


def test_redis_down_is_503_never_a_trace(embedder, tmp_path):
    from cache_core.embedded import free_port
    from cache_core.settings import Settings
    from web import create_app

    dead = f"redis://127.0.0.1:{free_port()}/0"
    app = create_app(Settings(redis_url=dead, index="down", data_dir=tmp_path, redis_write_timeout_ms=200),
                     embedder=embedder)
    client = app.test_client()
    headers = {"Authorization": "Bearer sc_0123456789ab_" + "A" * 43}
    # a key never verified cannot be checked while Redis is down: 503 (a known key gets a degraded miss, see
    # tests/test_reliability_redis.py)
    assert error_of(client.post("/api/v1/lookup", headers=headers, json={"prompt": "hi"}), 503)["code"] == "unavailable"
    assert error_of(client.get("/api/v1/stats", headers=headers), 503)["code"] == "unavailable"
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.get_json()["checks"]["redis"].startswith("unreachable")
    assert client.get("/healthz").status_code == 200


# --- admin endpoints ---------------------------------------------------------------------------------------------
def test_admin_endpoints_need_an_admin_key(client, api_headers, seed):
    tenant = unique_tenant()
    ident = seed("held question", tenant=tenant, status=Status.PENDING_REVIEW)
    tenant_key, admin = api_headers(tenant), api_headers(admin=True)
    for method, path, body in [("get", "/api/v1/admin/tenants", None),
                               ("post", f"/api/v1/admin/entries/{ident}/status", {"status": "approved"}),
                               ("get", "/api/v1/admin/deadletters", None),
                               ("post", "/api/v1/admin/deadletters/" + "0" * 32 + "/replay", None)]:
        assert error_of(getattr(client, method)(path, headers=tenant_key, json=body), 403)["code"] == "forbidden"
    tenants = client.get("/api/v1/admin/tenants", headers=admin).get_json()["tenants"]
    assert {"tenant": tenant, "total": 1, "approved": 0, "pending_review": 1, "rejected": 0} in tenants
    assert client.post(f"/api/v1/admin/entries/{ident}/status", headers=admin,
                       json={"status": "approved", "response": "edited"}).status_code == 202
    error = error_of(client.post(f"/api/v1/admin/entries/{ident}/status", headers=admin, json={"status": "maybe"}),
                     400)
    assert error["field"] == "status"
    error_of(client.post("/api/v1/admin/entries/" + "0" * 32 + "/status", headers=admin, json={"status": "approved"}),
             404)
    letters = client.get("/api/v1/admin/deadletters", headers=admin).get_json()["deadletters"]
    assert letters == {"total": 0, "items": []}
    error_of(client.post("/api/v1/admin/deadletters/" + "0" * 32 + "/replay", headers=admin), 404)


def test_openapi_document_describes_every_endpoint(client):
    response = client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    doc = response.get_json()
    assert doc["openapi"].startswith("3.1")
    routes = {rule.rule.replace("<entry>", "{entry_id}").replace("<task_id>", "{task_id}")
              .replace("<letter>", "{letter_id}")
              for rule in client.application.url_map.iter_rules() if rule.rule.startswith("/api/v1/")}
    routes -= {"/api/v1/openapi.json"}
    assert routes <= set(doc["paths"]), routes - set(doc["paths"])
    lookup = doc["paths"]["/api/v1/lookup"]["post"]
    assert lookup["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/LookupRequest")
    assert {"prompt", "scope", "min_similarity"} <= set(doc["components"]["schemas"]["LookupRequest"]["properties"])
    assert json.dumps(doc)  # plain JSON all the way down


def test_broker_down_is_503_and_not_ready(make_settings, embedder):
    from cache_core.embedded import free_port

    from .fixtures_web import _key_factory, _make_app

    settings = make_settings(broker_url=f"redis://127.0.0.1:{free_port()}/1")
    app = _make_app(settings, embedder, queue=None)
    client = app.test_client()
    headers = _key_factory(app)("acme")
    error = error_of(client.post("/api/v1/entries", headers=headers, json={"prompt": "p", "response": "r"}), 503)
    assert error["code"] == "unavailable" and "Traceback" not in error["message"]
    ready = client.get("/readyz").get_json()
    assert ready["ready"] is False and ready["checks"]["broker"].startswith("unreachable")
    assert ready["checks"]["redis"] == "ok"
    app.extensions["semcache"].close()
