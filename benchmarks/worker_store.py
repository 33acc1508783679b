"""semcache's store throughput end to end: a real ``semcache worker`` subprocess writes what the read path's
write queue (:class:`worker.queue.CeleryWriteQueue`) sends it, and the clock stops when the index holds every entry.

The commands carry no embedding, so the worker embeds them (in batches) as it would for the HTTP API. Safety checks
are switched off for the run (``SEMCACHE_SAFETY_*=off``): CLINC150 is full of "my account" prompts that the default
policy rightly refuses to cache, and RedisVL's ``store`` checks nothing, so this compares like with like.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import redis

from cache_core.connection import with_db
from cache_core.schema import Scope, WriteCommand, tag_token
from cache_core.settings import Settings

__all__ = ["WorkerStore", "count_tenant", "cpu_seconds"]

_SAFETY_OFF = {
    "SEMCACHE_SAFETY_PII": "off",
    "SEMCACHE_SAFETY_PERSONAL": "off",
    "SEMCACHE_SAFETY_TIME_SENSITIVE": "off",
    "SEMCACHE_SAFETY_REFUSALS": "off",
    "SEMCACHE_SAFETY_CALLER_FLAGS_DROP": "",
    "SEMCACHE_SAFETY_CALLER_FLAGS_HOLD": "",
}


def count_tenant(client: redis.Redis, index: str, tenant: str) -> int:
    """How many documents of ``tenant`` the index holds (what a lookup can find)."""
    reply = client.execute_command("FT.SEARCH", index, "@tenant:{$t}", "PARAMS", "2", "t", tag_token(tenant),
                                   "LIMIT", "0", "0", "DIALECT", "2")
    if isinstance(reply, dict):
        return int(reply.get(b"total_results", reply.get("total_results", 0)))
    return int(reply[0])


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux ``/proc``; just ``pid`` elsewhere)."""
    out = [pid]
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                children = fh.read().split()
        except OSError:
            continue
        for child in children:
            out += _process_tree(int(child))
    return out


def cpu_seconds(pids: list[int]) -> float | None:
    """User + system CPU seconds of these processes so far (Linux ``/proc``), None where that is not readable."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14 and 15 of stat)
    return total


def _redis_cpu(client: redis.Redis) -> float | None:
    try:
        info = client.info("cpu")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    except (redis.RedisError, KeyError, ValueError):
        return None


class WorkerStore:
    """Starts ``semcache worker`` for ``settings`` (its index, data dir and backend) against ``redis_url``."""

    def __init__(self, settings: Settings, redis_url: str, *, concurrency: int, broker_db: int, log_path: Path,
                 start_timeout_s: float = 180.0) -> None:
        from worker.app import create_celery

        self.settings = settings.model_copy(update={"broker_url": with_db(redis_url, broker_db)})
        self.redis_url = redis_url
        self.concurrency = concurrency
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.hostname = f"bench-{uuid.uuid4().hex[:8]}@semcache-bench"
        self.app = create_celery(self.settings, redis_url=redis_url)
        self.process: subprocess.Popen | None = None

    def _env(self) -> dict[str, str]:
        s = self.settings
        # the worker's own knobs (pool threads, batching) pass through, to measure them; nothing else of the shell
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("SEMCACHE_") or k.startswith(("SEMCACHE_WORKER_", "SEMCACHE_ONNX_"))}
        env.update({
            "SEMCACHE_REDIS_URL": self.redis_url, "SEMCACHE_BROKER_URL": s.broker_url, "SEMCACHE_INDEX": s.index,
            "SEMCACHE_DATA_DIR": str(s.data_dir), "SEMCACHE_EMBEDDING_BACKEND": s.embedding_backend,
            "SEMCACHE_EMBEDDING_PRECISION": s.embedding_precision,  # the worker must embed like the read path
            "SEMCACHE_VECTOR_TYPE": s.vector_type, "SEMCACHE_HNSW_M": str(s.hnsw_m),
            "SEMCACHE_HNSW_EF_CONSTRUCTION": str(s.hnsw_ef_construction),
            "SEMCACHE_HNSW_EF_RUNTIME": str(s.hnsw_ef_runtime), "SEMCACHE_MODEL": s.model,
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "C_FORCE_ROOT": "1", **_SAFETY_OFF,
        })  # fmt: skip
        return env

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "semcache", "worker", "--concurrency", str(self.concurrency),
                 "--loglevel", "WARNING", "--hostname", self.hostname],
                env=self._env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"semcache worker exited with {self.process.returncode}: {self.log_tail()}")
            try:
                if self.app.control.ping(destination=[self.hostname], timeout=0.5):
                    return
            except Exception:  # noqa: BLE001 - the broker may not answer yet
                time.sleep(0.2)
        raise RuntimeError(f"semcache worker not ready after {self.start_timeout_s:.0f}s: {self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def store(self, client: redis.Redis, index: str, entries: list[tuple[str, str]], tenant: str, *,
              vectors: list[list[float]] | None = None, tick: Callable[[int], None] | None = None,
              timeout_s: float = 1800.0) -> dict[str, float]:
        """Enqueue every entry, wait until the index holds them all: seconds and entries/s, end to end.

        With ``vectors``, each command carries its embedding, as a miss of ``get_or_generate`` hands it over.
        """
        from worker.queue import CeleryWriteQueue

        queue = CeleryWriteQueue(self.app, self.settings, max_pending=len(entries) + 1)
        scope = Scope(tenant=tenant)
        vecs = vectors if vectors is not None else [None] * len(entries)
        commands = [WriteCommand(prompt=p, response=a, scope=scope, source="bench", embedding=v)
                    for (p, a), v in zip(entries, vecs)]
        before = count_tenant(client, index, tenant)
        # CPU seconds, which a shared machine's load barely moves (entries/s swing tenfold with it): this process
        # (the queue's publisher, the polling below), the worker's process tree, the Redis server (all its users)
        pids = _process_tree(self.process.pid)
        cpu0 = (time.process_time(), cpu_seconds(pids), _redis_cpu(client))
        start = time.perf_counter()
        for c in commands:
            queue.enqueue(c)
        queue.flush(timeout=60)
        enqueued = time.perf_counter() - start
        done, last = before, before
        deadline = time.monotonic() + timeout_s
        while done - before < len(entries):
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {done - before} of {len(entries)} entries arrived: {self.log_tail()}")
            if self.process.poll() is not None:
                raise RuntimeError(f"semcache worker died: {self.log_tail()}")
            time.sleep(0.01)
            done = count_tenant(client, index, tenant)
            if tick and done > last:
                tick(done - last)
                last = done
        seconds = time.perf_counter() - start
        cpu1 = (time.process_time(), cpu_seconds(pids), _redis_cpu(client))
        queue.close()
        cpu = {f"{name}_cpu_seconds": (b - a if a is not None and b is not None else None)
               for name, a, b in zip(("sender", "worker", "redis"), cpu0, cpu1)}
        return {"seconds": seconds, "store_per_s": len(entries) / seconds, "enqueue_seconds": enqueued,
                "failures": queue.failures, **cpu}

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # pool processes that outlived their parent, if any
        except ProcessLookupError:
            pass
        self.process.wait(10)
