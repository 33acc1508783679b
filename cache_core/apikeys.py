"""API keys of the HTTP API: created once, stored only as hashes, bound to one tenant or to the admin role.

A key looks like ``sc_<id>_<secret>``: ``id`` (12 hex characters) names the key in listings and logs, ``secret``
(43 url-safe characters, 256 bits) is never stored. The hash ``<index>:apikeys`` maps each id to a JSON record
holding ``sha256(id:secret)`` and the key's tenant; it has no TTL, and a ``volatile-*`` eviction policy never
evicts it. A plain SHA-256 is enough for random 256-bit secrets (slow hashes protect guessable passwords, not
these); the comparison is constant-time, and an unknown id costs the same comparison as a known one.

>>> parse_key("sc_0123456789ab_" + "s" * 43)
('0123456789ab', 'sssssssssssssssssssssssssssssssssssssssssss')
>>> parse_key("Bearer nonsense") is None
True
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .connection import text
from .errors import BackendUnavailable, InvalidInput
from .settings import Settings

__all__ = ["ApiKey", "create_key", "verify_key", "list_keys", "revoke_key", "parse_key", "KEY_PATTERN"]

KEY_PATTERN = re.compile(r"^sc_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_DUMMY_HASH = hashlib.sha256(b"semcache:no-such-key").hexdigest()


class ApiKey(BaseModel):
    """What is stored about a key (never the key itself)."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(..., pattern=r"^[0-9a-f]{12}$")
    tenant: str | None = Field(None, min_length=1, max_length=1024)
    admin: bool = False
    name: str = Field("", max_length=200)
    created_at: float
    hash: str = Field("", repr=False, exclude=True)

    @model_validator(mode="after")
    def _tenant_or_admin(self) -> "ApiKey":
        # issue 15: a stored record with neither (by hand, or by an older version) was read as "no tenant bound",
        # which the API takes for "every tenant"; such a record is invalid, so the key is refused (401)
        if self.admin == (self.tenant is not None):
            raise ValueError("a key is either bound to one tenant or an admin key")
        return self

    @property
    def label(self) -> str:
        """Who acted, for audit records: ``key:<id>``."""
        return f"key:{self.id}"


def _digest(key_id: str, secret: str) -> str:
    return hashlib.sha256(f"{key_id}:{secret}".encode()).hexdigest()


def parse_key(presented: str) -> tuple[str, str] | None:
    """``(id, secret)`` of a well-formed key, else None."""
    match = KEY_PATTERN.match(presented.strip()) if isinstance(presented, str) else None
    return (match.group(1), match.group(2)) if match else None


def _store(settings: Settings) -> str:
    return settings.key("apikeys")


def create_key(client: redis.Redis, settings: Settings, *, tenant: str | None = None, admin: bool = False,
               name: str = "") -> tuple[str, ApiKey]:
    """Create a key; return ``(the key, its record)``. The key itself is returned once and never stored.

    A key is either bound to ``tenant`` or, with ``admin=True``, acts on every tenant.
    """
    if admin == (tenant is not None):
        raise InvalidInput("give either a tenant or admin=True (an admin key acts on every tenant)", field="tenant")
    if tenant is not None and (not tenant or len(tenant) > settings.max_scope_value_chars):
        raise InvalidInput(f"tenant must be 1 to {settings.max_scope_value_chars} characters", field="tenant")
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    record = ApiKey(id=key_id, tenant=tenant, admin=admin, name=name, created_at=time.time(),
                    hash=_digest(key_id, secret))
    stored = {**record.model_dump(mode="json"), "hash": record.hash}
    try:
        if not client.hsetnx(_store(settings), key_id, json.dumps(stored, ensure_ascii=False)):
            return create_key(client, settings, tenant=tenant, admin=admin, name=name)  # 48-bit id collision
    except redis.RedisError as exc:
        raise BackendUnavailable(f"cannot store the API key: {exc}") from exc
    return f"sc_{key_id}_{secret}", record


def _load(raw: object) -> ApiKey | None:
    try:
        data = json.loads(text(raw))
        return ApiKey.model_validate(data).model_copy(update={"hash": str(data.get("hash", ""))})
    except (ValueError, ValidationError):
        return None


def verify_key(client: redis.Redis, settings: Settings, presented: str) -> ApiKey | None:
    """The record of a valid, unrevoked key, else None. Raises :class:`BackendUnavailable` if Redis fails."""
    parsed = parse_key(presented)
    if parsed is None:
        return None
    key_id, secret = parsed
    try:
        raw = client.hget(_store(settings), key_id)
    except redis.RedisError as exc:
        raise BackendUnavailable(f"cannot read API keys: {exc}") from exc
    record = _load(raw) if raw else None
    expected = record.hash if record else _DUMMY_HASH
    ok = hmac.compare_digest(_digest(key_id, secret), expected)
    return record if (ok and record is not None) else None


def list_keys(client: redis.Redis, settings: Settings) -> list[ApiKey]:
    """Every key's record, oldest first (no secrets: they were never stored)."""
    records = [_load(raw) for raw in client.hgetall(_store(settings)).values()]
    return sorted((r for r in records if r is not None), key=lambda r: r.created_at)


def revoke_key(client: redis.Redis, settings: Settings, key_id: str) -> bool:
    """Delete a key's record; its key stops working at once. False when there was no such key."""
    return bool(client.hdel(_store(settings), key_id))
