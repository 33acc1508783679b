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
    embedded_maxmemory: str = Field(
        "auto", description="maxmemory of the embedded server (for example 2gb); auto: a quarter of the machine's "
        "memory (or of its cgroup limit); 0: no cap.",
    )
    embedded_maxmemory_policy: str = Field(
        "volatile-lfu", description="Eviction policy; volatile-* only evicts keys with a TTL (cache entries)."
    )

    # --- model and matching --------------------------------------------------------------------------------
    model: str = Field("", description="sentence-transformers model name or path. Empty: packaged all-MiniLM-L6-v2.")
    embedding_backend: Literal["torch", "onnx"] = Field(
        "onnx", description="How the model runs: onnx (exported once into data_dir/models, about 2.5x faster per "
        "prompt, same vectors) or torch (sentence-transformers on PyTorch).",
    )
    embedding_cache_size: int = Field(4096, ge=0, description="Prompts whose embeddings are kept in process (LRU).")
    min_similarity: float = Field(
        0.90, ge=-1.0, le=1.0,
        description="The main knob, cosine similarity in [-1, 1] (per call/scope too). threshold policy: what the "
        "nearest entry needs. consensus policy: what it needs when its neighbours neither agree nor compete; "
        "agreeing neighbours (same answer group) lower it, a competing group raises it (docs/quality.md).",
    )
    knn_k: int = Field(8, ge=1, le=100, description="Nearest approved entries fetched by the one FT.SEARCH "
                       "(the consensus policy's neighbourhood).")
    policy: Literal["threshold", "consensus"] = Field(
        "consensus", description="Match policy of the read path: consensus (neighbours vote with their answer "
        "group) or threshold (nearest entry against one number, the peers' rule)."
    )
    hnsw_m: int = Field(16, ge=2, le=512, description="HNSW M of the vector index.")
    hnsw_ef_construction: int = Field(200, ge=1, le=4096, description="HNSW EF_CONSTRUCTION.")
    hnsw_ef_runtime: int = Field(20, ge=1, le=4096, description="HNSW EF_RUNTIME.")
    hybrid_batches_min: int = Field(
        2000, ge=0, description="Scopes with at least this many entries are searched by walking the HNSW graph "
        "(HYBRID_POLICY BATCHES) instead of brute force over the scope; 0: always let RediSearch choose.")
    vector_type: Literal["FLOAT32", "FLOAT16"] = Field(
        "FLOAT16", description="Vector type inside the index. FLOAT16 (the default since issue 6) saves about "
        "0.8 KB per entry at the same search time and quality; an index built with the other type is refused "
        "until `semcache index migrate` rebuilds it.",
    )

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

    # --- match quality: consensus policy, feedback (issue 5; docs/quality.md) ----------------------------------
    consensus_floor: float = Field(
        0.3, ge=-1.0, lt=1.0, description="consensus policy: neighbours less similar than this are no evidence; a "
        "neighbour's weight rises linearly from 0 here to 1 at similarity 1.",
    )
    consensus_support: float = Field(
        1.0, ge=0.0, le=100.0, description="consensus policy: how much agreeing neighbours (same answer group as "
        "the nearest entry) widen the allowed distance 1 - min_similarity (x (1 + support * weight)).",
    )
    consensus_conflict: float = Field(
        1.0, ge=0.0, le=100.0, description="consensus policy: how much a competing answer group (two or more "
        "neighbours sharing another answer) narrows it (/ (1 + conflict * weight)).",
    )
    consensus_min_agree: int = Field(
        5, ge=0, le=100, description="consensus policy: the allowed distance widens only when at least this many "
        "other neighbours share the nearest entry's answer group (fewer is no evidence).",
    )
    consensus_compete_range: float = Field(
        0.2, ge=0.0, le=2.0, description="consensus policy: a competing neighbour counts fully when as similar as "
        "the served entry and not at all when this much less similar (0: by its weight alone).",
    )
    consensus_judged_conflict: float = Field(
        0.5, ge=0.0, le=1.0, description="consensus policy: the share of the conflict weight a competing group gets "
        "when a judge formed it (id j:...): two judged groups may be one answer a judge split.",
    )
    # --- judge-verified answer groups, formed by the worker (docs/quality.md "Free-text answers") ----------------
    judge: Literal["off", "llm", "cross-encoder", "embedding"] = Field(
        "off", description="Who decides, off the request path, whether a gray-zone neighbour's answer also "
        "answers a new entry's prompt (yes: the entry joins the neighbour's answer group): off, llm (an "
        "OpenAI-compatible chat endpoint), cross-encoder (a sentence-transformers CrossEncoder) or embedding "
        "(response vectors; measured weak).",
    )
    judge_min_similarity: float = Field(
        0.4, ge=-1.0, le=1.0, description="Neighbours at least this similar to a new entry's prompt are asked about "
        "(the gray zone below the serving threshold).",
    )
    judge_max_groups: int = Field(
        2, ge=0, le=8, description="At most this many distinct neighbouring answer groups are asked about per new "
        "entry (nearest first; the first yes wins).",
    )
    judge_url: str | None = Field(
        None, description="judge=llm: OpenAI-compatible base URL the judge posts <url>/chat/completions to. Unset: "
        "SEMCACHE_UPSTREAM_URL (the proxy's upstream).",
    )
    judge_api_key: str | None = Field(None, description="judge=llm: bearer key of the judge. Unset: "
                                      "SEMCACHE_UPSTREAM_API_KEY.")
    judge_model: str = Field("", max_length=200, description="judge=llm: the chat model asked (required with llm).")
    judge_timeout_ms: int = Field(
        10_000, ge=1, le=600_000, description="judge=llm: how long one question may take (connect, send, wait for "
        "the answer, each) before it counts as no verdict.",
    )
    judge_budget_per_minute: int = Field(
        600, ge=1, le=1_000_000, description="judge=llm: questions per minute, shared by every worker process (a "
        "Redis counter); beyond it an entry keeps its own group without asking.",
    )
    judge_concurrency: int = Field(
        4, ge=1, le=64, description="judge=llm: questions one worker process asks at once while writing a batch.",
    )
    judge_cross_encoder_model: str = Field(
        "", max_length=1000, description="judge=cross-encoder: a sentence-transformers CrossEncoder (one score per "
        "pair) by name or path, loaded offline (required with cross-encoder).",
    )
    judge_cross_encoder_threshold: float = Field(
        0.5, ge=-1000.0, le=1000.0, description="judge=cross-encoder: a score above this is a yes. Scores are what "
        "CrossEncoder.predict returns with the model's own activation: a probability in [0, 1] for the usual "
        "one-label model (sigmoid), a logit for a model saved with an identity activation.",
    )
    judge_embedding_threshold: float = Field(
        0.9, ge=-1.0, le=1.0, description="judge=embedding: cosine similarity of the two answers' embeddings at or "
        "above which they count as the same answer (measured weak, see docs/quality.md).",
    )
    feedback_window_s: int = Field(
        3600, ge=0, le=30 * 24 * 3600, description="How long after a hit its lookup_id can be rated (the read path "
        "logs hits this long, off the hot path); 0: no log, no feedback.",
    )
    feedback_margin: float = Field(
        0.01, ge=0.0, le=1.0, description="A wrong-answer report at similarity s makes the entry require s + this.",
    )
    feedback_demote_after: int = Field(
        3, ge=0, le=1000, description="Wrong-answer reports (outnumbering correct ones) that move an entry to "
        "review; a wrong report on an exact hit demotes at once; 0: never demote.",
    )

    # --- admin UI and HTTP API (issue 4) -------------------------------------------------------------------
    admin_user: str = Field("admin", min_length=1, max_length=200,
                            description="User name of the UI login (with SEMCACHE_ADMIN_PASSWORD_HASH).")
    cookie_secure: bool = Field(True, description="Session cookie only over HTTPS (browsers also accept it on "
                                "http://127.0.0.1 and localhost); false for plain http elsewhere.")
    session_hours: float = Field(12.0, gt=0, le=24 * 30, description="How long a UI login lasts.")
    login_attempts_per_15min: int = Field(20, ge=1, description="Failed UI logins allowed per client address.")
    login_account_attempts_per_15min: int = Field(
        100, ge=1, description="Failed UI logins allowed per account (the admin user, the admin token) from all "
        "addresses together; past it that account's login answers 429 for up to 15 minutes.",
    )
    trusted_proxies: int = Field(
        0, ge=0, le=10, description="Reverse proxies in front of semcache that append the client address to "
        "X-Forwarded-For (werkzeug ProxyFix x_for); 0: the header is ignored and the peer address is the client.",
    )

    # --- writer worker: retries, dead letters, enqueueing, safety pipeline (issue 3) ------------------------
    retry_backoff_s: float = Field(1.0, gt=0, le=3600, description="First retry delay; doubles each retry (+jitter).")
    retry_backoff_max_s: float = Field(60.0, gt=0, le=3600, description="Longest delay between two retries.")
    broker_visibility_timeout_s: int = Field(
        0, ge=0, description="Seconds before an unacknowledged task is redelivered (after a worker crash). "
        "0: 2 x (task time limit + longest retry delay). Must exceed task time limit + longest retry delay.",
    )
    deadletter_maxlen: int = Field(10_000, ge=10, description="Dead letters kept (the oldest are dropped).")
    deadletter_max_bytes: int = Field(
        64 * 1024 * 1024, ge=64 * 1024, description="Bytes of JSON all dead letters may take (the oldest are dropped "
        "first); one letter keeps its arguments only if they fit in 1/16 of this.",
    )
    deadletter_ttl_s: int = Field(
        14 * 24 * 3600, ge=60, description="Age after which a dead letter is dropped (on the next store or read).",
    )
    task_result_ttl_s: int = Field(
        3600, ge=60, le=7 * 24 * 3600, description="How long a task's result (and its state for GET "
        "/api/v1/tasks/<id>) is kept.",
    )
    worker_model_threads: int = Field(
        0, ge=0, le=256, description="Threads of the model in each worker process; 0: (cores - 1) / processes."
    )
    # 128, not 32: the worker embeds a task's prompts in length buckets, and a bigger task fills them better
    # (1.2x more prompts per CPU second; docs/performance.md, "Writes"). Only a burst of misses fills a batch.
    enqueue_batch_size: int = Field(128, ge=1, le=1000, description="Writes the read path sends in one task.")
    enqueue_linger_ms: int = Field(5, ge=0, le=10_000, description="How long the write queue waits to fill a batch.")
    enqueue_max_pending: int = Field(10_000, ge=1, description="Writes waiting to be sent before new ones are dropped.")
    safety_policy_file: Path | None = Field(
        None, description="JSON file of safety rules: defaults and per-tenant blocklists/regexes/actions "
        "(see docs/worker.md).",
    )
    safety_pii: Literal["hold", "drop", "off"] = Field(
        "hold", description="PII (e-mail, phone, card, IBAN, national id) in prompt or response."
    )
    safety_personal: Literal["drop", "hold", "short_ttl", "off"] = Field(
        "drop", description="Personal prompts ('my order', 'my account', ...): not cacheable by default."
    )
    safety_time_sensitive: Literal["drop", "hold", "short_ttl", "off"] = Field(
        "short_ttl", description="Time-sensitive prompts ('today', 'current price', ...)."
    )
    safety_short_ttl_seconds: int = Field(3600, ge=1, description="TTL of entries whose action is short_ttl.")
    safety_refusals: Literal["drop", "hold", "off"] = Field("drop", description="Refusals ('I can't help with').")
    safety_caller_flags_drop: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["no_cache", "moderation:blocked"],
        description="Comma-separated caller flags that drop the write.",
    )
    safety_caller_flags_hold: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["moderation:flagged", "review"],
        description="Comma-separated caller flags that hold the entry for review.",
    )

    safety_extra_checks: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated `module:factory` of extra safety checks (factory(settings)).",
    )

    # --- OpenAI-compatible proxy and /metrics (issue 8; docs/proxy.md). upstream_url, upstream_api_key and
    # proxy_max_temperature are above, with the web settings. ----------------------------------------------------
    upstream_timeout_s: float = Field(
        120.0, gt=0, le=3600, description="How long the proxy waits for the upstream's answer (and, when streaming, "
        "for each next chunk) before answering 504.",
    )
    upstream_connect_timeout_s: float = Field(
        5.0, gt=0, le=600, description="How long the proxy tries to connect to the upstream before answering 502.",
    )
    proxy_key_grace_s: int = Field(
        300, ge=0, le=86_400, description="While Redis is down, the proxy still accepts an API key it verified this "
        "recently (its misses are forwarded); 0: every request needs Redis to check its key.",
    )
    proxy_max_streams_per_key: int = Field(
        8, ge=0, le=100_000, description="Streamed proxy requests one API key may have open at once in each web "
        "process (each holds a server thread for the whole answer); past it 429 too_many_streams; 0: no cap.",
    )
    proxy_max_pending_writes: int = Field(
        1000, ge=1, le=1_000_000, description="Write-backs of proxy misses a web process keeps waiting for the "
        "broker; beyond that new ones are dropped (and counted), the answers are not delayed.",
    )
    proxy_coalesce: bool = Field(
        True, description="Concurrent identical non-streamed misses (same prompt and scope) in one web process make "
        "one upstream call; the others wait for it and relay its answer (X-Semcache-Coalesced: 1).",
    )
    metrics_token: str | None = Field(
        None, description="Bearer token that GET /metrics requires; unset: /metrics is open (deployment-wide "
        "counters only: no tenant names, prompts or answers).",
    )

    # --- memory per entry: how $.embedding is stored (issue 6; docs/performance.md "Memory per entry") ---------
    embedding_storage: Literal["float32", "int16", "int8"] = Field(
        "int8", description="How each document stores its embedding ($.embedding): int8 (integers in -127..127 "
        "scaled per vector; similarities move by at most 0.002), int16 (scaled to +-32767) or float32 (JSON floats). "
        "Measured per entry: 11.0 / 12.5 / 17.2 KB with the FLOAT16 index, RedisVL 5.0 KB. Cosine ignores the "
        "scale, so all three search alike; documents of every kind mix in one index (no migration needed).",
    )
    json_fpha: Literal["off", "FP32", "FP16", "BF16"] = Field(
        "off", description="Redis 8.8+ only: write $.embedding with JSON.SET ... FPHA <type> (a packed float array, "
        "2-4 bytes per element). Refused at startup when the server's JSON module does not support it.",
    )

    # --- embedding precision: int8-quantized ONNX model, opt-in (issue 6; docs/performance.md "Writes") ---------
    embedding_precision: Literal["fp32", "int8"] = Field(
        "fp32", description="Precision of the embedding model, onnx backend only: fp32 or int8 (a dynamically "
        "quantized copy of the ONNX export, made once beside it and refused if its vectors agree with fp32's below "
        "a mean cosine of 0.98): 2.5-2.8x more prompts per CPU second, mean cosine 0.997 to fp32 on CLINC150. Other "
        "vectors: an index built at one precision is refused at the other until `semcache index migrate --reembed`.",
    )

    @field_validator("safety_caller_flags_drop", "safety_caller_flags_hold", "safety_extra_checks", mode="before")
    @classmethod
    def _split_flags(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

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
