"""`semcache demo --no-serve`, run as a user runs it (a subprocess, a fresh data dir, free ports), small and fast:
the summary it prints, the chart, the numbers; then, independently, what it left in its Redis (the data survive in
the append-only file): hits happened, the review queue got entries. And no process of it outlives it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cache_core import browse
from cache_core.connection import make_client
from cache_core.embedded import EmbeddedRedis, free_port
from cache_core.settings import Settings
from cache_core.stats import read_cumulative

ROOT = Path(__file__).resolve().parent.parent


def processes_mentioning(marker: str) -> list[tuple[int, str]]:
    """Live processes whose command line or environment mentions ``marker`` (the test's own data dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (entry / "environ").read_bytes().decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and (marker in cmdline or marker in environ):
            found.append((int(entry.name), cmdline[:200]))
    return found


@pytest.fixture
def demo_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEMCACHE_")}
    env.update({"SEMCACHE_DATA_DIR": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")})
    return env


def test_demo_replays_through_the_proxy_reports_and_leaves_nothing_running(tmp_path, demo_env):
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "semcache", "demo", "--no-serve", "--queries", "150", "--clients", "4", "--seed", "2",
         "--port", str(port), "--web-workers", "1", "--concurrency", "1", "--llm-latency-ms", "20",
         "--llm-ms-per-token", "0.5", "--price-input", "0.003", "--price-output", "0.015"],
        env=demo_env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    demo_dir = tmp_path / "home" / "demo"

    # nothing of the demo is left: no Redis, worker, gunicorn or pool process mentions its data dir
    assert processes_mentioning(str(tmp_path)) == [], output[-3000:]
    assert not (demo_dir / "up.json").exists()

    # the summary table
    for label in ("queries", "hit rate", "wrong hits", "latency of hits", "latency of misses", "tokens saved",
                  "money saved", "cache entries"):
        assert re.search(rf"^{label}\s", result.stdout, re.M), f"no {label!r} row in:\n{result.stdout}"
    assert re.search(r"^queries\s+150 in ", result.stdout, re.M)
    assert "$0.003 / $0.015 per 1k" in result.stdout
    summary = json.loads((demo_dir / "demo_summary.json").read_text())
    assert summary["queries"] == 150 and summary["errors"] == 0, summary["first_errors"]
    assert summary["hits"] > 0 and summary["hits"] == summary["hits_exact"] + summary["hits_semantic"]
    assert summary["hits"] + summary["misses"] + summary["bypassed"] == 150
    assert summary["bypassed"] > 0  # the workload's hot requests went around the cache
    assert summary["saved_completion_tokens"] > 0
    assert summary["saved_money"] == pytest.approx(summary["saved_prompt_tokens"] / 1000 * 0.003
                                                   + summary["saved_completion_tokens"] / 1000 * 0.015)
    assert summary["latency_ms"]["hit_p50"] is not None and summary["latency_ms"]["miss_p50"] is not None
    assert summary["server"]["entries"]["pending_review"] > 0

    # the chart: printed, a real PNG
    chart = Path(re.search(r"^chart:\s+(\S+)$", result.stdout, re.M).group(1))
    assert chart == demo_dir / "demo_chart.png"
    data = chart.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000

    # independently of what the demo says: its Redis (the append-only file in its data dir) holds the results
    server = EmbeddedRedis(demo_dir, appendonly=True)
    url = server.start()
    try:
        client = make_client(url, timeout_ms=5000)
        settings = Settings(redis_url=url, index="demo", data_dir=demo_dir)
        counts = browse.count_by_status(client, settings)
        assert counts["pending_review"] > 0, counts  # the PII answers wait for a moderator
        assert counts["approved"] > 0
        totals = read_cumulative(client, settings)
        hits = totals.get("lookups:hit:exact", 0) + totals.get("lookups:hit:semantic", 0)
        assert hits == summary["hits"]  # the server counted every hit the clients saw
        assert totals.get("write_hold", 0) > 0 and totals.get("write_drop", 0) > 0  # refusals were dropped
        client.close()
    finally:
        server.stop()


def test_a_demo_index_left_by_another_configuration_is_dropped_before_the_services_start(redis_url, embedder):
    """An older version's demo index (FLOAT32 where FLOAT16 is now the default) would make the worker and the web
    app refuse to start; the demo drops its own disposable index, with its documents, and nothing else."""
    import uuid

    from cache_core.errors import IndexMismatch
    from cache_core.index import IndexSpec, ensure_index
    from cache_core.schema import Scope, WriteCommand
    from cache_core.store import write_command
    from cache_core.testing import test_settings
    from semcache.cli_demo import drop_demo_index

    name = f"demo{uuid.uuid4().hex[:8]}"
    old = test_settings(redis_url, index=name, vector_type="FLOAT32")
    new = old.model_copy(update={"vector_type": "FLOAT16"})
    other = test_settings(redis_url, index=f"other{uuid.uuid4().hex[:8]}")
    client = make_client(redis_url, timeout_ms=5000)
    try:
        for s in (old, other):
            ensure_index(client, IndexSpec(settings=s, dim=embedder.dim, model_name=embedder.name))
            write_command(client, s, embedder, WriteCommand(prompt="how do I reset my pin", response="Like this.",
                                                            scope=Scope(tenant="t")))
        with pytest.raises(IndexMismatch):
            ensure_index(client, IndexSpec(settings=new, dim=embedder.dim, model_name=embedder.name))
        assert drop_demo_index(redis_url, new) is True
        assert list(client.scan_iter(match=f"{new.key_prefix}*")) == []  # its documents went with it
        ensure_index(client, IndexSpec(settings=new, dim=embedder.dim, model_name=embedder.name))  # builds anew
        assert drop_demo_index(redis_url, new) is True and drop_demo_index(redis_url, new) is False
        assert list(client.scan_iter(match=f"{other.key_prefix}*"))  # another index's entries are untouched
    finally:
        client.close()
