"""Login and logout of the admin UI, and the guard every UI blueprint installs.

A user logs in with the admin user and password (``SEMCACHE_ADMIN_USER`` and the werkzeug hash in
``SEMCACHE_ADMIN_PASSWORD_HASH``) or with the admin token (``SEMCACHE_ADMIN_TOKEN``). Failed attempts are counted
per client address in Redis; past ``SEMCACHE_LOGIN_ATTEMPTS_PER_15MIN`` the login form answers 429 for a while.
"""

from __future__ import annotations

import secrets
import time
from urllib.parse import urlsplit

import redis
from flask import Blueprint, flash, redirect, render_template, request, session, url_for

from .errors import ApiError
from .security import check_csrf, check_login, csrf_token
from .state import state

__all__ = ["bp", "guard", "current_user"]

bp = Blueprint("auth", __name__)


def current_user() -> str:
    return session.get("user") or ""


def guard(blueprint: Blueprint) -> None:
    """Make every view of ``blueprint`` need a logged-in user and a valid CSRF token on POST."""

    @blueprint.before_request
    def _login_and_csrf():
        if not session.get("user"):
            if request.method == "GET":
                return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
            raise ApiError(401, "log in first")
        check_csrf()
        return None


def _safe_next(target: str | None) -> str:
    """Only same-site paths: a ``next`` of ``//evil.example`` or ``https://...`` goes to the overview instead."""
    if not target or not target.startswith("/") or target.startswith("//") or urlsplit(target).netloc:
        return url_for("overview.index")
    return target


def _failures_key() -> str:
    return state().settings.key(f"loginfail:{request.remote_addr or 'unknown'}")


def _too_many() -> bool:
    try:
        count = state().redis.get(_failures_key())
    except redis.RedisError:
        return False  # a login must not depend on the counter; the password check still applies
    return int(count or 0) >= state().settings.login_attempts_per_15min


def _count_failure() -> None:
    try:
        pipe = state().redis.pipeline(transaction=False)
        pipe.incr(_failures_key())
        pipe.expire(_failures_key(), 15 * 60)
        pipe.execute()
    except redis.RedisError:
        pass


@bp.route("/login", methods=["GET", "POST"])
def login():
    settings = state().settings
    methods = {"password": bool(settings.admin_password_hash), "token": bool(settings.admin_token)}
    next_url = _safe_next(request.values.get("next"))
    if request.method == "GET":
        csrf_token()
        return render_template("login.html", methods=methods, next=next_url, error=None)
    check_csrf()
    if _too_many():
        return render_template("login.html", methods=methods, next=next_url,
                               error="Too many failed attempts from this address; try again in 15 minutes."), 429
    user = check_login(settings, username=request.form.get("username", ""), password=request.form.get("password", ""),
                       token=request.form.get("token", ""))
    if user is None:
        _count_failure()
        time.sleep(0.2)  # a little friction for guessers; the counter does the real limiting
        return render_template("login.html", methods=methods, next=next_url,
                               error="Wrong credentials."), 401
    session.clear()  # a new session (and a new CSRF token) on every login: no session fixation
    session.permanent = True
    session["user"] = user
    session["login_at"] = time.time()
    session["sid"] = secrets.token_hex(16)  # names this login's server-side state (its recent actions)
    csrf_token()
    flash(f"Signed in as {user}.", "ok")
    return redirect(next_url)


@bp.post("/logout")
def logout():
    check_csrf()
    session.clear()
    flash("Signed out.", "ok")
    return redirect(url_for("auth.login"))
