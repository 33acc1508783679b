"""The server-side record of UI logins, so that a session can end before its signed cookie expires.

Flask's session is a signed cookie: on its own, a copy keeps working until it expires, whatever the user does.
Each login therefore records its session id in the Redis hash ``<index>:uisessions`` together with a fingerprint
of the credential it used, and every UI request checks both (issue 15):

* logout deletes the record, so copies of the cookie stop working at once;
* a rotated admin token or password hash changes the fingerprint, so every session made with the old one ends
  (a rotated ``SEMCACHE_SECRET_KEY`` already ends them: their signatures no longer match).

The hash has no TTL, like the API keys: under a ``volatile-*`` policy Redis never evicts it (an evicted record
would only log someone out, but a TTL'd key would be evicted before cache entries are). Records older than
``SEMCACHE_SESSION_HOURS`` are dropped at the next login. When Redis cannot be read, the check raises and the
request answers 503: a session that cannot be checked is not let in (fail closed).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import redis

from cache_core.connection import text
from cache_core.settings import Settings

__all__ = ["credential_fingerprint", "record_login", "end_session", "session_is_live"]


def _store(settings: Settings) -> str:
    return settings.key("uisessions")


def credential_fingerprint(settings: Settings, secret: str, user: str) -> str:
    """An HMAC (keyed with the app's session secret) of the credential ``user`` logged in with; "" when that
    credential is no longer configured. Only the fingerprint is stored, never the credential."""
    credential = settings.admin_token if user == "token" else settings.admin_password_hash
    if not credential:
        return ""
    return hmac.new(secret.encode(), f"{user}\0{credential}".encode(), hashlib.sha256).hexdigest()


def record_login(client: redis.Redis, settings: Settings, secret: str, *, sid: str, user: str) -> None:
    """Record a new login (and drop the records of sessions that expired). Raises ``redis.RedisError``."""
    now = time.time()
    lifetime = settings.session_hours * 3600
    stale = []
    for field, raw in client.hgetall(_store(settings)).items():
        record = _load(raw)
        if record is None or now - float(record.get("at", 0)) > lifetime:
            stale.append(field)
    pipe = client.pipeline(transaction=False)
    if stale:
        pipe.hdel(_store(settings), *stale)
    pipe.hset(_store(settings), sid, json.dumps({"user": user, "at": now,
                                                  "cred": credential_fingerprint(settings, secret, user)}))
    pipe.execute()


def end_session(client: redis.Redis, settings: Settings, sid: str) -> None:
    """Forget a session (logout): every copy of its cookie stops working. Raises ``redis.RedisError``."""
    client.hdel(_store(settings), sid)


def _load(raw: Any) -> dict[str, Any] | None:
    try:
        record = json.loads(text(raw))
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def session_is_live(client: redis.Redis, settings: Settings, secret: str, *, sid: str, user: str) -> bool:
    """Whether a session's login is still recorded, for this user, with the credential configured now, and
    younger than ``SEMCACHE_SESSION_HOURS``. Raises ``redis.RedisError`` (the caller answers 503)."""
    if not sid or not user:
        return False
    record = _load(client.hget(_store(settings), sid) or b"null")
    if record is None or record.get("user") != user:
        return False
    if time.time() - float(record.get("at", 0)) > settings.session_hours * 3600:
        return False
    expected = credential_fingerprint(settings, secret, user)
    return bool(expected) and hmac.compare_digest(str(record.get("cred", "")), expected)
