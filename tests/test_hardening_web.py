"""Issue 15 hardening of the web app, keys and logs: each test injects the defect the issue names.

Unicode digits in query strings, sessions that outlive a logout or a rotated credential, the login limiter behind a
TLS proxy, punctuation-only purge filters, PII in the access log and in Celery headers, upstream error bodies and
rate-limit headers, and keys without a tenant."""

from __future__ import annotations

import pytest

from cache_core.connection import make_client, with_db
from cache_core.errors import InvalidInput
from cache_core.tasks import EntryFilter, PurgeCommand

from .fixtures_web import UNCONSUMED, csrf_of, login, unique_tenant


# --- item 5: unicode digits in query strings ---------------------------------------------------------------------
@pytest.mark.parametrize("name,value", [("limit", "²"), ("limit", "٣"), ("offset", "²"), ("offset", "٣"),
                                        ("limit", "１"), ("minutes", "²"), ("minutes", "٣")])
def test_unicode_digits_in_query_strings_are_a_400_naming_the_field(client, api_headers, name, value):
    headers = api_headers(admin=True)
    path = "/api/v1/stats" if name == "minutes" else "/api/v1/entries"
    response = client.get(path, query_string={name: value}, headers=headers)
    assert response.status_code == 400, response.get_data(as_text=True)[:300]
    assert response.get_json()["error"]["field"] == name


@pytest.mark.parametrize("path", ["/entries/", "/review/", "/deadletters/"])
@pytest.mark.parametrize("value", ["²", "٣", "１"])
def test_ui_page_numbers_take_only_ascii_digits(ui_client, path, value):
    for name in ("page", "per_page"):
        response = ui_client.get(path, query_string={name: value})
        assert response.status_code == 200, (name, response.status_code)


# --- item 11: a purge whose text filter is only punctuation --------------------------------------------------------
@pytest.mark.parametrize("text", ["!!!", "?", " -- ", "*", "@#$%"])
def test_a_purge_whose_text_filter_is_only_punctuation_is_refused(ui_client, seed, web_settings, redis_client, text):
    """Punctuation has no words, so the query dropped the text clause and the filter matched every entry."""
    tenants = [unique_tenant(), unique_tenant()]
    for tenant in tenants:
        seed("a question that must survive", tenant=tenant)
    broker = make_client(with_db(web_settings.redis_url, 1), timeout_ms=5000)
    before = broker.llen(UNCONSUMED)
    preview = ui_client.post("/purge/preview", data={"csrf_token": ui_client.csrf, "q": text})
    assert preview.status_code == 302, "the preview offered to purge every entry"
    page = ui_client.get(preview.headers["Location"]).get_data(as_text=True)
    assert "letter or digit" in page
    run = ui_client.post("/purge/run", data={"csrf_token": ui_client.csrf, "mode": "filter", "confirm": "yes",
                                             "q": text})
    assert run.status_code == 302 and "/purge/tasks/" not in run.headers["Location"]
    assert broker.llen(UNCONSUMED) == before  # no purge task was sent
    # the worker's side refuses it too (a command sent by an older web, or by hand)
    from cache_core.purge import count_matching, purge

    command = PurgeCommand(filter=EntryFilter(text=text), mode="filter", by="test")
    with pytest.raises(InvalidInput) as refused:
        purge(redis_client, web_settings, command)
    assert refused.value.field == "filter.text"
    with pytest.raises(InvalidInput):
        count_matching(redis_client, web_settings, EntryFilter(text=text))
    assert count_matching(redis_client, web_settings, EntryFilter(text=f"{text} survive")) >= 2  # words still work


