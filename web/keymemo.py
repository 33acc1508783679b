"""API keys verified recently by any endpoint of any server process, so lookups keep answering while Redis is down.

A lookup cannot check a key without Redis. For a key that some endpoint of some gunicorn worker verified within
``SEMCACHE_PROXY_KEY_GRACE_S`` it answers a degraded miss instead of a 503, which gives nothing away: a miss holds no
entry. A per-process memory was not enough (issue 15): a key checked by ``POST /entries`` in one process, or by a
lookup in another one, got 503 from every process that had not seen it itself.

So the record is shared through the data directory (``<data_dir>/verified-keys``, mode 0700), one small file per
key, named by a digest of the presented key and holding the key's record (id, tenant, admin; no secret) and when
it was last verified. The file name is a SHA-256 of the whole key, so the directory gives no key away (as the
Redis hash of hashes, see :mod:`cache_core.apikeys`). A check that says "unknown" (revoked, wrong) deletes the
file at once; a file older than the grace is ignored and deleted. It is bounded: past :data:`MAX_KEYS` files the
stale ones, then the oldest, are deleted. Any filesystem error makes the record forget, never fail a request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

from pydantic import ValidationError

from cache_core.apikeys import ApiKey

__all__ = ["SharedKeyMemo", "shared_memo", "MAX_KEYS"]

log = logging.getLogger(__name__)

MAX_KEYS = 10_000


class SharedKeyMemo:
    """``remember``/``recall``/``forget`` of verified keys, shared by every process using the same directory."""

    def __init__(self, directory: Path, grace_s: float) -> None:
        self.directory = Path(directory)
        self.grace_s = grace_s
        # a key used on every request is rewritten at most this often (its file's age is its last check)
        self.refresh_s = min(max(grace_s / 10, 0.5), 30.0)
        self._written: dict[str, float] = {}
        self._lock = threading.Lock()
        self._warned = False

    @staticmethod
    def _digest(presented: str) -> str:
        return hashlib.sha256(b"semcache-verified-key\0" + presented.encode("utf-8", "replace")).hexdigest()

    def _path(self, presented: str) -> Path:
        return self.directory / self._digest(presented)

    def _io_failed(self, exc: OSError) -> None:
        if not self._warned:  # once per process: the grace then works only where Redis answers
            self._warned = True
            log.warning("verified-keys record in %s unusable (%s): lookups need Redis to check keys", self.directory,
                        exc)

    def remember(self, presented: str, key: ApiKey) -> None:
        if self.grace_s <= 0:
            return
        digest = self._digest(presented)
        now = time.time()
        with self._lock:
            if now - self._written.get(digest, 0.0) < self.refresh_s:
                return
            self._written[digest] = now
            if len(self._written) > MAX_KEYS:
                self._written.clear()
        path = self.directory / digest
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            new = not path.exists()
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
            with os.fdopen(fd, "w") as handle:
                json.dump({"key": key.model_dump(mode="json"), "at": now}, handle)
            os.replace(tmp, path)  # atomic: a reader sees the old record or the new one, never half
            if new:
                self._bound(now)
        except OSError as exc:
            self._io_failed(exc)

    def _bound(self, now: float) -> None:
        entries = [e for e in os.scandir(self.directory) if e.is_file() and not e.name.startswith(".")]
        if len(entries) <= MAX_KEYS:
            return
        by_age = sorted(entries, key=lambda e: e.stat().st_mtime)
        excess = len(entries) - MAX_KEYS
        for entry in by_age:
            if excess <= 0 and now - entry.stat().st_mtime < self.grace_s:
                break
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass
            excess -= 1

    def forget(self, presented: str) -> None:
        digest = self._digest(presented)
        with self._lock:
            self._written.pop(digest, None)
        try:
            os.unlink(self.directory / digest)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._io_failed(exc)

    def recall(self, presented: str) -> ApiKey | None:
        """The record of a key verified within the grace, by any process, else None."""
        if self.grace_s <= 0:
            return None
        path = self._path(presented)
        try:
            data = json.loads(path.read_text())
            at = float(data["at"])
            key = ApiKey.model_validate(data["key"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, ValidationError):
            return None  # a damaged record is no record
        if not 0 <= time.time() - at <= self.grace_s:
            self.forget(presented)
            return None
        return key


def shared_memo(settings) -> SharedKeyMemo:  # noqa: ANN001 - cache_core.settings.Settings
    """The record of the deployment these settings describe (its data directory)."""
    return SharedKeyMemo(Path(settings.data_dir) / "verified-keys", settings.proxy_key_grace_s)
