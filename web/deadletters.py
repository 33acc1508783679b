"""Dead letters: tasks the worker gave up on. List them, inspect one, replay (send again) or discard them.

Storage and replay are :mod:`cache_core.deadletters`; replaying sends the same task by name with the same
arguments, recorded like every other UI action so its outcome shows under Recent actions.
"""

from __future__ import annotations

import json
import re
from typing import Any

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for

from cache_core.deadletters import (
    count_dead_letters,
    get_dead_letter,
    list_dead_letters,
    remove_dead_letter,
    replay_dead_letters,
)
from cache_core.schema import ID_PATTERN

from .actions import recent, send
from .auth import guard
from .dispatch import send_task
from .errors import ApiError
from .forms import page_number
from .state import state

__all__ = ["bp", "list_json", "replay"]

bp = Blueprint("deadletters", __name__, url_prefix="/deadletters")
guard(bp)

_ID = re.compile(ID_PATTERN)
PER_PAGE = 50


def _page() -> int:
    return page_number(request.args.get("page"))


@bp.get("/")
def index():
    st = state()
    page = _page()
    letters = list_dead_letters(st.redis, st.settings, offset=(page - 1) * PER_PAGE, limit=PER_PAGE)
    total = count_dead_letters(st.redis, st.settings)
    return render_template("deadletters.html", letters=letters, total=total, page=page,
                           pages=max(1, -(-total // PER_PAGE)), actions=recent(5))


@bp.get("/<letter_id>")
def detail(letter_id: str):
    st = state()
    letter = get_dead_letter(st.redis, st.settings, letter_id) if _ID.fullmatch(letter_id) else None
    if letter is None:
        abort(404)
    return render_template("deadletter.html", letter=letter,
                           kwargs_json=json.dumps(letter.kwargs, indent=2, ensure_ascii=False, sort_keys=True))


def _ids() -> list[str]:
    return [i for i in request.form.getlist("ids") if _ID.fullmatch(i)][:1000]


@bp.post("/replay")
def replay_selected():
    st = state()
    ids = _ids()
    if not ids:
        flash("Select at least one dead letter.", "error")
        return redirect(url_for("deadletters.index"))
    replayed = 0
    for letter_id in ids:
        letter = get_dead_letter(st.redis, st.settings, letter_id)
        if letter is None:
            continue
        if not letter.task.startswith("semcache."):  # only semcache's own tasks are ever sent from here
            flash(f"Dead letter {letter_id[:8]}… names an unknown task; not replayed.", "error")
            continue
        label = f"replay {letter.task} ({letter_id[:8]}…)"
        replayed += len(replay_dead_letters(
            st.redis, st.settings, lambda name, kwargs: send(name, kwargs, tenant=letter.tenant, kind="replay",
                                                             label=label), ids=[letter_id]))
    flash(f"Replayed {replayed} dead letter{'s' if replayed != 1 else ''}; outcomes are listed under Recent actions.",
          "ok" if replayed else "error")
    return redirect(url_for("deadletters.index"))


@bp.post("/discard")
def discard_selected():
    st = state()
    removed = sum(remove_dead_letter(st.redis, st.settings, i) for i in _ids())
    flash(f"Discarded {removed} dead letter{'s' if removed != 1 else ''}.", "ok" if removed else "error")
    return redirect(url_for("deadletters.index"))


# --- used by the admin JSON API ----------------------------------------------------------------------------------
def list_json(offset: int = 0, limit: int = 100) -> dict[str, Any]:
    st = state()
    letters = list_dead_letters(st.redis, st.settings, offset=offset, limit=limit)
    return {"total": count_dead_letters(st.redis, st.settings),
            "items": [letter.model_dump(mode="json") for letter in letters]}


def replay(letter_id: str, *, by: str) -> str:
    """Replay one dead letter for an admin API key; returns the new task id. 404 when it does not exist."""
    st = state()
    letter = get_dead_letter(st.redis, st.settings, letter_id) if _ID.fullmatch(letter_id) else None
    if letter is None:
        raise ApiError(404, "not found")
    done = replay_dead_letters(
        st.redis, st.settings,
        lambda name, kwargs: send_task(st.celery, st.redis, st.settings, name, kwargs, owner=by, tenant=letter.tenant,
                                       kind="replay", label=f"replay {letter.task} ({letter_id[:8]}…)"),
        ids=[letter_id])  # fmt: skip
    if not done:
        raise ApiError(404, "not found")  # another admin replayed it a moment ago
    return done[0]["task_id"]
