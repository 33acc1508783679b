"""The one schema: the stored JSON document, the write command, and what a lookup returns.

Field names are defined once (:class:`Fields`) and used by these models, by the index definition
(:mod:`cache_core.index`) and by the queries (:mod:`cache_core.query`).

Scope values are arbitrary strings (a tenant may be called ``acme} | @tenant:{*``). They are stored as given under
``$.scope`` for people to read, and indexed under ``$.tags`` as ``"x" + hex(utf-8)``: RediSearch trims, splits on
separators and folds case in TAG values, and a hex token has none of those problems, so a scope matches only
itself, byte for byte. See :func:`tag_token`.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import re
import time
import unicodedata
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

__all__ = [
    "SCHEMA_VERSION",
    "Fields",
    "Status",
    "Decision",
    "Scope",
    "FlagReason",
    "Provenance",
    "Moderation",
    "CacheEntry",
    "EntryView",
    "WriteCommand",
    "LookupResult",
    "normalize_prompt",
    "prompt_hash",
    "entry_id",
    "tag_token",
    "untag_token",
    "FLAG_PATTERN",
    "ID_PATTERN",
    "EMBEDDING_STORAGES",
    "quantize_embedding",
    "embedding_vector",
]

SCHEMA_VERSION = 1
FLAG_PATTERN = r"^[a-z0-9][a-z0-9_.:-]{0,63}$"
ID_PATTERN = r"^[0-9a-f]{32}$"  # entry ids, lookup ids, task ids: 32 lower-case hex characters
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # scope values are identifiers: no control characters at all


class Fields:
    """Names of the document's fields, as JSON keys and as index attribute names."""

    VERSION = "v"
    ID = "id"
    PROMPT = "prompt"
    PROMPT_HASH = "prompt_hash"
    EMBEDDING = "embedding"
    RESPONSE = "response"
    SCOPE = "scope"
    TAGS = "tags"
    STATUS = "status"
    FLAGS = "flags"
    GROUP = "group"
    CREATED_AT = "created_at"
    UPDATED_AT = "updated_at"
    EXPIRES_AT = "expires_at"
    CORE_SCOPE = ("tenant", "locale", "model")


class Status(str, enum.Enum):
    APPROVED = "approved"
    PENDING_REVIEW = "pending_review"
    REJECTED = "rejected"


class Decision(str, enum.Enum):
    """What the safety pipeline decides for a write: store approved, hold for review, or drop."""

    APPROVE = "approve"
    HOLD = "hold"
    DROP = "drop"


def _clean_text(value: str, field: str) -> str:
    if "\x00" in value:
        raise ValueError(f"{field} contains a NUL character")
    # lone surrogates are exactly the code points strict UTF-8 refuses; encode() finds them in C, where a scan
    # per character cost the worker about 10 us per command (docs/performance.md, "Writes")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{field} contains a lone surrogate (invalid UTF-8)") from None
    return value


class Scope(BaseModel):
    """The hard boundary of a lookup: an entry only ever matches prompts of exactly the same scope."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tenant: str = Field(..., min_length=1, max_length=1024)
    locale: str = Field("und", min_length=1, max_length=1024)
    model: str = Field("default", min_length=1, max_length=1024)
    extra: dict[str, str] = Field(default_factory=dict)

    @field_validator("tenant", "locale", "model")
    @classmethod
    def _no_control(cls, value: str) -> str:
        _clean_text(value, "scope value")
        if _CONTROL.search(value):
            raise ValueError("scope values may not contain control characters")
        return value

    @field_validator("extra")
    @classmethod
    def _extra_values(cls, value: dict[str, str]) -> dict[str, str]:
        for key, item in value.items():
            if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", key):
                raise ValueError(f"extra scope field {key!r} must match [a-z][a-z0-9_]*")
            if len(item) > 1024 or _CONTROL.search(item) or "\x00" in item:
                raise ValueError(f"extra scope value of {key!r} is too long or has control characters")
            _clean_text(item, "scope value")
        return dict(sorted(value.items()))

    def tags(self, extra_fields: tuple[str, ...] | list[str] = ()) -> dict[str, str]:
        """The index tokens of this scope; every declared extra field gets one (missing means empty)."""
        out = {name: tag_token(getattr(self, name)) for name in Fields.CORE_SCOPE}
        for name in extra_fields:
            out[name] = tag_token(self.extra.get(name, ""))
        return out

    def describe(self) -> str:
        parts = [f"tenant={self.tenant!r}", f"locale={self.locale!r}", f"model={self.model!r}"]
        parts += [f"{k}={v!r}" for k, v in self.extra.items()]
        return " ".join(parts)


class FlagReason(BaseModel):
    """Why a flag was set. ``spans`` are character offsets, never the matched text (it may be PII)."""

    model_config = ConfigDict(extra="forbid")

    flag: str = Field(..., pattern=FLAG_PATTERN)
    check: str = Field(..., max_length=64)
    detail: str = Field("", max_length=500)
    field: Literal["prompt", "response", "caller", "scope", ""] = ""
    spans: list[tuple[int, int]] = Field(default_factory=list, max_length=100)


class Provenance(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task_id: str | None = Field(None, max_length=200)
    writer: str = Field("semcache", max_length=200)
    source: str = Field("api", max_length=64)
    lookup_id: str | None = Field(None, max_length=64)


class Moderation(BaseModel):
    """A moderator's decision. A later write of the same entry never overrides it."""

    model_config = ConfigDict(extra="ignore")

    status: Status
    by: str = Field("", max_length=200)
    at: float
    reason: str = Field("", max_length=1000)


