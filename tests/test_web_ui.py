"""The admin UI through Flask's test client: login, CSRF, headers, escaping, and every page and form.

Actions send tasks to a queue no worker consumes; ``test_browser_ui.py`` runs the same workflows in a
real browser against the real worker.
"""

from __future__ import annotations

import re

import pytest

from cache_core.deadletters import DeadLetter, count_dead_letters, push_dead_letter
from cache_core.schema import Status

from .fixtures_web import ADMIN_PASSWORD, ADMIN_TOKEN, ADMIN_USER, csrf_of, unique_tenant

PAGES = ["/", "/entries/", "/review/", "/purge/", "/deadletters/"]


# --- login -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PAGES)
def test_pages_need_a_login(client, path):
    response = client.get(path)
    assert response.status_code == 302 and "/login?next=" in response.headers["Location"]


def test_login_with_password_and_logout(client):
    csrf = csrf_of(client.get("/login").get_data(as_text=True))
    wrong = client.post("/login", data={"csrf_token": csrf, "username": ADMIN_USER, "password": "nope"})
    assert wrong.status_code == 401 and "Wrong credentials" in wrong.get_data(as_text=True)
    wrong_user = client.post("/login", data={"csrf_token": csrf, "username": "root", "password": ADMIN_PASSWORD})
    assert wrong_user.status_code == 401
    ok = client.post("/login", data={"csrf_token": csrf, "username": ADMIN_USER, "password": ADMIN_PASSWORD,
                                     "next": "/review/"})
    assert ok.status_code == 302 and ok.headers["Location"] == "/review/"
    cookie = ok.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "Secure" in cookie and "SameSite=Lax" in cookie
    page = client.get("/review/")
    assert page.status_code == 200
    new_csrf = csrf_of(page.get_data(as_text=True))
    assert new_csrf != csrf  # a new session (and token) at login: no session fixation
    assert client.post("/logout", data={}).status_code == 400  # logout is a form with a CSRF token too
    assert client.post("/logout", data={"csrf_token": new_csrf}).status_code == 302
    assert client.get("/review/").status_code == 302


def test_login_with_token_and_safe_redirects(client):
    csrf = csrf_of(client.get("/login").get_data(as_text=True))
    assert client.post("/login", data={"csrf_token": csrf, "token": "wrong"}).status_code == 401
    for target in ("//evil.example/x", "https://evil.example/", "javascript:alert(1)"):
        csrf = csrf_of(client.get("/login").get_data(as_text=True))
        response = client.post("/login", data={"csrf_token": csrf, "token": ADMIN_TOKEN, "next": target})
        assert response.status_code == 302 and response.headers["Location"] == "/"


def test_login_needs_its_csrf_token(client):
    client.get("/login")
    assert client.post("/login", data={"token": ADMIN_TOKEN}).status_code == 400
    assert client.post("/login", data={"token": ADMIN_TOKEN, "csrf_token": "forged"}).status_code == 400


def test_failed_logins_are_limited(make_settings, redis_url, embedder, password_hash):
    from .fixtures_web import _make_app, _web_overrides

    app = _make_app(make_settings(login_attempts_per_15min=2, **_web_overrides(password_hash)), embedder)
    client = app.test_client()
    csrf = csrf_of(client.get("/login").get_data(as_text=True))
    statuses = [client.post("/login", data={"csrf_token": csrf, "token": "wrong"}).status_code for _ in range(3)]
    assert statuses == [401, 401, 429]
    assert client.post("/login", data={"csrf_token": csrf, "token": ADMIN_TOKEN}).status_code == 429
    app.extensions["semcache"].close()


def test_no_credential_configured_means_no_login(make_settings, embedder):
    from .fixtures_web import _make_app

    app = _make_app(make_settings(), embedder)
    client = app.test_client()
    page = client.get("/login").get_data(as_text=True)
    assert "No admin credential is configured" in page
    with client.session_transaction() as session:
        csrf = session["csrf"]
    for guess in ("", "None", "null"):
        assert client.post("/login", data={"csrf_token": csrf, "token": guess, "password": guess}).status_code == 401
    app.extensions["semcache"].close()