# --- item 14: a non-admin key without a tenant -------------------------------------------------------------------
def test_a_stored_key_with_neither_tenant_nor_admin_is_refused(client, web_app, seed):
    """create_key never makes one, but a record stored by hand or by an older version had ``tenant: null`` and
    ``admin: false``; the API took "no tenant" as "every tenant" and listed, counted and purged all of them."""
    import hashlib
    import json
    import secrets
    import time

    from cache_core.apikeys import verify_key

    st = web_app.extensions["semcache"]
    victim = unique_tenant("victim")
    seed("a private question of the victim", tenant=victim)
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    record = {"id": key_id, "tenant": None, "admin": False, "name": "hand-made", "created_at": time.time(),
              "hash": hashlib.sha256(f"{key_id}:{secret}".encode()).hexdigest()}
    st.redis.hset(st.settings.key("apikeys"), key_id, json.dumps(record))
    headers = {"Authorization": f"Bearer sc_{key_id}_{secret}"}
    listing = client.get("/api/v1/entries", headers=headers)
    assert listing.status_code == 401, listing.get_json()
    assert client.get("/api/v1/stats", headers=headers).status_code == 401
    assert client.post("/api/v1/purge", headers=headers, json={"scope": {"locale": "en"}}).status_code == 401
    assert client.post("/api/v1/lookup", headers=headers,
                       json={"prompt": "a private question of the victim"}).status_code == 401
    assert verify_key(st.redis, st.settings, f"sc_{key_id}_{secret}") is None


# --- item 12: PII in logs and in Celery headers ------------------------------------------------------------------
def _raw_messages(settings) -> list[dict]:
    import json

    broker = make_client(with_db(settings.redis_url, 1), timeout_ms=5000)
    try:
        return [json.loads(raw) for raw in broker.lrange(UNCONSUMED, 0, -1)]
    finally:
        broker.close()


def test_task_headers_carry_a_summary_not_the_prompt(client, api_headers, web_settings, seed):
    """Celery puts ``repr(kwargs)`` (up to 1 KB) in ``kwargsrepr``: headers that monitoring tools and the worker's
    own log lines show. Every task the web sends carries a summary instead."""
    tenant = unique_tenant()
    headers = api_headers(tenant)
    secret = "jane.doe@example.com card 4111 1111 1111 1111"
    write = client.post("/api/v1/entries", headers=headers,
                        json={"prompt": f"My address is {secret}, what now?", "response": f"noted {secret}"})
    assert write.status_code == 202
    entry = seed(f"stored {secret}", tenant=tenant)
    delete = client.delete(f"/api/v1/entries/{entry}", headers=headers)
    assert delete.status_code == 202
    purge = client.post("/api/v1/purge", headers=headers, json={"scope": {"locale": "en"}})
    assert purge.status_code == 202
    sent = {write.get_json()["task_id"], delete.get_json()["task_id"], purge.get_json()["task_id"]}
    found = {m["headers"]["id"]: m["headers"] for m in _raw_messages(web_settings) if m["headers"]["id"] in sent}
    assert set(found) == sent
    for header in found.values():
        shown = f"{header.get('argsrepr')} {header.get('kwargsrepr')}"
        assert "jane.doe" not in shown and "4111" not in shown and tenant not in shown, shown
        assert len(shown) < 200
    assert "1 write" in found[write.get_json()["task_id"]]["kwargsrepr"]


