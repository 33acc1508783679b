"""The OpenAPI 3.1 document of the HTTP API (``GET /api/v1/openapi.json``), built from the same pydantic models
that validate the requests, so the document and the validation cannot drift apart."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from cache_core.schema import ID_PATTERN, EntryView
from cache_core.settings import Settings

from .apimodels import EntryRequest, FeedbackRequest, LookupRequest, PurgeRequest, StatusRequest

__all__ = ["document"]

_REF = "#/components/schemas/{model}"


def _schemas() -> dict[str, Any]:
    out: dict[str, Any] = {}
    models: list[type[BaseModel]] = [LookupRequest, EntryRequest, PurgeRequest, StatusRequest, FeedbackRequest,
                                     EntryView]
    for model in models:
        schema = model.model_json_schema(ref_template=_REF)
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    out["Error"] = {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
            "code": {"type": "string", "examples": ["invalid_input", "unauthorized", "not_found", "rate_limited"]},
            "message": {"type": "string"},
            "field": {"type": "string", "description": "The request field that is wrong (400 only)."},
        }}},
    }  # fmt: skip
    out["LookupResponse"] = {
        "type": "object", "required": ["hit", "entry", "similarity", "strategy"],
        "properties": {
            "hit": {"type": "boolean"},
            "entry": {"anyOf": [{"$ref": _REF.format(model="EntryView")}, {"type": "null"}]},
            "similarity": {"type": ["number", "null"], "description": "Cosine similarity of the served entry."},
            "strategy": {"enum": ["exact", "semantic", None]},
            "lookup_id": {"type": "string", "description": "Names this lookup (in statistics and logs)."},
            "nearest_similarity": {"type": ["number", "null"], "description": "Nearest candidate, hit or not."},
            "threshold": {"type": ["number", "null"]},
            "timings_ms": {"type": "object", "properties": {"embed": {"type": "number"}, "search": {"type": "number"},
                                                            "total": {"type": "number"}}},
            "degraded": {"type": ["string", "null"], "description": "Why Redis was not asked or failed: this miss "
                         "is not a real miss (Redis down or slow; the lookup still answers 200)."},
        },
    }  # fmt: skip
    out["TaskAccepted"] = {"type": "object", "required": ["task_id"], "properties": {
        "task_id": {"type": "string"}, "entry_id": {"type": "string"},
        "matched": {"type": "integer", "description": "Entries matching when the purge was accepted."}}}
    out["TaskStatus"] = {
        "type": "object", "required": ["task_id", "state"],
        "properties": {
            "task_id": {"type": "string"},
            "state": {"enum": ["pending", "started", "retry", "success", "failure"]},
            "result": {"description": "The task's result (success only)."},
            "error": {"type": "string", "description": "Why it failed (failure, retry)."},
            "progress": {"type": "object", "properties": {"done": {"type": "integer"}, "total": {"type": "integer"}}},
            "kind": {"enum": ["write", "delete", "purge", "status", "replay"]},
        },
    }  # fmt: skip
    return out


def _error(description: str) -> dict[str, Any]:
    schema = {"$ref": _REF.format(model="Error")}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _json(description: str, ref: str | dict[str, Any]) -> dict[str, Any]:
    schema = {"$ref": _REF.format(model=ref)} if isinstance(ref, str) else ref
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(ref: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": _REF.format(model=ref)}}}}


_COMMON = {"401": _error("Missing, invalid or revoked API key."), "429": _error("Rate limit of the key exceeded."),
           "503": _error("Redis or the task queue is unavailable.")}
_ENTRY_ID = {"name": "entry_id", "in": "path", "required": True,
             "schema": {"type": "string", "pattern": ID_PATTERN}}


def _op(summary: str, responses: dict[str, Any], *, body: str | None = None, params: list[dict] | None = None,
        tag: str = "cache", description: str = "") -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": {**responses, **_COMMON}}
    if description:
        op["description"] = description
    if body:
        op["requestBody"] = _body(body)
        op["responses"].setdefault("400", _error("Invalid input; `error.field` names the wrong field."))
        op["responses"].setdefault("413", _error("The body is larger than SEMCACHE_MAX_REQUEST_BYTES."))
    if params:
        op["parameters"] = params
    return op


def document(settings: Settings) -> dict[str, Any]:
    """The OpenAPI document of this deployment (its extra scope fields are named in the description)."""
    extras = ", ".join(settings.extra_scope_fields) or "none declared"
    paths: dict[str, Any] = {
        "/api/v1/lookup": {"post": _op(
            "Look a prompt up in the key's tenant", {"200": _json("Hit or miss.", "LookupResponse"),
                                                     "403": _error("scope.tenant names another tenant.")},
            body="LookupRequest",
            description="Exact match first, then one semantic KNN within the scope. The tenant is the key's; a "
                        f"scope holds locale, model and the extra fields ({extras}).")},
        "/api/v1/feedback": {"post": _op(
            "Say whether the answer a lookup served was right", {"202": _json("Accepted.", "TaskAccepted"),
                                                                 "404": _error("No hit with this lookup_id.")},
            body="FeedbackRequest",
            description="A wrong answer raises the entry's own similarity threshold above the lookup's similarity, "
                        "and demotes the entry to review (at once for an exact hit, else after "
                        "SEMCACHE_FEEDBACK_DEMOTE_AFTER wrong reports that outnumber correct ones).")},
        "/api/v1/entries": {
            "post": _op("Write an entry (through the worker's checks)", {"202": _json("Accepted.", "TaskAccepted"),
                                                                         "403": _error("Another tenant.")},
                        body="EntryRequest"),
            "get": _op("List the key's entries", {"200": _json("A page of entries.", {"type": "object"})}, params=[
                {"name": n, "in": "query", "schema": {"type": "string"}} for n in
                ("locale", "model", "status", "text", "flag", "sort", "order", "limit", "offset", "tenant")]),
        },
        "/api/v1/entries/{entry_id}": {
            "get": _op("Read one entry", {"200": _json("The entry.", "EntryView"),
                                          "404": _error("No such entry in the key's tenant.")}, params=[_ENTRY_ID]),
            "delete": _op("Delete one entry (a purge task)", {"202": _json("Accepted.", "TaskAccepted"),
                                                              "404": _error("No such entry in the key's tenant.")},
                          params=[_ENTRY_ID]),
        },
        "/api/v1/purge": {"post": _op("Delete every entry of a scope", {"202": _json("Accepted.", "TaskAccepted"),
                                                                        "403": _error("Another tenant.")},
                                      body="PurgeRequest")},
        "/api/v1/tasks/{task_id}": {"get": _op(
            "State of a task this key sent", {"200": _json("The task's state.", "TaskStatus"),
                                              "404": _error("No such task for this key.")},
            params=[{"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}}])},
        "/api/v1/stats": {"get": _op(
            "Entry counts of the key's tenant (and lookup statistics for admin keys)",
            {"200": _json("Statistics.", {"type": "object"})},
            params=[{"name": "minutes", "in": "query",
                     "schema": {"type": "integer", "minimum": 1, "maximum": 11520}}])},
        "/api/v1/admin/tenants": {"get": _op("Entries per tenant and status (admin key)",
                                             {"200": _json("Tenants.", {"type": "object"}),
                                              "403": _error("Not an admin key.")}, tag="admin")},
        "/api/v1/admin/entries/{entry_id}/status": {"post": _op(
            "Approve or reject an entry, optionally with an edited response (admin key)",
            {"202": _json("Accepted.", "TaskAccepted"), "403": _error("Not an admin key."),
             "404": _error("No such entry.")}, body="StatusRequest", params=[_ENTRY_ID], tag="admin")},
        "/api/v1/admin/deadletters": {"get": _op("Dead letters (admin key)",
                                                 {"200": _json("Dead letters.", {"type": "object"}),
                                                  "403": _error("Not an admin key.")}, tag="admin")},
        "/api/v1/admin/deadletters/{letter_id}/replay": {"post": _op(
            "Send a dead letter's task again (admin key)",
            {"202": _json("Accepted.", "TaskAccepted"), "403": _error("Not an admin key."),
             "404": _error("No such dead letter.")},
            params=[{"name": "letter_id", "in": "path", "required": True, "schema": {"type": "string"}}], tag="admin")},
        "/healthz": {"get": {"summary": "The process is up", "tags": ["health"], "security": [],
                             "responses": {"200": _json("Up.", {"type": "object"})}}},
        "/readyz": {"get": {"summary": "Redis, the index and the broker answer", "tags": ["health"], "security": [],
                            "responses": {"200": _json("Ready.", {"type": "object"}),
                                          "503": _json("Not ready; `checks` says what is missing.",
                                                       {"type": "object"})}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "semcache HTTP API", "version": "1",
                 "description": "A semantic cache for LLM responses. Every call but this document and the health "
                                "checks needs `Authorization: Bearer <key>` (`semcache keys create`). A key is bound "
                                "to one tenant (the tenant always comes from the key) or is an admin key. Errors "
                                "are `{\"error\": {\"code\", \"message\"}}`."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}, "schemas": _schemas()},
        "paths": paths,
    }
