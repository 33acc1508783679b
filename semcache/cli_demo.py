"""``semcache demo`` (and ``make demo``): the whole system on one machine, doing its job on a realistic workload.

1. starts a simulated OpenAI-compatible LLM (:mod:`semcache.fakellm`) in this process, answering the FAQ questions
   of CLINC150 with their intent's canned answer, with realistic latency and token counts (:mod:`semcache.demo`);
2. brings the stack up the way ``semcache up`` does (the same supervisor: the embedded Redis unless
   ``SEMCACHE_REDIS_URL``, the Celery worker, the web app under gunicorn), with the proxy pointed at that LLM, in its
   own data directory (``<SEMCACHE_DATA_DIR>/demo``) and index (``demo``), which it empties first (``--keep`` not);
3. creates a tenant API key and replays the workload through the proxy (``/v1/chat/completions``) from several
   concurrent clients, with a progress bar;
4. waits until the worker has written every answer back, then prints the summary table, writes a PNG chart of hit
   rate and latency over the replay (and the numbers as JSON) into the data directory;
5. leaves the admin UI running, with its URL and login, until Ctrl-C (``--no-serve``: stops everything and exits).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import click

from cache_core.settings import Settings

__all__ = ["register", "parse_metrics"]

log = logging.getLogger(__name__)

DEMO_TENANT = "demo"
DEMO_MODEL = "sim-faq-1"


def register(cli: click.Group) -> None:
    cli.add_command(demo_cmd)


class _Interrupted(Exception):
    """Ctrl-C or SIGTERM while the demo was running."""


def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    """Samples of a Prometheus text exposition: ``{(name, sorted label items): value}`` (the format /metrics writes).

    >>> parse_metrics('# TYPE x counter\\nx{a="1"} 2\\ny 0.5\\n')
    {('x', (('a', '1'),)): 2.0, ('y', ()): 0.5}
    """
    out: dict[tuple[str, tuple], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        items = []
        for part in labels.rstrip("}").split('",') if labels else []:
            key, _, val = part.partition('="')
            items.append((key, val.rstrip('"')))
        out[(name, tuple(sorted(items)))] = float(value)
    return out


def _metric(data: dict, name: str, **labels: str) -> float:
    return data.get((name, tuple(sorted(labels.items()))), 0.0)


def _handled(data: dict) -> float:
    """Proxy misses the web app is done with: handed to the broker, lost, dropped, or not cacheable."""
    sent = sum(_metric(data, "semcache_proxy_writebacks_total", result=r) for r in ("sent", "failed", "dropped"))
    return sent + _metric(data, "semcache_proxy_requests_total", result="not_cacheable")


class _Demo:
    """One run: the simulated LLM, the supervised stack, the replay, the report."""

    def __init__(self, opts: dict[str, Any]) -> None:
        self.opts = opts
        self.stop = threading.Event()
        self.received: list[str] = []
        self.up: Any = None
        self.llm_server: Any = None

    # --- the stack ---------------------------------------------------------------------------------------------
    def _environment(self, base: Settings, data_dir: Path, upstream_url: str) -> Settings:
        """What the children are started with: the demo's own data dir and index, the simulated upstream."""
        from cache_core.connection import with_db

        from .cli import load_settings

        os.environ["SEMCACHE_DATA_DIR"] = str(data_dir)
        os.environ["SEMCACHE_INDEX"] = self.opts["index"]
        os.environ["SEMCACHE_UPSTREAM_URL"] = upstream_url
        os.environ.pop("SEMCACHE_UPSTREAM_API_KEY", None)  # the user's real LLM key never goes to the simulation
        if self.opts["price_input"] is not None:
            os.environ["SEMCACHE_PRICE_PER_1K_INPUT_TOKENS"] = str(self.opts["price_input"])
        if self.opts["price_output"] is not None:
            os.environ["SEMCACHE_PRICE_PER_1K_OUTPUT_TOKENS"] = str(self.opts["price_output"])
        if base.redis_url and not base.broker_url:
            # a shared Redis: keep the demo's tasks away from another deployment's broker (database 1)
            os.environ["SEMCACHE_BROKER_URL"] = with_db(base.redis_url, 2)
            click.echo(f"note: SEMCACHE_REDIS_URL is set: the demo's tasks use database 2 of it as their broker "
                       f"(set SEMCACHE_BROKER_URL to choose); its entries use the index {self.opts['index']!r}",
                       err=True)
        return load_settings()

    def _poll(self) -> None:
        self.up.supervisor.poll()
        self.up.tick()
        crashing = [c for c in self.up.supervisor.children if c.state == "crash-loop"]
        if crashing:
            from .supervisor import tail

            child = crashing[0]
            raise click.ClickException(
                f"the {child.name} process keeps crashing ({child.last_exit}); last lines of "
                f"{child.service.log_path}:\n{tail(child.service.log_path)}")

    def wait(self, predicate: Callable[[], Any], *, timeout_s: float, what: str, interval_s: float = 0.25) -> Any:
        """Poll ``predicate`` while supervising the stack; ClickException after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._poll()
            if self.stop.is_set():
                raise _Interrupted()
            result = predicate()
            if result:
                return result
            if time.monotonic() > deadline:
                raise click.ClickException(f"gave up waiting for {what} after {timeout_s:.0f}s; the logs are in "
                                           f"{self.up.logs_dir}")
            self.stop.wait(interval_s)

    def _get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int | None, str]:
        import httpx

        try:
            response = httpx.get(self.base_url + path, headers=headers or {}, timeout=5.0, trust_env=False)
        except httpx.HTTPError:
            return None, ""
        return response.status_code, response.text

    def metrics(self) -> dict[tuple[str, tuple], float]:
        token = self.settings.metrics_token
        status, text = self._get("/metrics", {"Authorization": f"Bearer {token}"} if token else None)
        return parse_metrics(text) if status == 200 else {}

    # --- the run -----------------------------------------------------------------------------------------------
    def run(self) -> None:
        from cache_core.apikeys import create_key, revoke_key
        from cache_core.connection import make_client

        from .cli import load_settings
        from .cli_ops import _acquire_lock, _port_free, _Up
        from .demo import FaqAnswers, answer_lookup, make_workload
        from .fakellm import FakeLLMServer, SimulatedLLM
        from .supervisor import RestartPolicy

        opts = self.opts
        base = load_settings()
        data_dir = Path(opts["data_dir"]) if opts["data_dir"] else Path(base.data_dir) / "demo"
        workload = make_workload(opts["queries"], seed=opts["seed"])
        self.answers = FaqAnswers()
        llm = SimulatedLLM(answer_for=answer_lookup(workload), base_ms=opts["llm_latency_ms"],
                           per_token_ms=opts["llm_ms_per_token"], model=DEMO_MODEL)
        lock = _acquire_lock(data_dir)
        previous: dict[int, Any] = {}
        try:
            if not _port_free(opts["host"], opts["port"]):
                raise click.ClickException(f"port {opts['port']} on {opts['host']} is already in use: pass --port")
            self.llm_server = FakeLLMServer(llm).start()
            self.settings = self._environment(base, data_dir, self.llm_server.url)
            self.up = _Up(self.settings, host=opts["host"], port=opts["port"], web_workers=opts["web_workers"],
                          concurrency=opts["concurrency"], as_json=False, policy=RestartPolicy())
            self.base_url = self.up.urls["ui"].rstrip("/")
            # Every proxy miss holds a gunicorn thread for the whole upstream answer (about a second here): with
            # `semcache web`'s 4 threads per worker, a hit would queue behind misses. The proxy is I/O-bound: more.
            web = self.up.supervisor.child("web").service
            web.argv = [*web.argv, "--threads", str(opts["web_threads"])]

            def on_signal(signum: int, _frame: Any) -> None:
                self.received.append(signal.Signals(signum).name)
                self.stop.set()

            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, on_signal)
            redis_line = self.up.redis_info["url"] + (" (embedded)" if self.up.redis_info["embedded"] else "")
            click.echo(f"semcache demo: {len(workload):,} FAQ questions (CLINC150, seed {opts['seed']}), "
                       f"{opts['clients']} concurrent clients, through the proxy to a simulated LLM "
                       f"({opts['llm_latency_ms']:g} ms + {opts['llm_ms_per_token']:g} ms/token)")
            click.echo(f"  data dir {data_dir}, index {self.settings.index!r}, redis {redis_line}")
            click.echo("  starting redis, the worker and the web app (logs in "
                       f"{self.up.logs_dir})...")
            if not opts["keep"]:
                self._fresh_index_on_start()
            self.up.supervisor.start()
            self.wait(lambda: self._get("/readyz")[0] == 200, timeout_s=opts["start_timeout"],
                      what="the web app to be ready (/readyz)")

            client = make_client(self.up.redis_url, timeout_ms=5000)
            try:
                warm_key, warm = create_key(client, self.settings, tenant="demo-warm-up",
                                            name="semcache demo warm-up")
                self.warm_up(warm_key)
                revoke_key(client, self.settings, warm.id)
                if not opts["keep"]:
                    entries = reset_demo_data(client, self.settings)
                    if entries:
                        click.echo(f"  emptied the demo index of the last run ({entries:,} entries)")
                api_key, _ = create_key(client, self.settings, tenant=DEMO_TENANT, name="semcache demo")
            finally:
                client.close()
            self.api_key = api_key
            self.handled_before = _handled(self.metrics())
            records, elapsed = self.replay(workload)
            server = self.drain(records)
            self.report(records, elapsed, server, data_dir)
            if opts["serve"]:
                self.serve(server)
        except _Interrupted:
            pass
        finally:
            if self.up is not None:
                self.up.supervisor.stop()
                with contextlib.suppress(OSError):
                    (data_dir / "up.json").unlink()
            if self.llm_server is not None:
                self.llm_server.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            lock.close()
        if self.received:
            click.echo(f"stopped ({self.received[0]}): every process of the demo has exited", err=True)

    def _fresh_index_on_start(self) -> None:
        """Drop the demo index as soon as Redis is up, before the worker and the web app (which build it anew)."""
        from .supervisor import EmbeddedRedisService

        def drop() -> None:
            if drop_demo_index(self.up.redis_url, self.settings):
                click.echo("  dropped the demo index of the last run (the worker and web app build it anew)")

        redis_child = next((c for c in self.up.supervisor.children if isinstance(c.service, EmbeddedRedisService)),
                           None)
        if redis_child is None:  # an external Redis (SEMCACHE_REDIS_URL): it is already up
            drop()
            return
        service, start = redis_child.service, redis_child.service.start

        def start_then_drop() -> None:
            start()
            if not getattr(service, "_demo_index_dropped", False):  # once: not again on a supervised restart
                service._demo_index_dropped = True
                drop()

        service.start = start_then_drop

    def warm_up(self, key: str) -> None:
        """Make every web worker load its embedding model before the replay (the first lookup of a worker waits
        for it), so the replay's latencies are those of a warm server. Rounds of concurrent lookups until a round
        is fast; their statistics are removed with the rest of the demo's data right after."""
        import httpx

        width = self.opts["web_workers"] * 4  # enough concurrent lookups that every worker gets some
        result: dict[str, Any] = {}

        def rounds() -> None:
            with httpx.Client(timeout=300, headers={"Authorization": f"Bearer {key}"}, trust_env=False) as http:
                for attempt in range(6):
                    durations: list[float] = []

                    def one(prompt: str, durations: list[float]) -> None:
                        began = time.perf_counter()
                        with contextlib.suppress(httpx.HTTPError):
                            http.post(self.base_url + "/api/v1/lookup", json={"prompt": prompt})
                        durations.append(time.perf_counter() - began)

                    threads = [threading.Thread(target=one, args=(f"warm up {attempt} {i}", durations), daemon=True)
                               for i in range(2 * width)]
                    for thread in threads:
                        thread.start()
                    for thread in threads:
                        thread.join()
                    result["rounds"] = attempt + 1
                    if self.stop.is_set() or max(durations) < 1.0:
                        return

        click.echo("  loading the embedding model in the web workers...")
        thread = threading.Thread(target=rounds, name="demo-warm-up", daemon=True)
        thread.start()
        self.wait(lambda: not thread.is_alive(), timeout_s=self.opts["start_timeout"], what="the web workers' model")
        self.stop.wait(2.0)  # the stats recorders flush once a second: let them, before the data is emptied

    def replay(self, workload: list) -> tuple[list, float]:
        from tqdm import tqdm

        from .demo import Progress, replay

        progress = Progress()
        bar = tqdm(total=len(workload), unit="q", desc="replay", file=sys.stderr, dynamic_ncols=True,
                   mininterval=0.5, disable=None if sys.stderr.isatty() else False)
        result: dict[str, Any] = {}

        def on_done(record: Any) -> None:
            progress.add(record)
            bar.update(1)
            if progress.done % 20 == 0 or progress.done == len(workload):
                bar.set_postfix(hit_rate=f"{progress.hits / progress.done:.0%}", errors=progress.errors,
                                refresh=False)

        def run() -> None:
            try:
                result["records"] = replay(self.base_url, self.api_key, workload, clients=self.opts["clients"],
                                           answers=self.answers, model=DEMO_MODEL, stop=self.stop, on_done=on_done)
            except Exception as exc:  # noqa: BLE001 - reported by the main thread
                result["error"] = exc

        started = time.perf_counter()
        thread = threading.Thread(target=run, name="demo-replay", daemon=True)
        thread.start()
        try:
            self.wait(lambda: not thread.is_alive(), timeout_s=3600, what="the replay", interval_s=0.2)
        finally:
            bar.close()
        if "error" in result:
            raise click.ClickException(f"the replay failed: {result['error']}")
        return result["records"], time.perf_counter() - started

    def drain(self, records: list) -> dict[str, Any]:
        """Wait until every miss was handed to the worker and the broker's queue is empty; the server's numbers."""
        # a coalesced miss relayed another request's answer: that one request is written back, not both
        expected = self.handled_before + sum(r.cache == "miss" and not r.coalesced for r in records)

        def drained() -> dict | None:
            data = self.metrics()
            if not data:
                return None
            queued = _metric(data, "semcache_queue_depth") + _metric(data, "semcache_queue_unacked")
            return data if _handled(data) >= expected and queued == 0 else None

        click.echo("waiting for the worker to write the answers back...", err=True)
        self.stop.wait(1.5)  # the web processes fold their counters into Redis once a second
        try:
            data = self.wait(drained, timeout_s=self.opts["drain_timeout"], what="the worker to write every answer",
                             interval_s=0.5)
        except click.ClickException as exc:
            click.echo(f"warning: {exc.message}; reporting what is there", err=True)
            data = self.metrics()
        return {
            "entries": {s: int(_metric(data, "semcache_entries", status=s))
                        for s in ("approved", "pending_review", "rejected")},
            "writes": {d: int(_metric(data, "semcache_writes_total", decision=d))
                       for d in ("approve", "hold", "drop", "invalid")},
            "dead_letters": int(_metric(data, "semcache_dead_letters")),
            "saved_tokens": int(_metric(data, "semcache_saved_tokens_total", kind="prompt")
                                + _metric(data, "semcache_saved_tokens_total", kind="completion")),
        }

    def report(self, records: list, elapsed: float, server: dict[str, Any], data_dir: Path) -> None:
        from .demo import format_summary, records_json, summarize, write_chart

        s = self.settings
        summary = summarize(records, elapsed_s=elapsed, price_in=s.price_per_1k_input_tokens,
                            price_out=s.price_per_1k_output_tokens, server=server)
        summary["settings"] = {"queries": self.opts["queries"], "clients": self.opts["clients"],
                               "seed": self.opts["seed"], "llm_latency_ms": self.opts["llm_latency_ms"],
                               "llm_ms_per_token": self.opts["llm_ms_per_token"], "policy": s.policy,
                               "min_similarity": s.min_similarity}
        chart = write_chart(records, data_dir / "demo_chart.png",
                            title=f"semcache demo: {summary['queries']:,} CLINC150 questions, "
                                  f"{self.opts['clients']} clients, hit rate {summary['hit_rate']:.1%}, "
                                  f"wrong hits {summary['wrong_hit_rate']:.1%} of hits")
        (data_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2))
        (data_dir / "demo_records.json").write_text(json.dumps(records_json(records)))
        click.echo(format_summary(summary))
        click.echo(f"chart:   {chart}")
        click.echo(f"numbers: {data_dir / 'demo_summary.json'}")

    def serve(self, server: dict[str, Any]) -> None:
        login = self.up._login_text()
        ui = self.up.urls["ui"]
        click.echo("")
        click.echo(f"The admin UI is running: {ui}")
        click.echo(f"  log in        {login}")
        click.echo(f"  review queue  {ui}review/  ({server['entries']['pending_review']:,} answers held for review)")
        click.echo(f"  proxy         {ui}v1  (OpenAI-compatible; API key of tenant {DEMO_TENANT!r}: {self.api_key})")
        click.echo(f"  metrics       {ui}metrics")
        question = {"role": "user", "content": "how do i report a lost card"}
        body = json.dumps({"model": DEMO_MODEL, "messages": [question]})
        click.echo(f"  try it        curl -si {ui}v1/chat/completions -H 'Authorization: Bearer {self.api_key}' "
                   f"-H 'Content-Type: application/json' -d '{body}'   (twice: a miss, then a hit)")
        click.echo("Ctrl-C stops everything.")
        sys.stdout.flush()
        while not self.stop.is_set():
            self._poll()
            self.stop.wait(0.2)