class _Served:
    """``semcache web`` (gunicorn) in a subprocess on a free port, its output (access log included) in a file."""

    def __init__(self, settings, tmp_path, *, workers: int = 1, env: dict[str, str] | None = None) -> None:
        import os
        import subprocess
        import sys
        from pathlib import Path

        from cache_core.embedded import free_port

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"web-{self.port}.log"
        full = {**os.environ, "SEMCACHE_REDIS_URL": settings.redis_url, "SEMCACHE_INDEX": settings.index,
                "SEMCACHE_DATA_DIR": str(settings.data_dir), "SEMCACHE_ADMIN_TOKEN": settings.admin_token or "",
                "SEMCACHE_COOKIE_SECURE": "false", "HF_HUB_OFFLINE": "1", **(env or {})}
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "semcache", "web", "--port", str(self.port), "--workers", str(workers),
             "--threads", "4"], cwd=Path(__file__).resolve().parent.parent, env=full, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self) -> None:
        import time
        import urllib.request

        deadline = time.monotonic() + 90  # a bound for a loaded 2-core machine, not a timing assertion
        while True:
            try:
                with urllib.request.urlopen(self.base + "/healthz", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            assert self.process.poll() is None and time.monotonic() < deadline, self.output()[-2000:]
            time.sleep(0.2)

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> str:
        self.process.terminate()
        self.process.wait(60)
        self._log.close()
        return self.log_path.read_text(errors="replace")


def test_the_access_log_shows_paths_without_their_query_strings(web_settings, tmp_path):
    """Search terms of the entries page and the API listing, and a login's ``next``, reached gunicorn's access
    log through the request line (``%(r)s``)."""
    import urllib.error
    import urllib.request

    server = _Served(web_settings, tmp_path)
    try:
        server.wait_ready()
        for path in ("/entries/?q=jane.doe%40example.com", "/api/v1/entries?text=jane.doe%40example.com&limit=5",
                     "/login?next=%2Fentries%2F%3Fq%3Djane.doe"):
            try:
                urllib.request.urlopen(server.base + path, timeout=30).read()
            except urllib.error.HTTPError:
                pass  # 302, 401: what matters is the log line
    finally:
        output = server.stop()
    access = [line for line in output.splitlines() if '"GET ' in line]
    assert len(access) >= 3, output[-2000:]
    assert any("/api/v1/entries" in line for line in access) and any("/login" in line for line in access)
    assert "jane.doe" not in output and "example.com" not in output, access


# --- item 14: upstream error bodies and rate-limit headers ---------------------------------------------------------
LEAK = "org-7Hq2 quota of acct billing@operator.example"
RATE_HEADERS = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-limit-tokens": "90000",
                "x-ratelimit-remaining-tokens": "12", "x-ratelimit-reset-requests": "7s", "retry-after": "7"}


def _scripted_upstream():
    """An OpenAI-style upstream whose answer depends on the prompt: errors whose bodies name the operator's
    account, and rate-limit headers on every answer."""
    import json
    import threading

    from flask import Flask, Response, request
    from werkzeug.serving import make_server

    app = Flask("scripted-upstream")

    def answer(status: int, body: object, mimetype: str = "application/json") -> Response:
        data = body if isinstance(body, str) else json.dumps(body)
        return Response(data, status=status, mimetype=mimetype, headers={**RATE_HEADERS, "x-request-id": "req-1"})

    @app.post("/v1/chat/completions")
    def chat():
        body = request.get_json()
        prompt = body["messages"][-1]["content"]
        error = {"error": {"message": f"Rate limit reached for {LEAK} (you said: {prompt})", "type": "requests",
                           "code": "rate_limit_exceeded", "param": None}}
        if prompt.startswith("limit"):
            return answer(429, error)
        if prompt.startswith("auth"):
            return answer(401, {"error": {"message": f"Incorrect API key provided: sk-abcd...wxyz for {LEAK}",
                                          "type": "invalid_request_error", "code": "invalid_api_key"}})
        if prompt.startswith("crash"):
            return answer(500, f"Traceback (most recent call last): {LEAK}", "text/plain")
        if prompt.startswith("midstream"):
            events = ('data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n'
                      f"data: {json.dumps(error)}\n\n")
            return answer(200, events, "text/event-stream")
        return answer(200, {"id": "c1", "object": "chat.completion", "model": "m", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1}})

    @app.get("/v1/models")
    def models():
        return answer(403, {"error": {"message": f"Project {LEAK} has no access", "code": "forbidden"}})

    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def leaky_proxy(web_settings, embedder):
    from .fixtures_web import _make_app

    server = _scripted_upstream()
    settings = web_settings.model_copy(update={"upstream_url": f"http://127.0.0.1:{server.server_port}/v1",
                                               "proxy_coalesce": False})
    app = _make_app(settings, embedder)
    yield app
    app.extensions["semcache_proxy"].close()
    app.extensions["semcache"].close()
    server.shutdown()


def _no_leak(response) -> None:
    text = response.get_data(as_text=True)
    assert "org-7Hq2" not in text and "operator.example" not in text and "sk-abcd" not in text, text[:500]
    assert not [h for h in response.headers.keys() if h.lower().startswith("x-ratelimit")], dict(response.headers)
    assert "Retry-After" not in response.headers


