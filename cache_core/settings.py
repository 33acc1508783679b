"""Settings: one object, read from ``SEMCACHE_*`` environment variables at the edge and passed explicitly.

Nothing in semcache reads the environment on its own; the CLI, the Celery app factory and the Flask app factory
each receive a :class:`Settings`. Tests build one with ``Settings(index="t1", ...)``.

>>> Settings(index="demo").key_prefix
'demo:entry:'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["Settings", "default_data_dir"]

_NAME = r"^[A-Za-z][A-Za-z0-9_-]{0,47}$"


def default_data_dir() -> Path:
    """Per-user data directory: ``$XDG_DATA_HOME/semcache`` or ``~/.local/share/semcache``."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "semcache"


class Settings(BaseSettings):
    """Every knob of semcache. The environment variable is ``SEMCACHE_`` + the field name in upper case."""

    model_config = SettingsConfigDict(env_prefix="SEMCACHE_", extra="ignore", frozen=True)

    # --- Redis ---------------------------------------------------------------------------------------------
    redis_url: str | None = Field(
        None, description="Redis with Search and JSON (redis:8, Redis Stack). Unset: start the embedded server."
    )
    broker_url: str | None = Field(
        None, description="Celery broker and result backend. Unset: logical database 1 of the cache's Redis."
    )
    data_dir: Path = Field(default_factory=default_data_dir, description="Where the embedded server keeps its files.")
    index: str = Field("semcache", pattern=_NAME, description="Index name; also the root of every key prefix.")
    redis_timeout_ms: int = Field(
        50, ge=1, le=60_000, description="Socket timeout of the read path; a slower Redis is a miss."
    )
    redis_write_timeout_ms: int = Field(5_000, ge=1, le=600_000, description="Socket timeout of writers and admin.")
    breaker_cooldown_ms: int = Field(
        1_000, ge=0, le=600_000, description="After a Redis failure, lookups skip Redis (miss at once) this long."
    )
    embedded_port: int = Field(0, ge=0, le=65535, description="Port of the embedded server; 0 picks a free one.")
    embedded_appendonly: bool = Field(True, description="Append-only persistence of the embedded server.")
    embedded_maxmemory: str = Field("0", description="maxmemory of the embedded server (for example 2gb); 0 = none.")
    embedded_maxmemory_policy: str = Field(
        "volatile-lfu", description="Eviction policy; volatile-* only evicts keys with a TTL (cache entries)."
    )

    # --- model and matching --------------------------------------------------------------------------------
    model: str = Field("", description="sentence-transformers model name or path. Empty: packaged all-MiniLM-L6-v2.")
    embedding_backend: Literal["torch", "onnx"] = Field("torch", description="sentence-transformers backend.")
    embedding_cache_size: int = Field(4096, ge=0, description="Prompts whose embeddings are kept in process (LRU).")
    min_similarity: float = Field(
        0.90, ge=-1.0, le=1.0, description="Cosine similarity in [-1, 1] a semantic hit needs (per call/scope too)."
    )
    knn_k: int = Field(5, ge=1, le=100, description="Nearest approved entries fetched by the one FT.SEARCH.")
    policy: Literal["threshold"] = Field("threshold", description="Match policy of the read path.")
    hnsw_m: int = Field(16, ge=2, le=512, description="HNSW M of the vector index.")
    hnsw_ef_construction: int = Field(200, ge=1, le=4096, description="HNSW EF_CONSTRUCTION.")
    hnsw_ef_runtime: int = Field(20, ge=1, le=4096, description="HNSW EF_RUNTIME.")
    vector_type: Literal["FLOAT32", "FLOAT16"] = Field("FLOAT32", description="Vector type inside the index.")

    # --- entries -------------------------------------------------------------------------------------------
    ttl_seconds: int = Field(7 * 24 * 3600, ge=1, le=10 * 365 * 24 * 3600, description="Default entry TTL.")
    max_prompt_chars: int = Field(8_000, ge=1, description="Longest prompt accepted.")
    max_response_chars: int = Field(100_000, ge=1, description="Longest response accepted.")
    max_scope_value_chars: int = Field(128, ge=1, le=1024, description="Longest tenant/locale/model/extra value.")
    extra_scope_fields: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated extra scope tag fields (for example: region,plan)."
    )
    strict: bool = Field(False, description="Raise on Redis failures instead of degrading to a miss.")

    # --- worker --------------------------------------------------------------------------------------------
    worker_concurrency: int = Field(2, ge=1, le=64, description="Celery worker processes per `semcache worker`.")
    task_time_limit_s: int = Field(300, ge=1, description="Hard time limit of one task.")
    max_retries: int = Field(8, ge=0, le=100, description="Retries of a task on transient errors.")
    enqueue_timeout_ms: int = Field(200, ge=1, description="How long a caller may wait to enqueue a write.")
    audit_maxlen: int = Field(100_000, ge=100, description="Approximate length cap of the audit stream.")
    purge_batch_size: int = Field(500, ge=1, le=10_000, description="Entries deleted per purge batch.")

    # --- web -----------------------------------------------------------------------------------------------
    secret_key: str | None = Field(None, description="Flask session secret; unset: generated and kept in data_dir.")
    admin_password_hash: str | None = Field(None, description="werkzeug hash of the admin password.")
    admin_token: str | None = Field(None, description="Admin token (plain; compared in constant time).")
    rate_limit_per_minute: int = Field(6000, ge=1, description="Requests per API key per minute.")
    max_request_bytes: int = Field(1_000_000, ge=1024, description="Largest HTTP request body.")
    price_per_1k_input_tokens: float = Field(0.0025, ge=0, description="Money saved per 1k prompt tokens.")
    price_per_1k_output_tokens: float = Field(0.01, ge=0, description="Money saved per 1k completion tokens.")
    upstream_url: str | None = Field(None, description="OpenAI-compatible upstream the proxy forwards misses to.")
    upstream_api_key: str | None = Field(None, description="Bearer key for the upstream.")
    proxy_max_temperature: float = Field(0.0, ge=0, description="Requests hotter than this bypass the cache.")

    @field_validator("extra_scope_fields", mode="before")
    @classmethod
    def _split_fields(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("extra_scope_fields")
    @classmethod
    def _check_fields(cls, value: list[str]) -> list[str]:
        import re

        reserved = {"tenant", "locale", "model", "status", "flags", "group", "prompt_hash"}
        for name in value:
            if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", name) or name in reserved:
                raise ValueError(f"extra scope field {name!r} must match [a-z][a-z0-9_]* and not be one of {reserved}")
        if len(set(value)) != len(value):
            raise ValueError("extra scope fields repeat a name")
        return value

    # --- derived names: every key semcache writes starts with the index name -------------------------------
    @property
    def key_prefix(self) -> str:
        return f"{self.index}:entry:"

    def key(self, suffix: str) -> str:
        """A non-entry key of this deployment, for example ``settings.key("audit")``."""
        return f"{self.index}:{suffix}"