# --- protections on every page -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PAGES + ["/login"])
def test_security_headers(ui_client, path):
    response = ui_client.get(path)
    assert response.status_code == 200
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert response.headers["X-Frame-Options"] == "DENY" and response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cache-Control"] == "no-store"
    html = response.get_data(as_text=True)
    assert "<script>" not in html and " style=" not in html and "onclick" not in html  # nothing inline


@pytest.mark.parametrize("path", ["/review/action", "/review/approve/" + "0" * 32, "/review/" + "0" * 32 + "/edit",
                                  "/purge/preview", "/purge/selection", "/purge/run", "/deadletters/replay",
                                  "/deadletters/discard", "/entries/" + "0" * 32 + "/wrong"])
def test_every_form_needs_the_csrf_token(ui_client, path):
    assert ui_client.post(path, data={"ids": "0" * 32, "action": "approve", "tenant": "x"}).status_code == 400


def test_hostile_entries_render_as_text(ui_client, seed):
    tenant = unique_tenant()
    ident = seed('<img src=x onerror="alert(2)">', "<script>alert(1)</script>", tenant=tenant,
                 status=Status.PENDING_REVIEW, flags=("review",), metadata={"note": "</dd><script>alert(3)</script>"})
    for path in (f"/entries/{ident}", f"/entries/?tenant={tenant}", f"/review/?tenant={tenant}"):
        html = ui_client.get(path).get_data(as_text=True)
        assert "<script>alert(" not in html and "<img src=x" not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;img src=x onerror=" in html


# --- pages -------------------------------------------------------------------------------------------------------
def test_entries_page_filters_sorts_and_counts(ui_client, seed):
    tenant = unique_tenant()
    for i in range(3):
        seed(f"question number {i} about llamas", f"answer {i}", tenant=tenant)
    seed("a held question about llamas", tenant=tenant, status=Status.PENDING_REVIEW)
    seed("another tenant's question about llamas", tenant=unique_tenant())
    html = ui_client.get(f"/entries/?tenant={tenant}").get_data(as_text=True)
    assert re.search(r'id="count-total">4<', html) and re.search(r'id="count-approved">3<', html)
    assert html.count('name="ids" value=') == 4 and "another tenant" not in html
    approved = ui_client.get(f"/entries/?tenant={tenant}&status=approved&sort=created_at&order=asc").get_data(
        as_text=True)
    assert approved.index("question number 0") < approved.index("question number 2")
    assert "held question" not in approved
    texts = ui_client.get(f"/entries/?tenant={tenant}&q=number+1").get_data(as_text=True)
    assert "question number 1" in texts and "question number 2" not in texts
    paged = ui_client.get(f"/entries/?tenant={tenant}&per_page=25&page=1").get_data(as_text=True)
    assert "Page 1 of 1" in paged
    bad = ui_client.get(f"/entries/?tenant={tenant}&created_from=yesterday&status=nope")
    assert bad.status_code == 200 and "is not a date" in bad.get_data(as_text=True)
    in_range = ui_client.get(f"/entries/?tenant={tenant}&created_from=2000-01-01&created_to=2000-01-02")
    assert "No entries match" in in_range.get_data(as_text=True)


def test_entry_detail_page(ui_client, seed):
    tenant = unique_tenant()
    ident = seed("What is the capital of France?", "Paris", tenant=tenant)
    seed("Which city is France's capital?", "Paris!", tenant=tenant)
    html = ui_client.get(f"/entries/{ident}").get_data(as_text=True)
    assert "What is the capital of France?" in html and "Nearest neighbours" in html
    assert "Which city is France&#39;s capital?" in html  # the neighbour, escaped
    assert "Audit history" in html and re.search(r"<td>write → approved", html)
    assert ui_client.get("/entries/" + "0" * 32).status_code == 404
    assert ui_client.get("/entries/not-an-id").status_code == 404