def test_tenants_get_no_upstream_error_body_nor_rate_limit_header(leaky_proxy, caplog):
    import logging

    from cache_core.apikeys import create_key

    st = leaky_proxy.extensions["semcache"]
    key, _ = create_key(st.redis, st.settings, tenant=unique_tenant("px"))
    headers = {"Authorization": f"Bearer {key}"}
    client = leaky_proxy.test_client()

    def chat(prompt: str, stream: bool = False):
        return client.post("/v1/chat/completions", headers=headers, json={
            "model": "m", "stream": stream, "temperature": 0, "messages": [{"role": "user", "content": prompt}]})

    caplog.set_level(logging.INFO)
    for stream in (False, True):
        limited = chat("limit me, my mail is jane@example.com", stream)
        assert limited.status_code == 429 and limited.get_json()["error"]["code"] == "upstream_rate_limited"
        _no_leak(limited)
        refused = chat("auth please", stream)  # the operator's upstream credential, not the tenant's key
        assert refused.status_code == 502 and refused.get_json()["error"]["code"] == "upstream_error"
        _no_leak(refused)
        crashed = chat("crash now", stream)
        assert crashed.status_code == 502 and "5xx" in crashed.get_json()["error"]["message"]
        _no_leak(crashed)
    fine = chat("a fine question")
    assert fine.status_code == 200 and fine.get_json()["choices"][0]["message"]["content"] == "fine"
    _no_leak(fine)
    midstream = chat("midstream error", stream=True)
    assert midstream.status_code == 200
    _no_leak(midstream)
    assert "upstream_error" in midstream.get_data(as_text=True)
    models = client.get("/v1/models", headers=headers)
    assert models.status_code == 502
    _no_leak(models)
    # the operator sees what happened (status and the upstream's error code), without the prompt or the body
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "429" in logged and "rate_limit_exceeded" in logged and "invalid_api_key" in logged
    assert "jane@example.com" not in logged and "org-7Hq2" not in logged


# --- item 8: sessions that end, and a login limiter that sees through the TLS proxy ------------------------------
def _app_with(web_settings, embedder, **changes):
    from .fixtures_web import _make_app

    return _make_app(web_settings.model_copy(update=changes), embedder)


def _copied(app, cookie: str):
    """A second browser holding a copy of a session cookie."""
    thief = app.test_client()
    thief.set_cookie("semcache_session", cookie, domain="localhost")
    return thief


def _session_cookie(test_client) -> str:
    return test_client.get_cookie("semcache_session").value


def test_logout_ends_copies_of_the_session_cookie(client, web_app):
    csrf = login(client)
    thief = _copied(web_app, _session_cookie(client))
    assert thief.get("/entries/").status_code == 200  # a copy works while the session lives
    assert client.post("/logout", data={"csrf_token": csrf}).status_code == 302
    gone = thief.get("/entries/")
    assert gone.status_code == 302 and "/login" in gone.headers["Location"]
    assert thief.post("/purge/preview", data={"csrf_token": csrf, "tenant": "x"}).status_code in (302, 401)


@pytest.mark.parametrize("credential", ["token", "password"])
def test_a_rotated_token_or_password_ends_existing_sessions(web_settings, embedder, credential):
    """A restart with a new SEMCACHE_ADMIN_TOKEN or SEMCACHE_ADMIN_PASSWORD_HASH (same secret key, same Redis)."""
    from werkzeug.security import generate_password_hash

    from .fixtures_web import ADMIN_PASSWORD, ADMIN_USER

    old = _app_with(web_settings, embedder)
    browser = old.test_client()
    if credential == "token":
        login(browser)
        rotated = {"admin_token": "a-new-admin-token-" + "y" * 24}
    else:
        csrf = csrf_of(browser.get("/login").get_data(as_text=True))
        assert browser.post("/login", data={"csrf_token": csrf, "username": ADMIN_USER,
                                            "password": ADMIN_PASSWORD}).status_code == 302
        rotated = {"admin_password_hash": generate_password_hash("a new password")}
    cookie = _session_cookie(browser)
    unchanged = _app_with(web_settings, embedder)
    new = _app_with(web_settings, embedder, **rotated)
    try:
        assert _copied(unchanged, cookie).get("/entries/").status_code == 200  # a plain restart keeps sessions
        refused = _copied(new, cookie).get("/entries/")
        assert refused.status_code == 302 and "/login" in refused.headers["Location"]
    finally:
        for app in (old, unchanged, new):
            app.extensions["semcache"].close()


