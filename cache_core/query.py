"""The read path's Redis commands, built so that no caller text can change a query.

Scope values only ever reach RediSearch as hex tokens (:func:`~cache_core.schema.tag_token`) passed as query
``PARAMS`` with ``DIALECT 2`` (the read path's KNN: ``DIALECT 3``, the same query syntax plus JSON multi-value
``RETURN``); the query string itself is built from constants and attribute names from the schema.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .connection import text
from .schema import Fields, Scope, Status, tag_token

if TYPE_CHECKING:
    from .tasks import EntryFilter

__all__ = ["Candidate", "scope_filter", "knn_query", "parse_knn", "search_args", "search_timed_out",
           "entry_filter_query", "RETURN_FIELDS", "VIEW_PATHS", "VIEW_UNION"]

# What a KNN returns per candidate: everything an EntryView needs except hit statistics (kept elsewhere).
VIEW_PATHS = (
    "id", "prompt", "prompt_hash", "response", "scope", "status", "flags", "reasons", "group",
    "created_at", "updated_at", "expires_at", "metadata", "provenance", "moderation", "v",
)  # fmt: skip

# The KNN asks for all of them as ONE JSONPath union (``$['id','v',...]``) rather than 16 paths: RediSearch then
# evaluates one path per candidate instead of 16, and the client decodes one JSON array (real JSON numbers, every
# digit) instead of 16 values (issue 6; at 100k entries, with the expiry filter below, the KNN's p50 is 0.73x).
# A union returns every match only under DIALECT 3: DIALECT 2 returns the first value of a multi-value path. (Redis 8
# lists dialect 3 as deprecated but supported; a server that refused it would fail every KNN loudly, as degraded
# lookups.) The union leaves out the keys a document lacks, so the order below puts each optional field just before
# a required field of another JSON type: a document written by something other than semcache, without some optional
# keys, still decodes field by field (:func:`_view_fields`).
_UNION_ORDER = (
    "id", "v", "prompt", "flags", "prompt_hash", "reasons", "response", "metadata", "status", "provenance",
    "created_at", "group", "updated_at", "moderation", "expires_at", "scope",
)  # fmt: skip
# the JSON types each field may hold (numbers: int or float); every optional field (EntryView has a default) may
# also be null or absent
_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,), "prompt": (str,), "prompt_hash": (str,), "response": (str,), "status": (str,), "scope": (dict,),
    "created_at": (int, float), "updated_at": (int, float), "expires_at": (int, float),
    "v": (int,), "flags": (list,), "reasons": (list,), "metadata": (dict,), "provenance": (dict,),
    "group": (str,), "moderation": (dict,),
}  # fmt: skip
_OPTIONAL = frozenset({"v", "flags", "reasons", "metadata", "provenance", "group", "moderation"})
VIEW_UNION = "$[" + ",".join(f"'{name}'" for name in _UNION_ORDER) + "]"
_VIEW_AS = "view"  # the union's name in the reply
_ABSENT = object()
KNN_DIALECT = "3"
RETURN_FIELDS = ("dist", VIEW_UNION, "AS", _VIEW_AS)  # the RETURN arguments of the one KNN


@dataclass(frozen=True)
class Candidate:
    """One of the k nearest approved entries: its fields (an EntryView's) and cosine similarity."""

    key: str
    fields: dict[str, Any]
    similarity: float

    @property
    def group(self) -> str:
        return str(self.fields.get("group") or "")


def scope_filter(scope: Scope, extra_fields: tuple[str, ...] | list[str], *, status: Status | None = Status.APPROVED,
                 now: float | None = None) -> tuple[str, dict[str, str]]:
    """The pre-filter of a scope: ``(query, params)``. Every value is a parameter, never inlined."""
    clauses, params = [], {}
    for name, token in scope.tags(extra_fields).items():
        clauses.append(f"@{name}:{{$s_{name}}}")
        params[f"s_{name}"] = token
    if status is not None:
        clauses.append(f"@{Fields.STATUS}:{{$s_status}}")
        params["s_status"] = status.value
    if now is not None:  # an expired key can linger until Redis reaps it: never serve it
        # "not expired" rather than "expires after now": same documents (every indexed one has a numeric
        # expires_at), but the range walked is the few expired entries instead of nearly the whole index, which
        # RediSearch checks for every HNSW candidate (issue 6, 100k entries: the KNN's p50 0.89x)
        clauses.append(f"-@{Fields.EXPIRES_AT}:[-inf $s_now]")
        params["s_now"] = repr(float(now))
    return " ".join(clauses), params


def knn_query(
    filter_query: str,
    params: dict[str, Any],
    vector: np.ndarray,
    *,
    k: int,
    ef_runtime: int,
    vector_type: str = "FLOAT32",
    batches: bool = False,
) -> tuple[str, dict[str, Any]]:
    """``(filter)=>[KNN k @embedding $vec EF_RUNTIME ef AS dist]`` with the vector as bytes.

    ``batches`` forces RediSearch's ``HYBRID_POLICY BATCHES`` (walk the HNSW graph, filter as it goes). Left to
    itself RediSearch brute-forces every document the filter selects, which is right for a small scope and slow
    for a large one (measured: 16 ms against 0.5 ms p50 for a 20,000-entry scope; the reverse for a 50-entry scope
    in the same index). The read path asks for batches when the scope is large (``SEMCACHE_HYBRID_BATCHES_MIN``).
    """
    dtype = np.float16 if vector_type == "FLOAT16" else np.float32
    policy = " HYBRID_POLICY BATCHES" if batches else ""
    query = f"({filter_query})=>[KNN $k @{Fields.EMBEDDING} $vec EF_RUNTIME $ef{policy} AS dist]"
    all_params = {**params, "k": k, "ef": ef_runtime, "vec": np.asarray(vector, dtype=dtype).tobytes()}
    return query, all_params


def search_args(index: str, query: str, params: dict[str, Any], k: int) -> list[Any]:
    """The read path's one ``FT.SEARCH``: the ``k`` nearest documents, nearest first, each with ``dist`` and every
    EntryView field in one JSON array (:data:`VIEW_UNION`, DIALECT 3). Decode the reply with :func:`parse_knn`."""
    args: list[Any] = ["FT.SEARCH", index, query, "PARAMS", str(2 * len(params))]
    for name, value in params.items():
        args += [name, value]
    args += ["SORTBY", "dist", "RETURN", str(len(RETURN_FIELDS)), *RETURN_FIELDS]
    args += ["LIMIT", "0", str(k), "DIALECT", KNN_DIALECT]
    return args


def parse_knn(reply: Any) -> list[Candidate]:
    """Candidates of a :func:`search_args` reply (RESP3 map or RESP2 list), nearest first.

    Documents that vanished mid-query (expired or purged between the index hit and the load) come back without
    fields and are skipped. A document whose fields cannot be told apart (a required key missing) stays a candidate
    without fields: the policy still sees how near it is, and the read path never serves it (it fails validation).
    Null values and absent optional keys are left out of ``fields`` (EntryView's defaults apply).
    """
    out = []
    for key, attrs in _knn_rows(reply):
        raw, dist = _attr(attrs, _VIEW_AS), _attr(attrs, "dist")
        if raw is None or dist is None:
            continue
        try:
            values = json.loads(raw)
        except ValueError:
            values = None
        fields = _view_fields(values) if isinstance(values, list) else None
        out.append(Candidate(key=text(key), fields=fields or {}, similarity=1.0 - float(dist)))
    return out


def _view_fields(values: list[Any]) -> dict[str, Any] | None:
    """The fields of one union reply; None when they cannot be told apart (a required key missing or mistyped)."""
    if len(values) == len(_UNION_ORDER):  # every key present: every document semcache writes
        return {name: value for name, value in zip(_UNION_ORDER, values) if value is not None}
    fields: dict[str, Any] = {}
    i = 0
    for name in _UNION_ORDER:
        value = values[i] if i < len(values) else _ABSENT
        fits = value is not _ABSENT and type(value) in _TYPES[name]
        if name in _OPTIONAL:
            if not (fits or value is None):
                continue  # absent from this document: the value here is the next field's
        elif not fits:
            return None
        if value is not None:
            fields[name] = value
        i += 1
    return fields if i == len(values) else None


def _attr(attrs: Any, name: str) -> Any:
    value = attrs.get(name)
    return attrs.get(name.encode()) if value is None else value


def search_timed_out(reply: Any) -> bool:
    """Whether an ``FT.SEARCH`` reply was cut short by the server's search timeout (``ON_TIMEOUT RETURN``, the
    default, answers with the results found so far and, in RESP3, the warning "Timeout limit was reached").

    >>> search_timed_out({b"warning": [b"Timeout limit was reached"], b"results": []})
    True
    """
    if not isinstance(reply, dict):
        return False  # RESP2 carries no warning; semcache's clients speak RESP3 (cache_core.connection)
    return any("timeout" in text(w).lower() for w in _attr(reply, "warning") or [])


def _knn_rows(reply: Any):
    """``(key, attributes)`` per result; attribute names and values as the client gave them (bytes or str)."""
    if isinstance(reply, dict):
        for row in _attr(reply, "results") or []:
            yield _attr(row, "id"), _attr(row, "extra_attributes") or {}
        return
    items = list(reply)[1:]
    for i in range(0, len(items) - 1, 2):
        values = items[i + 1] or []
        yield items[i], {text(values[j]): values[j + 1] for j in range(0, len(values) - 1, 2)}


def entry_filter_query(flt: "EntryFilter", extra_fields: tuple[str, ...] | list[str], *, now: float | None = None,
                       tenant: str | None = None) -> tuple[str, dict[str, str]]:
    """The FT.SEARCH query of an :class:`~cache_core.tasks.EntryFilter`: ``(query, params)``, every value a
    parameter. ``tenant`` (from an API key) overrides and bounds the filter's tenant."""
    import re
    import time

    clauses: list[str] = []
    params: dict[str, str] = {}
    scope_values = {"tenant": tenant if tenant is not None else flt.tenant, "locale": flt.locale, "model": flt.model}
    for name in extra_fields:
        scope_values[name] = flt.extra.get(name)
    unknown = set(flt.extra) - set(extra_fields)
    if unknown:
        from .errors import InvalidInput

        raise InvalidInput(f"unknown extra scope fields {sorted(unknown)}", field="filter.extra")
    for name, value in scope_values.items():
        if value is not None:
            clauses.append(f"@{name}:{{$f_{name}}}")
            params[f"f_{name}"] = tag_token(value)
    if flt.status is not None:
        clauses.append(f"@{Fields.STATUS}:{{$f_status}}")
        params["f_status"] = flt.status.value
    for i, flag in enumerate(flt.flags):
        clauses.append(f"@{Fields.FLAGS}:{{$f_flag{i}}}")
        params[f"f_flag{i}"] = flag
    words = re.findall(r"\w+", flt.text or "")[:20]
    if words:
        clauses.append(f"@{Fields.PROMPT}:(" + " ".join(f"$f_w{i}" for i in range(len(words))) + ")")
        params.update({f"f_w{i}": w for i, w in enumerate(words)})
    low, high = flt.created_after, flt.created_before
    if flt.older_than_s is not None:
        cutoff = (now or time.time()) - flt.older_than_s
        high = cutoff if high is None else min(high, cutoff)
    if low is not None or high is not None:
        clauses.append(f"@{Fields.CREATED_AT}:[$f_low $f_high]")
        params["f_low"] = repr(float(low)) if low is not None else "-inf"
        params["f_high"] = repr(float(high)) if high is not None else "+inf"
    return (" ".join(clauses) or "*"), params