def test_review_actions_send_tasks_and_list_their_outcomes(ui_client, seed, queued):
    tenant = unique_tenant()
    older = seed("older held question", tenant=tenant, status=Status.PENDING_REVIEW)
    newer = seed("newer held question", tenant=tenant, status=Status.PENDING_REVIEW)
    html = ui_client.get(f"/review/?tenant={tenant}").get_data(as_text=True)
    assert html.index("older held question") < html.index("newer held question")  # oldest first
    response = ui_client.post("/review/action", data={"csrf_token": ui_client.csrf, "ids": [older, newer],
                                                      "action": "reject", "reason": "off-topic",
                                                      "next": f"/review/?tenant={tenant}"})
    assert response.status_code == 302 and response.headers["Location"] == f"/review/?tenant={tenant}"
    page = ui_client.get(response.headers["Location"]).get_data(as_text=True)
    assert "Sent 2 rejections" in page and page.count('data-task-id="') == 2
    task_ids = re.findall(r'data-task-id="([0-9a-f]{32})"', page)
    name, kwargs = queued(task_ids[0])
    assert name == "semcache.set_status" and kwargs["status"] == "rejected" and kwargs["tenant"] == tenant
    assert kwargs["by"] == "ui:token" and kwargs["reason"] == "off-topic"
    polled = ui_client.get(f"/ui/tasks/{task_ids[0]}").get_json()
    assert polled["state"] == "pending" and polled["text"] == "queued"
    edit = ui_client.post(f"/review/{older}/edit", data={"csrf_token": ui_client.csrf, "response": "fixed answer"})
    assert edit.status_code == 302
    one = ui_client.post(f"/review/approve/{newer}", data={"csrf_token": ui_client.csrf})
    assert one.status_code == 302
    tasks = re.findall(r'data-task-id="([0-9a-f]{32})"', ui_client.get("/review/").get_data(as_text=True))
    assert queued(tasks[0])[1]["status"] == "approved" and queued(tasks[1])[1]["response"] == "fixed answer"
    empty = ui_client.post("/review/action", data={"csrf_token": ui_client.csrf, "action": "approve"})
    assert "Select at least one entry" in ui_client.get(empty.headers["Location"]).get_data(as_text=True)


def test_a_bulk_decision_lists_every_outcome_and_keeps_the_cookie_small(ui_client, seed):
    tenant = unique_tenant()
    ids = [seed(f"held question number {i}", tenant=tenant, status=Status.PENDING_REVIEW) for i in range(25)]
    response = ui_client.post("/review/action", data={"csrf_token": ui_client.csrf, "ids": ids, "action": "approve"})
    assert len(response.headers.get("Set-Cookie", "")) < 2000  # actions live in Redis, not in the cookie
    page = ui_client.get(f"/review/?tenant={tenant}").get_data(as_text=True)
    assert "Sent 25 approvals" in page
    assert len(set(re.findall(r'data-task-id="([0-9a-f]{32})"', page))) == 25


def test_purge_by_filter_previews_then_confirms(ui_client, seed, queued):
    tenant = unique_tenant()
    for i in range(3):
        seed(f"french question {i}", tenant=tenant, locale="fr")
    seed("english question", tenant=tenant, locale="en")
    preview = ui_client.post("/purge/preview", data={"csrf_token": ui_client.csrf, "tenant": tenant, "locale": "fr"})
    html = preview.get_data(as_text=True)
    assert re.search(r'id="purge-count">3<', html) and "english question" not in html
    unconfirmed = ui_client.post("/purge/run", data={"csrf_token": ui_client.csrf, "mode": "filter", "tenant": tenant})
    assert "not confirmed" in ui_client.get(unconfirmed.headers["Location"]).get_data(as_text=True)
    run = ui_client.post("/purge/run", data={"csrf_token": ui_client.csrf, "mode": "filter", "confirm": "yes",
                                             "tenant": tenant, "locale": "fr"})
    assert run.status_code == 302 and "/purge/tasks/" in run.headers["Location"]
    task_id = run.headers["Location"].rsplit("/", 1)[1]
    name, kwargs = queued(task_id)
    assert name == "semcache.purge" and kwargs["filter"]["tenant"] == tenant and kwargs["filter"]["locale"] == "fr"
    assert ui_client.get(run.headers["Location"]).status_code == 200
    assert ui_client.get("/purge/tasks/unknown").status_code == 404
    everything = ui_client.post("/purge/preview", data={"csrf_token": ui_client.csrf})
    assert "Give at least one filter field" in ui_client.get(everything.headers["Location"]).get_data(as_text=True)