class EntryView(BaseModel):
    """An entry as shown to callers: the stored document without its embedding."""

    model_config = ConfigDict(extra="ignore")

    v: int = SCHEMA_VERSION
    id: str
    prompt: str
    prompt_hash: str
    response: str
    scope: Scope
    status: Status
    flags: list[str] = Field(default_factory=list)
    reasons: list[FlagReason] = Field(default_factory=list)
    group: str = ""
    created_at: float
    updated_at: float
    expires_at: float
    metadata: dict[str, Any] = Field(default_factory=dict)
    provenance: Provenance = Field(default_factory=Provenance)
    moderation: Moderation | None = None
    hit_count: int = 0
    last_hit_at: float | None = None


class CacheEntry(EntryView):
    """The stored JSON document (one Redis JSON key per entry).

    ``embedding`` is a list of floats (``SEMCACHE_EMBEDDING_STORAGE=float32``, and every document written before
    that setting existed) or of integers (``int16``, ``int8``: see :func:`quantize_embedding`); both kinds live side
    by side in one index. Validating with ``context={"dim": n}`` also checks the dimension.
    """

    model_config = ConfigDict(extra="forbid")

    # StrictInt first: a list of integers stays integers in the document (RedisJSON keeps them in less memory);
    # anything with a float in it is a float list
    embedding: list[Annotated[int, Field(strict=True)]] | list[float]
    tags: dict[str, str]

    @field_validator("embedding", mode="before")
    @classmethod
    def _numbers(cls, value: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            raise ValueError("embedding must be a list of numbers")
        # the common case (plain ints or floats) checked in C; anything else (bool, None, str, subclasses such as
        # numpy scalars) takes the per-element check
        if set(map(type, value)) <= {int, float}:
            return value
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
            raise ValueError("embedding must hold only numbers (no strings, booleans or nulls)")
        return value

    @field_validator("embedding")
    @classmethod
    def _finite(cls, value: list[int] | list[float], info: ValidationInfo) -> list[int] | list[float]:
        if not value:
            raise ValueError("embedding is empty")
        if not all(map(math.isfinite, value)):
            raise ValueError("embedding contains NaN or infinity")
        if not any(value):
            raise ValueError("embedding is all zeros (it has no direction to compare)")
        if isinstance(value[0], int) and max(map(abs, value)) > _INT_LIMIT:
            raise ValueError(f"an integer embedding holds values beyond +-{_INT_LIMIT} (the int16 range)")
        dim = (info.context or {}).get("dim") if info is not None else None
        if dim is not None and len(value) != dim:
            raise ValueError(f"embedding has {len(value)} dimensions, the index has {dim}")
        return value

    def view(self) -> EntryView:
        return EntryView.model_validate(self.model_dump(exclude={"embedding", "tags"}))

    def document(self) -> dict[str, Any]:
        """The JSON document as stored (``JSON.SET key $ document``)."""
        return self.model_dump(mode="json")


# Limits of caller metadata that Redis would otherwise refuse (issue 15): RedisJSON refuses a document nested deeper
# than 128 levels and an integer beyond 64 bits, reads an integer below -2**63 back as a float, and a refusal used to
# be retried and dead-lettered as if Redis were down. Checked by WriteCommand, so the HTTP API, the proxy and the
# worker refuse the same input.
MAX_METADATA_DEPTH = 32  # levels of objects and arrays, metadata itself being the first
MAX_TOKEN_COUNT = 100_000_000  # prompt_tokens / completion_tokens of one answer: far above any context window
TOKEN_FIELDS = ("prompt_tokens", "completion_tokens")  # what the savings metrics add up (cache_core.stats)
_I64 = (-(2**63), 2**63 - 1)


def _check_metadata(metadata: dict[str, Any]) -> None:
    """Raise ValueError (naming the place, never the value) for metadata Redis would refuse or the metrics misread.

    >>> _check_metadata({"prompt_tokens": 12, "tags": [["a"]]})
    >>> _check_metadata({"n": 10**400})
    Traceback (most recent call last):
    ...
    ValueError: metadata.n: an integer outside the signed 64-bit range
    """
    for name in TOKEN_FIELDS:
        if name in metadata:
            count = metadata[name]
            if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_TOKEN_COUNT:
                raise ValueError(f"metadata.{name}: must be an integer from 0 to {MAX_TOKEN_COUNT:,} (the savings "
                                 "metrics add it up)")
    stack: list[tuple[Any, str, int]] = [(metadata, "metadata", 1)]
    seen = 0
    while stack:  # iterative: the depth limit must be found before anything recurses into the data
        value, where, depth = stack.pop()
        seen += 1
        if seen > 10_000:  # every value takes at least one character of JSON: too large whatever it holds
            raise ValueError("metadata is larger than 10,000 characters of JSON")
        if isinstance(value, (dict, list, tuple)):
            if depth > MAX_METADATA_DEPTH:
                raise ValueError(f"{where[:200]}: metadata nests more than {MAX_METADATA_DEPTH} levels of objects "
                                 "and arrays")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str) and not key.isascii():
                    _valid_utf8(key, f"{where[:200]} key")
                stack.append((item, f"{where}.{key}"[:300], depth + 1))
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int):
            if not _I64[0] <= value <= _I64[1]:
                raise ValueError(f"{where[:200]}: an integer outside the signed 64-bit range")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ValueError(f"{where[:200]}: NaN or infinity is not JSON")
        elif isinstance(value, str) and not value.isascii():
            _valid_utf8(value, where[:200])


