"""Session fixtures: one real embedded Redis (Search + JSON) for the whole run, the real MiniLM model loaded once,
and per-test settings with a fresh index name and key prefix so tests never see each other's entries."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from cache_core.connection import make_client  # noqa: E402
from cache_core.embedded import EmbeddedRedis  # noqa: E402
from cache_core.testing import test_settings  # noqa: E402

pytest_plugins = ["tests.fixtures_worker", "tests.fixtures_web"]

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(autouse=True)
def _clean_semcache_env(monkeypatch):
    """No SEMCACHE_* variable of the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("SEMCACHE_"):
            monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def tmp_root():
    path = Path(tempfile.mkdtemp(prefix="semcache-tests-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server(tmp_root):
    """The embedded server, started once for the session on a free port."""
    server = EmbeddedRedis(tmp_root / "redis", appendonly=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def plain_redis_url(tmp_path):
    """A redis-server without Search and JSON (the same binary, no modules loaded): what a wrong deployment has."""
    import subprocess
    import time

    import redis

    from cache_core.embedded import free_port, server_binary

    port = free_port()
    plain = subprocess.Popen([server_binary(), "--port", str(port), "--save", "", "--dir", str(tmp_path)],
                             stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        for _ in range(100):
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield url
    finally:
        plain.terminate()
        plain.wait()


@pytest.fixture(scope="session")
def redis_url(redis_server) -> str:
    return redis_server.url


@pytest.fixture
def redis_client(redis_url):
    client = make_client(redis_url, timeout_ms=5000)
    yield client
    client.close()


@pytest.fixture(scope="session")
def embedder():
    """The real packaged all-MiniLM-L6-v2, loaded once."""
    from cache_core.embedder import load_embedder

    return load_embedder()


@pytest.fixture
def settings(redis_url, tmp_path):
    return test_settings(redis_url, data_dir=tmp_path)


@pytest.fixture
def make_settings(redis_url, tmp_path):
    def make(**overrides):
        return test_settings(redis_url, data_dir=tmp_path, **overrides)

    return make


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
