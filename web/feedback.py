"""The admin UI's "wrong answer" action: a moderator reports that an entry's answer is wrong.

``POST /entries/<entry_id>/wrong`` (a form with the session's CSRF token, the tenant the page showed, an optional
reason and where to go back to) sends the worker's ``semcache.feedback`` task with the entry id: the same task and
the same :func:`cache_core.feedback.apply_feedback` as ``POST /api/v1/feedback``, so the report lands in the same
per-entry state, is audited, and demotes the entry to review by the same rule (``SEMCACHE_FEEDBACK_DEMOTE_AFTER``
wrong reports outnumbering the correct ones).

Every action is bound to the tenant of the page it was sent from: the form says which tenant's entry it marks, and
an entry id of any other tenant (a stale page, an edited form, a guessed id) answers 404 with nothing sent or
recorded. The page's flash message follows the task (``static/app.js`` polls it) and says what happened.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from flask import Blueprint, abort, flash, redirect, request, url_for

from cache_core.feedback import MAX_REASON_CHARS
from cache_core.schema import ID_PATTERN
from cache_core.store import get_entry
from cache_core.tasks import FEEDBACK, FeedbackCommand

from .actions import send
from .auth import current_user, guard
from .state import state

__all__ = ["bp", "flash_task"]

bp = Blueprint("feedback", __name__, url_prefix="/entries")
guard(bp)

_ID = re.compile(ID_PATTERN)
TASK_FLASH = "task:"  # a flash category naming a task: base.html renders it as a message that follows the task


def flash_task(message: str, task_id: str) -> None:
    """A flash message that the page updates with the outcome of task ``task_id``."""
    flash(message, TASK_FLASH + task_id)


def _back(entry_id: str) -> str:
    target = request.form.get("next", "")
    if target.startswith("/") and not target.startswith("//") and not urlsplit(target).netloc and "\\" not in target:
        return target
    return url_for("entries.detail", entry_id=entry_id)


@bp.post("/<entry_id>/wrong")
def wrong(entry_id: str):
    """Report the entry's answer as wrong (optionally with a reason); 404 for an unknown entry or another tenant's."""
    if not _ID.fullmatch(entry_id):
        abort(404)
    tenant = request.form.get("tenant")
    if not tenant:
        abort(400, description="the form did not say which tenant's entry it marks; reload the page and try again")
    reason = " ".join(request.form.get("reason", "").split())  # one line: it is shown in tables and the audit
    if len(reason) > MAX_REASON_CHARS:
        flash(f"The reason is longer than {MAX_REASON_CHARS} characters; nothing was recorded.", "error")
        return redirect(_back(entry_id))
    st = state()
    view = get_entry(st.redis, st.settings, entry_id, tenant=tenant)
    if view is None:  # gone, or another tenant's: the same answer, so ids of other tenants cannot be probed
        abort(404)
    command = FeedbackCommand(entry_id=entry_id, correct=False, by=f"ui:{current_user()}"[:200], reason=reason,
                              tenant=view.scope.tenant)
    # no ``entry=``: the review page greys out entries whose *decision* is done, and a report is no decision
    task_id = send(FEEDBACK, command.model_dump(mode="json"), tenant=view.scope.tenant, kind="feedback",
                   label=f"wrong answer {entry_id[:8]}… “{view.prompt[:60]}”")
    flash_task(f"Wrong answer reported for entry {entry_id[:8]}…:", task_id)
    return redirect(_back(entry_id))
