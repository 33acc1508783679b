"""The entries table (filters, sorting, pages, counts) and one entry's detail page (with its feedback counts; the
"wrong answer" action itself is :mod:`web.feedback`)."""

from __future__ import annotations

import re
from urllib.parse import urlencode

from flask import Blueprint, abort, flash, render_template, request, url_for

from cache_core import browse
from cache_core.feedback import entry_feedback
from cache_core.policy import FEEDBACK_KEY
from cache_core.schema import ID_PATTERN, Status

from .actions import recent
from .auth import guard
from .forms import filter_from, page_number
from .state import state

__all__ = ["bp"]

bp = Blueprint("entries", __name__, url_prefix="/entries")
guard(bp)

PER_PAGE_CHOICES = (25, 50, 100, 200)


def _page_args() -> tuple[str, str, int, int]:
    sort = request.args.get("sort", "created_at")
    sort = sort if sort in browse.SORT_FIELDS else "created_at"
    order = "asc" if request.args.get("order") == "asc" else "desc"
    per_page = page_number(request.args.get("per_page"), 50)
    per_page = per_page if per_page in PER_PAGE_CHOICES else 50
    page = page_number(request.args.get("page"))
    page = min(page, browse.MAX_WINDOW // per_page)
    return sort, order, page, per_page


@bp.get("/")
def index():
    st = state()
    flt, values, problems = filter_from(request.args)
    for problem in problems:
        flash(problem, "error")
    sort, order, page, per_page = _page_args()
    result = browse.list_entries(st.redis, st.settings, flt, sort=sort, order=order, offset=(page - 1) * per_page,
                                 limit=per_page)
    counts = browse.count_by_status(st.redis, st.settings, flt)
    tenants = [t["tenant"] for t in browse.tenant_summary(st.redis, st.settings, limit=200)]
    base = {k: v for k, v in values.items() if v and k != "older_than"}

    def link(**changes) -> str:
        params = {**base, "sort": sort, "order": order, "per_page": per_page, "page": page, **changes}
        return "?" + urlencode({k: v for k, v in params.items() if v not in ("", None)})

    return render_template("entries.html", page=result, values=values, counts=counts, tenants=tenants, sort=sort,
                           order=order, per_page=per_page, per_page_choices=PER_PAGE_CHOICES, link=link,
                           statuses=[s.value for s in Status], filtered=bool(base))


@bp.get("/<entry_id>")
def detail(entry_id: str):
    st = state()
    if len(entry_id) != 32 or any(c not in "0123456789abcdef" for c in entry_id):
        abort(404)
    found = browse.entry_detail(st.redis, st.settings, entry_id)
    if found is None:
        abort(404)
    metadata = {k: v for k, v in found.entry.metadata.items() if k != FEEDBACK_KEY}  # shown as its own card
    return render_template("entry.html", detail=found, entry=found.entry, actions=recent(5), metadata=metadata,
                           feedback=entry_feedback(found.entry.metadata), verdicts=_verdicts(found.audit),
                           demote_after=st.settings.feedback_demote_after)


def _verdicts(audit: list[dict[str, str]]) -> list[dict[str, str]]:
    """The judge's verdicts on this entry (audit records of event ``judge``, newest first), each with a link to
    the neighbour asked about when its id is an entry id."""
    out = []
    for record in audit:
        if record.get("event") != "judge":
            continue
        neighbour = record.get("neighbour", "")
        link = url_for("entries.detail", entry_id=neighbour) if re.fullmatch(ID_PATTERN, neighbour) else None
        out.append({**record, "link": link})
    return out
