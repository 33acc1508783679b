"""The errors semcache raises, in one small hierarchy.

::

    SemcacheError                 base class; ``retryable`` says whether trying again can help
    ├── ConfigError               settings or environment are wrong (what to change is in the message)
    ├── InvalidInput              a prompt, scope, command or argument failed validation (never retried)
    ├── BackendUnavailable        Redis is down, slow or refused the command (retryable)
    ├── IndexMismatch             the live index does not match the schema this code expects
    ├── EmbeddingError            the embedding model failed or returned something unusable
    └── NotFound                  an entry, task or key that does not exist (or is not yours)

Context is keyword-only so call sites stay readable: ``raise InvalidInput("too long", field="prompt")``.
Redis errors are wrapped at the boundary with ``raise BackendUnavailable(...) from exc``.
"""

from __future__ import annotations

__all__ = [
    "SemcacheError",
    "ConfigError",
    "InvalidInput",
    "BackendUnavailable",
    "IndexMismatch",
    "EmbeddingError",
    "NotFound",
]


class SemcacheError(Exception):
    """Base class of every error semcache raises on purpose."""

    retryable: bool = False
    code: str = "error"

    def __init__(self, message: str, *, field: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.hint = hint

    def __str__(self) -> str:
        text = self.message
        if self.field:
            text = f"{self.field}: {text}"
        if self.hint:
            text = f"{text} ({self.hint})"
        return text


class ConfigError(SemcacheError):
    code = "config_error"


class InvalidInput(SemcacheError):
    code = "invalid_input"


class BackendUnavailable(SemcacheError):
    retryable = True
    code = "backend_unavailable"


class IndexMismatch(SemcacheError):
    code = "index_mismatch"


class EmbeddingError(SemcacheError):
    code = "embedding_error"


class NotFound(SemcacheError):
    code = "not_found"
