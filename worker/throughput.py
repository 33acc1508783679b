"""Measure write throughput through the worker: entries/s from the first enqueue to the last audit record.

Starts its own embedded Redis (or uses ``--redis-url``) and a real ``semcache worker`` subprocess with
``--workers`` pool processes, then hands ``--n`` CLINC150 prompts to :class:`~worker.queue.CeleryWriteQueue`, as the
read path does after misses: with ``--vectors`` each command carries its embedding (the read path computed it
during the lookup), without it the worker runs MiniLM itself (batched when ``--batch`` > 1). Every command goes
through validation, the safety checks and the transactional write; personal prompts get a short TTL instead of
being dropped, so that every command is written and counted.

    python -m worker.throughput --n 2000 --workers 1
    python -m worker.throughput --n 2000 --workers 2 --vectors --batch 32
    python -m worker.throughput --n 2000 --matrix      # all eight combinations and a Markdown table

Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

__all__ = ["main", "measure"]

DATA = Path(__file__).resolve().parent.parent / "semcache" / "data" / "clinc150.csv"


def _prompts(n: int) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    with open(DATA, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            seen.setdefault(row["text"], row["intent"])
            if len(seen) >= n:
                break
    if len(seen) < n:
        raise SystemExit(f"only {len(seen)} distinct prompts in {DATA}")
    return list(seen.items())


def _start_worker(settings, workers: int, log_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEMCACHE_")}
    for name in settings.model_fields_set:
        value = getattr(settings, name)
        env[f"SEMCACHE_{name.upper()}"] = ",".join(value) if isinstance(value, list) else str(value)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("C_FORCE_ROOT", "1")
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "semcache", "worker", "--concurrency", str(workers),
                                 "--loglevel", os.environ.get("THROUGHPUT_LOGLEVEL", "WARNING"),
                                 "--hostname", f"throughput-{uuid.uuid4().hex[:6]}@bench"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_ready(app, process: subprocess.Popen, log_path: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"worker exited:\n{log_path.read_text()[-3000:]}")
        if app.control.ping(timeout=0.5):
            return
    raise SystemExit("worker did not start")


def _wait_writes(client, key: str, target: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = client.xlen(key)
        if n >= target:
            return n
        time.sleep(0.01)
    raise SystemExit(f"only {client.xlen(key)} of {target} writes after {timeout}s")


def measure(n: int, workers: int, vectors: bool, batch: int, redis_url: str | None = None) -> dict:
    from cache_core.connection import make_client
    from cache_core.embedded import EmbeddedRedis
    from cache_core.schema import Scope, WriteCommand
    from cache_core.settings import Settings

    from .app import create_celery
    from .queue import CeleryWriteQueue

    tmp = Path(tempfile.mkdtemp(prefix="semcache-throughput-"))
    server = None
    if redis_url is None:
        server = EmbeddedRedis(tmp / "redis", appendonly=True)
        redis_url = server.start()
    settings = Settings(redis_url=redis_url, index=f"tp{uuid.uuid4().hex[:8]}", data_dir=tmp,
                        safety_personal="short_ttl", enqueue_batch_size=batch, enqueue_linger_ms=5,
                        broker_url=redis_url.rsplit("/", 1)[0] + "/1")
    app = create_celery(settings)
    client = make_client(redis_url, timeout_ms=5000)
    log_path = tmp / "worker.log"
    process = _start_worker(settings, workers, log_path)
    queue = None
    try:
        _wait_ready(app, process, log_path)
        prompts = _prompts(n + 4 * workers)
        warm, prompts = prompts[: 4 * workers], prompts[4 * workers :]
        embedder = None
        if vectors:
            from cache_core.embedder import load_embedder

            # the same model as the worker's (vectors of another precision would be refused by its index)
            embedder = load_embedder(settings.model, backend=settings.embedding_backend, data_dir=settings.data_dir,
                                     precision=settings.embedding_precision)

        def command(prompt: str, intent: str, vector=None) -> WriteCommand:
            return WriteCommand(prompt=prompt, response=f"This is about {intent.replace('_', ' ')}.",
                                scope=Scope(tenant="bench"), embedding=vector)

        warm_cmds = [command(p, i) for p, i in warm]  # warm-up: the first model call of each process is slow
        vecs = [None] * len(prompts)
        if embedder is not None:  # computed before timing: on the read path they come with the lookup
            vecs = [[float(x) for x in v] for v in embedder.embed([p for p, _ in prompts])]
        cmds = [command(p, i, v) for (p, i), v in zip(prompts, vecs)]
        queue = CeleryWriteQueue(app, settings, batch_size=1, linger_ms=0)
        for c in warm_cmds:
            queue.enqueue(c)
        queue.flush()
        audit = settings.key("audit")
        _wait_writes(client, audit, len(warm_cmds), 300)
        queue = CeleryWriteQueue(app, settings, batch_size=batch, linger_ms=5)
        start = time.perf_counter()
        for c in cmds:
            queue.enqueue(c)
        queue.flush(120)
        enqueued = time.perf_counter() - start
        _wait_writes(client, audit, len(warm_cmds) + n, 600)
        seconds = time.perf_counter() - start
        written = client.xlen(audit) - len(warm_cmds)
        return {"n": n, "workers": workers, "vectors": vectors, "batch": batch, "seconds": round(seconds, 3),
                "entries_per_s": round(written / seconds, 1), "enqueue_seconds": round(enqueued, 3),
                "queue_failures": queue.failures}
    finally:
        if queue is not None:
            queue.close(5)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        client.close()
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="Commands to write (distinct CLINC150 prompts).")
    parser.add_argument("--workers", type=int, default=1, help="Worker pool processes.")
    parser.add_argument("--vectors", action="store_true", help="Commands carry their embedding (read path).")
    parser.add_argument("--batch", type=int, default=1, help="Commands per task (the write queue's batch size).")
    parser.add_argument("--redis-url", default=None, help="Use this Redis (Search + JSON) instead of an embedded one.")
    parser.add_argument("--matrix", action="store_true",
                        help="Run 1 and 2 workers x with/without vectors x batch 1/32, then print a Markdown table.")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.matrix:
        print(json.dumps(measure(args.n, args.workers, args.vectors, args.batch, args.redis_url)), flush=True)
        return
    rows = []
    for workers in (1, 2):
        for vectors in (False, True):
            for batch in (1, 32):
                load = os.getloadavg()[0]
                row = {**measure(args.n, workers, vectors, batch, args.redis_url), "load_before": round(load, 2)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    print("\n| worker processes | embedding | commands per task | entries/s | load average before |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        how = "supplied by the read path" if r["vectors"] else "MiniLM in the worker"
        print(f"| {r['workers']} | {how} | {r['batch']} | {r['entries_per_s']:.0f} | {r['load_before']} |")


if __name__ == "__main__":
    main()
