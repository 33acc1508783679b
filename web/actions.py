"""What the UI sent to the worker and how it went: the "recent actions" panel and its polling endpoint.

Every UI action is a task; the last ones of each login session are kept in Redis (``<index>:uiactions:<session>``,
expiring with the session: a bulk approval of a whole page would not fit in a cookie), the pages show their states,
and ``static/app.js`` polls ``/ui/tasks/<id>`` until each one is done, so a moderator sees every outcome.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import redis
from flask import Blueprint, jsonify, session

from .auth import current_user, guard
from .dispatch import send_task, task_record, task_status
from .errors import ApiError
from .state import state

__all__ = ["bp", "send", "recent", "describe"]

bp = Blueprint("ui_tasks", __name__, url_prefix="/ui/tasks")
guard(bp)

_KEEP = 100


def _actions_key() -> str:
    sid = session.get("sid")
    if not sid:
        sid = session["sid"] = secrets.token_hex(16)
    return state().settings.key(f"uiactions:{sid}")


def send(name: str, kwargs: dict[str, Any], *, tenant: str | None, kind: str, label: str, entry: str = "") -> str:
    """Send a task for the logged-in user and remember it in the session's recent actions (with the entry it acts
    on, so the review page can mark that entry as decided once the task is done)."""
    st = state()
    task_id = send_task(st.celery, st.redis, st.settings, name, kwargs, owner=f"ui:{current_user()}", tenant=tenant,
                        kind=kind, label=label)
    record = {"id": task_id, "label": label[:200], "kind": kind, "at": time.time(), "entry": entry}
    key = _actions_key()
    try:
        pipe = st.redis.pipeline(transaction=False)
        pipe.lpush(key, json.dumps(record, ensure_ascii=False))
        pipe.ltrim(key, 0, _KEEP - 1)
        pipe.expire(key, int(st.settings.session_hours * 3600))
        pipe.execute()
    except redis.RedisError:
        pass  # the task is sent; only the panel misses it
    return task_id


def describe(status: dict[str, Any]) -> str:
    """A short human sentence for a task's state and result."""
    state_ = status["state"]
    if state_ == "success":
        result = status.get("result")
        if isinstance(result, dict):
            if "found" in result and ("demoted" in result or "error" in result) and "changed" not in result:
                return _feedback_text(result)
            if "deleted" in result:
                return f"done: {result['deleted']} deleted"
            if "changed" in result:
                return f"done: {result['status'].replace('_', ' ')}" if result["changed"] else \
                    "done: nothing changed (the entry is gone)"
            if "decision" in result:
                return f"done: {result['decision']} ({result.get('outcome', '')})"
        return "done"
    if state_ == "failure":
        return f"failed: {str(status.get('error', ''))[:200]}"
    if state_ == "retry":
        return "retrying"
    if "progress" in status:
        p = status["progress"]
        return f"running: {p['done']} of {p['total']}"
    return "running" if state_ == "started" else "queued"


def _feedback_text(result: dict[str, Any]) -> str:
    """What a ``semcache.feedback`` task did: "done: marked wrong; 3 wrong reports (0 correct), demoted to review"."""
    if not result.get("found"):
        return "done: nothing recorded (the entry is gone)"
    counts = result.get("state") or {}
    wrong, right = int(counts.get("wrong", 0) or 0), int(counts.get("correct", 0) or 0)
    tally = f"{wrong} wrong report{'' if wrong == 1 else 's'} ({right} correct)"
    if result.get("duplicate"):
        return f"done: already rated; {tally}"
    verb = "marked right" if result.get("correct") else "marked wrong"
    status = result.get("status", "")
    if result.get("demoted"):
        outcome = "demoted to review"
    elif status == "pending_review":
        outcome = "already in review"
    elif status == "rejected":
        outcome = "rejected, not served"
    else:
        outcome = "still served"
    return f"done: {verb}; {tally}, {outcome}"


def recent(limit: int = 10) -> list[dict[str, Any]]:
    """The session's recent actions with their current states."""
    st = state()
    out = []
    try:
        actions = [json.loads(raw) for raw in st.redis.lrange(_actions_key(), 0, limit - 1)]
    except (redis.RedisError, ValueError):
        actions = []
    for action in actions:
        try:
            status = task_status(st.celery, action["id"])
        except Exception:  # noqa: BLE001 - the panel must render even if the backend hiccups
            status = {"task_id": action["id"], "state": "pending"}
        out.append({**action, **status, "text": describe(status)})
    return out


@bp.get("/<task_id>")
def poll(task_id: str):
    st = state()
    record = task_record(st.redis, st.settings, task_id)
    if record is None or not str(record.get("owner", "")).startswith("ui:"):
        raise ApiError(404, "not found")
    status = task_status(st.celery, task_id)
    return jsonify({**status, "text": describe(status), "label": record.get("label", "")})
