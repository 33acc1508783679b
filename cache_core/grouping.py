"""Judge-verified answer groups, formed on the write side (the worker, ``semcache eval``), never on the read path.

Before a new approved entry without an explicit ``group`` is written, :func:`judged_groups` looks at the approved
entries of its scope nearest to it (one ``FT.SEARCH`` KNN per entry, pipelined for a batch). The nearest member of
each distinct answer group whose similarity is at least ``SEMCACHE_JUDGE_MIN_SIMILARITY`` is a question for the
judge (nearest group first, at most ``SEMCACHE_JUDGE_MAX_GROUPS`` of them): "does this neighbour's answer also
answer the new prompt?". The first yes puts the new entry into that neighbour's group; no yes (or no verdict) keeps
the entry in a group of its own. Every question asked is returned as a verdict record for the audit trail.

A group formed this way is marked as *judged*: its id starts with :data:`JUDGED_PREFIX` (an entry that founds a
group while a judge is on gets ``j:`` + the hash of its answer). The consensus policy trusts a judged group less
as a *competitor* (``SEMCACHE_CONSENSUS_JUDGED_CONFLICT``): two judged groups next to each other may be one answer
split by a judge's wrong "no" or by a question never asked (budget, gray zone), whereas two groups of different
answer texts, or two explicit groups from the app, really are different answers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import redis

from .index import alias_name
from .judge import Judge, JudgeRequest, JudgeVerdict
from .policy import JUDGED_PREFIX  # defined by the read path's policy, which must not import the write side
from .query import Candidate, knn_query, parse_knn, scope_filter, search_args
from .schema import Status, WriteCommand, entry_id
from .settings import Settings

__all__ = ["GroupDecision", "judged_groups", "questions", "JUDGED_PREFIX", "judged_group_id"]



def judged_group_id(group: str) -> str:
    """The id of a group formed while a judge is on (idempotent).

    >>> judged_group_id("3f2a"), judged_group_id("j:3f2a")
    ('j:3f2a', 'j:3f2a')
    """
    return group if group.startswith(JUDGED_PREFIX) else JUDGED_PREFIX + group

log = logging.getLogger(__name__)


@dataclass
class GroupDecision:
    """The group a new entry gets and the judge's verdicts on the way there. ``group``: the neighbour's group it
    joined (``joined``), else its own judged group; None only when no neighbour search could run (then the entry
    keeps the group it has without a judge)."""

    group: str | None = None
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    joined: bool = False

    @property
    def asked(self) -> int:
        return len(self.verdicts)


def questions(candidates: Sequence[Candidate], own_group: str, *, min_similarity: float, max_groups: int
              ) -> list[Candidate]:
    """The neighbours to ask about: the nearest member of each distinct group, nearest first, in the gray zone.

    A neighbour already in the new entry's own group (the same answer text) is no question: it agrees already.

    >>> def cand(i, s, g):
    ...     return Candidate(key=f"k{i}", fields={"id": str(i), "group": g, "response": "r"}, similarity=s)
    >>> picked = questions([cand(1, 0.8, "a"), cand(2, 0.78, "a"), cand(3, 0.7, "b"), cand(4, 0.5, "c")], "own",
    ...                    min_similarity=0.6, max_groups=2)
    >>> [c.key for c in picked]
    ['k1', 'k3']
    """
    seen: set[str] = {own_group}
    out: list[Candidate] = []
    for cand in candidates:
        if len(out) >= max_groups or cand.similarity < min_similarity:
            break
        group = cand.group or f"\x00{cand.key}"
        if group in seen or not cand.fields.get("response"):
            continue
        seen.add(group)
        out.append(cand)
    return out


def judged_groups(client: redis.Redis, settings: Settings, items: Sequence[tuple[WriteCommand, Sequence[float]]],
                  judge: Judge, *, own_groups: Sequence[str], k: int | None = None,
                  min_similarity: float | None = None, max_groups: int | None = None) -> list[GroupDecision]:
    """One :class:`GroupDecision` per ``(command, unit vector)``; ``own_groups`` are the groups the entries would
    have without a judge. A Redis error while looking for neighbours leaves every entry in its own group (the
    write itself goes on: grouping is an optimisation of hits, never a condition of the write)."""
    min_sim = settings.judge_min_similarity if min_similarity is None else min_similarity
    limit = settings.judge_max_groups if max_groups is None else max_groups
    k = k or max(settings.knn_k, limit)
    decisions = [GroupDecision() for _ in items]
    if not items or limit <= 0:
        return decisions
    index = alias_name(settings)
    now = time.time()
    try:
        pipe = client.pipeline(transaction=False)
        for command, vector in items:
            filt, params = scope_filter(command.scope, settings.extra_scope_fields, status=Status.APPROVED, now=now)
            query, params = knn_query(filt, params, np.asarray(vector, dtype=np.float32), k=k,
                                      ef_runtime=settings.hnsw_ef_runtime, vector_type=settings.vector_type)
            pipe.execute_command(*search_args(index, query, params, k))
        replies = pipe.execute()
    except redis.RedisError as exc:
        log.warning("judge: could not look for neighbours of %d entries, none joins a group: %s", len(items), exc)
        return decisions
    for decision, (command, _), own, reply in zip(decisions, items, own_groups, replies):
        own = decision.group = judged_group_id(own)
        # a rewrite of an entry finds its own older version nearest: that is no neighbour to ask about
        own_id = entry_id(command.prompt, command.scope)
        found = [c for c in parse_knn(reply) if str(c.fields.get("id", "")) != own_id]
        for cand in questions(found, own, min_similarity=min_sim, max_groups=limit):
            verdict = _ask(judge, command, cand)
            decision.verdicts.append({
                "neighbour_id": str(cand.fields.get("id", "")), "neighbour_group": cand.group,
                "similarity": round(cand.similarity, 4), "agree": verdict.agree, "judge": judge.name,
                "detail": verdict.detail[:200], "ms": round(verdict.ms, 1),
                "prompt_tokens": verdict.prompt_tokens, "completion_tokens": verdict.completion_tokens,
            })  # fmt: skip
            if verdict.agree:
                decision.group, decision.joined = cand.group, True
                break
    return decisions


def _ask(judge: Judge, command: WriteCommand, cand: Candidate) -> JudgeVerdict:
    request = JudgeRequest(prompt=command.prompt, response=command.response,
                           neighbour_id=str(cand.fields.get("id", "")),
                           neighbour_prompt=str(cand.fields.get("prompt", "")),
                           neighbour_response=str(cand.fields.get("response", "")), similarity=cand.similarity)
    started = time.perf_counter()
    try:
        verdict = judge.judge(request)
    except Exception as exc:  # a judge must never fail a write: a crash is no verdict
        log.warning("judge %s failed: %s", getattr(judge, "name", "?"), type(exc).__name__)
        return JudgeVerdict(agree=None, detail=f"judge error: {type(exc).__name__}",
                            ms=(time.perf_counter() - started) * 1000)
    if not verdict.ms:
        verdict = JudgeVerdict(verdict.agree, verdict.detail, (time.perf_counter() - started) * 1000,
                               verdict.prompt_tokens, verdict.completion_tokens)
    return verdict
