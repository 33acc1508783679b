"""``GET /metrics``: the deployment's counters in the Prometheus text format (version 0.0.4).

Everything is read from Redis at scrape time, never from the memory of the process that answers: the cumulative
counters of :func:`cache_core.stats.read_cumulative` (every replica's lookups, every worker's write decisions),
the broker's queue, the dead letters and the entries per status. So any web replica, scraped at any moment, reports
the same totals, and a restart resets nothing. When Redis does not answer, the scrape still succeeds with
``semcache_redis_up 0`` and nothing else from Redis.

With ``SEMCACHE_METRICS_TOKEN`` set, a scrape must send ``Authorization: Bearer <token>``; unset, /metrics is open:
it shows deployment-wide counts only (no tenant names, prompts or answers).
"""

from __future__ import annotations

import hmac
import logging
import math
from typing import Iterable

import redis
from flask import Blueprint, Response, current_app, request

from cache_core import browse
from cache_core.celeryconf import unacked_keys
from cache_core.connection import make_client
from cache_core.deadletters import count_dead_letters
from cache_core.errors import BackendUnavailable
from cache_core.stats import LATENCY_BUCKETS_MS, read_cumulative

from .state import WebState, state

__all__ = ["bp", "collect", "render", "CONTENT_TYPE"]

log = logging.getLogger(__name__)

bp = Blueprint("metrics", __name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_OUTCOMES = (("hit", "exact"), ("hit", "semantic"), ("miss", "none"), ("degraded", "none"))
_DECISIONS = ("approve", "hold", "drop", "invalid")
_PROXY = ("hit", "miss", "coalesced", "bypass", "upstream_error", "not_cacheable")
_WRITEBACKS = ("sent", "failed", "dropped")
_TIMERS = (("total", "semcache_lookup_duration_seconds", "Time of a whole lookup (exact check, embedding, search)."),
           ("embed", "semcache_embed_duration_seconds", "Time to embed a prompt, for the lookups that embedded one."),
           ("search", "semcache_search_duration_seconds", "Time spent in Redis (exact check and KNN) per lookup."))


class Family:
    """One metric family: its name, type, help and samples ``(suffix, labels, value)``."""

    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name, self.kind, self.help = name, kind, help_text
        self.samples: list[tuple[str, dict[str, str], float]] = []

    def add(self, value: float, suffix: str = "", **labels: str) -> "Family":
        self.samples.append((suffix, labels, value))
        return self


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def render(families: Iterable[Family]) -> str:
    """The text exposition format: ``# HELP``, ``# TYPE``, then the samples of each family."""
    lines = []
    for family in families:
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for suffix, labels, value in family.samples:
            label_text = ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in labels.items())
            lines.append(f"{family.name}{suffix}{{{label_text}}} {_number(value)}" if label_text
                         else f"{family.name}{suffix} {_number(value)}")
    return "\n".join(lines) + "\n"


def _histogram(name: str, help_text: str, totals: dict[str, float], timer: str) -> Family:
    """A histogram in seconds from the per-bucket counts in milliseconds (``<timer>_le_<ms>``)."""
    family = Family(name, "histogram", help_text)
    running = 0.0
    for edge in LATENCY_BUCKETS_MS:
        running += totals.get(f"{timer}_le_{edge:g}", 0.0)
        family.add(running, "_bucket", le=repr(edge / 1000))
    running += totals.get(f"{timer}_le_inf", 0.0)
    family.add(running, "_bucket", le="+Inf")
    family.add(totals.get(f"{timer}_ms_sum", 0.0) / 1000, "_sum")
    family.add(running, "_count")  # the buckets are the observations: count and +Inf agree even mid-flush
    return family


def _judge_families(totals: dict[str, float]) -> list[Family]:
    """The judge's counters (issue 14), as the worker adds them (``judge_<verdict>`` and friends, worker/judging.py)."""
    calls = Family("semcache_judge_calls_total", "counter",
                   "Questions the worker's judge answered: yes (agrees: the new entry joins the neighbour's group), "
                   "no, or none (no verdict: timeout, error, unparseable reply).")
    for verdict in ("yes", "no", "none"):
        calls.add(totals.get(f"judge_{verdict}", 0.0), verdict=verdict)
    return [
        calls,
        Family("semcache_judge_skipped_total", "counter",
               "Questions not asked: the judge's per-minute budget was spent (or its counter unreadable).")
        .add(totals.get("judge_skipped", 0.0)),
        Family("semcache_judge_joins_total", "counter", "New entries that joined a neighbour's answer group.")
        .add(totals.get("judge_joined", 0.0)),
        Family("semcache_judge_tokens_total", "counter", "Tokens the llm judge's calls used (from their usage).")
        .add(totals.get("judge_prompt_tokens", 0.0), kind="prompt")
        .add(totals.get("judge_completion_tokens", 0.0), kind="completion"),
    ]


