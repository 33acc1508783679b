"""``semcache keys create|list|revoke`` and ``semcache web`` (gunicorn in a subprocess), and the rule that ``web``
never imports ``worker``; plus the API key store itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from cache_core.apikeys import create_key, list_keys, parse_key, revoke_key, verify_key
from cache_core.embedded import free_port
from cache_core.errors import InvalidInput

ROOT = Path(__file__).resolve().parent.parent


def test_keys_are_stored_only_as_hashes(redis_client, settings):
    key, record = create_key(redis_client, settings, tenant="acme", name="ci")
    assert parse_key(key) is not None and record.tenant == "acme" and not record.admin
    stored = redis_client.hgetall(settings.key("apikeys"))
    raw = b"".join(k + v for k, v in stored.items()).decode()
    secret = key.split("_", 2)[2]
    assert secret not in raw and record.id in raw
    assert redis_client.ttl(settings.key("apikeys")) == -1  # no TTL: never expires, never evicted by volatile-*
    assert verify_key(redis_client, settings, key).id == record.id
    assert verify_key(redis_client, settings, key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert verify_key(redis_client, settings, f"sc_{'0' * 12}_{secret}") is None
    assert verify_key(redis_client, settings, "garbage") is None
    admin, admin_record = create_key(redis_client, settings, admin=True)
    assert verify_key(redis_client, settings, admin).admin and admin_record.tenant is None
    assert [k.id for k in list_keys(redis_client, settings)] == [record.id, admin_record.id]
    assert revoke_key(redis_client, settings, record.id) and not revoke_key(redis_client, settings, record.id)
    assert verify_key(redis_client, settings, key) is None
    with pytest.raises(InvalidInput):
        create_key(redis_client, settings)
    with pytest.raises(InvalidInput):
        create_key(redis_client, settings, tenant="acme", admin=True)


def _env(settings) -> dict[str, str]:
    return {"SEMCACHE_REDIS_URL": settings.redis_url, "SEMCACHE_INDEX": settings.index,
            "SEMCACHE_DATA_DIR": str(settings.data_dir)}


def test_keys_commands(settings, redis_client):
    from semcache.cli import cli

    runner = CliRunner()
    env = _env(settings)
    created = runner.invoke(cli, ["keys", "create", "--tenant", "acme", "--name", "billing"], env=env)
    assert created.exit_code == 0, created.output
    key = created.stdout.strip().splitlines()[0]
    record = verify_key(redis_client, settings, key)
    assert record is not None and record.tenant == "acme" and record.name == "billing"
    admin = runner.invoke(cli, ["keys", "create", "--admin"], env=env)
    assert admin.exit_code == 0 and verify_key(redis_client, settings, admin.stdout.strip()).admin
    listing = runner.invoke(cli, ["keys", "list"], env=env)
    assert record.id in listing.stdout and "tenant acme" in listing.stdout and "admin" in listing.stdout
    assert key.split("_", 2)[2] not in listing.stdout  # the secret is never shown again
    as_json = json.loads(runner.invoke(cli, ["keys", "list", "--json"], env=env).stdout)
    assert {k["id"] for k in as_json} >= {record.id} and all("hash" not in k for k in as_json)
    assert runner.invoke(cli, ["keys", "create"], env=env).exit_code == 2
    assert runner.invoke(cli, ["keys", "create", "--tenant", "a", "--admin"], env=env).exit_code == 2
    revoked = runner.invoke(cli, ["keys", "revoke", key], env=env)  # the whole key works as well as its id
    assert revoked.exit_code == 0 and verify_key(redis_client, settings, key) is None
    again = runner.invoke(cli, ["keys", "revoke", record.id], env=env)
    assert again.exit_code == 1 and "no API key" in again.output


def _get(url: str, headers: dict[str, str] | None = None, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={**(headers or {}), "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_semcache_web_serves_with_gunicorn(settings, redis_client, embedder, seed_index):
    key, _ = create_key(redis_client, settings, tenant="acme")
    port = free_port()
    env = {**os.environ, **_env(settings), "SEMCACHE_ADMIN_TOKEN": "t" * 32, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "semcache", "web", "--port", str(port), "--workers", "1"],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if _get(base + "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "semcache web did not start"
            time.sleep(0.2)
        assert _get(base + "/readyz") == (200, {"ready": True, "checks": {"redis": "ok", "index": "ok",
                                                                           "broker": "ok"}})
        status, body = _get(base + "/api/v1/lookup", {"Authorization": f"Bearer {key}"},
                            {"prompt": "What is the capital of France?", "scope": {"locale": "en"}})
        assert status == 200 and body["hit"] and body["entry"]["response"] == "Paris"
        with urllib.request.urlopen(base + "/login", timeout=10) as response:
            assert response.headers["Server"].startswith("gunicorn")
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0].decode(errors="replace")
    assert process.returncode == 0, output[-2000:]


@pytest.fixture
def seed_index(settings, redis_client, embedder):
    from cache_core.index import IndexSpec, ensure_index
    from cache_core.schema import Scope, WriteCommand
    from cache_core.store import write_command

    ensure_index(redis_client, IndexSpec(settings=settings, dim=embedder.dim, model_name=embedder.name))
    command = WriteCommand(prompt="What is the capital of France?", response="Paris",
                           scope=Scope(tenant="acme", locale="en"))
    write_command(redis_client, settings, embedder, command)


def test_web_never_imports_worker():
    code = ("import sys, pkgutil, importlib, web\n"
            "for m in pkgutil.iter_modules(web.__path__): importlib.import_module('web.' + m.name)\n"
            "bad = sorted(m for m in sys.modules if m == 'worker' or m.startswith('worker.'))\n"
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
