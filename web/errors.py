"""Errors as HTTP answers: JSON ``{"error": {"code", "message"}}`` for the API, a page for the UI, never a trace.

Semcache's own errors map to statuses here (invalid input 400, not found 404, Redis down 503); Redis errors that
escape a view are 503; anything else is logged with its traceback and answered 500 with no detail.
"""

from __future__ import annotations

import logging
import re

import redis
from flask import Flask, Response, jsonify, render_template, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from cache_core.errors import BackendUnavailable, IndexMismatch, InvalidInput, NotFound, SemcacheError

__all__ = ["ApiError", "json_error", "register_error_handlers", "validation_error", "wants_json"]

log = logging.getLogger(__name__)

_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
          413: "payload_too_large", 415: "unsupported_media_type", 429: "rate_limited", 500: "internal_error",
          503: "unavailable"}


class ApiError(Exception):
    """An error answer of a view: status, machine code, human message and (for 400) the field that is wrong."""

    def __init__(self, status: int, message: str, *, code: str | None = None, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or _CODES.get(status, "error")
        self.field = field
        self.headers = headers or {}


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "tuple", "set", "bytes"}


def _is_union_tag(part: object) -> bool:
    """pydantic puts the union member a value failed against into the location (``flags.list[str]``)."""
    return isinstance(part, str) and (part in _TYPE_TAGS or re.fullmatch(r"[A-Za-z_][\w.-]*\[.*\]", part) is not None)


def validation_error(exc: ValidationError, prefix: str = "") -> ApiError:
    """The first problem of a pydantic error as a 400 naming the field (``scope.locale``, ``flags.0``)."""
    first = exc.errors()[0]
    loc = ".".join((str(p) or '""') for p in first.get("loc", ()) if not _is_union_tag(p))
    field = ".".join(p for p in (prefix, loc) if p) or None
    message = str(first.get("msg", "invalid value"))
    return ApiError(400, f"{field}: {message}" if field else message, code="invalid_input", field=field)


def wants_json() -> bool:
    return request.path.startswith("/api/") or request.path in ("/healthz", "/readyz") or (
        request.path.startswith("/ui/tasks/")
    )


def json_error(status: int, message: str, *, code: str | None = None, field: str | None = None,
               headers: dict[str, str] | None = None) -> Response:
    body: dict = {"code": code or _CODES.get(status, "error"), "message": message}
    if field:
        body["field"] = field
    response = jsonify({"error": body})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _answer(status: int, message: str, *, code: str | None = None, field: str | None = None,
            headers: dict[str, str] | None = None) -> Response | tuple:
    if wants_json():
        return json_error(status, message, code=code, field=field, headers=headers)
    page = render_template("error.html", status=status, message=message), status
    return page


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return _answer(exc.status, exc.message, code=exc.code, field=exc.field, headers=exc.headers)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        message = exc.description or exc.name
        if exc.code == 413:
            message = f"the request body is larger than {app.config.get('MAX_CONTENT_LENGTH')} bytes"
        elif exc.code == 404:
            message = "not found"
        headers = {"Allow": ", ".join(exc.valid_methods)} if getattr(exc, "valid_methods", None) else None
        return _answer(exc.code or 500, message, headers=headers)

    @app.errorhandler(InvalidInput)
    def _invalid(exc: InvalidInput):
        return _answer(400, str(exc), code="invalid_input", field=exc.field)

    @app.errorhandler(NotFound)
    def _not_found(exc: NotFound):
        return _answer(404, "not found")

    @app.errorhandler(BackendUnavailable)
    def _unavailable(exc: BackendUnavailable):
        log.warning("backend unavailable: %s", exc)
        return _answer(503, "Redis or the task queue is unavailable; try again shortly", code="unavailable",
                       headers={"Retry-After": "5"})

    @app.errorhandler(redis.RedisError)
    def _redis(exc: redis.RedisError):
        log.warning("redis error in %s: %s", request.path, exc)
        return _answer(503, "Redis is unavailable; try again shortly", code="unavailable",
                       headers={"Retry-After": "5"})

    @app.errorhandler(IndexMismatch)
    def _mismatch(exc: IndexMismatch):
        log.error("index mismatch: %s", exc)
        return _answer(503, "the index does not match this server's configuration (see the server log)",
                       code="index_mismatch")

    @app.errorhandler(SemcacheError)
    def _semcache(exc: SemcacheError):
        log.error("error in %s: %s", request.path, exc)
        return _answer(500, "internal error", code="internal_error")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unexpected error in %s %s", request.method, request.path)
        return _answer(500, "internal error", code="internal_error")