def _fail_login(test_client, csrf: str, *, forwarded: str | None = None, token: str = "wrong") -> int:
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    return test_client.post("/login", data={"csrf_token": csrf, "token": token}, headers=headers).status_code


def test_the_login_limiter_counts_the_forwarded_client_behind_a_trusted_proxy(web_settings, embedder):
    from .fixtures_web import ADMIN_TOKEN

    app = _app_with(web_settings, embedder, trusted_proxies=1, login_attempts_per_15min=2,
                    login_account_attempts_per_15min=50)
    try:
        browser = app.test_client()
        csrf = csrf_of(browser.get("/login").get_data(as_text=True))
        # the proxy appends the address it saw; what a client puts in front of it is not trusted
        assert [_fail_login(browser, csrf, forwarded=f"10.9.9.{i}, 203.0.113.7") for i in range(3)] == [401, 401, 429]
        assert _fail_login(browser, csrf, forwarded="203.0.113.8") == 401  # another client behind the same proxy
        assert _fail_login(browser, csrf, forwarded="203.0.113.8", token=ADMIN_TOKEN) == 302
    finally:
        app.extensions["semcache"].close()
    direct = _app_with(web_settings.model_copy(update={"index": web_settings.index + "d",
                                                       "key_prefix": web_settings.key_prefix + "d:"}),
                       embedder, login_attempts_per_15min=2)
    try:  # without a trusted proxy the header is the client's own text: ignored
        browser = direct.test_client()
        csrf = csrf_of(browser.get("/login").get_data(as_text=True))
        assert [_fail_login(browser, csrf, forwarded=f"198.51.100.{i}") for i in range(3)] == [401, 401, 429]
    finally:
        direct.extensions["semcache"].close()


def test_the_login_limiter_counts_per_account_across_addresses(web_settings, embedder):
    from .fixtures_web import ADMIN_TOKEN

    app = _app_with(web_settings, embedder, trusted_proxies=1, login_attempts_per_15min=50,
                    login_account_attempts_per_15min=3)
    try:
        browser = app.test_client()
        csrf = csrf_of(browser.get("/login").get_data(as_text=True))
        statuses = [_fail_login(browser, csrf, forwarded=f"203.0.113.{i}") for i in range(4)]
        assert statuses == [401, 401, 401, 429]
        locked = browser.post("/login", data={"csrf_token": csrf, "token": ADMIN_TOKEN},
                              headers={"X-Forwarded-For": "203.0.113.99"})
        assert locked.status_code == 429 and "account" in locked.get_data(as_text=True)
    finally:
        app.extensions["semcache"].close()


def test_the_login_fails_closed_when_its_counter_cannot_be_read(web_settings, embedder):
    from cache_core.embedded import free_port
    from web import create_app

    from .fixtures_web import ADMIN_TOKEN

    dead = web_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0",
                                           "redis_write_timeout_ms": 300})
    app = create_app(dead, embedder=embedder)
    try:
        browser = app.test_client()
        csrf = csrf_of(browser.get("/login").get_data(as_text=True))
        refused = browser.post("/login", data={"csrf_token": csrf, "token": ADMIN_TOKEN})
        assert refused.status_code == 503, refused.status_code
        assert "try again" in refused.get_data(as_text=True)
        assert browser.get("/entries/").status_code in (302, 503)
    finally:
        app.extensions["semcache"].close()


