"""Feedback on served answers: "this hit was right / wrong", by ``lookup_id`` (API) or by entry id (admin UI).

The read path logs every hit, off the hot path (the :class:`~cache_core.stats.StatsRecorder` buffer), as
``<index>:lookup:<lookup_id>`` for ``SEMCACHE_FEEDBACK_WINDOW_S``: which entry was served, at which similarity, in
which scope. :func:`record_feedback` reads that record and updates the entry's own state, kept inside its
``metadata`` under :data:`~cache_core.policy.FEEDBACK_KEY` so the one KNN query of the read path already returns it:

- a *wrong* report at similarity ``s`` raises the similarity the entry requires to ``s + SEMCACHE_FEEDBACK_MARGIN``
  (a per-entry adaptive threshold, the idea of vCache, arXiv 2502.03771: one global number is wrong for most
  entries). Both policies honour it (:func:`~cache_core.policy.entry_floor`);
- after ``SEMCACHE_FEEDBACK_DEMOTE_AFTER`` wrong reports that outnumber the correct ones, or one wrong report on an
  exact hit (the answer itself is wrong, not the match), the entry goes to review (``pending_review``) and is no
  longer served until a moderator approves it;
- a *correct* report counts in the entry's favour (it delays demotion).

Each lookup can be rated once; feedback is bound to the tenant of the lookup (a tenant's API key can only rate its
own lookups). A rewrite of the entry by a new write (same prompt and scope) starts from a clean state, unless a
moderator decided on it.

:func:`record_entry_feedback` is the admin UI's "wrong answer" action: a moderator rates the entry itself, with no
lookup behind the report. Both entry points end in :func:`apply_feedback`, so a report counts the same either way;
an entry-level report carries no match similarity, so it counts towards demotion but leaves the entry's similarity
floor alone (only a rated lookup knows at which similarity the wrong match happened).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import redis
from pydantic import BaseModel, Field

from .connection import text
from .errors import BackendUnavailable, InvalidInput, NotFound
from .policy import FEEDBACK_KEY
from .schema import ID_PATTERN, Scope, Status
from .settings import Settings
from .stats import record_counters

__all__ = [
    "FeedbackResult",
    "FeedbackState",
    "record_feedback",
    "record_entry_feedback",
    "apply_feedback",
    "entry_feedback",
    "log_lookup",
    "lookup_record",
    "MAX_REASON_CHARS",
]

_ID = re.compile(ID_PATTERN)  # lookup ids and entry ids alike
MAX_REASON_CHARS = 1000  # as SetStatusCommand.reason and FeedbackCommand.reason
_EXACT = 0.9999  # a similarity this high is the same prompt: a wrong report is about the answer itself


class FeedbackState(BaseModel):
    """An entry's feedback, as stored in ``metadata[FEEDBACK_KEY]``."""

    wrong: int = Field(0, ge=0)
    correct: int = Field(0, ge=0)
    min_similarity: float = Field(-1.0, ge=-1.0, le=1.0, description="What this entry requires; -1: no floor.")
    updated_at: float = 0.0


class FeedbackResult(BaseModel):
    """What :func:`record_feedback` or :func:`record_entry_feedback` did."""

    lookup_id: str = Field("", description="The rated lookup; empty for a report on the entry itself.")
    entry_id: str
    correct: bool
    similarity: float | None = Field(None, description="Of the rated hit; None for a report on the entry itself.")
    state: FeedbackState
    status: str = Field("", description="The entry's status after the report.")
    demoted: bool = False
    duplicate: bool = Field(False, description="This lookup was already rated; nothing changed.")


def lookup_key(settings: Settings, lookup_id: str) -> str:
    return settings.key(f"lookup:{lookup_id}")


def log_lookup(pipe: Any, settings: Settings, lookup_id: str, entry_id: str, similarity: float,
               strategy: str | None, scope: Scope, *, at: float | None = None) -> None:
    """Queue the log record of one hit on a pipeline (called by the stats flush, never by the read path)."""
    record = {
        "entry": entry_id,
        "similarity": repr(float(similarity)),
        "strategy": strategy or "",
        "tenant": scope.tenant,
        "scope": scope.model_dump_json(),
        "at": repr(at or time.time()),
    }
    key = lookup_key(settings, lookup_id)
    pipe.hset(key, mapping=record)
    pipe.expire(key, settings.feedback_window_s)


