"""The `semcache` command line, run as a real subprocess."""

import json
import os
import signal
import subprocess
import sys

import redis

from cache_core.schema import Scope, WriteCommand
from cache_core.store import write_command
from cache_core.index import IndexSpec, ensure_index


def run(args, env, timeout=120):
    return subprocess.run([sys.executable, "-m", "semcache", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def env_for(settings):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEMCACHE_")}
    env.update(SEMCACHE_INDEX=settings.index, SEMCACHE_DATA_DIR=str(settings.data_dir), HF_HUB_OFFLINE="1")
    if settings.redis_url:
        env["SEMCACHE_REDIS_URL"] = settings.redis_url
    return env


def test_lookup_hit_and_miss(settings, redis_client, embedder):
    ensure_index(redis_client, IndexSpec(settings=settings, dim=embedder.dim, model_name=embedder.name))
    write_command(redis_client, settings, embedder, WriteCommand(
        prompt="How do I cancel my subscription?", response="Go to Settings > Billing.", scope=Scope(tenant="t1")))
    env = env_for(settings)
    hit = run(["lookup", "how can I cancel my subscription", "--tenant", "t1"], env)
    assert hit.returncode == 0, hit.stderr
    assert hit.stdout.startswith("HIT (semantic") and "Go to Settings > Billing." in hit.stdout
    assert "embed" in hit.stderr and "search" in hit.stderr
    miss = run(["lookup", "how can I cancel my subscription", "--tenant", "t2", "--json"], env)
    assert miss.returncode == 0, miss.stderr
    assert json.loads(miss.stdout)["hit"] is False


def test_index_info_and_create(settings):
    env = env_for(settings)
    created = run(["index", "create"], env)
    assert created.returncode == 0, created.stderr
    assert "is ready (dim 384" in created.stdout
    info = json.loads(run(["index", "info"], env).stdout)
    assert info["exists"] and info["num_docs"] == 0 and info["meta"]["model"] == "all-MiniLM-L6-v2"


def test_index_mismatch_is_one_clear_line(settings, redis_client):
    ensure_index(redis_client, IndexSpec(settings=settings, dim=8, model_name="all-MiniLM-L6-v2"))
    out = run(["lookup", "hi", "--tenant", "t"], env_for(settings))
    assert out.returncode != 0
    assert "Error:" in out.stderr and "semcache index migrate" in out.stderr and "Traceback" not in out.stderr


def test_bad_setting_is_a_clear_error(settings):
    env = env_for(settings)
    env["SEMCACHE_MIN_SIMILARITY"] = "2"
    out = run(["lookup", "hi", "--tenant", "t"], env)
    assert out.returncode != 0 and "SEMCACHE_MIN_SIMILARITY" in out.stderr and "Traceback" not in out.stderr


def test_lookup_on_the_embedded_default_starts_and_stops_its_own_server(tmp_path, settings):
    env = env_for(settings)
    env.pop("SEMCACHE_REDIS_URL", None)
    env["SEMCACHE_DATA_DIR"] = str(tmp_path / "embedded")
    out = run(["lookup", "anything", "--tenant", "t"], env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("MISS")
    assert (tmp_path / "embedded" / "appendonly.aof").exists() or (tmp_path / "embedded" / "appendonlydir").exists()
    assert not (tmp_path / "embedded" / "redis.json").exists()  # stopped again


def test_redis_command_runs_in_the_foreground_until_sigterm(tmp_path, settings):
    env = env_for(settings)
    env.pop("SEMCACHE_REDIS_URL", None)
    env["SEMCACHE_DATA_DIR"] = str(tmp_path / "fg")
    proc = subprocess.Popen([sys.executable, "-m", "semcache", "redis"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("redis://127.0.0.1:")  # printed without the password (issue 15)
        password = (tmp_path / "fg" / "redis.password").read_text().strip()
        assert password not in url
        client = redis.Redis.from_url(url, password=password)
        assert client.ping()
        pid = json.loads((tmp_path / "fg" / "redis.json").read_text())["pid"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    assert proc.returncode == 0
    try:
        os.kill(pid, 0)
        alive = open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] != "Z"
    except ProcessLookupError:
        alive = False
    assert not alive