def _queue_depth(st: WebState) -> dict[str, float] | None:
    """Messages waiting in the broker's task queue and messages delivered but not yet acknowledged (Redis brokers)."""
    url = st.handle.broker_url
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None
    queue = st.celery.conf.task_default_queue or "celery"
    # kombu's Redis transport keeps one list per priority step: "<queue>" and "<queue>\x06\x16<priority>"
    names = [queue] + [f"{queue}\x06\x16{p}" for p in (1, 2, 3, 4, 5, 6, 7, 8, 9)]
    broker = current_app.extensions.get("semcache_metrics_broker")
    if broker is None:
        broker = make_client(url, timeout_ms=min(st.settings.redis_write_timeout_ms, 2000), max_connections=4)
        current_app.extensions["semcache_metrics_broker"] = broker
    pipe = broker.pipeline(transaction=False)
    for name in names:
        pipe.llen(name)
    pipe.hlen(unacked_keys(st.settings)["unacked_key"])  # this deployment's own (issue 15)
    replies = pipe.execute()
    return {"waiting": float(sum(replies[:-1])), "unacked": float(replies[-1])}


def collect(st: WebState) -> list[Family]:
    """Every family, read from Redis now."""
    s = st.settings
    up = Family("semcache_redis_up", "gauge", "1 when Redis answered this scrape, else 0 (and nothing else is shown).")
    try:
        totals = read_cumulative(st.redis, s)
    except redis.RedisError as exc:
        log.warning("/metrics: Redis did not answer: %s", exc)
        return [up.add(0)]
    families = [up.add(1)]

    lookups = Family("semcache_lookups_total", "counter",
                     "Lookups by outcome (hit, miss, degraded: Redis failed) and strategy (exact, semantic, none).")
    for outcome, strategy in _OUTCOMES:
        lookups.add(totals.get(f"lookups:{outcome}:{strategy}", 0.0), outcome=outcome, strategy=strategy)
    families.append(lookups)
    for timer, name, help_text in _TIMERS:
        families.append(_histogram(name, help_text, totals, timer))

    writes = Family("semcache_writes_total", "counter",
                    "Writes the worker handled, by the safety pipeline's decision (approve, hold for review, drop) "
                    "or invalid.")
    for decision in _DECISIONS:
        writes.add(totals.get(f"write_{decision}", 0.0), decision=decision)
    families.append(writes)

    families.extend(_judge_families(totals))

    saved_in, saved_out = totals.get("saved_prompt_tokens", 0.0), totals.get("saved_completion_tokens", 0.0)
    families.append(Family("semcache_saved_tokens_total", "counter",
                           "Tokens the cache's hits did not spend upstream (from the entries' usage metadata).")
                    .add(saved_in, kind="prompt").add(saved_out, kind="completion"))
    saved_cost = saved_in / 1000 * s.price_per_1k_input_tokens + saved_out / 1000 * s.price_per_1k_output_tokens
    families.append(Family("semcache_saved_cost_total", "counter",
                           "Money the hits saved, at SEMCACHE_PRICE_PER_1K_INPUT_TOKENS and ..._OUTPUT_TOKENS.")
                    .add(saved_cost))

    proxy = Family("semcache_proxy_requests_total", "counter",
                   "Chat completions through the OpenAI-compatible proxy, by result.")
    for result in _PROXY:
        proxy.add(totals.get(f"proxy_{result}", 0.0), result=result)
    families.append(proxy)
    writebacks = Family("semcache_proxy_writebacks_total", "counter",
                        "Proxy misses handed to the worker (sent), lost to a broker failure, or dropped (too many "
                        "waiting).")
    for result in _WRITEBACKS:
        writebacks.add(totals.get(f"proxy_writeback_{result}", 0.0), result=result)
    families.append(writebacks)

    try:
        families.append(Family("semcache_dead_letters", "gauge", "Tasks that failed for good, kept for replay.")
                        .add(count_dead_letters(st.redis, s)))
    except (redis.RedisError, BackendUnavailable) as exc:
        log.warning("/metrics: dead letters not counted: %s", exc)
    try:
        counts = browse.count_by_status(st.redis, s)
        entries = Family("semcache_entries", "gauge", "Cache entries by status (pending_review: the review queue).")
        for status_name, count in counts.items():
            entries.add(count, status=status_name)
        families.append(entries)
    except (redis.RedisError, BackendUnavailable) as exc:
        log.warning("/metrics: entries not counted: %s", exc)
    try:
        depth = _queue_depth(st)
    except redis.RedisError as exc:
        log.warning("/metrics: broker queue not measured: %s", exc)
        depth = None
    if depth is not None:
        families.append(Family("semcache_queue_depth", "gauge", "Tasks waiting in the broker for a worker.")
                        .add(depth["waiting"]))
        families.append(Family("semcache_queue_unacked", "gauge",
                               "Tasks a worker took and has not acknowledged yet (running or reserved).")
                        .add(depth["unacked"]))
    return families


def _authorized() -> bool:
    token = state().settings.metrics_token
    if not token:
        return True
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), token.encode())


@bp.get("/metrics")
def metrics() -> Response:
    if not _authorized():
        return Response("send Authorization: Bearer <SEMCACHE_METRICS_TOKEN>\n", status=401, mimetype="text/plain",
                        headers={"WWW-Authenticate": 'Bearer realm="semcache-metrics"'})
    body = render(collect(state()))
    return Response(body, mimetype=None, content_type=CONTENT_TYPE, headers={"Cache-Control": "no-store"})
