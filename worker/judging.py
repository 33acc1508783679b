"""Judge-verified answer groups in the worker: ask the judge about a batch, audit the verdicts, count them.

:func:`worker.service.write_commands` calls :func:`judge_batch` for the approved commands of a task that carry no
explicit ``group`` (only when ``SEMCACHE_JUDGE`` is not ``off``: with no judge nothing here runs, not even the
neighbour search). The questions of one task run on a few threads at once for the ``llm`` judge (an HTTP call
takes long and waits on the network), one at a time for the model judges. A judge that fails, times out or is out
of budget gives no verdict, which keeps the entry in its own group: the write itself never fails or retries
because of a judge. Nor does a judge that hangs: a task asks questions for at most a third of its time limit
(``SEMCACHE_TASK_TIME_LIMIT_S``); the questions left after that are not asked (counted as skipped), so a batch of
timeouts cannot push the task past its limit (which would kill, retry and finally dead-letter the write).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import redis

from cache_core.grouping import GroupDecision, judged_groups
from cache_core.judge import Judge, JudgeRequest, JudgeVerdict
from cache_core.judge_llm import NOT_ASKED
from cache_core.schema import CacheEntry, WriteCommand
from cache_core.settings import Settings
from cache_core.store import answer_group, audit

__all__ = ["judge_batch", "audit_verdicts", "judge_counters", "JUDGE_COUNTERS"]

log = logging.getLogger(__name__)

# The cumulative counters of the judge (cache_core.stats.record_counters; /metrics, GET /api/v1/stats): questions
# by verdict (a call that answered yes, no, or gave no verdict), questions not asked (budget), entries that joined a
# neighbour's group, and the tokens the judge's calls used.
JUDGE_COUNTERS = ("judge_yes", "judge_no", "judge_none", "judge_skipped", "judge_joined", "judge_prompt_tokens",
                  "judge_completion_tokens")


class _Deadline:
    """A judge that stops asking at ``deadline`` (``time.monotonic()``): later questions are "not asked"."""

    def __init__(self, judge: Judge, deadline: float) -> None:
        self.inner = judge
        self.name = judge.name
        self.deadline = deadline

    def judge(self, request: JudgeRequest) -> JudgeVerdict:
        if time.monotonic() >= self.deadline:
            return JudgeVerdict(agree=None, detail=f"{NOT_ASKED}the task's time for questions is spent")
        return self.inner.judge(request)


def judge_batch(client: redis.Redis, settings: Settings, judge: Judge,
                items: Sequence[tuple[WriteCommand, Sequence[float]]]) -> list[GroupDecision]:
    """One :class:`GroupDecision` per ``(command, unit vector)``, in order. Never raises."""
    own = [answer_group(command.response) for command, _ in items]
    judge = _Deadline(judge, time.monotonic() + settings.task_time_limit_s / 3)
    threads = min(settings.judge_concurrency, len(items)) if judge.name == "llm" else 1
    try:
        if threads <= 1:
            decisions = judged_groups(client, settings, items, judge, own_groups=own)
        else:
            # interleaved slices: each thread gets every n-th command, one pipelined neighbour search per slice
            slices = [list(range(start, len(items), threads)) for start in range(threads)]
            with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="semcache-judge") as pool:
                parts = list(pool.map(lambda idx: judged_groups(client, settings, [items[i] for i in idx], judge,
                                                                own_groups=[own[i] for i in idx]), slices))
            decisions = [GroupDecision() for _ in items]
            for idx, part in zip(slices, parts):
                for i, decision in zip(idx, part):
                    decisions[i] = decision
    except Exception as exc:  # noqa: BLE001 - grouping is an optimisation of hits, never a condition of the write
        log.warning("judge: %d entries keep their own group: %s", len(items), type(exc).__name__)
        return [GroupDecision() for _ in items]
    counts = judge_counters(decisions)
    if counts:  # one line per task, never per question (a judge that is down would flood the log)
        log.info("judge %s: %d entries, %d yes, %d no, %d no verdict, %d not asked", judge.name, len(items),
                 counts.get("judge_yes", 0), counts.get("judge_no", 0), counts.get("judge_none", 0),
                 counts.get("judge_skipped", 0))
    return decisions


def _verdict_word(agree: bool | None) -> str:
    return "none" if agree is None else ("yes" if agree else "no")


def audit_verdicts(client: redis.Redis, settings: Settings, judged: Sequence[tuple[CacheEntry, GroupDecision]],
                   *, task_id: str | None) -> None:
    """One ``judge`` audit record per question about an entry that was written (best effort: after the write's
    own transaction, so a Redis failure here loses verdict records, never the entry)."""
    if not any(decision.verdicts for _, decision in judged):
        return
    try:
        pipe = client.pipeline(transaction=False)
        for entry, decision in judged:
            for verdict in decision.verdicts:
                audit(pipe, settings, event="judge", id=entry.id, tenant=entry.scope.tenant, task_id=task_id,
                      neighbour=verdict.get("neighbour_id", ""), similarity=verdict.get("similarity", ""),
                      verdict=_verdict_word(verdict.get("agree")), judge=verdict.get("judge", ""),
                      detail=str(verdict.get("detail", ""))[:200], ms=verdict.get("ms", ""),
                      group=verdict.get("neighbour_group", "") if verdict.get("agree") else "")
        pipe.execute()
    except redis.RedisError as exc:
        log.warning("judge: verdicts of %d entries not audited: %s", len(judged), exc)


def judge_counters(decisions: Sequence[GroupDecision]) -> dict[str, int]:
    """The counters a batch's decisions add (zero counters left out).

    >>> d = GroupDecision(group="g", joined=True, verdicts=[{"agree": False, "detail": "no", "prompt_tokens": 40},
    ...                                        {"agree": True, "detail": "yes", "prompt_tokens": 41}])
    >>> sorted(judge_counters([d, GroupDecision()]).items())
    [('judge_joined', 1), ('judge_no', 1), ('judge_prompt_tokens', 81), ('judge_yes', 1)]
    """
    out: Counter = Counter()
    for decision in decisions:
        out["judge_joined"] += decision.joined
        for verdict in decision.verdicts:
            if verdict.get("agree") is None and str(verdict.get("detail", "")).startswith(NOT_ASKED):
                out["judge_skipped"] += 1
            else:
                out[f"judge_{_verdict_word(verdict.get('agree'))}"] += 1
            out["judge_prompt_tokens"] += int(verdict.get("prompt_tokens") or 0)
            out["judge_completion_tokens"] += int(verdict.get("completion_tokens") or 0)
    return {k: int(v) for k, v in out.items() if v}


def summary(decisions: Sequence[GroupDecision]) -> dict[str, Any]:
    """What a task's result says about the judge: questions by verdict and the entries that joined a group."""
    counts = judge_counters(decisions)
    return {name[len("judge_"):]: counts.get(name, 0) for name in JUDGE_COUNTERS[:5]}
