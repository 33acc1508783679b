"""Per-scope calibration: fit the match policy's main knob on labeled data for a target wrong-hit rate, and store it
where the read path reads it.

The record is a JSON object in the Redis hash ``<index>:calibration``, under the field ``"*"`` (every scope) or
``"t:" + tag_token(tenant)`` (one tenant; it overrides ``"*"`` key by key). The read path fetches both fields in
the same pipelined round trip as its exact-match check, so a new calibration takes effect on the next lookup, with
no restart and no extra round trip. Keys it understands: ``policy``, ``min_similarity``, ``k`` and the consensus
knobs ``consensus_floor``, ``consensus_support``, ``consensus_conflict``, ``consensus_min_agree``,
``consensus_compete_range``; the ``fitted`` block records how the
values were obtained.

Fitting runs the evaluation (:mod:`cache_core.evaluation`) on the labeled CSV through the real stack, with the
policy's other parameters as configured, and keeps the loosest knob whose measured wrong rate is at most the target
(the most hits within it). Stream data: a coarse sweep, then a finer one below the chosen value. Pairs data: one
lookup pass serves any number of knob values, so the sweep is fine from the start.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import redis
from pydantic import BaseModel, Field

from .connection import text
from .errors import BackendUnavailable, InvalidInput
from .evaluation import OperatingPoint, best_at, evaluate, read_dataset
from .schema import tag_token
from .settings import Settings

__all__ = ["CalibrationResult", "fit", "field_for", "store_calibration", "read_calibration", "clear_calibration",
           "COARSE_KNOBS"]

COARSE_KNOBS = (0.70, 0.74, 0.78, 0.82, 0.86, 0.90, 0.94, 0.97, 0.99)
FINE_PAIR_KNOBS = tuple(round(0.50 + 0.005 * i, 3) for i in range(100))


class CalibrationResult(BaseModel):
    """What :func:`fit` found: the record to store and the operating point it was measured at."""

    policy: str
    target_wrong_rate: float
    met: bool = Field(description="Some knob reached the target; if not, the strictest knob tried is used.")
    record: dict[str, Any]
    point: OperatingPoint
    curve: list[OperatingPoint]
    protocol: str
    rows: int
    data: str
    stored_fields: list[str] = Field(default_factory=list)


def field_for(tenant: str | None) -> str:
    """The hash field of a scope: ``"*"`` for every tenant, ``"t:<tag token>"`` for one."""
    return "*" if tenant is None else "t:" + tag_token(tenant)


def fit(settings: Settings, data: str | Path, target_wrong_rate: float, *, protocol: str | None = None,
        seed: int = 42, limit: int | None = None, splits: Iterable[str] | None = None, workers: int = 2,
        progress: bool = True, embedder: Any = None, coarse: Sequence[float] = COARSE_KNOBS,
        oos_label: str = "oos") -> CalibrationResult:
    """Fit ``settings.policy``'s ``min_similarity`` for ``target_wrong_rate`` on a labeled CSV."""
    if not 0.0 < target_wrong_rate < 1.0:
        raise InvalidInput("must be between 0 and 1 (for example 0.01 for 1% wrong hits)", field="target_wrong_rate")
    kind = read_dataset(data, protocol, splits=splits, max_chars=settings.max_prompt_chars).protocol  # fail early
    if embedder is None:
        from .embedder import load_embedder

        embedder = load_embedder(settings.model, backend=settings.embedding_backend, cache_size=0,
                                 precision=settings.embedding_precision)
    common = dict(protocol=kind, seed=seed, limit=limit, splits=splits, baseline_knobs=None, workers=workers,
                  progress=progress, embedder=embedder, oos_label=oos_label)
    if kind == "pairs":
        report = evaluate(settings, data, knobs=FINE_PAIR_KNOBS, **common)
        curve = report.curve
    else:
        report = evaluate(settings, data, knobs=coarse, **common)
        curve = list(report.curve)
        chosen = best_at(curve, target_wrong_rate)
        if chosen is not None:
            looser = [k for k in coarse if k < chosen.knob]
            low = max(looser) if looser else chosen.knob - 0.04
            fine = [round(chosen.knob - 0.01 * i, 2) for i in range(1, 5)]
            fine = [k for k in fine if k > low + 1e-9 and k not in coarse]
            if fine:
                curve += evaluate(settings, data, knobs=fine, **common).curve
    curve.sort(key=lambda p: p.knob)
    point = best_at(curve, target_wrong_rate)
    met = point is not None
    if point is None:
        point = max(curve, key=lambda p: p.knob)
    record: dict[str, Any] = {"policy": settings.policy, "min_similarity": point.knob, "k": settings.knn_k}
    if settings.policy == "consensus":
        record.update(consensus_floor=settings.consensus_floor, consensus_support=settings.consensus_support,
                      consensus_conflict=settings.consensus_conflict,
                      consensus_min_agree=settings.consensus_min_agree,
                      consensus_compete_range=settings.consensus_compete_range)
    record["fitted"] = {
        "target_wrong_rate": target_wrong_rate, "met": met, "hit_rate": point.hit_rate,
        "wrong_rate": point.wrong_rate, "hits": point.hits, "queries": point.queries, "protocol": kind,
        "data": Path(data).name, "seed": seed, "model": report.model, "at": time.time(),
        **({"precision": point.precision, "recall": point.recall} if point.precision is not None else {}),
    }  # fmt: skip
    return CalibrationResult(policy=settings.policy, target_wrong_rate=target_wrong_rate, met=met, record=record,
                             point=point, curve=curve, protocol=kind, rows=report.rows, data=str(data))


def store_calibration(client: redis.Redis, settings: Settings, record: dict[str, Any],
                      tenants: Sequence[str] | None = None) -> list[str]:
    """Store a record for each tenant (or for every scope, ``"*"``). Returns the hash fields written."""
    fields = [field_for(t) for t in tenants] if tenants else ["*"]
    payload = json.dumps(record)
    try:
        client.hset(settings.key("calibration"), mapping={f: payload for f in fields})
    except redis.RedisError as exc:
        raise BackendUnavailable(f"could not store the calibration: {exc}") from exc
    return fields


def read_calibration(client: redis.Redis, settings: Settings, tenant: str | None = None) -> dict[str, Any] | None:
    """The stored record of one scope (None when there is none)."""
    raw = client.hget(settings.key("calibration"), field_for(tenant))
    if not raw:
        return None
    try:
        return json.loads(text(raw))
    except ValueError:
        return None


def clear_calibration(client: redis.Redis, settings: Settings, tenants: Sequence[str] | None = None) -> int:
    """Remove the records of these tenants (or the global one). Returns how many were removed."""
    fields = [field_for(t) for t in tenants] if tenants else ["*"]
    return int(client.hdel(settings.key("calibration"), *fields))
