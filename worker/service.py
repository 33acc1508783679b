"""The write pipeline as plain functions: validate -> safety -> embed -> build entry -> write.

The Celery tasks (:mod:`worker.tasks`) are thin wrappers around these; everything here takes its collaborators
(Redis client, embedder, safety pipeline, settings) explicitly and is tested without Celery too.

Nothing from a command's prompt or response is ever logged: log lines carry entry ids, tenants, flags and counts.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import redis
from pydantic import BaseModel, ValidationError

from cache_core.embedder import Embedder
from cache_core.errors import BackendUnavailable, InvalidInput, NotFound
from cache_core.feedback import record_entry_feedback, record_feedback
from cache_core.judge import Judge
from cache_core.purge import purge as purge_entries
from cache_core.schema import Decision, Provenance, Status, WriteCommand, entry_id
from cache_core.settings import Settings
from cache_core.stats import record_counters
from cache_core.store import build_entry, set_status, write_entries
from cache_core.tasks import FeedbackCommand, PurgeCommand, SetStatusCommand

from . import judging
from .safety import SafetyPipeline, Verdict

__all__ = [
    "parse_model",
    "parse_command",
    "plan_write",
    "write_commands",
    "write_one",
    "change_status",
    "run_purge",
    "give_feedback",
    "WritePlan",
]

log = logging.getLogger(__name__)

_STATUS = {Decision.APPROVE: Status.APPROVED, Decision.HOLD: Status.PENDING_REVIEW}


def describe_validation(exc: ValidationError, limit: int = 3) -> str:
    """A validation error as one line: where and what, never the offending input (it may be PII)."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False)[:limit]:
        where = ".".join(str(p) for p in err["loc"]) or "value"
        parts.append(f"{where[:100]}: {err['msg'][:200]}")
    more = len(exc.errors()) - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def parse_model(model: type[BaseModel], raw: Any, what: str) -> Any:
    """Validate task keyword arguments against one of the shared models; :class:`InvalidInput` if they fail."""
    if not isinstance(raw, dict):
        raise InvalidInput(f"{what} must be a JSON object, not {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise InvalidInput(f"invalid {what}: {describe_validation(exc)}") from None


def parse_command(raw: Any, settings: Settings, dim: int | None) -> WriteCommand:
    """A write command from JSON data, with the limits of the settings. Raises :class:`InvalidInput`."""
    command: WriteCommand = parse_model(WriteCommand, raw, "command")
    if not command.prompt.strip():
        raise InvalidInput("command.prompt is blank")
    if len(command.prompt) > settings.max_prompt_chars:
        raise InvalidInput(f"command.prompt is longer than {settings.max_prompt_chars} characters "
                           f"({len(command.prompt)})")
    if len(command.response) > settings.max_response_chars:
        raise InvalidInput(f"command.response is longer than {settings.max_response_chars} characters "
                           f"({len(command.response)})")
    scope = command.scope
    limit = settings.max_scope_value_chars
    for name in ("tenant", "locale", "model"):
        if len(getattr(scope, name)) > limit:
            raise InvalidInput(f"command.scope.{name} is longer than {limit} characters")
    unknown = set(scope.extra) - set(settings.extra_scope_fields)
    if unknown:
        raise InvalidInput(f"command.scope.extra has undeclared fields {sorted(unknown)[:5]} "
                           f"(declared: {settings.extra_scope_fields or 'none'})")
    if any(len(v) > limit for v in scope.extra.values()):
        raise InvalidInput(f"command.scope.extra has a value longer than {limit} characters")
    if command.embedding is not None:
        if dim is not None and len(command.embedding) != dim:
            raise InvalidInput(f"command.embedding has {len(command.embedding)} dimensions, the model has {dim}")
        norm = float(np.linalg.norm(np.asarray(command.embedding, dtype=np.float64)))
        if not norm > 0 or not math.isfinite(norm):  # float overflow of huge values, or an all-zero vector
            raise InvalidInput("command.embedding has a zero or non-finite length")
    return command


@dataclass
class WritePlan:
    """One valid command and what the safety pipeline decided for it."""

    command: WriteCommand
    verdict: Verdict
    ttl_seconds: int

    @functools.cached_property
    def entry_id(self) -> str:  # cached: the summary and the log line both ask (a hash of the normalized prompt)
        return entry_id(self.command.prompt, self.command.scope)


def plan_write(command: WriteCommand, settings: Settings, pipeline: SafetyPipeline) -> WritePlan:
    """Run the safety checks; TTL from the command, else the tenant's policy, else the default, capped by
    time-sensitive findings."""
    verdict = pipeline.evaluate(command)
    policy = pipeline.policy_for(command.scope.tenant)
    ttl = command.ttl_seconds or policy.ttl_seconds or settings.ttl_seconds
    if verdict.ttl_cap is not None:
        ttl = min(ttl, verdict.ttl_cap)
    return WritePlan(command=command, verdict=verdict, ttl_seconds=ttl)


def _unit(vector: Sequence[float]) -> list[float]:
    """Unit length, like the embedder's own vectors (so cosine distances mean the same for every writer)."""
    array = np.asarray(vector, dtype=np.float64)
    return (array / np.linalg.norm(array)).tolist()


def write_commands(client: redis.Redis, settings: Settings, embedder: Embedder, pipeline: SafetyPipeline,
                   raws: Sequence[Any], *, task_id: str | None = None, judge: Judge | None = None) -> dict[str, Any]:
    """Validate, check, embed (in one batch, only the commands that carry no vector) and write many commands.

    Invalid commands are reported (with their position) and skipped; the rest are written in one transaction.
    With a ``judge``, approved commands without an explicit ``group`` may join a gray-zone neighbour's answer group
    first (:mod:`worker.judging`). Returns a small summary: counts per decision, the ids written, the invalid
    positions with their reasons (and, with a judge, its verdicts counted under ``judge``).
    """
    commands: list[tuple[int, WriteCommand]] = []
    invalid: list[dict[str, Any]] = []
    for index, raw in enumerate(raws):
        try:
            commands.append((index, parse_command(raw, settings, embedder.dim)))
        except InvalidInput as exc:
            invalid.append({"index": index, "error": str(exc)[:300]})
    return _write_parsed(client, settings, embedder, pipeline, commands, invalid, task_id=task_id, judge=judge)


def _write_parsed(client: redis.Redis, settings: Settings, embedder: Embedder, pipeline: SafetyPipeline,
                  commands: list[tuple[int, WriteCommand]], invalid: list[dict[str, Any]], *,
                  task_id: str | None, judge: Judge | None = None) -> dict[str, Any]:
    """:func:`write_commands` after validation: ``commands`` are (position, valid command) pairs."""
    results: list[dict[str, Any]] = []
    plans = [(index, plan_write(command, settings, pipeline)) for index, command in commands]
    keep = [(i, p) for i, p in plans if p.verdict.decision != Decision.DROP]
    missing = [p.command.prompt for _, p in keep if p.command.embedding is None]
    # one model call for the whole task (the embedder sorts it into length buckets); tolist() converts the float32
    # rows to Python floats in C, the same values as float() on each, at a fraction of the cost
    vectors = iter(np.asarray(embedder.embed(missing)).tolist()) if missing else iter(())
    unit = [_unit(p.command.embedding) if p.command.embedding is not None else next(vectors) for _, p in keep]
    decisions: dict[int, judging.GroupDecision] = {}
    if judge is not None:  # no judge, no neighbour search: the path without one is exactly as before
        asked = [n for n, (_, p) in enumerate(keep)
                 if p.verdict.decision == Decision.APPROVE and p.command.group is None]
        if asked:
            found = judging.judge_batch(client, settings, judge, [(keep[n][1].command, unit[n]) for n in asked])
            for n, decision in zip(asked, found):
                decisions[n] = decision
                if decision.group is not None:
                    plan = keep[n][1]
                    plan.command = plan.command.model_copy(update={"group": decision.group})
    entries = []
    for (_, plan), vector in zip(keep, unit):
        cmd = plan.command
        entries.append(build_entry(
            cmd, settings=settings, embedding=vector, status=_STATUS[plan.verdict.decision],
            flags=plan.verdict.flags, reasons=plan.verdict.reasons, ttl_seconds=plan.ttl_seconds,
            provenance=Provenance(task_id=task_id, writer="semcache-worker", source=cmd.source,
                                  lookup_id=cmd.lookup_id),
        ))  # fmt: skip
    outcomes = write_entries(client, settings, entries, task_id=task_id) if entries else []
    outcome_of = {index: outcome for (index, _), outcome in zip(keep, outcomes)}
    if decisions:
        judging.audit_verdicts(client, settings, [(entries[n], d) for n, d in decisions.items()
                                                  if outcomes[n] == "written"], task_id=task_id)
    counts = {"write_approve": 0, "write_hold": 0, "write_drop": 0, "write_invalid": len(invalid)}
    for index, plan in plans:
        decision = plan.verdict.decision
        outcome = outcome_of.get(index, "dropped")
        if outcome != "duplicate":  # a redelivered task counts once
            counts[f"write_{decision.value}"] += 1
        stored = outcome in ("written", "superseded", "duplicate") and decision in _STATUS
        results.append({
            "index": index, "id": plan.entry_id, "decision": decision.value,
            "status": _STATUS[decision].value if stored else None, "outcome": outcome,
            "flags": plan.verdict.flags, "ttl_seconds": plan.ttl_seconds if decision != Decision.DROP else None,
        })  # fmt: skip
        _log_decision(plan, outcome)
    for item in invalid:
        log.warning("write command #%d rejected: %s", item["index"], item["error"])
    judged = judging.judge_counters(list(decisions.values())) if decisions else {}
    _count(client, settings, {**counts, **judged})
    summary = {"results": results, "invalid": invalid, "counts": {k[6:]: v for k, v in counts.items()}}
    if judge is not None:
        summary["judge"] = judging.summary(list(decisions.values()))
    return summary


def _log_decision(plan: WritePlan, outcome: str) -> None:
    decision = plan.verdict.decision
    tenant = plan.command.scope.tenant[:64]
    if decision == Decision.APPROVE and not plan.verdict.flags:
        log.debug("entry %s (tenant %r): %s", plan.entry_id, tenant, outcome)
        return
    log.info("entry %s (tenant %r): %s, %s, flags %s", plan.entry_id, tenant, decision.value, outcome,
             ",".join(plan.verdict.flags) or "-")


def _count(client: redis.Redis, settings: Settings, counts: dict[str, int]) -> None:
    nonzero = {k: v for k, v in counts.items() if v}
    if not nonzero:
        return
    try:
        record_counters(client, settings, nonzero)
    except redis.RedisError as exc:  # statistics are best effort; the write itself is what matters
        log.warning("could not count write decisions %s: %s", nonzero, exc)


def count_invalid(client: redis.Redis, settings: Settings) -> None:
    _count(client, settings, {"write_invalid": 1})


def write_one(client: redis.Redis, settings: Settings, embedder: Embedder, pipeline: SafetyPipeline, raw: Any, *,
              task_id: str | None = None, judge: Judge | None = None) -> dict[str, Any]:
    """One command (the ``semcache.write_entry`` task). An invalid command raises :class:`InvalidInput`."""
    command = parse_command(raw, settings, embedder.dim)  # raises (rather than reports): the only command is invalid
    summary = _write_parsed(client, settings, embedder, pipeline, [(0, command)], [], task_id=task_id, judge=judge)
    result = dict(summary["results"][0])
    result.pop("index", None)
    if "judge" in summary:
        result["judge"] = summary["judge"]
    return result


def change_status(client: redis.Redis, settings: Settings, raw: Any) -> dict[str, Any]:
    """A moderator's decision (the ``semcache.set_status`` task)."""
    cmd: SetStatusCommand = parse_model(SetStatusCommand, raw, "status change")
    if cmd.response is not None and len(cmd.response) > settings.max_response_chars:
        raise InvalidInput(f"response is longer than {settings.max_response_chars} characters")
    try:
        changed = set_status(client, settings, cmd.entry_id, cmd.status, by=cmd.by, reason=cmd.reason,
                             response=cmd.response, tenant=cmd.tenant)
    except redis.RedisError as exc:
        raise BackendUnavailable(f"status change of {cmd.entry_id} failed: {exc}") from exc
    log.info("entry %s: status %s by %r (%s)", cmd.entry_id, cmd.status.value, cmd.by[:64],
             "changed" if changed else "not found")
    return {"entry_id": cmd.entry_id, "status": cmd.status.value, "changed": changed, "found": changed}


def give_feedback(client: redis.Redis, settings: Settings, raw: Any) -> dict[str, Any]:
    """Feedback on a served answer (the ``semcache.feedback`` task): may raise the entry's threshold or demote it."""
    cmd: FeedbackCommand = parse_model(FeedbackCommand, raw, "feedback")
    try:
        if cmd.entry_id is not None:  # the admin UI's "wrong answer": a report on the entry itself
            result = record_entry_feedback(client, settings, cmd.entry_id, cmd.correct, tenant=cmd.tenant, by=cmd.by,
                                           reason=cmd.reason)
        else:
            result = record_feedback(client, settings, cmd.lookup_id, cmd.correct, tenant=cmd.tenant, by=cmd.by)
    except NotFound as exc:  # expired or unknown lookup, entry gone: nothing to retry
        return {"lookup_id": cmd.lookup_id, "entry_id": cmd.entry_id, "found": False, "error": str(exc)}
    return {"found": True, **result.model_dump(mode="json", include={"lookup_id", "entry_id", "correct",
                                                                    "demoted", "duplicate", "state", "status"})}


def run_purge(client: redis.Redis, settings: Settings, raw: Any,
              progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """A purge by ids or by filter (the ``semcache.purge`` task)."""
    cmd: PurgeCommand = parse_model(PurgeCommand, raw, "purge")
    try:
        return purge_entries(client, settings, cmd, progress=progress)
    except redis.RedisError as exc:
        raise BackendUnavailable(f"purge failed: {exc}") from exc
