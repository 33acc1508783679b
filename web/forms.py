"""Reading the UI's filter forms (query strings and posted forms) into an :class:`EntryFilter`.

A value that does not parse is dropped with a message for the page, never passed on: the filter only ever holds
validated values, and the query builder turns every one of them into a query parameter.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Mapping

from pydantic import ValidationError

from cache_core.purge import has_words
from cache_core.schema import Status
from cache_core.tasks import EntryFilter

from .apimodels import parse_duration
from .errors import ApiError

__all__ = ["FILTER_FIELDS", "filter_from", "filter_values", "parse_date"]

FILTER_FIELDS = ("tenant", "locale", "model", "status", "flags", "q", "created_from", "created_to", "older_than")


def page_number(raw: str | None, default: int = 1) -> int:
    """A page number (or page size) from a query string: ASCII digits only, else ``default``; at least 1.

    ``int()`` reads other scripts' digits (``int("٣") == 3``) and fails on superscripts (``"²".isdigit()`` is true):
    neither is a page number a link of ours writes.

    >>> [page_number(v) for v in ("3", "٣", "²", "１", "", None, "0", "-2")]
    [3, 1, 1, 1, 1, 1, 1, 1]
    """
    if not raw or not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
        return default
    return max(1, int(raw))


def parse_date(value: str, *, end: bool = False) -> float:
    """Seconds since the epoch of ``YYYY-MM-DD`` (start of day, or end of day with ``end``) or
    ``YYYY-MM-DDTHH:MM``, read as UTC."""
    value = value.strip()
    try:
        if len(value) == 10:
            day = dt.datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=dt.timezone.utc)
            return (day + dt.timedelta(days=1 if end else 0)).timestamp() - (0.001 if end else 0)
        return dt.datetime.fromisoformat(value).replace(tzinfo=dt.timezone.utc).timestamp()
    except ValueError:
        raise ValueError(f"{value[:40]!r} is not a date (YYYY-MM-DD)") from None


def filter_values(source: Mapping[str, Any]) -> dict[str, str]:
    """The filter fields of a form or query string, stripped (what the form shows back)."""
    return {name: str(source.get(name, "") or "").strip()[:1000] for name in FILTER_FIELDS}


def filter_from(source: Mapping[str, Any]) -> tuple[EntryFilter, dict[str, str], list[str]]:
    """``(filter, the values as given, problems)``."""
    values = filter_values(source)
    problems: list[str] = []
    data: dict[str, Any] = {}
    for name in ("tenant", "locale", "model"):
        if values[name]:
            data[name] = values[name]
    if values["status"]:
        if values["status"] in {s.value for s in Status}:
            data["status"] = values["status"]
        else:
            problems.append(f"unknown status {values['status'][:40]!r}")
            values["status"] = ""
    if values["flags"]:
        data["flags"] = [f.strip() for f in values["flags"].split(",") if f.strip()]
    if values["q"]:
        if has_words(values["q"]):
            data["text"] = values["q"][:500]
        else:  # issue 15: the query keeps only words, so "!!!" was no filter at all (a purge of everything)
            problems.append("search: give at least one letter or digit (punctuation alone matches every entry)")
            values["q"] = ""
    for name, key, end in (("created_from", "created_after", False), ("created_to", "created_before", True)):
        if values[name]:
            try:
                data[key] = parse_date(values[name], end=end)
            except ValueError as exc:
                problems.append(f"{name.replace('_', ' ')}: {exc}")
                values[name] = ""
    if values["older_than"]:
        try:
            data["older_than_s"] = parse_duration(values["older_than"])
        except ApiError:
            problems.append("older than: a duration like 90s, 15m, 12h or 7d")
            values["older_than"] = ""
    try:
        flt = EntryFilter.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            field = ".".join(str(p) for p in error["loc"])
            problems.append(f"{field}: {error['msg']}")
            data.pop(str(error["loc"][0]), None)
            values[{"text": "q", "created_after": "created_from", "created_before": "created_to"}.get(
                str(error["loc"][0]), str(error["loc"][0]))] = ""
        try:
            flt = EntryFilter.model_validate(data)
        except ValidationError:
            flt = EntryFilter()
    return flt, values, problems