def test_purge_of_a_selection(ui_client, seed, queued):
    tenant = unique_tenant()
    ids = [seed(f"selected {i}", tenant=tenant) for i in range(2)]
    confirm = ui_client.post("/purge/selection", data={"csrf_token": ui_client.csrf, "ids": ids + ["junk"]})
    assert re.search(r'id="purge-count">2<', confirm.get_data(as_text=True))
    run = ui_client.post("/purge/run", data={"csrf_token": ui_client.csrf, "mode": "ids", "confirm": "yes",
                                             "ids": ids})
    _, kwargs = queued(run.headers["Location"].rsplit("/", 1)[1])
    assert kwargs["mode"] == "ids" and sorted(kwargs["ids"]) == sorted(ids)


def test_overview_and_charts(ui_client, api_headers, seed, client):
    tenant = unique_tenant()
    seed("a cached question", tenant=tenant)
    ui_client.post("/api/v1/lookup", headers=api_headers(tenant), json={"prompt": "a cached question",
                                                                         "scope": {"locale": "en"}})
    for window in ("hour", "day"):
        html = ui_client.get(f"/?window={window}").get_data(as_text=True)
        assert "Hit rate" in html and "Money saved" in html and tenant in html
        for name in ("lookups", "latency", "status"):
            png = ui_client.get(f"/overview/chart/{name}.png?window={window}")
            assert png.status_code == 200 and png.mimetype == "image/png" and png.data[:4] == b"\x89PNG"
    assert ui_client.get("/overview/chart/nothing.png").status_code == 404


def test_dead_letters_list_inspect_replay_and_discard(ui_client, web_app, queued):
    state = web_app.extensions["semcache"]
    kwargs = {"command": {"prompt": "<b>bold</b> prompt", "response": "r", "scope": {"tenant": "dl"}}}
    first = push_dead_letter(state.redis, state.settings, DeadLetter(task="semcache.write_entry", kwargs=kwargs,
                                                                     reason="boom", error_type="BackendUnavailable",
                                                                     tenant="dl"))
    second = push_dead_letter(state.redis, state.settings, DeadLetter(task="semcache.purge", kwargs={"ids": []},
                                                                      reason="bad", tenant="dl"))
    listing = ui_client.get("/deadletters/").get_data(as_text=True)
    assert "BackendUnavailable" in listing and "2 dead letters" in listing
    detail = ui_client.get(f"/deadletters/{first}").get_data(as_text=True)
    assert "&lt;b&gt;bold&lt;/b&gt; prompt" in detail and "<b>bold</b>" not in detail
    assert ui_client.get("/deadletters/" + "0" * 32).status_code == 404
    replay = ui_client.post("/deadletters/replay", data={"csrf_token": ui_client.csrf, "ids": [first]})
    assert "Replayed 1 dead letter" in ui_client.get(replay.headers["Location"]).get_data(as_text=True)
    task_id = re.findall(r'data-task-id="([0-9a-f]{32})"', ui_client.get("/deadletters/").get_data(as_text=True))[0]
    assert queued(task_id) == ("semcache.write_entry", kwargs)
    ui_client.post("/deadletters/discard", data={"csrf_token": ui_client.csrf, "ids": [second]})
    assert count_dead_letters(state.redis, state.settings) == 0


def test_ui_errors_are_pages_not_traces(ui_client):
    response = ui_client.get("/nothing-here")
    assert response.status_code == 404 and "<h1>404</h1>" in response.get_data(as_text=True)
