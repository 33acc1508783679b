"""Login and logout of the admin UI, and the guard every UI blueprint installs.

A user logs in with the admin user and password (``SEMCACHE_ADMIN_USER`` and the werkzeug hash in
``SEMCACHE_ADMIN_PASSWORD_HASH``) or with the admin token (``SEMCACHE_ADMIN_TOKEN``). Failed attempts are counted in
Redis per client address (behind ``SEMCACHE_TRUSTED_PROXIES`` proxies: the forwarded one) and per account (the
admin user, the token); past ``SEMCACHE_LOGIN_ATTEMPTS_PER_15MIN`` for the address or
``SEMCACHE_LOGIN_ACCOUNT_ATTEMPTS_PER_15MIN`` for the account the login form answers 429 for a while. When the
counters cannot be read the login is refused (503): a limit that fails open is no limit (issue 15).

Every login is recorded server-side (:mod:`web.sessions`), and the guard checks the record on every request, so
logout and a rotated credential end copies of the session cookie.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from urllib.parse import urlsplit

import redis
from flask import Blueprint, current_app, flash, redirect, render_template, request, session, url_for

from cache_core.counters import count_in_window, read_in_window

from .errors import ApiError
from .security import check_csrf, check_login, client_address, csrf_token
from .sessions import end_session, record_login, session_is_live
from .state import state

__all__ = ["bp", "guard", "current_user"]

bp = Blueprint("auth", __name__)


def current_user() -> str:
    return session.get("user") or ""


def guard(blueprint: Blueprint) -> None:
    """Make every view of ``blueprint`` need a logged-in user and a valid CSRF token on POST."""

    @blueprint.before_request
    def _login_and_csrf():
        if session.get("user") and not _live():
            session.clear()  # logged out elsewhere, or the credential was rotated: this cookie is dead
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


def _live() -> bool:
    """Whether this session's login is still recorded (a Redis failure raises: the request answers 503)."""
    st = state()
    return session_is_live(st.redis, st.settings, current_app.secret_key, sid=session.get("sid", ""),
                           user=session.get("user", ""))


def _account() -> str:
    """Which account a login attempt is for: the token, or the user name given with a password."""
    if request.form.get("token"):
        return "token"
    return "user:" + hashlib.sha256(request.form.get("username", "").encode("utf-8", "replace")).hexdigest()[:32]


_WINDOW_S = 15 * 60


def _failure_counters() -> tuple[tuple[str, str], tuple[str, str]]:
    """(hash, subject) of the address's and the account's counters: TTL-less hashes (cache_core.counters), so a
    volatile-* eviction cannot end a lockout (issue 15)."""
    s = state().settings
    return (s.key("loginfail"), client_address(s)), (s.key("loginfail-account"), _account())


def _too_many() -> str | None:
    """Why this attempt is refused ("address", "account"), or None. Raises ``redis.RedisError``: fail closed."""
    s = state().settings
    by_address, by_account = (read_in_window(state().redis, key, [subject], _WINDOW_S)[0]
                              for key, subject in _failure_counters())
    if int(by_address or 0) >= s.login_attempts_per_15min:
        return "address"
    if int(by_account or 0) >= s.login_account_attempts_per_15min:
        return "account"
    return None


def _count_failure() -> None:
    try:
        for key, subject in _failure_counters():
            count_in_window(state().redis, key, subject, _WINDOW_S)
    except redis.RedisError:
        pass  # the next attempt reads the counters first, and is refused if Redis is still away


@bp.route("/login", methods=["GET", "POST"])
def login():
    settings = state().settings
    methods = {"password": bool(settings.admin_password_hash), "token": bool(settings.admin_token)}
    next_url = _safe_next(request.values.get("next"))
    if request.method == "GET":
        csrf_token()
        return render_template("login.html", methods=methods, next=next_url, error=None)
    check_csrf()
    try:
        refused = _too_many()
    except redis.RedisError:
        return render_template("login.html", methods=methods, next=next_url,
                               error="Logins are unavailable: the attempt counter cannot be read (Redis is "
                                     "unavailable); try again shortly."), 503
    if refused:
        which = "from this address" if refused == "address" else "for this account"
        return render_template("login.html", methods=methods, next=next_url,
                               error=f"Too many failed attempts {which}; try again in 15 minutes."), 429
    user = check_login(settings, username=request.form.get("username", ""), password=request.form.get("password", ""),
                       token=request.form.get("token", ""))
    if user is None:
        _count_failure()
        time.sleep(0.2)  # a little friction for guessers; the counter does the real limiting
        return render_template("login.html", methods=methods, next=next_url,
                               error="Wrong credentials."), 401
    sid = secrets.token_hex(16)  # names this login's server-side state (its record, its recent actions)
    try:
        record_login(state().redis, settings, current_app.secret_key, sid=sid, user=user)
    except redis.RedisError:
        return render_template("login.html", methods=methods, next=next_url,
                               error="Logins are unavailable: Redis is unavailable; try again shortly."), 503
    session.clear()  # a new session (and a new CSRF token) on every login: no session fixation
    session.permanent = True
    session["user"] = user
    session["login_at"] = time.time()
    session["sid"] = sid
    csrf_token()
    flash(f"Signed in as {user}.", "ok")
    return redirect(next_url)


@bp.post("/logout")
def logout():
    check_csrf()
    if session.get("sid"):
        st = state()
        end_session(st.redis, st.settings, session["sid"])  # copies of the cookie end too; Redis down: 503
    session.clear()
    flash("Signed out.", "ok")
    return redirect(url_for("auth.login"))
