"""Purge: by entry, by a selection from the entries table, or by a scope filter; always a preview with the count,
then a confirmation, then one ``semcache.purge`` batch task whose progress the page shows."""

from __future__ import annotations

import re

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for

from cache_core import browse
from cache_core.schema import ID_PATTERN
from cache_core.store import get_entry
from cache_core.tasks import PURGE, PurgeCommand

from .actions import send
from .auth import current_user, guard
from .dispatch import task_record
from .forms import filter_from
from .state import state

__all__ = ["bp"]

bp = Blueprint("purge", __name__, url_prefix="/purge")
guard(bp)

_ID = re.compile(ID_PATTERN)
MAX_SELECTION = 10_000
SAMPLE = 10


@bp.get("/")
def index():
    st = state()
    flt, values, problems = filter_from(request.args)
    for problem in problems:
        flash(problem, "error")
    return render_template("purge.html", values=values, tenants=browse.tenant_summary(st.redis, st.settings),
                           statuses=["approved", "pending_review", "rejected"])


@bp.post("/preview")
def preview():
    """The confirmation step of a purge by filter: how many entries match, and a sample of them."""
    st = state()
    flt, values, problems = filter_from(request.form)
    if problems:
        for problem in problems:
            flash(problem, "error")
        return redirect(url_for("purge.index", **{k: v for k, v in values.items() if v}))
    if flt.is_empty():
        flash("Give at least one filter field: purging every entry of every tenant is not offered here.", "error")
        return redirect(url_for("purge.index"))
    sample = browse.list_entries(st.redis, st.settings, flt, limit=SAMPLE)
    return render_template("purge_confirm.html", mode="filter", values=values, total=sample.total,
                           sample=sample.entries, ids=[])


@bp.post("/selection")
def selection():
    """The confirmation step of a purge of entries picked in the table (or of one entry from its page)."""
    st = state()
    ids = list(dict.fromkeys(i for i in request.form.getlist("ids") if _ID.fullmatch(i)))[:MAX_SELECTION]
    if not ids:
        flash("Select at least one entry to purge.", "error")
        return redirect(request.referrer if _same_site(request.referrer) else url_for("entries.index"))
    found = [e for e in (get_entry(st.redis, st.settings, i) for i in ids[:SAMPLE]) if e is not None]
    return render_template("purge_confirm.html", mode="ids", values={}, total=len(ids), sample=found, ids=ids)


def _same_site(url: str | None) -> bool:
    host = request.host_url.rstrip("/")
    return bool(url) and (url.startswith(host + "/"))


@bp.post("/run")
def run():
    by = f"ui:{current_user()}"
    if request.form.get("confirm") != "yes":
        flash("Purge not confirmed.", "error")
        return redirect(url_for("purge.index"))
    if request.form.get("mode") == "ids":
        ids = list(dict.fromkeys(i for i in request.form.getlist("ids") if _ID.fullmatch(i)))[:MAX_SELECTION]
        if not ids:
            flash("Nothing to purge.", "error")
            return redirect(url_for("purge.index"))
        command = PurgeCommand(ids=ids, mode="ids", by=by, reason="ui purge")
        label = f"purge {len(ids)} selected entr{'y' if len(ids) == 1 else 'ies'}"
        tenant = None
    else:
        flt, values, problems = filter_from(request.form)
        if problems or flt.is_empty():
            flash("The purge filter is invalid or empty; nothing was purged.", "error")
            return redirect(url_for("purge.index"))
        command = PurgeCommand(filter=flt, mode="filter", by=by, reason="ui purge")
        described = ", ".join(f"{k}={v}" for k, v in values.items() if v)
        label = f"purge where {described}"
        tenant = flt.tenant
    task_id = send(PURGE, command.model_dump(mode="json"), tenant=tenant, kind="purge", label=label)
    return redirect(url_for("purge.progress", task_id=task_id))


@bp.get("/tasks/<task_id>")
def progress(task_id: str):
    st = state()
    record = task_record(st.redis, st.settings, task_id)
    if record is None or not str(record.get("owner", "")).startswith("ui:"):
        abort(404)
    return render_template("purge_progress.html", task_id=task_id, record=record)
