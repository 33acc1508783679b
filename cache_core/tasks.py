"""The contract between the senders of work (read path, HTTP API, admin UI) and the worker: task names and the
pydantic models of their keyword arguments. ``web`` sends tasks by these names; it never imports ``worker``.

Every task takes JSON-able keyword arguments only; unknown extra arguments are logged and ignored by the worker.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .schema import FLAG_PATTERN, ID_PATTERN, Status

__all__ = [
    "WRITE_ENTRY",
    "SET_STATUS",
    "PURGE",
    "FEEDBACK",
    "TASK_NAMES",
    "FeedbackCommand",
    "SetStatusCommand",
    "EntryFilter",
    "PurgeCommand",
]

WRITE_ENTRY = "semcache.write_entry"  # kwargs: command=WriteCommand (as a dict)
SET_STATUS = "semcache.set_status"  # kwargs: SetStatusCommand fields
PURGE = "semcache.purge"  # kwargs: PurgeCommand fields
FEEDBACK = "semcache.feedback"  # kwargs: FeedbackCommand fields
TASK_NAMES = (WRITE_ENTRY, SET_STATUS, PURGE, FEEDBACK)


class SetStatusCommand(BaseModel):
    """Approve or reject one entry (optionally with an edited response, "edit and approve")."""

    model_config = ConfigDict(extra="ignore")

    entry_id: str = Field(..., pattern=ID_PATTERN)
    status: Status
    by: str = Field("", max_length=200)
    reason: str = Field("", max_length=1000)
    response: str | None = Field(None, max_length=1_000_000)
    tenant: str | None = Field(None, max_length=1024, description="Only act if the entry belongs to this tenant.")


class EntryFilter(BaseModel):
    """A selection of entries by scope, status, flags, prompt words and age. Empty fields select everything.

    Scope values match exactly (byte for byte). ``text`` matches prompts containing every word of it.
    """

    model_config = ConfigDict(extra="forbid")

    tenant: str | None = Field(None, min_length=1, max_length=1024)
    locale: str | None = Field(None, min_length=1, max_length=1024)
    model: str | None = Field(None, min_length=1, max_length=1024)
    extra: dict[str, str] = Field(default_factory=dict)
    status: Status | None = None
    flags: list[str] = Field(default_factory=list, max_length=16)
    text: str | None = Field(None, max_length=500)
    created_after: float | None = Field(None, ge=0)
    created_before: float | None = Field(None, ge=0)
    older_than_s: float | None = Field(None, ge=0, description="Created more than this many seconds ago.")

    @field_validator("flags")
    @classmethod
    def _flags(cls, value: list[str]) -> list[str]:
        for flag in value:
            if not re.fullmatch(FLAG_PATTERN, flag):
                raise ValueError(f"flag {flag[:70]!r} must match {FLAG_PATTERN}")
        return value

    def is_empty(self) -> bool:
        return not any(
            (self.tenant, self.locale, self.model, self.extra, self.status, self.flags, self.text,
             self.created_after, self.created_before, self.older_than_s is not None)
        )  # fmt: skip


class PurgeCommand(BaseModel):
    """Delete entries: by ids, or every entry matching a filter. Deleted in batches of
    ``SEMCACHE_PURGE_BATCH_SIZE``; progress is reported in the task's state."""

    model_config = ConfigDict(extra="ignore")

    ids: list[str] = Field(default_factory=list, max_length=100_000)
    filter: EntryFilter | None = None
    by: str = Field("", max_length=200)
    reason: str = Field("", max_length=1000)
    tenant: str | None = Field(None, max_length=1024, description="Restrict to this tenant (API keys set it).")
    mode: Literal["ids", "filter"] = "ids"

    @field_validator("ids")
    @classmethod
    def _ids(cls, value: list[str]) -> list[str]:
        for i in value:
            if not re.fullmatch(ID_PATTERN, i):
                raise ValueError("ids must be 32 hex characters")
        return value

    @model_validator(mode="after")
    def _one_selection(self) -> "PurgeCommand":
        if self.mode == "filter" and self.filter is None:
            raise ValueError("mode 'filter' needs a filter")
        if self.mode == "ids" and not self.ids:
            raise ValueError("mode 'ids' needs ids")
        if self.mode == "filter" and self.filter.is_empty() and self.tenant is None:
            raise ValueError("refusing to purge everything with an empty filter; give at least one field")
        return self


class FeedbackCommand(BaseModel):
    """Whether the answer a lookup served (``lookup_id``, the API) or an entry holds (``entry_id``, the admin UI's
    "wrong answer") is right; feeds the per-entry thresholds (:mod:`cache_core.feedback`). Exactly one of the two."""

    model_config = ConfigDict(extra="ignore")

    lookup_id: str | None = Field(None, pattern=ID_PATTERN)
    entry_id: str | None = Field(None, pattern=ID_PATTERN)
    correct: bool
    by: str = Field("", max_length=200)
    reason: str = Field("", max_length=1000, description="A moderator's words (entry reports); audited.")
    tenant: str | None = Field(None, max_length=1024, description="Only lookups (or an entry) of this tenant.")

    @model_validator(mode="after")
    def _one_target(self) -> "FeedbackCommand":
        if (self.lookup_id is None) == (self.entry_id is None):
            raise ValueError("give either lookup_id or entry_id")
        return self
