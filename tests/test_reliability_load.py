"""Issue 7, promise 4: ``semcache loadtest`` runs against its own stack with zero 5xx, and refuses non-loopback URLs.

Load level tried here: 3 seconds, 2 clients (about 4 lookups to 1 write), on an own stack (embedded Redis, a real
worker, gunicorn with 2 workers). The highest rate held with zero 5xx on the reference machine is in
docs/guarantees.md (measured by hand with larger runs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_loadtest_on_its_own_stack_has_zero_5xx_and_a_sane_report():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEMCACHE_")}
    env["HF_HUB_OFFLINE"] = "1"
    run = subprocess.run([sys.executable, "-m", "semcache", "loadtest", "--duration", "3", "--clients", "2", "--json"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["errors_5xx"] == 0 and report["connection_errors"] == 0, report
    assert report["requests"] > 0 and report["clients"] == 2 and report["throughput_rps"] > 0
    assert set(report["status"]) <= {"200", "202"}, report["status"]
    assert report["requests_by_kind"]["lookup"] > 0 and report["requests_by_kind"]["write"] > 0
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.org", "https://127.0.0.1:8000",
                                 "http://192.168.1.5", "ftp://127.0.0.1/"])
def test_loadtest_refuses_non_loopback_urls(url):
    from semcache.cli import cli

    result = CliRunner().invoke(cli, ["loadtest", "--url", url, "--key", "sc_x", "--duration", "1"])
    assert result.exit_code == 2 and "loopback" in result.output


def test_loadtest_with_url_needs_a_key():
    from semcache.cli import cli

    result = CliRunner().invoke(cli, ["loadtest", "--url", "http://127.0.0.1:1", "--duration", "1"])
    assert result.exit_code == 2 and "--key" in result.output
