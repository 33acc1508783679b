"""``semcache loadtest``: a bounded load test of the HTTP API (issue 7, promise 4).

C client threads, each with one keep-alive HTTP connection, send mixed traffic for S seconds: about four lookups
(prompts drawn from a small pool, so a share of them hit once the worker has written the pool) to one write
(``POST /api/v1/entries``). The report: requests, throughput, p50/p95/p99 latency, answers by status, 5xx count and
connection errors. Traffic goes to 127.0.0.1 only: a URL naming any other host is refused.

Without ``--url`` it brings up its own stack in a temporary directory (embedded Redis, ``semcache worker`` and
``semcache web`` under gunicorn, each a child process in its own process group), makes a tenant key, runs, and tears
everything down, even on Ctrl-C.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click

__all__ = ["register", "run_load", "LoadReport", "check_loopback"]

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_PROMPTS = [f"{q} (item {i})" for i in range(40) for q in (
    "What are your opening hours?", "How do I reset my password?", "Do you ship to Portugal?",
    "Can I change my delivery address?", "How long does a refund take?")][:120]


def check_loopback(url: str) -> tuple[str, int]:
    """``(host, port)`` of a loopback http URL; anything else is a :class:`click.UsageError`."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in _LOOPBACK:
        raise click.UsageError(f"--url must be http://127.0.0.1:PORT (loopback only), not {url!r}")
    return parts.hostname, parts.port or 80


@dataclass
class LoadReport:
    """What one run measured."""

    duration_s: float
    clients: int
    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, int] = field(default_factory=dict)
    hits: int = 0
    connection_errors: int = 0

    def as_dict(self) -> dict[str, Any]:
        ordered = sorted(self.latencies_ms)

        def pct(p: float) -> float | None:
            if not ordered:
                return None
            return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))], 2)

        requests = len(ordered)
        errors_5xx = sum(n for s, n in self.statuses.items() if s.startswith("5"))
        return {
            "duration_s": round(self.duration_s, 2), "clients": self.clients, "requests": requests,
            "throughput_rps": round(requests / self.duration_s, 1) if self.duration_s else 0.0,
            "latency_ms": {"p50": pct(50), "p95": pct(95), "p99": pct(99),
                           "max": round(ordered[-1], 2) if ordered else None},
            "status": dict(sorted(self.statuses.items())), "errors_5xx": errors_5xx,
            "errors": sum(n for s, n in self.statuses.items() if not s.startswith("2")) + self.connection_errors,
            "connection_errors": self.connection_errors, "requests_by_kind": self.by_kind,
            "lookup_hits": self.hits,
        }  # fmt: skip


def run_load(url: str, key: str, *, duration_s: float, clients: int, write_share: float = 0.2,
             seed: int = 7) -> LoadReport:
    """Run the mixed load against ``url`` (loopback only) and return the report."""
    host, port = check_loopback(url)
    report = LoadReport(duration_s=duration_s, clients=clients)
    lock = threading.Lock()
    deadline = time.monotonic() + duration_s
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    def client(n: int) -> None:
        rnd = random.Random(seed + n)
        conn = http.client.HTTPConnection(host, port, timeout=30)
        lat: list[float] = []
        statuses: dict[str, int] = {}
        kinds = {"lookup": 0, "write": 0}
        hits = errors = 0
        while time.monotonic() < deadline:
            prompt = rnd.choice(_PROMPTS)
            if rnd.random() < write_share:
                kind, path = "write", "/api/v1/entries"
                body = {"prompt": prompt, "response": f"A helpful answer about: {prompt}"}
            else:
                kind, path, body = "lookup", "/api/v1/lookup", {"prompt": prompt}
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body=json.dumps(body), headers=headers)
                response = conn.getresponse()
                raw = response.read()
            except (OSError, http.client.HTTPException):
                errors += 1
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=30)
                continue
            lat.append((time.perf_counter() - t0) * 1000)
            statuses[str(response.status)] = statuses.get(str(response.status), 0) + 1
            kinds[kind] += 1
            if kind == "lookup" and response.status == 200:
                try:
                    hits += bool(json.loads(raw).get("hit"))
                except ValueError:
                    pass
        conn.close()
        with lock:
            report.latencies_ms += lat
            for s, n in statuses.items():
                report.statuses[s] = report.statuses.get(s, 0) + n
            for k, n in kinds.items():
                report.by_kind[k] = report.by_kind.get(k, 0) + n
            report.hits += hits
            report.connection_errors += errors

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration_s + 60)
    report.duration_s = time.monotonic() - started
    return report