def lookup_record(client: redis.Redis, settings: Settings, lookup_id: str, *, tenant: str | None = None
                  ) -> dict[str, str] | None:
    """The logged hit of ``lookup_id`` (None when unknown, expired, or of another tenant than ``tenant``)."""
    if not isinstance(lookup_id, str) or not _ID.fullmatch(lookup_id):
        raise InvalidInput("must be the 32 hex characters of a lookup's lookup_id", field="lookup_id")
    raw = client.hgetall(lookup_key(settings, lookup_id))
    record = {text(k): text(v) for k, v in (raw or {}).items()}
    if not record or (tenant is not None and record.get("tenant") != tenant):
        return None
    return record


def record_feedback(client: redis.Redis, settings: Settings, lookup_id: str, correct: bool, *,
                    tenant: str | None = None, by: str = "") -> FeedbackResult:
    """Record that the answer served by lookup ``lookup_id`` was right (``correct=True``) or wrong.

    ``tenant`` (from an API key) restricts the feedback to that tenant's lookups. Raises :class:`NotFound` when
    the lookup is unknown, older than ``SEMCACHE_FEEDBACK_WINDOW_S``, of another tenant, or its entry is gone;
    :class:`InvalidInput` for a malformed ``lookup_id``; :class:`BackendUnavailable` when Redis fails.
    """
    if not isinstance(correct, bool):
        raise InvalidInput("must be true or false", field="correct")
    try:
        record = lookup_record(client, settings, lookup_id, tenant=tenant)
        if record is None:
            raise NotFound(f"no hit with lookup_id {lookup_id} in the last {settings.feedback_window_s}s",
                           field="lookup_id")
        entry_id, similarity = record.get("entry", ""), float(record.get("similarity", "0"))
        # one rating per lookup: the first one applied wins, a retry of the same request changes nothing. The mark
        # is set in the transaction that updates the entry: marked first, a retry after a failed update was taken
        # for a duplicate and the report was lost (issue 15)
        return apply_feedback(client, settings, entry_id, similarity, correct, tenant=record.get("tenant"),
                              by=by, lookup_id=lookup_id, rated_key=lookup_key(settings, lookup_id))
    except redis.RedisError as exc:
        raise BackendUnavailable(f"Redis failed while recording feedback: {exc}") from exc


def record_entry_feedback(client: redis.Redis, settings: Settings, entry_id: str, correct: bool, *,
                          tenant: str | None = None, by: str = "", reason: str = "") -> FeedbackResult:
    """Record that entry ``entry_id``'s answer is right (``correct=True``) or wrong, with no lookup behind it.

    The admin UI's "wrong answer" action (through the ``semcache.feedback`` task). The report counts like a rated
    lookup (towards ``SEMCACHE_FEEDBACK_DEMOTE_AFTER``, in the same per-entry state) but, having no similarity,
    leaves the entry's similarity floor as it is. ``reason`` (a moderator's words) goes into the audit record and,
    if the entry is demoted, into its moderation reason. ``tenant`` restricts the report to that tenant's entries.

    Raises :class:`InvalidInput` for a malformed id, a non-bool ``correct`` or a reason longer than
    :data:`MAX_REASON_CHARS`; :class:`NotFound` when the entry is gone or of another tenant;
    :class:`BackendUnavailable` when Redis fails.
    """
    if not isinstance(entry_id, str) or not _ID.fullmatch(entry_id):
        raise InvalidInput("must be the 32 hex characters of an entry id", field="entry_id")
    if not isinstance(correct, bool):
        raise InvalidInput("must be true or false", field="correct")
    if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS:
        raise InvalidInput(f"must be a text of at most {MAX_REASON_CHARS} characters", field="reason")
    try:
        return apply_feedback(client, settings, entry_id, None, correct, tenant=tenant, by=by, reason=reason.strip())
    except redis.RedisError as exc:
        raise BackendUnavailable(f"Redis failed while recording feedback: {exc}") from exc


def entry_feedback(metadata: Any) -> FeedbackState:
    """The feedback state kept in an entry's ``metadata`` (an empty state when there is none or it is damaged)."""
    return _state(metadata.get(FEEDBACK_KEY) if isinstance(metadata, dict) else None)


