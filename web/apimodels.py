"""The HTTP API's request bodies as pydantic models, and the rule that the tenant comes from the key.

Bodies are validated strictly (``"1"`` is not a number, unknown fields are refused) so that a client's mistake gets
a 400 naming the field instead of being guessed at.

A scope in a body is an object of strings: ``tenant``, ``locale``, ``model``, and any declared extra scope field
(``SEMCACHE_EXTRA_SCOPE_FIELDS``), either at the top level or under ``extra``. A tenant key may leave ``tenant`` out
(or repeat its own); naming another tenant is refused with 403. An admin key names the tenant it acts on.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cache_core.apikeys import ApiKey
from cache_core.cache import GROUP_MAX_CHARS, check_group
from cache_core.schema import FLAG_PATTERN, ID_PATTERN, Scope, Status
from cache_core.settings import Settings
from cache_core.tasks import EntryFilter

from .errors import ApiError, validation_error

__all__ = [
    "LookupRequest",
    "EntryRequest",
    "PurgeRequest",
    "StatusRequest",
    "scope_for",
    "filter_for",
    "parse_duration",
    "parse_body",
]

_STRICT = ConfigDict(extra="forbid", strict=True)
ScopeBody = dict[str, Any]


class LookupRequest(BaseModel):
    """``POST /api/v1/lookup``"""

    model_config = _STRICT

    prompt: str = Field(..., min_length=1, description="The prompt to look up.")
    scope: ScopeBody = Field(default_factory=dict, description="locale, model, extra fields (tenant from the key).")
    min_similarity: float | None = Field(None, ge=-1.0, le=1.0, description="Cosine similarity a semantic hit needs.")


class FeedbackRequest(BaseModel):
    """``POST /api/v1/feedback``: was the answer a lookup served right?"""

    model_config = _STRICT

    lookup_id: str = Field(..., pattern=ID_PATTERN, description="The lookup_id a lookup returned.")
    correct: bool = Field(..., description="false: the cached answer was wrong for this prompt.")


class EntryRequest(BaseModel):
    """``POST /api/v1/entries``: a write handed to the worker (validated, flagged, maybe held for review)."""

    model_config = _STRICT

    prompt: str = Field(..., min_length=1)
    response: str
    scope: ScopeBody = Field(default_factory=dict)
    ttl_seconds: int | None = Field(None, ge=1, le=10 * 365 * 24 * 3600)
    flags: list[str] = Field(default_factory=list, max_length=32)
    metadata: dict[str, Any] = Field(default_factory=dict)
    group: str | None = Field(
        None, min_length=1, max_length=GROUP_MAX_CHARS, examples=["kb:refund-policy"],
        description="The answer's group when the app knows its source (a RAG document id, a router's label): "
                    "entries of one group count as the same answer; the worker does not ask its judge about them.",
    )

    @field_validator("group")
    @classmethod
    def _group(cls, value: str | None) -> str | None:
        return None if value is None else check_group(value)


class PurgeRequest(BaseModel):
    """``POST /api/v1/purge``: delete every entry of a scope (optionally only older ones, or of one status)."""

    model_config = _STRICT

    scope: ScopeBody = Field(default_factory=dict)
    older_than: Any = Field(  # a number or a string: checked by parse_duration (a union would blur the message)
        None, description="Only entries created longer ago than this: seconds, or a duration like 90s, 15m, 12h, 7d."
    )
    status: Literal["approved", "pending_review", "rejected"] | None = None


class StatusRequest(BaseModel):
    """``POST /api/v1/admin/entries/<id>/status``: approve or reject (optionally with an edited response)."""

    model_config = _STRICT

    status: Literal["approved", "rejected"]
    response: str | None = None
    reason: str = Field("", max_length=1000)


def parse_body(model: type[BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_input", field="body")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)?\s*$")
_UNITS = {None: 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(value: float | int | str, field: str = "older_than") -> float:
    """Seconds in a duration: a number of seconds or ``"<number><s|m|h|d|w>"``.

    >>> parse_duration("7d"), parse_duration(90), parse_duration("1.5h")
    (604800.0, 90.0, 5400.0)
    """
    if isinstance(value, bool):
        raise ApiError(400, f"{field}: seconds or a duration like 7d", code="invalid_input", field=field)
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(value)
        if not match:
            raise ApiError(400, f"{field}: seconds or a duration like 90s, 15m, 12h, 7d", code="invalid_input",
                           field=field)
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if not 0 <= seconds <= 100 * 365 * 86400 or seconds != seconds:
        raise ApiError(400, f"{field}: out of range", code="invalid_input", field=field)
    return seconds


def _split_scope(raw: ScopeBody, settings: Settings, field: str = "scope") -> dict[str, Any]:
    """Core fields and extras of a scope body, every value a string."""
    if not isinstance(raw, dict):
        raise ApiError(400, f"{field}: must be an object", code="invalid_input", field=field)
    core: dict[str, Any] = {}
    extra: dict[str, str] = {}
    nested = raw.get("extra", {})
    if not isinstance(nested, dict):
        raise ApiError(400, f"{field}.extra: must be an object", code="invalid_input", field=f"{field}.extra")
    for name, value in [*((k, v) for k, v in raw.items() if k != "extra"), *nested.items()]:
        where = f"{field}.{name}" if not isinstance(name, str) or len(name) < 60 else f"{field}.<long name>"
        if not isinstance(value, str):
            raise ApiError(400, f"{where}: must be a string", code="invalid_input", field=where)
        if not value or len(value) > settings.max_scope_value_chars:
            raise ApiError(400, f"{where}: must be 1 to {settings.max_scope_value_chars} characters",
                           code="invalid_input", field=where)
        if name in ("tenant", "locale", "model"):
            core[name] = value
        elif name in settings.extra_scope_fields:
            extra[name] = value
        else:
            declared = ", ".join(settings.extra_scope_fields) or "none"
            raise ApiError(400, f"{where}: unknown scope field (scope fields: tenant, locale, model; declared "
                                f"extra fields: {declared})", code="invalid_input", field=where)
    core["extra"] = extra
    return core


def _tenant(core: dict[str, Any], key: ApiKey, *, required: bool) -> str | None:
    named = core.pop("tenant", None)
    if not key.admin:
        if named is not None and named != key.tenant:
            raise ApiError(403, "this API key is bound to one tenant; scope.tenant may be left out, and may not "
                                "name another tenant", code="forbidden", field="scope.tenant")
        return key.tenant
    if named is None and required:
        raise ApiError(400, "scope.tenant: an admin key must name the tenant it acts on", code="invalid_input",
                       field="scope.tenant")
    return named


def scope_for(raw: ScopeBody, key: ApiKey, settings: Settings) -> Scope:
    """The full scope of a lookup or write: the body's scope with the tenant taken from the key."""
    core = _split_scope(raw, settings)
    tenant = _tenant(core, key, required=True)
    try:
        return Scope.model_validate({**core, "tenant": tenant})
    except ValidationError as exc:
        raise validation_error(exc, "scope") from None


def filter_for(raw: ScopeBody, key: ApiKey, settings: Settings, *, older_than_s: float | None = None,
               status: str | None = None) -> tuple[EntryFilter, str | None]:
    """``(filter, tenant bound)`` of a purge or listing; a tenant key's tenant always bounds it."""
    core = _split_scope(raw, settings)
    tenant = _tenant(core, key, required=False)
    try:
        flt = EntryFilter.model_validate({
            "tenant": tenant, "locale": core.get("locale"), "model": core.get("model"), "extra": core["extra"],
            "older_than_s": older_than_s, "status": Status(status) if status else None,
        })  # fmt: skip
    except ValidationError as exc:
        raise validation_error(exc, "scope") from None
    return flt, (None if key.admin else key.tenant)


def check_flags(flags: list[str]) -> None:
    for i, flag in enumerate(flags):
        if not re.fullmatch(FLAG_PATTERN, flag):
            raise ApiError(400, f"flags.{i}: must match {FLAG_PATTERN}", code="invalid_input", field=f"flags.{i}")