def drop_demo_index(url: str, settings: Settings) -> bool:
    """Drop the demo's search index and its documents before the worker and the web app start, so that they build
    it afresh with this version's settings (an index left by an older version, e.g. FLOAT32 where FLOAT16 is now the
    default, would otherwise be refused). Only for the demo's own, disposable index. Returns whether one existed."""
    from cache_core.connection import make_client
    from cache_core.index import drop_index

    client = make_client(url, timeout_ms=5000)
    try:
        return drop_index(client, settings, delete_documents=True)
    finally:
        client.close()


def reset_demo_data(client: Any, settings: Settings) -> int:
    """Delete every key of the demo's index but its index metadata (entries, stats, API keys, audit...). Returns
    how many entries there were. The search index itself stays: the running processes keep using it, and deleted
    entries leave it."""
    from cache_core.connection import text

    keep = {settings.key("meta")}
    entries = 0
    batch: list[str] = []
    for raw in client.scan_iter(match=f"{settings.index}:*", count=1000):
        key = text(raw)
        if key in keep:
            continue
        entries += key.startswith(settings.key_prefix)
        batch.append(key)
        if len(batch) >= 500:
            client.unlink(*batch)
            batch = []
    if batch:
        client.unlink(*batch)
    return entries


@click.command("demo")
@click.option("--queries", type=click.IntRange(1, 23_700), default=1200, show_default=True,
              help="Questions to replay.")
