"""The embedded Redis: start, modules, sharing one data dir, clean stop, no orphans; external servers checked."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import redis

from cache_core.connection import check_modules, open_redis
from cache_core.embedded import EmbeddedRedis, free_port
from cache_core.errors import ConfigError
from cache_core.settings import Settings


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0): look at its state
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split(")")[-1].split()[0] != "Z"


def test_start_loads_search_and_json_then_stops_cleanly(tmp_path):
    server = EmbeddedRedis(tmp_path / "r")
    url = server.start()
    client = redis.Redis.from_url(url)
    names = {m[b"name"] for m in client.execute_command("MODULE", "LIST")}
    assert {b"search", b"ReJSON"} <= names
    assert client.config_get("appendonly")["appendonly"] == "yes"
    assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "volatile-lfu"
    assert client.config_get("bind")["bind"] == "127.0.0.1"
    pid = server.process.pid
    state = json.loads((tmp_path / "r" / "redis.json").read_text())
    assert state["pid"] == pid
    server.stop()
    assert not _alive(pid)
    assert not (tmp_path / "r" / "redis.json").exists()


def test_second_process_joins_the_running_server(tmp_path):
    first = EmbeddedRedis(tmp_path / "r")
    url = first.start()
    try:
        second = EmbeddedRedis(tmp_path / "r")
        assert second.start() == url
        assert not second.owned
        second.stop()  # not the owner: must not stop it
        assert redis.Redis.from_url(url).ping()
    finally:
        first.stop()


def test_stale_state_file_is_ignored(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "redis.json").write_text(json.dumps({"pid": 999999, "port": free_port()}))
    with EmbeddedRedis(tmp_path / "r") as server:
        assert server.owned and redis.Redis.from_url(server.url).ping()


def test_server_dies_with_a_killed_parent(tmp_path):
    """SIGKILL the owning process: the kernel's parent-death signal stops the server (no orphan)."""
    code = (
        "import sys, time; from pathlib import Path; from cache_core.embedded import EmbeddedRedis;"
        f"s = EmbeddedRedis(Path({str(tmp_path / 'r')!r})); s.start();"
        "print(s.process.pid, flush=True); time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    assert _alive(pid)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    for _ in range(100):
        if not _alive(pid):
            break
        time.sleep(0.05)
    assert not _alive(pid)


def test_open_redis_refuses_a_server_without_search_and_json(plain_redis_url):
    url = plain_redis_url
    with pytest.raises(ConfigError) as info:
        check_modules(redis.Redis.from_url(url), url)
    assert "redis:8" in str(info.value)
    with pytest.raises(ConfigError):
        open_redis(Settings(redis_url=url))


def test_open_redis_with_url_uses_that_server(redis_url):
    with open_redis(Settings(redis_url=redis_url)) as handle:
        assert handle.embedded is None
        assert handle.reader().ping()
        assert handle.broker_url.endswith("/1")


def test_open_redis_rejects_a_non_redis_url():
    with pytest.raises(ConfigError):
        open_redis(Settings(redis_url="http://localhost:6379"))
