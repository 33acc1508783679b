"""The review queue: entries held for review (``pending_review``), oldest first, and the moderator's decisions.

Approve, reject and edit-and-approve each send one ``semcache.set_status`` task per entry; bulk actions send one
per selected entry. The page lists the actions with their outcomes (``actions.recent``).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from flask import Blueprint, flash, redirect, render_template, request, url_for

from cache_core import browse
from cache_core.schema import ID_PATTERN, Status
from cache_core.store import get_entry
from cache_core.tasks import SET_STATUS, EntryFilter, SetStatusCommand

from .actions import recent, send
from .auth import current_user, guard
from .forms import page_number
from .state import state

__all__ = ["bp"]

bp = Blueprint("review", __name__, url_prefix="/review")
guard(bp)

_ID = re.compile(ID_PATTERN)
PER_PAGE = 25
MAX_BULK = 500


@bp.get("/")
def index():
    st = state()
    tenant = request.args.get("tenant", "").strip()[:1024] or None
    page = page_number(request.args.get("page"))
    flt = EntryFilter(status=Status.PENDING_REVIEW, tenant=tenant)
    result = browse.list_entries(st.redis, st.settings, flt, sort="created_at", order="asc",
                                 offset=min((page - 1) * PER_PAGE, browse.MAX_WINDOW - PER_PAGE), limit=PER_PAGE)
    tenants = [t for t in browse.tenant_summary(st.redis, st.settings, limit=200) if t["pending_review"]]
    return render_template("review.html", page=result, tenant=tenant or "", tenants=tenants,
                           actions=recent(PER_PAGE))


def _back() -> str:
    target = request.form.get("next", "")
    if target.startswith("/") and not target.startswith("//") and not urlsplit(target).netloc:
        return target
    return url_for("review.index")


def _decide(ids: list[str], status: Status, *, reason: str = "", response: str | None = None) -> int:
    st = state()
    sent = 0
    for entry_id in ids:
        view = get_entry(st.redis, st.settings, entry_id)
        if view is None:
            flash(f"Entry {entry_id[:8]}… is gone (expired or purged).", "error")
            continue
        command = SetStatusCommand(entry_id=entry_id, status=status, by=f"ui:{current_user()}", reason=reason,
                                   response=response, tenant=view.scope.tenant)
        verb = {"approved": "approve", "rejected": "reject"}[status.value]
        if response is not None:
            verb = "edit and approve"
        send(SET_STATUS, command.model_dump(mode="json"), tenant=view.scope.tenant, kind="status",
             label=f"{verb} {entry_id[:8]}… “{view.prompt[:60]}”", entry=entry_id)
        sent += 1
    return sent


@bp.post("/action")
def action():
    ids = [i for i in request.form.getlist("ids") if _ID.fullmatch(i)][:MAX_BULK]
    verb = request.form.get("action", "")
    if verb not in ("approve", "reject"):
        flash("Choose approve or reject.", "error")
        return redirect(_back())
    if not ids:
        flash("Select at least one entry.", "error")
        return redirect(_back())
    status = Status.APPROVED if verb == "approve" else Status.REJECTED
    sent = _decide(ids, status, reason=request.form.get("reason", "")[:1000])
    if sent:
        flash(f"Sent {sent} {'approval' if verb == 'approve' else 'rejection'}{'s' if sent != 1 else ''} to the "
              "worker; outcomes are listed under Recent actions.", "ok")
    return redirect(_back())


@bp.post("/<verb>/<entry_id>")
def one(verb: str, entry_id: str):
    """The per-row buttons: one decision for one entry, whatever else is ticked."""
    if verb not in ("approve", "reject") or not _ID.fullmatch(entry_id):
        flash("No such action.", "error")
        return redirect(_back())
    status = Status.APPROVED if verb == "approve" else Status.REJECTED
    if _decide([entry_id], status, reason=request.form.get("reason", "")[:1000]):
        flash(f"Sent the {'approval' if verb == 'approve' else 'rejection'} to the worker; its outcome is listed "
              "under Recent actions.", "ok")
    return redirect(_back())


@bp.post("/<entry_id>/edit")
def edit(entry_id: str):
    if not _ID.fullmatch(entry_id):
        flash("No such entry.", "error")
        return redirect(_back())
    response = request.form.get("response", "")
    if not response.strip():
        flash("The edited response is empty.", "error")
        return redirect(_back())
    if len(response) > state().settings.max_response_chars:
        flash(f"The edited response is longer than {state().settings.max_response_chars} characters.", "error")
        return redirect(_back())
    if _decide([entry_id], Status.APPROVED, reason=request.form.get("reason", "")[:1000] or "edited",
               response=response.replace("\r\n", "\n")):
        flash("Sent the edited response for approval; its outcome is listed under Recent actions.", "ok")
    return redirect(_back())
