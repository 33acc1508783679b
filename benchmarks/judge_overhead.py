"""What judge-verified groups add to a worker task: ``worker.service.write_commands`` on ``--n`` commands whose
prompts each have gray-zone neighbours (CLINC150: one seeded prompt per intent, then another prompt of the same
intent), with the judge off and with the ``llm`` judge asking a fake OpenAI-compatible judge on 127.0.0.1
(tests/fake_judge.py, in this process) that answers after ``--latency-ms``, one question at a time and with
``SEMCACHE_JUDGE_CONCURRENCY=4``.

Vectors are supplied (the embedding is not what is measured), Redis is a fresh embedded server. The fake judge
shares this process (and its GIL) with the worker code, so the concurrent figure is a lower bound of what threads
give against a real, remote judge.

    python -m benchmarks.judge_overhead --latency-ms 50
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cache_core.connection import make_client  # noqa: E402
from cache_core.embedded import EmbeddedRedis  # noqa: E402
from cache_core.embedder import load_embedder  # noqa: E402
from cache_core.index import IndexSpec, ensure_index  # noqa: E402
from cache_core.judge import make_judge  # noqa: E402
from cache_core.settings import Settings  # noqa: E402
from tests.fake_judge import FakeJudge  # noqa: E402
from worker.safety import SafetyPipeline  # noqa: E402
from worker.service import write_commands  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "semcache" / "data" / "clinc150.csv"
CASES = (("off", 1), ("llm", 1), ("llm", 4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=128, help="commands per task (intents)")
    parser.add_argument("--reps", type=int, default=3, help="tasks per case (each in its own tenant)")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="how long the fake judge takes to answer")
    args = parser.parse_args()

    by_intent: dict[str, list[str]] = {}
    with open(DATA, newline="") as f:
        for row in csv.DictReader(f):
            by_intent.setdefault(row["intent"], []).append(row["text"])
    intents = [k for k, v in by_intent.items() if len(v) >= 2 * args.reps][: args.n]
    tmp = Path(tempfile.mkdtemp(prefix="semcache-judge-bench-"))
    server = EmbeddedRedis(tmp / "redis", appendonly=False)
    server.start()
    judge_server = FakeJudge().start()
    judge_server.slow_s = args.latency_ms / 1000
    judge_server.reply = "slow" if args.latency_ms > 0 else "no"
    client = make_client(server.url, timeout_ms=5000)
    embedder = load_embedder()
    try:
        for case_no, (name, threads) in enumerate(CASES):
            s = Settings(redis_url=server.url, index=f"jb{case_no}", data_dir=tmp, judge=name, judge_model="m",
                         judge_url=judge_server.url, judge_concurrency=threads, judge_budget_per_minute=1_000_000,
                         safety_personal="off", safety_time_sensitive="off")
            ensure_index(client, IndexSpec(settings=s, dim=embedder.dim, model_name=embedder.name))
            pipeline = SafetyPipeline.from_settings(s)
            judge = make_judge(s, client=client)
            times, asked = [], []
            for rep in range(args.reps):
                scope = {"tenant": f"t{rep}"}
                for offset, label in ((0, "seed"), (1, "new")):
                    prompts = [by_intent[i][2 * rep + offset] for i in intents]
                    vectors = embedder.embed(prompts)
                    commands = [{"prompt": p, "response": f"{label} answer of {i}", "scope": scope,
                                 "embedding": v.tolist()} for p, i, v in zip(prompts, intents, vectors)]
                    calls = judge_server.calls
                    started = time.perf_counter()
                    write_commands(client, s, embedder, pipeline, commands, judge=judge)
                    if label == "new":
                        times.append((time.perf_counter() - started) * 1000)
                        asked.append(judge_server.calls - calls)
            print(f"judge={name:<4} concurrency={threads}: median {statistics.median(times):,.0f} ms per task of "
                  f"{len(intents)} commands, questions per task {asked}")
    finally:
        judge_server.stop()
        client.close()
        server.stop()


if __name__ == "__main__":
    main()
