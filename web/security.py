"""The UI's protections: the session secret, CSRF tokens, the login check and the security headers.

* The session is Flask's signed cookie: ``HttpOnly``, ``SameSite=Lax``, ``Secure`` unless
  ``SEMCACHE_COOKIE_SECURE=false``, and it expires after ``SEMCACHE_SESSION_HOURS``.
* Every form carries a per-session CSRF token, checked on every state-changing request of the UI (the API uses bearer
  keys, not cookies, so a forged cross-site request carries no credential there).
* Every response carries a strict Content-Security-Policy: scripts, styles and images only from this origin, no
  inline script, no frames. Cached responses are untrusted HTML; templates autoescape them, and the policy is the
  second wall.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from flask import Flask, Response, abort, request, session
from werkzeug.security import check_password_hash

from cache_core.settings import Settings

__all__ = [
    "secret_key",
    "csrf_token",
    "check_csrf",
    "check_login",
    "client_address",
    "add_security_headers",
    "CSP",
]

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def secret_key(settings: Settings) -> str:
    """``SEMCACHE_SECRET_KEY``, or a random key generated once and kept (mode 0600) in the data directory, so
    sessions survive restarts and every server worker signs with the same key."""
    if settings.secret_key:
        return settings.secret_key
    path = Path(settings.data_dir) / "web-secret-key"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        value = path.read_text().strip()
        if len(value) >= 32:
            return value
        raise RuntimeError(f"{path} is too short to be a session secret; delete it to have a new one made") from None
    with os.fdopen(fd, "w") as handle:
        value = secrets.token_urlsafe(48)
        handle.write(value)
    return value


def csrf_token() -> str:
    """This session's CSRF token (made on first use)."""
    token = session.get("csrf")
    if not token:
        token = session["csrf"] = secrets.token_urlsafe(32)
    return token


def check_csrf() -> None:
    """Abort 400 unless a state-changing request carries this session's CSRF token."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    sent = request.form.get("csrf_token") or request.headers.get("X-CSRF-Token") or ""
    expected = session.get("csrf") or ""
    if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
        abort(400, description="the form expired or did not come from this site (CSRF check failed); reload "
                               "the page and try again")


def client_address(settings: Settings) -> str:
    """The client's address: the peer's, or with ``SEMCACHE_TRUSTED_PROXIES=N`` the N-th value from the right of
    ``X-Forwarded-For`` (werkzeug ProxyFix's ``x_for``: each trusted proxy appends the address it saw, so values
    further left are the client's own text and never trusted). Behind a TLS proxy the peer is always the proxy, so
    without this every client would share one login limit (issue 15)."""
    peer = request.remote_addr or "unknown"
    hops = settings.trusted_proxies
    forwarded = request.headers.get("X-Forwarded-For", "")
    if hops <= 0 or not forwarded:
        return peer
    values = [v.strip() for v in forwarded.split(",")]
    if len(values) < hops:
        return peer
    value = values[-hops]
    # an address, never free text, in a Redis key name
    return value[:64] if value and all(c in "0123456789abcdefABCDEF.:[]" for c in value) else peer


def check_login(settings: Settings, *, username: str = "", password: str = "", token: str = "") -> str | None:
    """The user name a credential logs in as (the admin user for a password, ``token`` for the admin token), or
    None. Every comparison is constant-time."""
    if token and settings.admin_token:
        if hmac.compare_digest(token.encode(), settings.admin_token.encode()):
            return "token"
        return None
    if password and settings.admin_password_hash:
        user_ok = hmac.compare_digest(username.encode(), settings.admin_user.encode())
        try:
            password_ok = check_password_hash(settings.admin_password_hash, password)
        except (ValueError, TypeError):
            password_ok = False
        return settings.admin_user if (user_ok and password_ok) else None
    return None


def add_security_headers(app: Flask) -> None:
    @app.after_request
    def _headers(response: Response) -> Response:
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
        if not request.path.startswith("/static/"):  # pages and answers show entries: never kept by caches
            response.headers.setdefault("Cache-Control", "no-store")
        return response
