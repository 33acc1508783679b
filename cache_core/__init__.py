"""semcache's core: settings, schema, the embedded Redis, the index and the read path.

``worker`` and ``web`` build on this package; it imports neither.
"""

from .cache import Answer, Generated, SemanticCache
from .errors import (
    BackendUnavailable,
    ConfigError,
    EmbeddingError,
    IndexMismatch,
    InvalidInput,
    NotFound,
    SemcacheError,
)
from .schema import CacheEntry, EntryView, LookupResult, Scope, Status, WriteCommand
from .settings import Settings
from .writequeue import NullWriteQueue, SyncWriteQueue, WriteQueue

__all__ = [
    "Answer",
    "BackendUnavailable",
    "CacheEntry",
    "ConfigError",
    "EmbeddingError",
    "EntryView",
    "Generated",
    "IndexMismatch",
    "InvalidInput",
    "LookupResult",
    "NotFound",
    "NullWriteQueue",
    "Scope",
    "SemanticCache",
    "SemcacheError",
    "Settings",
    "Status",
    "SyncWriteQueue",
    "WriteCommand",
    "WriteQueue",
]

__version__ = "0.1.0"