# --- item 13: lookups while Redis is down, for keys verified anywhere recently -----------------------------------
def _http(url: str, method: str = "GET", headers: dict | None = None, body: dict | None = None) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_lookups_answer_misses_while_redis_is_down_for_keys_verified_by_any_endpoint_or_process(tmp_path,
                                                                                               password_hash):
    """The issue's run: a write (its key checked by POST /entries), Redis killed, then lookups. Under gunicorn with
    two worker processes every lookup must be a degraded miss, whichever process answers and although no lookup
    ever checked that key; a key never seen still gets 503, a malformed or revoked one 401, never a miss."""
    from cache_core.apikeys import create_key, revoke_key
    from cache_core.embedded import EmbeddedRedis
    from cache_core.testing import test_settings

    server = EmbeddedRedis(tmp_path / "redis", appendonly=False)
    url = server.start()
    settings = test_settings(url, data_dir=tmp_path / "data", admin_token="t" * 32)
    redis_client = make_client(url, timeout_ms=5000)
    tenant = unique_tenant()
    key, _ = create_key(redis_client, settings, tenant=tenant)
    revoked, revoked_record = create_key(redis_client, settings, tenant=tenant)
    never_used, _ = create_key(redis_client, settings, tenant=tenant)
    served = _Served(settings, tmp_path, workers=2, env={"SEMCACHE_REDIS_TIMEOUT_MS": "100",
                                                         "SEMCACHE_BREAKER_COOLDOWN_MS": "500",
                                                         "SEMCACHE_REDIS_WRITE_TIMEOUT_MS": "500",
                                                         "SEMCACHE_ENQUEUE_TIMEOUT_MS": "500"})
    lookup = {"prompt": "What are your opening hours?", "scope": {"locale": "en"}}
    try:
        served.wait_ready()
        for k in (key, revoked):
            status, body = _http(served.base + "/api/v1/entries", "POST", {"Authorization": f"Bearer {k}"},
                                 {"prompt": "What are your opening hours?", "response": "9 to 5"})
            assert status == 202, body
        revoke_key(redis_client, settings, revoked_record.id)
        for _ in range(4):  # a revoked key is refused (and forgotten) while Redis can say so
            assert _http(served.base + "/api/v1/lookup", "POST", {"Authorization": f"Bearer {revoked}"},
                         lookup)[0] == 401
        server.stop()
        answers = [_http(served.base + "/api/v1/lookup", "POST", {"Authorization": f"Bearer {key}"}, lookup)
                   for _ in range(10)]
        assert all(s == 200 and b["hit"] is False and b["degraded"] for s, b in answers), answers
        assert _http(served.base + "/api/v1/lookup", "POST", {"Authorization": f"Bearer {never_used}"},
                     lookup)[0] == 503
        assert _http(served.base + "/api/v1/lookup", "POST", {"Authorization": f"Bearer {revoked}"},
                     lookup)[0] == 503  # unknown now: it is not a miss
        assert _http(served.base + "/api/v1/lookup", "POST", {"Authorization": "Bearer sc_nonsense"},
                     lookup)[0] == 401
        # the proxy shares the record: the key passes its check (and meets the missing upstream, not "unavailable")
        status, body = _http(served.base + "/v1/models", "GET", {"Authorization": f"Bearer {key}"})
        assert status == 503 and body["error"]["code"] == "upstream_not_configured", body
    finally:
        served.stop()
        redis_client.close()
        server.stop()
    stored = b"".join(p.read_bytes() for p in (tmp_path / "data").rglob("*") if p.is_file())
    assert key.split("_", 2)[2].encode() not in stored  # the record holds digests, never a key


