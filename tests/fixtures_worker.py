"""Fixtures for a real Celery worker process (``semcache worker`` in a subprocess, never eager mode).

- ``worker_settings`` (session): Settings on the session Redis, index ``wk``, a tmp data dir, quick retries
  (3, backoff 0.2 s .. 1 s) and a small safety policy file (see :data:`POLICY`).
- ``celery_worker`` (session): a :class:`WorkerProcess` started with those settings through ``SEMCACHE_*``
  variables, ready once it answers a ping. ``.settings``, ``.app``, ``.stop()``, ``.kill()`` (SIGKILL of the whole
  process group), ``.start()``, ``.restart()``, ``.log_text()``.
- ``celery_app`` (session): a client app from ``worker.app.create_celery(worker_settings)`` to send tasks and wait
  for results. It depends on ``celery_worker``, so using it starts the worker.
- ``worker_factory`` (function): ``worker_factory(settings, concurrency=2)`` starts a worker of your own (for tests
  that kill or restart things); each gets its own broker database unless its settings name one, and all are stopped
  at the end of the test.

Tests sharing the session worker isolate themselves with unique tenant names (``uuid``): the index is shared.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from cache_core.connection import make_client, with_db
from cache_core.settings import Settings
from cache_core.testing import test_settings

__all__ = ["WorkerProcess", "settings_env", "POLICY", "BLOCKED_WORD", "POLICY_TENANT", "make_command", "run_task",
           "entry_keys", "audit_writes"]

ROOT = Path(__file__).resolve().parent.parent

BLOCKED_WORD = "zorblax"  # blocked for every tenant by the session worker's policy
POLICY_TENANT = "wk-policy-tenant"  # has its own rules in the session worker's policy
POLICY = {
    "default": {"block_words": [BLOCKED_WORD]},
    "tenants": {
        POLICY_TENANT: {
            "block_patterns": [r"(?i)\bcasino\s+bonus\b"],
            "hold_words": ["wire transfer"],
            "personal": "short_ttl",
            "ttl_seconds": 7200,
        }
    },
}


def settings_env(settings: Settings) -> dict[str, str]:
    """The ``SEMCACHE_*`` variables that recreate ``settings`` in another process (fields that were set)."""
    env = {}
    for name in settings.model_fields_set:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            value = ",".join(value)
        env[f"SEMCACHE_{name.upper()}"] = str(value)
    return env


_names = itertools.count(1)


class WorkerProcess:
    """A ``semcache worker`` subprocess in its own process group."""

    def __init__(self, settings: Settings, log_path: Path, *, concurrency: int = 2, start_timeout_s: float = 120):
        from worker.app import create_celery

        self.settings = settings
        self.log_path = log_path
        self.concurrency = concurrency
        self.start_timeout_s = start_timeout_s
        self.hostname = f"{settings.index}-{next(_names)}-{uuid.uuid4().hex[:6]}@semcache-tests"
        self.app = create_celery(settings)
        self.process: subprocess.Popen | None = None

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEMCACHE_")}
        env.update(settings_env(self.settings))
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env["C_FORCE_ROOT"] = "1"  # CI containers run as root; the worker only runs JSON tasks
        return env

    def start(self) -> "WorkerProcess":
        if self.alive():
            return self
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "semcache", "worker", "--concurrency", str(self.concurrency),
                 "--loglevel", "INFO", "--hostname", self.hostname],
                cwd=ROOT, env=self._env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        finally:
            log.close()
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log_text()[-3000:]}")
            try:
                if self.app.control.ping(destination=[self.hostname], timeout=0.5):
                    return
            except Exception:  # noqa: BLE001 - the broker may not answer yet
                time.sleep(0.2)
        raise RuntimeError(f"worker not ready after {self.start_timeout_s}s:\n{self.log_text()[-3000:]}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30) -> None:
        """Warm shutdown (SIGTERM: running tasks finish, reserved ones go back to the queue)."""
        if not self.alive():
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return
        self._reap_group()

    def kill(self) -> None:
        """SIGKILL the main process and its pool processes at once (a crash, not a shutdown)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)

    def _reap_group(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # pool processes that outlived their parent, if any
        except ProcessLookupError:
            pass

    def restart(self) -> "WorkerProcess":
        self.stop()
        return self.start()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


@pytest.fixture(scope="session")
def worker_settings(redis_url, tmp_root) -> Settings:
    data_dir = tmp_root / "worker"
    data_dir.mkdir(parents=True, exist_ok=True)
    policy = data_dir / "safety-policy.json"
    policy.write_text(json.dumps(POLICY))
    return test_settings(redis_url, index="wk", data_dir=data_dir, max_retries=3, retry_backoff_s=0.2,
                         retry_backoff_max_s=1.0, safety_policy_file=policy)


@pytest.fixture(scope="session")
def celery_worker(worker_settings):
    worker = WorkerProcess(worker_settings, worker_settings.data_dir / "worker.log")
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture(scope="session")
def celery_app(celery_worker):
    return celery_worker.app


_broker_dbs = itertools.count(2)


@pytest.fixture
def worker_factory(tmp_path):
    """Start workers of one's own: ``worker_factory(settings, concurrency=2) -> WorkerProcess``."""
    started: list[WorkerProcess] = []

    def make(settings: Settings, *, concurrency: int = 2) -> WorkerProcess:
        if settings.broker_url is None:
            db = next(_broker_dbs)
            if db > 15:
                raise RuntimeError("out of Redis databases for test brokers")
            settings = settings.model_copy(update={"broker_url": with_db(settings.redis_url, db)})
            client = make_client(settings.broker_url, timeout_ms=5000)
            client.flushdb()  # a fresh broker: nothing left over from another test
            client.close()
        worker = WorkerProcess(settings, tmp_path / f"worker-{len(started)}.log", concurrency=concurrency)
        started.append(worker)
        return worker.start()

    yield make
    for worker in started:
        worker.stop()


# --- helpers for worker tests ---------------------------------------------------------------------------------------
def make_command(tenant: str, prompt: str, response: str = "A plain, helpful answer.", **fields) -> dict:
    """A WriteCommand as the JSON dict a task carries."""
    scope = {"tenant": tenant, **fields.pop("scope", {})}
    return {"prompt": prompt, "response": response, "scope": scope, **fields}


def run_task(app, name: str, timeout: float = 90, **kwargs):
    """Send a task by name and wait for it; returns the AsyncResult (its ``.result`` is the dict or the error)."""
    result = app.send_task(name, kwargs=kwargs)
    result.get(timeout=timeout, propagate=False)
    return result


def entry_keys(client, settings: Settings, tenant: str) -> list[str]:
    """Every entry key of a tenant, found by scanning the key space (not the index: partial documents count too)."""
    keys = [k.decode() if isinstance(k, bytes) else k for k in client.scan_iter(match=f"{settings.key_prefix}*",
                                                                               count=1000)]
    if not keys:
        return []
    tenants = client.execute_command("JSON.MGET", *keys, "$.scope.tenant")  # not client.json(): see store._json
    return sorted(k for k, t in zip(keys, tenants) if t and json.loads(t) == [tenant])


def audit_writes(client, settings: Settings, tenant: str) -> list[dict]:
    """The ``write`` records of a tenant in the audit stream."""
    out = []
    for _, fields in client.xrange(settings.key("audit")):
        row = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
               for k, v in fields.items()}
        if row.get("event") == "write" and row.get("tenant") == tenant:
            out.append(row)
    return out
