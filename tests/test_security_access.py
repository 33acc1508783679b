"""Issue 7, promise 6: isolation and access, where the existing tests do not already prove it.

Already proven elsewhere (and not repeated here): tenant B's key cannot hit, read, list, delete, write into, purge,
see the tasks of or use admin endpoints on tenant A (tests/test_api_isolation.py, every test); a tenant key may not
name another tenant (tests/test_api_endpoints.py::test_a_tenant_key_may_not_name_another_tenant); UI pages need a
login (tests/test_web_ui.py::test_pages_need_a_login); CSRF on every form
(tests/test_web_ui.py::test_every_form_needs_the_csrf_token, ::test_login_needs_its_csrf_token); hostile entries
render as text (tests/test_web_ui.py::test_hostile_entries_render_as_text); the proxy never hits across tenants
(tests/test_proxy.py::test_the_same_question_in_another_conversation_or_tenant_does_not_hit); scope values that look
like query syntax match only themselves (tests/test_core_lookup.py::test_query_syntax_in_scope_values_matches_only_itself
and tests/test_security_fuzz.py).

Added here: UI pages and the login refuse tenant and admin API keys; /metrics shows no tenant's name or text; API
keys are stored only as hashes (every Redis value inspected); keys and tokens are compared with
``hmac.compare_digest``; secrets and detected PII never reach a log (web app and worker service functions, and the
real worker process's log).
"""

from __future__ import annotations

import inspect
import logging
import re
import uuid

import pytest

from cache_core import apikeys
from cache_core.apikeys import create_key
from cache_core.tasks import WRITE_ENTRY

from .fixtures_web import ADMIN_TOKEN, csrf_of, login, unique_tenant, wait_task
from .fixtures_worker import make_command, run_task
from .test_web_ui import PAGES

EMAIL = "jane.doe.secret@example.org"
CARD = "4111 1111 1111 1111"  # a Luhn-valid test card number
CARD_DIGITS = CARD.replace(" ", "")


def _all_values(client, pattern: str = "*") -> list[str]:
    """Every key name and every stored value (strings, hashes, lists, streams, JSON) in db 0, as text."""
    out = []
    for key in client.scan_iter(match=pattern, count=1000):
        name = key.decode() if isinstance(key, bytes) else key
        out.append(name)
        kind = client.type(name)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind == "string":
            out.append(str(client.get(name)))
        elif kind == "hash":
            out.append(str(client.hgetall(name)))
        elif kind == "list":
            out.append(str(client.lrange(name, 0, -1)))
        elif kind == "stream":
            out.append(str(client.xrange(name)))
        elif kind == "ReJSON-RL":
            out.append(str(client.execute_command("JSON.GET", name)))
    return out


# --- admin pages -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PAGES)
def test_ui_pages_refuse_api_keys_tenant_or_admin(client, api_headers, path):
    """An API key (even an admin one) is not a UI login: the page redirects to the login form, never renders."""
    for headers in (api_headers(unique_tenant()), api_headers(admin=True)):
        response = client.get(path, headers=headers)
        assert response.status_code == 302 and "/login" in response.headers["Location"], (path, response.status_code)


def test_login_refuses_an_api_key_as_the_admin_token(client, web_app):
    state = web_app.extensions["semcache"]
    for admin in (False, True):
        key, _ = create_key(state.redis, state.settings, tenant=None if admin else "acme", admin=admin)
        page = client.get("/login")
        response = client.post("/login", data={"csrf_token": csrf_of(page.get_data(as_text=True)), "token": key})
        assert response.status_code != 302 or response.headers["Location"].endswith("/login"), response.status_code
        assert client.get("/entries/").status_code == 302  # still not logged in


def test_admin_api_refuses_anonymous_and_tenant_keys(client, api_headers):
    tenant = api_headers(unique_tenant())
    for path in ("/api/v1/admin/tenants", "/api/v1/admin/deadletters"):
        assert client.get(path).status_code == 401
        assert client.get(path, headers=tenant).status_code == 403
        assert client.get(path, headers=api_headers(admin=True)).status_code == 200


# --- /metrics ------------------------------------------------------------------------------------------------------
def test_metrics_reveal_no_tenant_prompt_or_answer(client, seed, api_headers):
    """/metrics (open when no token is set) is deployment-wide counts only: tenant A's name, prompt and answer
    appear nowhere, so a scrape by anyone (tenant B included) learns nothing of A's entries."""
    a = unique_tenant("secret-a")
    seed("What is the launch code of project falcon?", "It is kestrel-42", tenant=a)
    client.post("/api/v1/lookup", headers=api_headers(a), json={"prompt": "What is the launch code of project "
                                                                          "falcon?", "scope": {"locale": "en"}})
    text = client.get("/metrics", headers=api_headers(unique_tenant("b"))).get_data(as_text=True)
    assert "semcache_" in text
    for secret in (a, "falcon", "kestrel"):
        assert secret not in text


