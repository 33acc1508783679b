"""Fixtures of the web work: the Flask app (factory, test client, a logged-in UI client), API keys, entries seeded
straight into Redis, and, for the browser tests, a live server on 127.0.0.1 and Debian's Chromium under Playwright.

Two kinds of app:

* ``web_app`` has its own fresh index and sends its tasks to a queue no worker consumes (:data:`UNCONSUMED`, on
  the session broker): they stay queued, which is what tests of the sending side want (202, task records,
  isolation, the exact arguments sent).
* ``worker_web_app`` and ``live_server`` use ``worker_settings`` (the index the session's real Celery worker
  serves), so approvals, rejections, writes and purges really happen. That index is shared by the session: tests
  on it use their own tenant names (:func:`unique_tenant`).
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any, Callable

import pytest
from werkzeug.security import generate_password_hash

from cache_core.apikeys import create_key
from cache_core.connection import make_client, with_db
from cache_core.index import IndexSpec, ensure_index
from cache_core.schema import Scope, Status, WriteCommand
from cache_core.store import write_command

ADMIN_USER = "admin"
ADMIN_PASSWORD = "correct horse battery staple"
ADMIN_TOKEN = "test-admin-token-" + "x" * 24
UNCONSUMED = "semcache-web-tests"  # a queue no worker listens to (workers consume Celery's default queue)
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]


def unique_tenant(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def password_hash() -> str:
    return generate_password_hash(ADMIN_PASSWORD)


def _web_overrides(password_hash: str) -> dict[str, Any]:
    return {"admin_user": ADMIN_USER, "admin_password_hash": password_hash, "admin_token": ADMIN_TOKEN}


@pytest.fixture
def web_settings(make_settings, password_hash):
    """A fresh index with the admin credentials of these tests."""
    return make_settings(**_web_overrides(password_hash))


def _make_app(settings, embedder, *, queue: str | None = UNCONSUMED):
    """The app with the session's model and its index made; with ``queue``, tasks go where no worker takes them."""
    from web import create_app
    from web.dispatch import make_celery_client

    client = make_client(settings.redis_url, timeout_ms=5000)
    ensure_index(client, IndexSpec(settings=settings, dim=embedder.dim, model_name=embedder.name))
    client.close()
    celery = None
    if queue:
        celery = make_celery_client(settings, settings.broker_url or with_db(settings.redis_url, 1))
        celery.conf.task_default_queue = queue
    return create_app(settings, embedder=embedder, celery=celery)


@pytest.fixture
def web_app(web_settings, embedder):
    app = _make_app(web_settings, embedder)
    yield app
    app.extensions["semcache"].close()


@pytest.fixture
def client(web_app):
    return web_app.test_client()


def csrf_of(html: str) -> str:
    import re

    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)


def login(test_client, *, token: str = ADMIN_TOKEN) -> str:
    """Log a test client in with the admin token; returns the session's CSRF token."""
    page = test_client.get("/login")
    response = test_client.post("/login", data={"csrf_token": csrf_of(page.get_data(as_text=True)), "token": token})
    assert response.status_code == 302, response.get_data(as_text=True)[:500]
    return csrf_of(test_client.get("/entries/").get_data(as_text=True))


@pytest.fixture
def ui_client(client):
    """A test client logged in to the UI; ``ui_client.csrf`` is its CSRF token."""
    client.csrf = login(client)
    return client


def _key_factory(app) -> Callable[..., dict[str, str]]:
    state = app.extensions["semcache"]

    def make(tenant: str | None = None, *, admin: bool = False) -> dict[str, str]:
        key, _ = create_key(state.redis, state.settings, tenant=tenant, admin=admin)
        return {"Authorization": f"Bearer {key}"}

    return make


@pytest.fixture
def api_headers(web_app):
    """``api_headers("acme")`` -> headers with a new key of tenant acme; ``api_headers(admin=True)`` an admin key."""
    return _key_factory(web_app)