# --- a per-key cap on concurrent streams (proxy) -------------------------------------------------------------------
@pytest.fixture
def held_streams(web_settings, embedder):
    """A proxy whose upstream starts every stream at once and finishes none until the test lets it."""
    import threading

    from flask import Flask, Response
    from werkzeug.serving import make_server

    from .fixtures_web import _make_app

    release = threading.Event()
    upstream = Flask("held-upstream")

    @upstream.post("/v1/chat/completions")
    def chat():
        def events():
            yield 'data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n'
            release.wait(120)
            yield 'data: {"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
        return Response(events(), mimetype="text/event-stream")

    server = make_server("127.0.0.1", 0, upstream, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings = web_settings.model_copy(update={"upstream_url": f"http://127.0.0.1:{server.server_port}/v1",
                                               "proxy_max_streams_per_key": 2})
    app = _make_app(settings, embedder)
    app.release_upstream = release
    yield app
    release.set()
    app.extensions["semcache_proxy"].close()
    app.extensions["semcache"].close()
    server.shutdown()


def test_a_key_may_hold_only_so_many_streams_at_once(held_streams):
    """Each forwarded stream holds a server thread for the whole LLM answer: one key opening streams without end
    would take every thread of the web process from every other tenant."""
    from cache_core.apikeys import create_key

    st = held_streams.extensions["semcache"]
    a = {"Authorization": f"Bearer {create_key(st.redis, st.settings, tenant=unique_tenant('sa'))[0]}"}
    b = {"Authorization": f"Bearer {create_key(st.redis, st.settings, tenant=unique_tenant('sb'))[0]}"}
    client = held_streams.test_client()

    def stream(headers, n: int):
        return client.post("/v1/chat/completions", headers=headers, buffered=False, json={
            "model": "m", "stream": True, "temperature": 0,
            "messages": [{"role": "user", "content": f"stream number {n}"}]})

    first, second = stream(a, 1), stream(a, 2)
    assert first.status_code == second.status_code == 200
    third = stream(a, 3)
    assert third.status_code == 429 and third.get_json()["error"]["code"] == "too_many_streams"
    other = stream(b, 4)  # another key is not affected
    assert other.status_code == 200
    first.close()  # a stream that ends (or whose client goes away) frees its slot
    fourth = stream(a, 5)
    assert fourth.status_code == 200
    for response in (second, other, fourth):
        response.close()
    held_streams.release_upstream.set()
    plain = client.post("/v1/chat/completions", headers=a, json={
        "model": "m", "stream": False, "temperature": 2, "messages": [{"role": "user", "content": "not streamed"}]})
    assert plain.status_code != 429  # only streams count


def test_the_shared_key_record_is_bounded_expires_and_never_fails_a_request(tmp_path, monkeypatch):
    import json
    import os
    import time

    from cache_core.apikeys import ApiKey
    from web import keymemo

    monkeypatch.setattr(keymemo, "MAX_KEYS", 3)
    record = ApiKey(id="0123456789ab", tenant="acme", created_at=time.time())
    memo = keymemo.SharedKeyMemo(tmp_path / "verified", grace_s=300)
    other_process = keymemo.SharedKeyMemo(tmp_path / "verified", grace_s=300)
    keys = [f"sc_0123456789ab_{str(i) * 43}" for i in range(5)]
    for i, presented in enumerate(keys):
        memo.remember(presented, record)
        path = memo._path(presented)
        os.utime(path, (time.time() - 100 + i, time.time() - 100 + i))  # older first
    files = [p for p in (tmp_path / "verified").iterdir() if not p.name.startswith(".")]
    assert len(files) <= 3 and other_process.recall(keys[-1]) == record  # the newest kept, seen by another memo
    assert oct((tmp_path / "verified").stat().st_mode & 0o777) == "0o700"
    stale = memo._path(keys[-1])
    stale.write_text(json.dumps({"key": record.model_dump(mode="json"), "at": time.time() - 301}))
    assert other_process.recall(keys[-1]) is None and not stale.exists()  # past the grace: gone
    memo.remember(keys[-2] + "x", record)
    other_process.forget(keys[-2] + "x")
    assert memo.recall(keys[-2] + "x") is None  # forgotten by another process
    memo._path(keys[0]).write_text("{not json")
    assert memo.recall(keys[0]) is None  # a damaged record is no record
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    broken = keymemo.SharedKeyMemo(blocked / "verified", grace_s=300)  # cannot be made: never raises
    broken.remember(keys[1], record)
    assert broken.recall(keys[1]) is None
    broken.forget(keys[1])
    assert keymemo.SharedKeyMemo(tmp_path / "off", grace_s=0).recall(keys[1]) is None