def apply_feedback(client: redis.Redis, settings: Settings, entry_id: str, similarity: float | None, correct: bool,
                   *, tenant: str | None = None, by: str = "", lookup_id: str = "", reason: str = "",
                   rated_key: str | None = None) -> FeedbackResult:
    """Update one entry's feedback state (and maybe demote it): what :func:`record_feedback` and
    :func:`record_entry_feedback` share.

    ``similarity`` is that of the rated hit; ``None`` for a report on the entry itself, which counts but moves no
    similarity floor and is never an "exact hit". ``semcache eval --feedback-rate`` calls this directly, with the
    entry and similarity it just saw. With ``rated_key`` (the lookup's log record), a lookup already rated changes
    nothing (``duplicate``), and the record is marked rated in the same transaction as the entry's update.
    """
    from .store import audit, set_status

    field = "lookup_id" if lookup_id else "entry_id"
    key = settings.key_prefix + entry_id
    for _ in range(10):
        try:
            with client.pipeline(transaction=True) as pipe:
                pipe.watch(key, *([rated_key] if rated_key else []))
                if rated_key and pipe.hexists(rated_key, "rated"):
                    pipe.reset()
                    return FeedbackResult(lookup_id=lookup_id, entry_id=entry_id, correct=correct,
                                          similarity=similarity,
                                          state=_read_state(client, settings, entry_id) or FeedbackState(),
                                          status=_read_status(client, settings, entry_id), duplicate=True)
                raw = pipe.execute_command("JSON.GET", key, "$.scope.tenant", f'$.metadata["{FEEDBACK_KEY}"]',
                                           "$.status")
                found = _json(raw) if raw else None
                if not found or not found.get("$.scope.tenant"):
                    raise NotFound(f"entry {entry_id} no longer exists", field=field)
                owner = found["$.scope.tenant"][0]
                if tenant is not None and owner != tenant:
                    raise NotFound(f"entry {entry_id} no longer exists", field=field)
                stored = found.get(f'$.metadata["{FEEDBACK_KEY}"]') or [None]
                state = _state(stored[0])
                if correct:
                    state.correct += 1
                else:
                    state.wrong += 1
                    if similarity is not None:
                        state.min_similarity = min(1.0, max(state.min_similarity,
                                                            similarity + settings.feedback_margin))
                state.updated_at = time.time()
                status = (found.get("$.status") or [""])[0]
                demote = (not correct and status == Status.APPROVED.value and (
                    (similarity is not None and similarity >= _EXACT)
                    or (settings.feedback_demote_after and state.wrong >= settings.feedback_demote_after
                        and state.wrong > state.correct)
                ))  # fmt: skip
                pipe.multi()
                if rated_key:
                    pipe.hset(rated_key, "rated", "1" if correct else "0")
                pipe.execute_command("JSON.SET", key, f'$.metadata["{FEEDBACK_KEY}"]', state.model_dump_json())
                audit(pipe, settings, event="feedback", id=entry_id, status=status, by=by,
                      reason=_audit_reason(correct, similarity, reason), tenant=owner)
                pipe.execute()
            break
        except redis.WatchError:
            continue
    else:
        raise BackendUnavailable(f"feedback on entry {entry_id} kept conflicting with concurrent changes")
    if demote:
        why = f"{state.wrong} wrong-answer report(s), {state.correct} correct"
        set_status(client, settings, entry_id, Status.PENDING_REVIEW, by=by or "feedback",
                   reason=f"{why}; last: {reason}"[:MAX_REASON_CHARS] if reason else why, tenant=owner)
        status = Status.PENDING_REVIEW.value
    try:
        record_counters(client, settings, {"feedback_correct" if correct else "feedback_wrong": 1,
                                           **({"feedback_demoted": 1} if demote else {})})
    except redis.RedisError:
        pass  # statistics are best effort; the feedback itself is recorded
    return FeedbackResult(lookup_id=lookup_id, entry_id=entry_id, correct=correct, similarity=similarity,
                          state=state, status=status, demoted=bool(demote))


def _audit_reason(correct: bool, similarity: float | None, reason: str) -> str:
    what = "correct" if correct else "wrong"
    what += f" at similarity {similarity:.4f}" if similarity is not None else " (report on the entry itself)"
    return f"{what}: {reason}" if reason else what


def _read_status(client: redis.Redis, settings: Settings, entry_id: str) -> str:
    raw = client.execute_command("JSON.GET", settings.key_prefix + entry_id, "$.status")
    found = _json(raw) if raw else None
    return found[0] if found else ""


def _read_state(client: redis.Redis, settings: Settings, entry_id: str) -> FeedbackState | None:
    raw = client.execute_command("JSON.GET", settings.key_prefix + entry_id, f'$.metadata["{FEEDBACK_KEY}"]')
    found = _json(raw) if raw else None
    return _state(found[0]) if found else None


def _state(value: Any) -> FeedbackState:
    try:
        return FeedbackState.model_validate(value) if isinstance(value, dict) else FeedbackState()
    except ValueError:
        return FeedbackState()  # a damaged record starts over rather than blocking feedback


def _json(raw: Any) -> Any:
    return json.loads(raw) if isinstance(raw, (bytes, str)) else raw