# --- an own stack -------------------------------------------------------------------------------------------------
class OwnStack:
    """Embedded Redis + ``semcache worker`` + ``semcache web`` (gunicorn) in a temporary directory."""

    def __init__(self, *, web_workers: int = 2, threads: int = 4, start_timeout_s: float = 180) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="semcache-loadtest-"))
        self.web_workers, self.threads, self.start_timeout_s = web_workers, threads, start_timeout_s
        self.children: list[subprocess.Popen] = []
        self.redis = None
        self.url = ""
        self.key = ""

    def _env(self, redis_url: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEMCACHE_")}
        env.update({"SEMCACHE_REDIS_URL": redis_url, "SEMCACHE_DATA_DIR": str(self.dir), "SEMCACHE_INDEX": "loadtest",
                    "SEMCACHE_RATE_LIMIT_PER_MINUTE": "10000000", "HF_HUB_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false"})
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def _spawn(self, args: list[str], env: dict[str, str], log: str) -> None:
        with open(self.dir / log, "ab") as out:
            self.children.append(subprocess.Popen([sys.executable, "-m", "semcache", *args], env=env,
                                                  stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                                  start_new_session=True))

    def start(self) -> "OwnStack":
        from cache_core.apikeys import create_key
        from cache_core.connection import make_client
        from cache_core.embedded import EmbeddedRedis, free_port
        from cache_core.settings import Settings

        self.redis = EmbeddedRedis(self.dir / "redis", appendonly=True)
        redis_url = self.redis.start()
        env = self._env(redis_url)
        port = free_port()
        self._spawn(["worker", "--concurrency", "1"], env, "worker.log")
        self._spawn(["web", "--host", "127.0.0.1", "--port", str(port), "--workers", str(self.web_workers),
                     "--threads", str(self.threads)], env, "web.log")
        self.url = f"http://127.0.0.1:{port}"
        settings = Settings(redis_url=redis_url, data_dir=self.dir, index="loadtest")
        client = make_client(redis_url, timeout_ms=5000)
        self.key, _ = create_key(client, settings, tenant="loadtest", name="semcache loadtest")
        client.close()
        self._wait_ready()
        self._warm_up()
        return self

    def _warm_up(self) -> None:
        """Every gunicorn worker loads the model on its first lookup: load until none is a cold start (not
        counted)."""
        for _ in range(10):
            warm = run_load(self.url, self.key, duration_s=2, clients=self.web_workers * self.threads).as_dict()
            if warm["requests"] and (warm["latency_ms"]["max"] or 0) < 1000:
                return

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        host, port = check_loopback(self.url)
        while time.monotonic() < deadline:
            for child in self.children:
                if child.poll() is not None:
                    raise click.ClickException(f"a stack process exited with {child.returncode}; logs in {self.dir}")
            try:
                conn = http.client.HTTPConnection(host, port, timeout=5)
                conn.request("GET", "/readyz")
                ready = conn.getresponse().status == 200
                conn.close()
                if ready:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise click.ClickException(f"the stack was not ready after {self.start_timeout_s:.0f}s; logs in {self.dir}")

    def stop(self) -> None:
        for child in self.children:
            if child.poll() is None:
                try:
                    os.killpg(child.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for child in self.children:
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(child.pid, signal.SIGKILL)  # whatever of the group outlived its leader
            except ProcessLookupError:
                pass
        if self.redis is not None:
            self.redis.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _print(report: dict[str, Any]) -> None:
    lat = report["latency_ms"]
    click.echo(f"{report['requests']} requests in {report['duration_s']} s with {report['clients']} clients: "
               f"{report['throughput_rps']} req/s")
    click.echo(f"latency ms: p50 {lat['p50']}  p95 {lat['p95']}  p99 {lat['p99']}  max {lat['max']}")
    click.echo("status: " + ", ".join(f"{s}: {n}" for s, n in report["status"].items()))
    click.echo(f"errors: {report['errors']} (5xx: {report['errors_5xx']}, connection: {report['connection_errors']})"
               f"; lookups {report['requests_by_kind'].get('lookup', 0)} ({report['lookup_hits']} hits), writes "
               f"{report['requests_by_kind'].get('write', 0)}")


@click.command("loadtest")
@click.option("--duration", type=click.FloatRange(0.5, 3600), default=10, show_default=True, help="Seconds of load.")
@click.option("--clients", type=click.IntRange(1, 256), default=4, show_default=True, help="Concurrent clients.")
@click.option("--url", default=None, help="A running semcache web app (http://127.0.0.1:PORT only); without it, "
              "an own stack is started and stopped.")
@click.option("--key", default=None, help="A tenant API key for --url (required with --url).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def loadtest_cmd(duration: float, clients: int, url: str | None, key: str | None, as_json: bool) -> None:
    """Bounded load test of the HTTP API: mixed lookups and writes, loopback only."""
    stack = None
    if url is not None:
        check_loopback(url)
        if not key:
            raise click.UsageError("--url needs --key (a tenant key: semcache keys create --tenant NAME)")
    try:
        if url is None:
            click.echo("starting an own stack (embedded Redis, worker, web)...", err=True)
            stack = OwnStack().start()
            url, key = stack.url, stack.key
        report = run_load(url, key, duration_s=duration, clients=clients).as_dict()
    finally:
        if stack is not None:
            stack.stop()
    if as_json:
        click.echo(json.dumps(report))
    else:
        _print(report)
    if report["errors_5xx"]:
        sys.exit(1)


def register(cli: click.Group) -> None:
    cli.add_command(loadtest_cmd)