def _seeder(settings, embedder) -> Callable[..., str]:
    client = make_client(settings.redis_url, timeout_ms=5000)

    def seed(prompt: str, response: str = "an answer", *, tenant: str, locale: str = "en", model: str = "default",
             status: Status = Status.APPROVED, flags: tuple[str, ...] = (), ttl_seconds: int | None = None,
             metadata: dict[str, Any] | None = None) -> str:
        command = WriteCommand(prompt=prompt, response=response, scope=Scope(tenant=tenant, locale=locale, model=model),
                               flags=list(flags), ttl_seconds=ttl_seconds, source="test", metadata=metadata or {})
        return write_command(client, settings, embedder, command, status=status)[0]

    return seed


@pytest.fixture
def seed(web_settings, embedder):
    """Write an entry straight into ``web_app``'s index (no worker); returns its id."""
    return _seeder(web_settings, embedder)


@pytest.fixture
def queued(web_settings):
    """``queued(task_id)`` -> ``(task name, kwargs)`` of a message ``web_app`` sent (waiting in :data:`UNCONSUMED`)."""
    import base64
    import json

    broker = make_client(with_db(web_settings.redis_url, 1), timeout_ms=5000)

    def find(task_id: str) -> tuple[str, dict[str, Any]]:
        for raw in broker.lrange(UNCONSUMED, 0, -1):
            message = json.loads(raw)
            if message["headers"]["id"] == task_id:
                args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
                return message["headers"]["task"], kwargs
        raise AssertionError(f"task {task_id} is not queued")

    yield find
    broker.close()


# --- with the session's real worker ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def worker_web_settings(worker_settings, password_hash):
    return worker_settings.model_copy(update=_web_overrides(password_hash))


@pytest.fixture(scope="session")
def worker_web_app(worker_web_settings, embedder, celery_worker):
    """The app on the worker's index: its tasks are executed by the session's worker process."""
    app = _make_app(worker_web_settings, embedder, queue=None)
    yield app
    app.extensions["semcache"].close()


@pytest.fixture
def worker_client(worker_web_app):
    return worker_web_app.test_client()


@pytest.fixture(scope="session")
def worker_api_headers(worker_web_app):
    return _key_factory(worker_web_app)


@pytest.fixture(scope="session")
def worker_seed(worker_web_settings, embedder):
    """Write an entry straight into the worker's index; use a :func:`unique_tenant`."""
    return _seeder(worker_web_settings, embedder)


def wait_task(test_client, headers: dict[str, str], task_id: str, timeout_s: float = 60.0) -> dict[str, Any]:
    """Poll ``GET /api/v1/tasks/<id>`` until the task succeeded or failed (a bound, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while True:
        body = test_client.get(f"/api/v1/tasks/{task_id}", headers=headers).get_json()
        if body["state"] in ("success", "failure") or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


# --- a live server and a browser ---------------------------------------------------------------------------------
class LiveServer:
    """The worker-backed app served by werkzeug in a thread on 127.0.0.1 (a free port)."""

    def __init__(self, app) -> None:
        from werkzeug.serving import make_server

        self.app = app
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="live-server", daemon=True)

    def start(self) -> "LiveServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(10)


@pytest.fixture(scope="session")
def live_server(worker_web_app):
    server = LiveServer(worker_web_app).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import expect, sync_playwright

    # a bound on waiting for the worker on a busy 2-core machine, not a timing assertion (the default is 5 s)
    expect.set_options(timeout=30_000)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=BROWSER_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, live_server):
    """A fresh browser context (no cookies) with a page; JavaScript dialogs are recorded in ``page.dialogs``."""
    context = browser.new_context(viewport={"width": 1360, "height": 900}, base_url=live_server.url)
    tab = context.new_page()
    tab.dialogs = []

    def on_dialog(dialog) -> None:
        tab.dialogs.append(dialog.message)
        dialog.dismiss()

    tab.on("dialog", on_dialog)
    tab.set_default_timeout(20_000)
    yield tab
    context.close()


def browser_login(tab, *, password: bool = True) -> None:
    tab.goto("/login")
    if password:
        tab.fill("#username", ADMIN_USER)
        tab.fill("#password", ADMIN_PASSWORD)
        tab.click("#password-login button[type=submit]")
    else:
        tab.fill("#token", ADMIN_TOKEN)
        tab.click("#token-login button[type=submit]")
    tab.wait_for_url("**/")