def _valid_utf8(value: str, where: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{where}: a lone surrogate (invalid UTF-8)") from None


class WriteCommand(BaseModel):
    """What the read path (or the HTTP API) hands to the write queue after a miss. Plain JSON-able data."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(..., min_length=1)
    response: str
    scope: Scope
    embedding: list[float] | None = None
    ttl_seconds: int | None = Field(None, ge=1, le=10 * 365 * 24 * 3600)
    flags: list[str] = Field(default_factory=list, max_length=32)
    metadata: dict[str, Any] = Field(default_factory=dict)
    finish_reason: str | None = Field(None, max_length=64)
    group: str | None = Field(None, max_length=128)
    source: str = Field("read_through", max_length=64)
    lookup_id: str | None = Field(None, max_length=64)
    requested_at: float = Field(default_factory=time.time)

    @field_validator("prompt", "response")
    @classmethod
    def _text(cls, value: str, info: Any) -> str:
        return _clean_text(value, info.field_name)

    @field_validator("flags")
    @classmethod
    def _flags(cls, value: list[str]) -> list[str]:
        for flag in value:
            if not re.fullmatch(FLAG_PATTERN, flag):
                raise ValueError(f"flag {flag[:70]!r} must match {FLAG_PATTERN}")
        return sorted(set(value))

    @field_validator("embedding")
    @classmethod
    def _embedding(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and not all(map(math.isfinite, value)):
            raise ValueError("embedding contains NaN or infinity")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_metadata(value)  # first: json.dumps of very deep data would hit the recursion limit
        if len(json.dumps(value, default=str)) > 10_000:
            raise ValueError("metadata is larger than 10,000 characters of JSON")
        return value


class LookupResult(BaseModel):
    """The answer of :meth:`SemanticCache.lookup`. ``similarity`` is cosine similarity in [-1, 1]."""

    hit: bool
    entry: EntryView | None = None
    similarity: float | None = None
    strategy: Literal["exact", "semantic"] | None = None
    lookup_id: str = ""
    embed_ms: float = 0.0
    search_ms: float = 0.0
    total_ms: float = 0.0
    threshold: float | None = None
    degraded: str | None = None  # why Redis was not asked or failed: the miss is not a real miss

    @property
    def response(self) -> str | None:
        return self.entry.response if self.entry else None


EMBEDDING_STORAGES = ("float32", "int16", "int8")
_INT_LIMIT = 32767
_INT_SCALES = {"int16": 32767, "int8": 127}


def quantize_embedding(vector: Any, storage: str = "float32") -> list[float] | list[int]:
    """An embedding as ``$.embedding`` stores it: floats, or integers scaled per vector to the type's range.

    ``int8``: ``round(x / max|x| * 127)``, ``int16``: the same with 32767. The index's metric is cosine, which
    ignores a vector's length, so a scaled vector searches like the original, up to rounding: on the 23,700
    CLINC150 prompts with MiniLM, int8 moves a vector by 1 - cosine = 3e-5 on average (1.2e-4 at most) and the
    similarity a float query sees by 3e-4 on average (1e-3 at the 99th percentile, 2e-3 at most). RedisJSON keeps
    integers in -128..127 in the array's own 8-byte slots (no separate allocation), which is what makes ``int8``
    small (docs/performance.md, "Memory per entry").

    >>> quantize_embedding([0.5, -0.25, 0.0], "int8")
    [127, -64, 0]
    >>> quantize_embedding([0.5, -0.25], "float32")
    [0.5, -0.25]
    """
    if storage == "float32":
        return [float(x) for x in vector]
    scale = _INT_SCALES.get(storage)
    if scale is None:
        raise ValueError(f"unknown embedding storage {storage!r} (known: {', '.join(EMBEDDING_STORAGES)})")
    array = np.asarray(vector, dtype=np.float64)
    peak = float(np.max(np.abs(array))) if array.size else 0.0
    if not peak > 0 or not math.isfinite(peak):
        raise ValueError("embedding is empty, all zeros or not finite: it cannot be stored")
    # / peak first: a subnormal peak must not overflow; astype + tolist gives the same ints as int() per element,
    # in C
    return np.rint(array / peak * scale).astype(np.int64).tolist()


def embedding_vector(stored: Any) -> np.ndarray:
    """A stored ``$.embedding`` (floats or scaled integers) as a unit-length float32 vector, for a KNN query.

    >>> embedding_vector([3, 4]).tolist()
    [0.6000000238418579, 0.800000011920929]
    """
    array = np.asarray(stored, dtype=np.float64)
    norm = float(np.linalg.norm(array))
    if not norm > 0 or not math.isfinite(norm):
        raise ValueError("stored embedding is all zeros or not finite")
    return (array / norm).astype(np.float32)


_WS = re.compile(r"\s+")
# the full-width, ideographic and ellipsis forms are listed themselves: NFKC no longer turns them into "." "!" "?"
_TRAILING = re.compile(r"[\s.!?。？！．｡…‼⁇⁈⁉]+$")
_FACTORIAL = re.compile(r"(?<=\d)[!！]+")  # "5!" at the end is a factorial, not an exclamation


def normalize_prompt(prompt: str) -> str:
    """The form two prompts share when they are the same request: NFC, lower case, whitespace collapsed, trailing
    punctuation dropped (but the "!" of a trailing factorial).

    Only changes that never change what a prompt means (issue 15). NFC joins canonically equivalent spellings (a
    composed and a decomposed "é" are the same text); NFKC and ``str.casefold`` were dropped because they merge
    prompts that differ: NFKC made "5²+3" into "52+3", "½" into "1⁄2", "①" into "1", full-width digits into
    ASCII ones, "ﬁ" into "fi", and ``casefold`` "ß" into "ss". ``str.lower`` stays: the packaged model is uncased, so
    prompts that differ only in case already embed to the same vector (similarity 1.0) and the exact path merging
    them adds nothing the semantic path would not serve. Changing this function changes entry ids (see
    docs/guarantees.md, "Hardening (issue 15)"); ASCII prompts keep theirs except those ending in a digit and "!".

    >>> normalize_prompt("  What is   the Capital of France?? ")
    'what is the capital of france'
    >>> normalize_prompt("What is 5²+3?"), normalize_prompt("What is 5!")
    ('what is 5²+3', 'what is 5!')
    """
    text = unicodedata.normalize("NFC", prompt).lower()
    text = _WS.sub(" ", text).strip()
    trailing = _TRAILING.search(text)
    if trailing is None:
        return text
    factorial = _FACTORIAL.match(text, trailing.start())
    return text[: trailing.start()] + (factorial.group() if factorial else "")


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(normalize_prompt(prompt).encode("utf-8", "surrogatepass")).hexdigest()[:32]


def entry_id(prompt: str, scope: Scope) -> str:
    """Deterministic id: a hash of the normalized prompt and the whole scope, so a rewrite overwrites one key."""
    material = json.dumps(
        [normalize_prompt(prompt), scope.tenant, scope.locale, scope.model, sorted(scope.extra.items())],
        ensure_ascii=False,
    )
    return hashlib.sha256(material.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def tag_token(value: str) -> str:
    """Index token of a scope value: ``"x"`` + hex of its UTF-8 bytes. Only ``[0-9a-fx]``: nothing to escape.

    >>> tag_token("Acme Inc")
    'x41636d6520496e63'
    """
    return "x" + value.encode("utf-8").hex()


def untag_token(token: str) -> str:
    return bytes.fromhex(token[1:]).decode("utf-8")