# --- keys at rest and in comparison --------------------------------------------------------------------------------
def test_api_keys_are_stored_only_as_hashes(client, web_app, redis_client):
    """The secret part of a key appears in no Redis key or value (of any type), before and after it is used."""
    state = web_app.extensions["semcache"]
    key, record = create_key(state.redis, state.settings, tenant="acme")
    key_id, secret = apikeys.parse_key(key)
    headers = {"Authorization": f"Bearer {key}"}
    assert client.post("/api/v1/lookup", headers=headers, json={"prompt": "hello"}).status_code == 200
    assert client.post("/api/v1/entries", headers=headers, json={"prompt": "p", "response": "r"}).status_code == 202
    everything = "\n".join(_all_values(redis_client))
    assert key_id in everything  # the id is stored (it names the record) ...
    assert secret not in everything and key not in everything  # ... the secret is not
    stored = redis_client.hget(state.settings.key("apikeys"), key_id)
    assert stored and apikeys._digest(key_id, secret).encode() in (stored if isinstance(stored, bytes)
                                                                   else stored.encode())


@pytest.mark.parametrize("function", [
    "cache_core.apikeys:verify_key", "web.security:check_csrf", "web.security:check_login", "web.metrics:_authorized",
    "web.proxy:KeyMemo.recall",
])
def test_secrets_are_compared_in_constant_time(function):
    """Code inspection: every comparison of a presented secret uses ``hmac.compare_digest`` and no ``==``/``!=``
    on the secret."""
    import importlib

    module_name, _, qualname = function.partition(":")
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            pytest.fail(f"{function} not found: the constant-time check must name the real function")
    source = inspect.getsource(obj)
    assert "hmac.compare_digest(" in source, function
    for line in source.splitlines():
        if re.search(r"(presented|secret|token|digest|hash|password)\w*\s*[!=]=\s*\w", line) and "compare_digest" \
                not in line and "is None" not in line and "len(" not in line:
            pytest.fail(f"{function}: non-constant-time comparison: {line.strip()}")


# --- secrets and PII never logged ----------------------------------------------------------------------------------
def _secrets_in(text: str, secrets: list[str]) -> list[str]:
    return [s for s in secrets if s and s in text]


def test_web_app_logs_no_secret_or_pii(client, web_app, api_headers, caplog):
    """Log capture at DEBUG of every logger while: logging in with the admin token, creating and using an API key,
    writing an entry with an e-mail address and a card number, looking it up, and sending wrong keys."""
    state = web_app.extensions["semcache"]
    with caplog.at_level(logging.DEBUG):
        login(client)
        key, _ = create_key(state.redis, state.settings, tenant="acme")
        headers = {"Authorization": f"Bearer {key}"}
        body = {"prompt": f"My e-mail is {EMAIL} and my card is {CARD}", "response": f"Noted {EMAIL}, card {CARD}"}
        assert client.post("/api/v1/entries", headers=headers, json=body).status_code == 202
        assert client.post("/api/v1/lookup", headers=headers, json={"prompt": body["prompt"]}).status_code == 200
        wrong = key[:-4] + "AAAA"
        assert client.post("/api/v1/lookup", headers={"Authorization": f"Bearer {wrong}"},
                           json={"prompt": "x"}).status_code == 401
        assert client.post("/api/v1/entries", headers=headers, json={**body, "ttl_seconds": "bad"}).status_code == 400
    _, secret = apikeys.parse_key(key)
    leaked = _secrets_in(caplog.text, [key, secret, wrong, ADMIN_TOKEN, EMAIL, CARD, CARD_DIGITS])
    assert not leaked, leaked


def test_worker_service_functions_log_no_secret_or_pii(make_settings, embedder, caplog):
    """``worker.service.write_commands`` / ``write_one`` on entries holding an e-mail and a card number (held or
    dropped by the safety pipeline), and on an invalid command carrying them: nothing of either in the logs."""
    from cache_core.connection import make_client
    from worker.safety import SafetyPipeline
    from worker.service import write_commands, write_one
    from cache_core.errors import InvalidInput

    settings = make_settings()
    client = make_client(settings.redis_url, timeout_ms=5000)
    pipeline = SafetyPipeline.from_settings(settings)
    with caplog.at_level(logging.DEBUG):
        summary = write_commands(client, settings, embedder, pipeline, [
            make_command("acme", f"Contact me at {EMAIL}", f"Sure, I will write to {EMAIL}"),
            make_command("acme", f"Charge my card {CARD}", f"Charged {CARD_DIGITS}"),
            {"prompt": f"bad {EMAIL}", "response": CARD, "scope": {"tenant": ""}},
        ])
        assert summary["invalid"] and len(summary["results"]) == 2
        with pytest.raises(InvalidInput):
            write_one(client, settings, embedder, pipeline, {"prompt": f"{EMAIL} {CARD}", "scope": "nope"})
    leaked = _secrets_in(caplog.text, [EMAIL, CARD, CARD_DIGITS])
    assert not leaked, (leaked, caplog.text[-2000:])


def test_the_real_worker_logs_no_pii(worker_client, worker_api_headers, celery_worker):
    """Through the API and the session's worker process (INFO logging to its file)."""
    tenant = unique_tenant("pii")
    headers = worker_api_headers(tenant)
    marker = uuid.uuid4().hex[:8]
    email = f"pii.{marker}@example.org"
    body = {"prompt": f"Send the invoice to {email} and bill card {CARD}", "response": f"Billed {CARD} for {email}"}
    task = worker_client.post("/api/v1/entries", headers=headers, json=body).get_json()["task_id"]
    assert wait_task(worker_client, headers, task)["state"] == "success"
    bad = run_task(celery_worker.app, WRITE_ENTRY, command={"prompt": f"x {email}", "response": CARD, "scope": 7})
    assert bad.failed()
    log_text = celery_worker.log_text()
    assert marker not in log_text and CARD not in log_text and CARD_DIGITS not in log_text
