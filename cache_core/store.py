"""The write side's storage functions: build an entry from a command, write it atomically, change its status,
delete entries, read entries for people. Called by the worker (and by synchronous writers in tests and ``eval``),
never by the read path.

Every write is one ``MULTI``: ``JSON.SET`` + ``EXPIREAT`` + an audit record (``XADD`` to ``<index>:audit`` with a
bounded length), so no document ever exists without its TTL and no write goes unaudited. A ``WATCH`` on the key
makes the moderator check and the write one step: a late duplicate write never overrides a moderator's decision,
and a task that is delivered twice (after a worker crash) finds its own id in the document and writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any, Iterable, Literal, Sequence

import orjson
import redis
from pydantic import ValidationError

from .connection import text
from .errors import BackendUnavailable, ConfigError, InvalidInput
from .rediserrors import redis_failure
from .schema import (
    SCHEMA_VERSION,
    CacheEntry,
    EntryView,
    Fields,
    FlagReason,
    Moderation,
    Provenance,
    Scope,
    Status,
    WriteCommand,
    entry_id,
    normalize_prompt,
    prompt_hash,
    quantize_embedding,
)
from .settings import Settings

__all__ = [
    "build_entry",
    "document_set_args",
    "embedding_set_args",
    "write_entry",
    "write_entries",
    "set_status",
    "delete_entries",
    "get_entry",
    "get_document",
    "answer_group",
    "audit",
    "audit_history",
    "WriteOutcome",
    "write_command",
]

log = logging.getLogger(__name__)

WriteOutcome = Literal["written", "kept_moderated", "duplicate", "superseded"]

# Fields audit records may carry. Prompts and responses are never copied into the audit stream (they may hold PII).
_AUDIT_FIELDS = ("event", "id", "status", "by", "reason", "task_id", "flags", "tenant", "decision", "count",
                 # a judge's verdict (event "judge", issue 14): the neighbour asked about, never its text
                 "neighbour", "similarity", "verdict", "judge", "detail", "group", "ms")


def answer_group(response: str) -> str:
    """Entries whose responses are the same text (after normalization) share an answer group."""
    return hashlib.sha256(normalize_prompt(response).encode("utf-8", "surrogatepass")).hexdigest()[:16]


def build_entry(
    command: WriteCommand,
    *,
    settings: Settings,
    embedding: Sequence[float],
    status: Status = Status.APPROVED,
    flags: Iterable[str] = (),
    reasons: Iterable[FlagReason] = (),
    provenance: Provenance | None = None,
    ttl_seconds: int | None = None,
    now: float | None = None,
    dim: int | None = None,
) -> CacheEntry:
    """The document of one write. ``embedding`` is the float vector; it is stored as
    ``SEMCACHE_EMBEDDING_STORAGE`` says (:func:`~cache_core.schema.quantize_embedding`), so every writer (the
    worker, ``semcache eval``, seeding, benchmarks) stores vectors the same way. With ``dim``, a vector of another
    dimension is refused."""
    now = now or time.time()
    ttl = ttl_seconds or command.ttl_seconds or settings.ttl_seconds
    unknown = set(command.scope.extra) - set(settings.extra_scope_fields)
    if unknown:
        raise InvalidInput(f"unknown extra scope fields {sorted(unknown)}; declared: {settings.extra_scope_fields}",
                           field="scope")
    try:
        stored = quantize_embedding(embedding, settings.embedding_storage)
    except ValueError as exc:
        raise InvalidInput(str(exc), field="embedding") from exc
    fields = dict(
        v=SCHEMA_VERSION,
        id=entry_id(command.prompt, command.scope),
        prompt=command.prompt,
        prompt_hash=prompt_hash(command.prompt),
        embedding=stored,
        response=command.response,
        scope=command.scope,
        tags=command.scope.tags(settings.extra_scope_fields),
        status=status,
        flags=sorted(set(flags) | set(command.flags)),
        reasons=list(reasons),
        group=command.group or answer_group(command.response),
        created_at=now,
        updated_at=now,
        expires_at=now + ttl,
        metadata=command.metadata,
        provenance=provenance or Provenance(source=command.source, lookup_id=command.lookup_id),
    )
    if dim is None:
        return CacheEntry(**fields)
    try:
        return CacheEntry.model_validate(fields, context={"dim": dim})
    except ValidationError as exc:
        raise InvalidInput(exc.errors()[0]["msg"], field="embedding") from exc


def _json_text(value: Any) -> bytes | str:
    """``value`` as JSON for a ``JSON.SET``: orjson (UTF-8 bytes, about 4x faster than ``json.dumps`` on a
    document: 29 -> 7 us per entry, docs/performance.md "Writes"), or ``json.dumps`` for what orjson refuses
    (integers beyond 64 bits in caller metadata)."""
    try:
        return orjson.dumps(value)
    except (orjson.JSONEncodeError, TypeError):
        return json.dumps(value, ensure_ascii=False)


def document_set_args(key: str, entry: CacheEntry, settings: Settings) -> list[list[Any]]:
    """The ``JSON.SET`` command(s) that write one entry's document.

    One command normally. With ``SEMCACHE_JSON_FPHA`` (Redis 8.8+), the document goes first without its
    embedding, then the embedding alone with ``FPHA <type>``: the option packs *every* floating-point homogeneous
    array of the value it is given, and the document has others that must stay plain numbers (the character
    offsets in ``reasons[].spans`` would not even fit in FP16). Both run in the caller's ``MULTI``.
    """
    doc = entry.document()
    if settings.json_fpha == "off":
        return [["JSON.SET", key, "$", _json_text(doc)]]
    embedding = embedding_set_args(key, doc.pop("embedding"), settings)
    return [["JSON.SET", key, "$", _json_text(doc)], embedding]


def embedding_set_args(key: str, stored: Sequence[float], settings: Settings, *options: str) -> list[str]:
    """``JSON.SET key $.embedding ...`` for an embedding as :func:`quantize_embedding` stored it; with
    ``SEMCACHE_JSON_FPHA``, as floats with ``FPHA <type>`` (FPHA packs floating-point arrays). ``options`` (say
    ``XX``) go before FPHA."""
    if settings.json_fpha == "off":
        return ["JSON.SET", key, f"$.{Fields.EMBEDDING}", json.dumps(list(stored)), *options]
    return ["JSON.SET", key, f"$.{Fields.EMBEDDING}", json.dumps([float(x) for x in stored]), *options,
            "FPHA", settings.json_fpha]


def audit(pipe: Any, settings: Settings, **fields: Any) -> None:
    """Queue an audit record on a pipeline (or client). Only whitelisted, non-sensitive fields are kept."""
    record = {k: ("" if v is None else (json.dumps(v) if isinstance(v, (list, dict)) else str(v)))
              for k, v in fields.items() if k in _AUDIT_FIELDS}
    record["at"] = repr(time.time())
    pipe.xadd(settings.key("audit"), record, maxlen=settings.audit_maxlen, approximate=True)


def write_entry(client: redis.Redis, settings: Settings, entry: CacheEntry, *, task_id: str | None = None,
                attempts: int = 5) -> WriteOutcome:
    """Write one entry atomically (document, TTL and audit record), idempotent by id.

    An entry that carries a moderator's decision is left as the moderator left it (``"kept_moderated"``): a late
    write neither resurrects a rejected entry nor replaces a response a moderator approved or edited. With a
    ``task_id``, a document already written by that task is not written again (``"duplicate"``): a redelivered
    task leaves one document and one audit record.
    """
    return write_entries(client, settings, [entry], task_id=task_id, attempts=attempts)[0]


def write_entries(client: redis.Redis, settings: Settings, entries: list[CacheEntry], *,
                  task_id: str | None = None, attempts: int = 5) -> list[WriteOutcome]:
    """Write several entries in one transaction: one ``WATCH`` over their keys, two reads, one ``MULTI``.

    Each entry gets the guarantees of :func:`write_entry` (its ``JSON.SET``, ``EXPIREAT`` and audit record are
    in the same ``MULTI``). Entries with the same id: the last one is written, the others are ``"superseded"``.
    Returns one outcome per entry, in order.
    """
    if not entries:
        return []
    keys = [settings.key_prefix + e.id for e in entries]
    last = {key: i for i, key in enumerate(keys)}  # same id twice in one batch: only the last is written
    unique = sorted(last.values())
    for _ in range(attempts):
        try:
            with client.pipeline(transaction=True) as pipe:
                watched = [keys[i] for i in unique]
                pipe.watch(*watched)
                # the reads go in one round trip on another connection; the WATCH still guards the keys until EXEC
                reads = client.pipeline(transaction=False)
                for key in watched:
                    reads.type(key)
                reads.execute_command("JSON.MGET", *watched, "$.moderation")
                reads.execute_command("JSON.MGET", *watched, "$.provenance.task_id")
                *types, found_mod, found_task = reads.execute()
                foreign = [k for k, t in zip(watched, types) if text(t) not in ("none", "ReJSON-RL")]
                if foreign:  # never overwrite (or set a TTL on) a key semcache did not write; not retried (issue 15)
                    raise ConfigError(f"key {foreign[0]} holds a {text(types[watched.index(foreign[0])])}, "
                                      "not a cache entry; remove it or change SEMCACHE_INDEX")
                outcomes: dict[int, WriteOutcome] = {}
                pipe.multi()
                for i, raw_mod, raw_task in zip(unique, found_mod, found_task):
                    entry = entries[i]
                    moderation = _first(raw_mod)
                    if task_id is not None and _first(raw_task) == task_id:
                        outcomes[i] = "duplicate"
                    elif moderation:
                        outcomes[i] = "kept_moderated"
                    else:
                        for args in document_set_args(keys[i], entry, settings):
                            pipe.execute_command(*args)
                        pipe.expireat(keys[i], int(entry.expires_at) + 1)
                        audit(pipe, settings, event="write", id=entry.id, status=entry.status.value, task_id=task_id,
                              flags=entry.flags, tenant=entry.scope.tenant)
                        outcomes[i] = "written"
                pipe.execute()
            return [outcomes.get(i, "superseded") for i in range(len(entries))]
        except redis.WatchError:
            continue
        except redis.RedisError as exc:  # a refusal of the data is InvalidInput, not "Redis down" (issue 15)
            raise redis_failure(exc, f"write of {len(unique)} entr{'y' if len(unique) == 1 else 'ies'} "
                                     f"({entries[unique[0]].id}...)") from exc
    raise BackendUnavailable(f"write of entry {entries[0].id} kept conflicting with concurrent changes")


def _json(raw: Any) -> Any:
    """A ``JSON.GET``/``JSON.MGET`` reply as data.

    Replies are JSON text, unless someone called ``client.json()`` on the same client: redis-py then installs
    decoding callbacks on the whole client, and later replies arrive already decoded. Both shapes are accepted.
    """
    return json.loads(raw) if isinstance(raw, (bytes, str)) else raw


def _first(raw: Any) -> Any:
    """The first match of a ``$`` path reply (``None`` for a missing key or path)."""
    found = _json(raw) if raw else None
    return found[0] if found else None


def set_status(client: redis.Redis, settings: Settings, entry_id_: str, status: Status, *, by: str = "",
               reason: str = "", response: str | None = None, tenant: str | None = None, attempts: int = 10) -> bool:
    """A moderator's decision (and optionally an edited response). Returns False when the entry is gone
    (or belongs to another tenant than ``tenant``).

    A concurrent change of the entry between the read and the write is retried ``attempts`` times, then
    :class:`BackendUnavailable` (retryable: the task tries again later). It used to retry by recursing, with no
    bound (issue 15).
    """
    key = settings.key_prefix + entry_id_
    for _ in range(max(1, attempts)):
        moderation = Moderation(status=status, by=by, at=time.time(), reason=reason)
        try:
            with client.pipeline(transaction=True) as pipe:
                pipe.watch(key)
                current = pipe.execute_command("JSON.GET", key, "$.scope.tenant")
                if not current:
                    return False
                if tenant is not None and _first(current) != tenant:
                    return False
                pipe.multi()
                pipe.execute_command("JSON.SET", key, "$.status", json.dumps(status.value))
                pipe.execute_command("JSON.SET", key, "$.moderation", moderation.model_dump_json())
                pipe.execute_command("JSON.SET", key, "$.updated_at", json.dumps(moderation.at))
                if response is not None:
                    pipe.execute_command("JSON.SET", key, "$.response", json.dumps(response, ensure_ascii=False))
                    pipe.execute_command("JSON.SET", key, "$.group", json.dumps(answer_group(response)))
                audit(pipe, settings, event="status", id=entry_id_, status=status.value, by=by, reason=reason,
                      tenant=_first(current))
                pipe.execute()
            return True
        except redis.WatchError:
            continue
        except redis.RedisError as exc:  # a key of another type is a ConfigError, not "Redis down" (issue 15)
            raise redis_failure(exc, f"status change of {entry_id_}") from exc
    raise BackendUnavailable(f"status change of {entry_id_} kept conflicting with concurrent changes")


def delete_entries(client: redis.Redis, settings: Settings, ids: list[str], *, by: str = "", reason: str = "",
                   tenant: str | None = None) -> int:
    """Delete entries by id (only those of ``tenant`` when given). Returns how many were deleted."""
    if not ids:
        return 0
    keys = [settings.key_prefix + i for i in ids]
    if tenant is not None:
        tenants = client.execute_command("JSON.MGET", *keys, "$.scope.tenant")
        keys = [k for k, t in zip(keys, tenants) if _first(t) == tenant]
        if not keys:
            return 0
    pipe = client.pipeline(transaction=True)
    pipe.delete(*keys)
    short = [k[len(settings.key_prefix):] for k in keys]
    pipe.hdel(settings.key("hits"), *short)
    pipe.hdel(settings.key("lasthit"), *short)
    audit(pipe, settings, event="delete", id=short[0] if len(short) == 1 else "", count=len(short), by=by,
          reason=reason, tenant=tenant)
    deleted = pipe.execute()[0]
    return int(deleted)


def get_document(client: redis.Redis, settings: Settings, entry_id_: str) -> dict[str, Any] | None:
    raw = client.execute_command("JSON.GET", settings.key_prefix + entry_id_)
    return _json(raw) if raw else None


def get_entry(client: redis.Redis, settings: Settings, entry_id_: str, *,
              tenant: str | None = None) -> EntryView | None:
    """The entry without its embedding, with hit statistics; None when missing or of another tenant."""
    from .stats import hit_counts

    doc = get_document(client, settings, entry_id_)
    if doc is None or (tenant is not None and doc.get("scope", {}).get("tenant") != tenant):
        return None
    doc.pop("embedding", None)
    doc.pop("tags", None)
    count, last = hit_counts(client, settings, [entry_id_]).get(entry_id_, (0, None))
    doc["hit_count"], doc["last_hit_at"] = count, last
    return EntryView.model_validate(doc)


def audit_history(client: redis.Redis, settings: Settings, entry_id_: str, *, scan: int = 10_000) -> list[dict]:
    """Audit records of one entry, newest first, among the last ``scan`` records of the stream."""
    out = []
    for record_id, fields in client.xrevrange(settings.key("audit"), count=scan):
        row = {text(k): text(v) for k, v in fields.items()}
        if row.get("id") == entry_id_:
            row["record"] = text(record_id)
            out.append(row)
    return out


def scope_of(doc: dict[str, Any]) -> Scope:
    return Scope.model_validate(doc["scope"])


def write_command(client: redis.Redis, settings: Settings, embedder: Any, command: WriteCommand, *,
                  status: Status = Status.APPROVED, task_id: str | None = None) -> tuple[str, WriteOutcome]:
    """Embed (if the command carries no vector) and write a command as one entry, with no safety checks.

    The worker's pipeline validates and flags before it calls :func:`write_entry`; this plain writer is for
    trusted, already-checked data (``semcache eval``, seeding, tests).
    """
    embedding = command.embedding
    if embedding is None:
        embedding = [float(x) for x in embedder.embed([command.prompt])[0]]
    elif len(embedding) != embedder.dim:
        raise InvalidInput(f"embedding has {len(embedding)} dimensions, the index has {embedder.dim}",
                           field="embedding")
    entry = build_entry(command, settings=settings, embedding=embedding, status=status, dim=embedder.dim,
                        provenance=Provenance(task_id=task_id, source=command.source, lookup_id=command.lookup_id))
    return entry.id, write_entry(client, settings, entry, task_id=task_id)
