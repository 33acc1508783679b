"""Reading entries for people: filtered, sorted, paginated listings, counts, tenant totals, one entry's detail and
its nearest neighbours. Every query is an ``FT.SEARCH``/``FT.AGGREGATE`` over the index (never a key scan), built by
:func:`~cache_core.query.entry_filter_query` so that every user-supplied value is a query parameter.

``tenant`` arguments bound a query to one tenant (an API key's); ``None`` means every tenant (an admin).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import redis
from pydantic import ValidationError

from .connection import text
from .errors import BackendUnavailable, InvalidInput
from .index import alias_name
from .query import VIEW_PATHS, entry_filter_query, scope_filter
from .schema import EntryView, Fields, Status, untag_token
from .settings import Settings
from .stats import hit_counts
from .store import audit_history, get_document
from .tasks import EntryFilter

__all__ = [
    "SORT_FIELDS",
    "EntryPage",
    "Neighbour",
    "list_entries",
    "count_entries",
    "count_by_status",
    "tenant_summary",
    "neighbours",
    "entry_detail",
    "EntryDetail",
]

SORT_FIELDS = (Fields.CREATED_AT, Fields.EXPIRES_AT)  # the SORTABLE numeric attributes of the index
MAX_WINDOW = 10_000  # deepest offset + limit a listing may ask for (the engine's default cap is far larger)
_JSON_VALUED = {"scope", "flags", "reasons", "metadata", "provenance", "moderation"}
_RETURN = tuple(f"$.{p}" for p in VIEW_PATHS)


@dataclass
class EntryPage:
    """One page of a listing: the entries (with hit counts), how many match in all, and where the page starts."""

    entries: list[EntryView]
    total: int
    offset: int
    limit: int
    skipped: int = 0  # documents that vanished or did not validate between the index and the load

    @property
    def page(self) -> int:
        return self.offset // self.limit + 1 if self.limit else 1

    @property
    def pages(self) -> int:
        return max(1, -(-min(self.total, MAX_WINDOW) // self.limit)) if self.limit else 1


@dataclass(frozen=True)
class Neighbour:
    """Another entry of the same scope, with its cosine similarity to the entry being looked at."""

    entry: EntryView
    similarity: float


@dataclass
class EntryDetail:
    entry: EntryView
    audit: list[dict[str, str]] = field(default_factory=list)
    neighbours: list[Neighbour] = field(default_factory=list)


class _NoIndex(Exception):
    """The index does not exist yet: no entries were ever written with these settings."""


def _search(client: redis.Redis, args: list[Any]) -> Any:
    try:
        return client.execute_command(*args)
    except redis.ResponseError as exc:
        message = str(exc)
        if "no such index" in message.lower() or "unknown index" in message.lower():
            raise _NoIndex(message) from exc
        if "syntax" in message.lower() or "parse" in message.lower():
            raise InvalidInput(f"the search could not be parsed: {message}", field="text") from exc
        raise BackendUnavailable(f"search failed: {message}") from exc
    except redis.RedisError as exc:
        raise BackendUnavailable(f"search failed: {exc}") from exc


def _params(params: dict[str, Any]) -> list[Any]:
    out: list[Any] = ["PARAMS", str(2 * len(params))]
    for name, value in params.items():
        out += [name, value]
    return out


def _rows(reply: Any) -> tuple[int, list[tuple[str, dict[str, str | None]]]]:
    """``(total, [(key, attributes)])`` of an FT.SEARCH reply (RESP3 map or RESP2 list)."""
    if isinstance(reply, dict):
        total = int(reply.get(b"total_results", reply.get("total_results", 0)))
        rows = []
        for row in reply.get(b"results", reply.get("results", [])):
            attrs = row.get(b"extra_attributes", row.get("extra_attributes", {})) or {}
            rows.append((text(row.get(b"id", row.get("id"))),
                         {text(k): (None if v is None else text(v)) for k, v in attrs.items()}))
        return total, rows
    items = list(reply)
    rows = []
    for i in range(1, len(items) - 1, 2):
        values = items[i + 1] or []
        rows.append((text(items[i]), {text(values[j]): text(values[j + 1]) for j in range(0, len(values) - 1, 2)}))
    return int(items[0]), rows


def _view(attrs: dict[str, str | None]) -> EntryView | None:
    fields: dict[str, Any] = {}
    for name in VIEW_PATHS:
        raw = attrs.get(f"$.{name}")
        if raw is None or (raw in ("", "null") and name in _JSON_VALUED):
            continue
        fields[name] = json.loads(raw) if name in _JSON_VALUED else raw
    try:
        return EntryView.model_validate(fields)
    except ValidationError:
        return None


def _with_hits(client: redis.Redis, settings: Settings, entries: list[EntryView]) -> list[EntryView]:
    counts = hit_counts(client, settings, [e.id for e in entries])
    return [e.model_copy(update={"hit_count": counts[e.id][0], "last_hit_at": counts[e.id][1]}) for e in entries]


def list_entries(
    client: redis.Redis,
    settings: Settings,
    flt: EntryFilter,
    *,
    tenant: str | None = None,
    sort: str = Fields.CREATED_AT,
    order: Literal["asc", "desc"] = "desc",
    offset: int = 0,
    limit: int = 50,
    now: float | None = None,
) -> EntryPage:
    """One page of the entries matching ``flt`` (bounded to ``tenant`` when given), sorted by a sortable field.

    Raises :class:`InvalidInput` for an unknown sort field or a page beyond :data:`MAX_WINDOW`.
    """
    if sort not in SORT_FIELDS:
        raise InvalidInput(f"sort by one of {', '.join(SORT_FIELDS)}", field="sort")
    if order not in ("asc", "desc"):
        raise InvalidInput("order is asc or desc", field="order")
    if not 1 <= limit <= 500:
        raise InvalidInput("limit is 1 to 500", field="limit")
    if offset < 0 or offset + limit > MAX_WINDOW:
        raise InvalidInput(f"pages reach at most {MAX_WINDOW} entries deep; narrow the filter", field="page")
    query, params = entry_filter_query(flt, settings.extra_scope_fields, now=now, tenant=tenant)
    args: list[Any] = ["FT.SEARCH", alias_name(settings), query]
    if params:
        args += _params(params)
    args += ["SORTBY", sort, order.upper(), "RETURN", str(len(_RETURN)), *_RETURN,
             "LIMIT", str(offset), str(limit), "DIALECT", "2"]
    try:
        total, rows = _rows(_search(client, args))
    except _NoIndex:
        return EntryPage(entries=[], total=0, offset=offset, limit=limit)
    entries = [v for v in (_view(attrs) for _, attrs in rows) if v is not None]
    return EntryPage(entries=_with_hits(client, settings, entries), total=total, offset=offset, limit=limit,
                     skipped=len(rows) - len(entries))


def count_entries(client: redis.Redis, settings: Settings, flt: EntryFilter, *, tenant: str | None = None,
                  now: float | None = None) -> int:
    """How many entries match ``flt`` (the preview count of a purge)."""
    query, params = entry_filter_query(flt, settings.extra_scope_fields, now=now, tenant=tenant)
    args: list[Any] = ["FT.SEARCH", alias_name(settings), query]
    if params:
        args += _params(params)
    args += ["LIMIT", "0", "0", "DIALECT", "2"]
    try:
        return _rows(_search(client, args))[0]
    except _NoIndex:
        return 0


def count_by_status(client: redis.Redis, settings: Settings, flt: EntryFilter | None = None, *,
                    tenant: str | None = None) -> dict[str, int]:
    """Entries per status among those matching ``flt`` (its own status ignored), one round trip."""
    base = (flt or EntryFilter()).model_copy(update={"status": None})
    pipe = client.pipeline(transaction=False)
    for status in Status:
        query, params = entry_filter_query(base.model_copy(update={"status": status}), settings.extra_scope_fields,
                                           tenant=tenant)
        pipe.execute_command("FT.SEARCH", alias_name(settings), query, *(_params(params) if params else []),
                             "LIMIT", "0", "0", "DIALECT", "2")
    try:
        replies = pipe.execute(raise_on_error=False)
    except redis.RedisError as exc:
        raise BackendUnavailable(f"search failed: {exc}") from exc
    counts = {}
    for status, reply in zip(Status, replies):
        if isinstance(reply, Exception):
            if "no such index" in str(reply).lower() or "unknown index" in str(reply).lower():
                return {s.value: 0 for s in Status}
            raise BackendUnavailable(f"search failed: {reply}")
        counts[status.value] = _rows(reply)[0]
    return counts


def tenant_summary(client: redis.Redis, settings: Settings, *, limit: int = 1000) -> list[dict[str, Any]]:
    """Entries per tenant and status (``FT.AGGREGATE GROUPBY``), largest tenants first."""
    args = ["FT.AGGREGATE", alias_name(settings), "*", "GROUPBY", "2", "@tenant", "@status",
            "REDUCE", "COUNT", "0", "AS", "n", "LIMIT", "0", str(limit * len(Status)), "DIALECT", "2"]
    try:
        reply = _search(client, args)
    except _NoIndex:
        return []
    rows = reply.get(b"results", reply.get("results", [])) if isinstance(reply, dict) else [
        {text(r[i]): r[i + 1] for i in range(0, len(r) - 1, 2)} for r in list(reply)[1:]
    ]  # fmt: skip
    tenants: dict[str, dict[str, Any]] = {}
    for row in rows:
        attrs = row.get(b"extra_attributes", row.get("extra_attributes", row)) if isinstance(row, dict) else row
        attrs = {text(k): text(v) for k, v in attrs.items()}
        token, status = attrs.get("tenant", ""), attrs.get("status", "")
        try:
            name = untag_token(token)
        except ValueError:
            continue
        item = tenants.setdefault(name, {"tenant": name, "total": 0, **{s.value: 0 for s in Status}})
        item[status] = item.get(status, 0) + int(attrs.get("n", 0))
        item["total"] += int(attrs.get("n", 0))
    return sorted(tenants.values(), key=lambda t: (-t["total"], t["tenant"]))[:limit]


def neighbours(client: redis.Redis, settings: Settings, doc: dict[str, Any], *, k: int = 5) -> list[Neighbour]:
    """The ``k`` nearest other entries of ``doc``'s scope (any status), by a KNN with its own embedding."""
    from .query import knn_query, parse_knn, search_args
    from .schema import Scope, embedding_vector

    embedding = doc.get("embedding")
    if not embedding:
        return []
    try:
        # floats or scaled integers (SEMCACHE_EMBEDDING_STORAGE): the query wants a unit float vector either way
        vector = embedding_vector(embedding)
    except (ValueError, TypeError):
        return []  # a damaged vector has no neighbours; the rest of the detail page still renders
    filt, params = scope_filter(Scope.model_validate(doc["scope"]), settings.extra_scope_fields, status=None,
                                now=time.time())
    query, params = knn_query(filt, params, vector, k=k + 1, ef_runtime=max(settings.hnsw_ef_runtime, 2 * k + 2),
                              vector_type=settings.vector_type)
    try:  # the read path's own KNN (its RETURN is one JSONPath union: parse_knn decodes it)
        candidates = parse_knn(_search(client, search_args(alias_name(settings), query, params, k + 1)))
    except _NoIndex:
        return []
    out = []
    for cand in candidates:
        try:
            view = EntryView.model_validate(cand.fields)
        except ValidationError:
            continue
        if view.id != doc.get("id"):
            out.append(Neighbour(entry=view, similarity=cand.similarity))
    return out[:k]


def entry_detail(client: redis.Redis, settings: Settings, entry_id: str, *, tenant: str | None = None,
                 k: int = 5) -> EntryDetail | None:
    """Everything the detail page shows about one entry; None when it is missing or of another tenant."""
    try:
        doc = get_document(client, settings, entry_id)
    except redis.RedisError as exc:
        raise BackendUnavailable(f"cannot read entry {entry_id}: {exc}") from exc
    if doc is None or (tenant is not None and doc.get("scope", {}).get("tenant") != tenant):
        return None
    view = {k_: v for k_, v in doc.items() if k_ not in ("embedding", "tags")}
    try:
        entry = EntryView.model_validate(view)
    except ValidationError:
        return None
    entry = _with_hits(client, settings, [entry])[0]
    return EntryDetail(entry=entry, audit=audit_history(client, settings, entry_id),
                       neighbours=neighbours(client, settings, doc, k=k))