@click.option("--clients", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Concurrent clients of the proxy.")
@click.option("--seed", type=int, default=42, show_default=True, help="Seed of the workload.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the web app listens on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="Port of the web app.")
@click.option("--serve/--no-serve", default=True, show_default=True,
              help="After the replay, keep the admin UI running until Ctrl-C (--no-serve: stop and exit).")
@click.option("--web-workers", type=click.IntRange(1, 16), default=2, show_default=True,
              help="gunicorn worker processes of the web app.")
@click.option("--web-threads", type=click.IntRange(1, 256), default=16, show_default=True,
              help="Threads per gunicorn worker (each proxy miss holds one while the LLM answers).")
@click.option("--concurrency", type=click.IntRange(1, 16), default=2, show_default=True,
              help="Celery worker processes.")
@click.option("--llm-latency-ms", type=click.FloatRange(0, 60_000), default=350.0, show_default=True,
              help="Simulated LLM: time to the first token.")
@click.option("--llm-ms-per-token", type=click.FloatRange(0, 1_000), default=8.0, show_default=True,
              help="Simulated LLM: time per generated token.")
@click.option("--price-input", type=click.FloatRange(0), default=None,
              help="Price per 1k prompt tokens for 'money saved' (default: SEMCACHE_PRICE_PER_1K_INPUT_TOKENS).")
@click.option("--price-output", type=click.FloatRange(0), default=None,
              help="Price per 1k completion tokens (default: SEMCACHE_PRICE_PER_1K_OUTPUT_TOKENS).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Where the demo keeps its Redis, logs, chart and numbers [default: <SEMCACHE_DATA_DIR>/demo].")
@click.option("--index", default="demo", show_default=True, help="The demo's index (it is emptied first).")
@click.option("--keep", is_flag=True, help="Keep the entries of the last run instead of starting empty.")
@click.option("--start-timeout", type=click.IntRange(10, 3600), default=300, show_default=True,
              help="Seconds to wait for the stack to come up.")
@click.option("--drain-timeout", type=click.IntRange(1, 3600), default=180, show_default=True,
              help="Seconds to wait for the worker to write every answer back.")
def demo_cmd(**opts: Any) -> None:
    """Bring the stack up with a simulated LLM, replay a FAQ workload through the OpenAI-compatible proxy, print a
    summary and a chart, and keep the admin UI running (Ctrl-C stops it; --no-serve exits instead)."""
    import re

    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,47}", opts["index"]):
        raise click.BadParameter("letters, digits, _ and - (starting with a letter)", param_hint="--index")
    _Demo(opts).run()
