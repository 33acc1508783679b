"""Quality evaluation on labeled data, through the real stack: how many hits, how many of them wrong.

Two protocols, for two CSV formats (the protocol is read from the header unless given):

- **stream** (``text,intent[,response][,split]``): all rows, shuffled with the seed, are looked up one by one in
  one scope with :meth:`SemanticCache.lookup`; a miss stores the query (synchronously, with
  :func:`cache_core.store.write_command`, so the stream is deterministic). What a miss stores as the answer is the
  *answers* protocol: ``label`` stores the row's intent (the short-answer case: classification, routing; entries
  with the same intent share an answer group because their answers are the same text), ``response`` stores the
  row's own free-text ``response`` (the chat case: no two answers are the same text, so groups come only from a
  judge). Before a miss is written, the write path's judge step (:func:`cache_core.grouping.judged_groups`, the
  worker's own function) may put it into a gray-zone neighbour's group; ``--judge simulated:FA,FR`` answers from
  the labels and errs on purpose (:class:`SimulatedJudge`). A hit is *wrong* when the served entry's intent
  differs from the query's, or the query's intent is the out-of-scope label (``oos``).
  ``hit_rate = hits / queries``, ``wrong_rate = wrong hits / hits``.
- **pairs** (``q1,q2,is_duplicate[,split]``): every distinct ``q1`` is stored (its own text as its answer, so each
  is alone in its answer group), every ``q2`` is looked up; a hit is correct only on the pair's own ``q1`` and only
  when the pair is a duplicate. Precision, recall and F1 per knob; ``hit_rate`` and ``wrong_rate`` as above.

Each curve sweeps the policy's main knob (``min_similarity``). The *baseline* curve is the peers' method, nearest
neighbour against one global threshold (:class:`~cache_core.policy.ThresholdPolicy`), run in the same process on
the same data. Every stream operating point is one *lane*: a fresh index in a private embedded Redis, streamed from
an empty cache; lanes run in a few threads. All rows are embedded once, in batches, and the vectors are reused by
every lane (and kept on disk in ``<data_dir>/eval-cache`` for the next run).
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import random
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np
import redis
from pydantic import BaseModel, Field

from .cache import SemanticCache
from .connection import make_client
from .embedded import EmbeddedRedis
from .embedder import Embedder
from .errors import InvalidInput
from .index import drop_index
from .policy import ConsensusParams, make_policy
from .schema import Scope, WriteCommand, entry_id
from .settings import Settings
from .grouping import judged_groups
from .judge import JUDGE_NAMES, JudgeRequest, JudgeVerdict
from .store import answer_group, build_entry, write_command, write_entries

__all__ = [
    "DEFAULT_KNOBS",
    "StreamRow",
    "PairRow",
    "Dataset",
    "OperatingPoint",
    "EvalReport",
    "read_dataset",
    "detect_protocol",
    "embed_rows",
    "PrecomputedEmbedder",
    "EvalEnvironment",
    "run_stream",
    "run_pairs",
    "evaluate",
    "best_at",
    "bundled_dataset",
    "SimulatedJudge",
    "parse_judge_spec",
    "ANSWERS",
]

log = logging.getLogger(__name__)

Protocol = Literal["stream", "pairs"]
Answers = Literal["label", "response"]
ANSWERS = ("label", "response")

# Both curves sweep the same knob values (0.70 to 0.99, denser where the operating points of interest lie).
DEFAULT_KNOBS = (0.70, 0.75, 0.80, 0.83, 0.85, 0.87, 0.90, 0.92, 0.95, 0.97, 0.99)
TARGETS = (0.005, 0.01, 0.02)
_STREAM_COLUMNS = ("text", "intent")
_PAIRS_COLUMNS = ("q1", "q2", "is_duplicate")
_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no"}


def bundled_dataset() -> Path:
    """CLINC150 as shipped with semcache (CC BY 3.0, see ``semcache/data/ATTRIBUTION.md``)."""
    return Path(__file__).resolve().parent.parent / "semcache" / "data" / "clinc150.csv"


# --- data ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamRow:
    text: str
    intent: str
    split: str = ""
    response: str = ""


@dataclass(frozen=True)
class PairRow:
    q1: str
    q2: str
    duplicate: bool
    split: str = ""


@dataclass
class Dataset:
    protocol: Protocol
    path: str
    rows: list[Any]
    has_responses: bool = False

    def texts(self) -> list[str]:
        if self.protocol == "stream":
            return [r.text for r in self.rows]
        return [t for r in self.rows for t in (r.q1, r.q2)]


def detect_protocol(header: Sequence[str]) -> Protocol:
    """``stream`` for ``text,intent[,split]``, ``pairs`` for ``q1,q2,is_duplicate[,split]`` (extra columns ok)."""
    names = {h.strip().lower() for h in header}
    if set(_STREAM_COLUMNS) <= names:
        return "stream"
    if set(_PAIRS_COLUMNS) <= names:
        return "pairs"
    raise InvalidInput(
        f"the header {','.join(header)[:200]!r} is neither text,intent[,split] (stream protocol) "
        "nor q1,q2,is_duplicate[,split] (pairs protocol)", field="data",
    )


def read_dataset(path: str | Path, protocol: Protocol | None = None, *, splits: Iterable[str] | None = None,
                 max_chars: int = 8_000) -> Dataset:
    """Read and validate a labeled CSV (UTF-8, header row). Every problem is an :class:`InvalidInput` naming the
    file and line. ``splits`` keeps only rows whose ``split`` is one of them."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror or exc}", field="data") from exc
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{path} is not UTF-8 (byte {exc.start})", field="data") from exc
    if "\x00" in content:
        raise InvalidInput(f"{path} contains NUL bytes: not a CSV file", field="data")
    reader = csv.reader(io.StringIO(content, newline=""), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise InvalidInput(f"{path} is empty: expected a header row", field="data") from None
    except csv.Error as exc:
        raise InvalidInput(f"{path}:1: malformed CSV: {exc}", field="data") from exc
    header = [h.strip().lower() for h in header]
    if len(set(header)) != len(header):
        raise InvalidInput(f"{path}:1: the header repeats a column name", field="data")
    found = detect_protocol(header)
    if protocol is not None and protocol != found:
        need = "text,intent[,split]" if protocol == "stream" else "q1,q2,is_duplicate[,split]"
        raise InvalidInput(f"{path}: --protocol {protocol} needs a header {need}; this file looks like {found}",
                           field="protocol")
    col = {name: i for i, name in enumerate(header)}
    keep = set(splits) if splits else None
    rows: list[Any] = []
    line = 1
    try:
        for line, values in enumerate(reader, start=2):
            if not values or all(not v.strip() for v in values):
                continue  # blank line
            if len(values) != len(header):
                raise InvalidInput(f"{path}:{line}: {len(values)} fields, the header has {len(header)}",
                                   field="data")
            split = values[col["split"]].strip() if "split" in col else ""
            if keep is not None and split not in keep:
                continue
            if found == "stream":
                text = _text(values[col["text"]], path, line, "text", max_chars)
                intent = values[col["intent"]].strip()
                if not intent:
                    raise InvalidInput(f"{path}:{line}: empty intent", field="data")
                response = values[col["response"]].strip() if "response" in col else ""
                if "response" in col and not response:
                    raise InvalidInput(f"{path}:{line}: empty response", field="data")
                rows.append(StreamRow(text, intent, split, response))
            else:
                q1 = _text(values[col["q1"]], path, line, "q1", max_chars)
                q2 = _text(values[col["q2"]], path, line, "q2", max_chars)
                label = values[col["is_duplicate"]].strip().lower()
                if label not in _TRUE | _FALSE:
                    raise InvalidInput(f"{path}:{line}: is_duplicate must be 0 or 1, not {label[:20]!r}",
                                       field="data")
                rows.append(PairRow(q1, q2, label in _TRUE, split))
    except csv.Error as exc:
        raise InvalidInput(f"{path}:{line}: malformed CSV: {exc}", field="data") from exc
    if not rows:
        what = f" in split(s) {','.join(sorted(keep))}" if keep is not None else ""
        raise InvalidInput(f"{path} has no data rows{what}", field="data")
    return Dataset(found, str(path), rows, has_responses=found == "stream" and "response" in col)


def _text(value: str, path: Path, line: int, name: str, max_chars: int) -> str:
    value = value.strip()
    if not value:
        raise InvalidInput(f"{path}:{line}: empty {name}", field="data")
    if len(value) > max_chars:
        raise InvalidInput(f"{path}:{line}: {name} is longer than {max_chars} characters "
                           "(SEMCACHE_MAX_PROMPT_CHARS)", field="data")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise InvalidInput(f"{path}:{line}: {name} is not valid UTF-8", field="data")
    return value


# --- vectors -------------------------------------------------------------------------------------------------
class PrecomputedEmbedder:
    """An embedder that answers from vectors computed up front, and asks the real one for anything else."""

    def __init__(self, inner: Embedder, vectors: dict[str, np.ndarray]) -> None:
        self.inner = inner
        self.name = inner.name
        self.dim = inner.dim
        self.vectors = vectors

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        missing = [t for t in texts if t not in self.vectors]
        if missing:
            for t, v in zip(missing, self.inner.embed(missing)):
                self.vectors[t] = v
        return np.stack([self.vectors[t] for t in texts]) if texts else np.empty((0, self.dim), np.float32)


def embed_rows(embedder: Embedder, texts: Sequence[str], *, cache_dir: Path | None = None, batch_size: int = 256,
               progress: bool = True) -> dict[str, np.ndarray]:
    """Embed every distinct text once, in batches, with a progress bar; reuse a previous run's vectors on disk."""
    from tqdm import tqdm

    unique = list(dict.fromkeys(texts))
    digest = hashlib.sha256(("\x00".join([embedder.name, str(embedder.dim), *unique])).encode("utf-8", "replace"))
    cached = cache_dir / f"{digest.hexdigest()[:24]}.npy" if cache_dir else None
    if cached is not None and cached.exists():
        try:
            matrix = np.load(cached)
            if matrix.shape == (len(unique), embedder.dim):
                return dict(zip(unique, matrix))
        except (OSError, ValueError):
            pass
    matrix = np.empty((len(unique), embedder.dim), dtype=np.float32)
    with tqdm(total=len(unique), desc="embedding", unit="text", disable=not progress, leave=False) as bar:
        for start in range(0, len(unique), batch_size):
            chunk = unique[start : start + batch_size]
            matrix[start : start + len(chunk)] = embedder.embed(chunk)
            bar.update(len(chunk))
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp.npy")
            np.save(tmp, matrix)
            tmp.replace(cached)
        except OSError as exc:
            log.warning("could not keep the vectors in %s: %s", cache_dir, exc)
    return dict(zip(unique, matrix))


# --- judges --------------------------------------------------------------------------------------------------
_SIMULATED = "simulated:"


def parse_judge_spec(spec: str | None) -> tuple[str, tuple[float, float] | None]:
    """``off``, ``llm``, ``cross-encoder``, ``embedding`` or ``simulated:FA,FR`` -> ``(name, (FA, FR) or None)``.

    >>> parse_judge_spec("simulated:0.05,0.1")
    ('simulated', (0.05, 0.1))
    >>> parse_judge_spec(None)
    ('off', None)
    """
    spec = (spec or "off").strip()
    if spec.startswith(_SIMULATED):
        try:
            fa, fr = (float(x) for x in spec[len(_SIMULATED):].split(","))
        except ValueError:
            raise InvalidInput(f"{spec!r}: expected simulated:FA,FR with two rates, e.g. simulated:0.05,0.05",
                               field="judge") from None
        if not (0.0 <= fa <= 1.0 and 0.0 <= fr <= 1.0):
            raise InvalidInput(f"{spec!r}: the rates must be between 0 and 1", field="judge")
        return "simulated", (fa, fr)
    if spec not in JUDGE_NAMES:
        raise InvalidInput(f"unknown judge {spec!r} (known: {', '.join(JUDGE_NAMES)}, simulated:FA,FR)",
                           field="judge")
    return spec, None


class SimulatedJudge:
    """A judge derived from the labels, for sensitivity analysis: it wrongly accepts ``false_accept`` of the
    different-intent pairs and wrongly rejects ``false_reject`` of the same-intent ones (seeded, so a lane is
    deterministic). ``intent_of`` maps entry ids to intents; the new prompt's intent is set before each write.

    >>> judge = SimulatedJudge(0.0, 0.0, {"e1": "a"}, seed=1)
    >>> from cache_core.judge import JudgeRequest
    >>> judge.current = "a"
    >>> judge.judge(JudgeRequest("q", "r", "e1", "p", "r1", 0.7)).agree
    True
    """

    name = "simulated"

    def __init__(self, false_accept: float, false_reject: float, intent_of: dict[str, str], *,
                 seed: int | str = 0) -> None:
        self.false_accept, self.false_reject = false_accept, false_reject
        self.intent_of = intent_of
        self.rng = random.Random(seed)
        self.current: str | None = None
        self.calls = 0

    def judge(self, request: JudgeRequest) -> JudgeVerdict:
        self.calls += 1
        same = self.current is not None and self.intent_of.get(request.neighbour_id) == self.current
        draw = self.rng.random()
        agree = draw >= self.false_reject if same else draw < self.false_accept
        return JudgeVerdict(agree=agree, detail="simulated from the labels")


# --- results -------------------------------------------------------------------------------------------------
class OperatingPoint(BaseModel):
    """One point of a curve: the knob value and what it gave."""

    knob: float
    hit_rate: float
    wrong_rate: float
    queries: int
    hits: int
    wrong: int
    precision: float | None = None
    recall: float | None = None
    f1: float | None = None
    demoted: int | None = None
    judge_calls_per_query: float | None = None
    judge_tokens_per_query: float | None = None


class EvalReport(BaseModel):
    """What ``semcache eval --json`` prints."""

    protocol: Protocol
    data: str
    rows: int
    seed: int
    policy: str
    baseline: str = "threshold"
    params: dict[str, Any] = Field(default_factory=dict)
    model: str = ""
    curve: list[OperatingPoint]
    baseline_curve: list[OperatingPoint]
    summary: dict[str, Any] = Field(default_factory=dict)
    lookup_ms: dict[str, dict[str, float]] = Field(default_factory=dict)
    latency: dict[str, Any] | None = Field(None, description="measure_latency: before/after on the same index.")
    feedback_rate: float = 0.0
    elapsed_s: float = 0.0
    answers: Answers = Field("label", description="stream: what a miss stores, the row's intent or its response.")
    judge: str = Field("off", description="The write path's judge: off, llm, cross-encoder, embedding or "
                       "simulated:FA,FR (derived from the labels: a sensitivity analysis, not a real judge).")
    simulated_judge: bool = False
    judge_calls_per_query: float | None = Field(
        None, description="Judge questions per query at the policy's best point at <= 1% wrong (else its "
        "loosest point); each point of the curve has its own.")
    judge_tokens_per_query: float | None = None


def best_at(curve: Sequence[OperatingPoint], target: float, *, by: str = "hit_rate") -> OperatingPoint | None:
    """The operating point with the highest ``by`` among those whose wrong rate is at most ``target``."""
    ok = [p for p in curve if p.hits and p.wrong_rate <= target + 1e-12]
    return max(ok, key=lambda p: (getattr(p, by) or 0.0, -p.knob)) if ok else None


def _summary(report: EvalReport) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for target in TARGETS:
        row = {}
        for name, curve in (("policy", report.curve), ("baseline", report.baseline_curve)):
            point = best_at(curve, target)
            row[name] = None if point is None else {
                "knob": point.knob, "hit_rate": point.hit_rate, "wrong_rate": point.wrong_rate,
                **({"precision": point.precision, "recall": point.recall, "f1": point.f1}
                   if point.f1 is not None else {}),
            }  # fmt: skip
        out[f"wrong<={target:g}"] = row
    if report.protocol == "pairs":
        for name, curve in (("policy", report.curve), ("baseline", report.baseline_curve)):
            best = max(curve, key=lambda p: (p.f1 or 0.0, -p.knob), default=None)
            out[f"best_f1_{name}"] = None if best is None else {"knob": best.knob, "f1": best.f1,
                                                                  "precision": best.precision, "recall": best.recall}
    return out


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {"p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)),
            "p99": float(np.percentile(arr, 99)), "n": float(len(arr))}


# --- the environment -----------------------------------------------------------------------------------------
@dataclass
class EvalEnvironment:
    """A private embedded Redis (or a given URL), the embedder with precomputed vectors, and base settings.

    Every lane gets its own index name under ``prefix``; nothing outside those names is touched, so evaluating
    against a shared Redis (``redis_url``) is safe, if slower.
    """

    settings: Settings
    embedder: Embedder
    redis_url: str | None = None
    server: EmbeddedRedis | None = None
    tmpdir: tempfile.TemporaryDirectory | None = None
    client: redis.Redis | None = None
    url: str = ""
    prefix: str = field(default_factory=lambda: f"eval{uuid.uuid4().hex[:8]}")

    def __enter__(self) -> "EvalEnvironment":
        url = self.redis_url
        if url is None:
            self.tmpdir = tempfile.TemporaryDirectory(prefix="semcache-eval-")
            self.server = EmbeddedRedis(Path(self.tmpdir.name), appendonly=False)
            url = self.server.start()
        self.url = url
        self.client = make_client(url, timeout_ms=max(self.settings.redis_write_timeout_ms, 30_000))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.client is not None:
            self.client.close()
        if self.server is not None:
            self.server.stop()
        if self.tmpdir is not None:
            self.tmpdir.cleanup()

    def lane_settings(self, n: int | str, **overrides: Any) -> Settings:
        return self.settings.model_copy(update={"redis_url": self.url, "index": f"{self.prefix}-{n}", **overrides})

    def drop(self, settings: Settings) -> None:
        _drop(self.client, settings)


@dataclass
class _Lane:
    curve: str  # "curve" or "baseline"
    policy: str
    knob: float
    n: int
    point: OperatingPoint | None = None
    latencies: list[float] = field(default_factory=list)


class _Progress:
    """A thread-safe tqdm over every lane's rows."""

    def __init__(self, total: int, enabled: bool, desc: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="q", disable=not enabled, smoothing=0.05)
        self.lock = threading.Lock()

    def update(self, n: int) -> None:
        with self.lock:
            self.bar.update(n)

    def set(self, n: int) -> None:
        with self.lock:
            if n > self.bar.n:
                self.bar.update(n - self.bar.n)

    def close(self) -> None:
        self.bar.close()


# --- stream protocol -----------------------------------------------------------------------------------------
def stream_order(rows: Sequence[StreamRow], seed: int, limit: int | None = None) -> list[int]:
    """The row order of the stream: all rows shuffled with ``seed``, then the first ``limit``."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return order[:limit] if limit else order


def run_stream(env: EvalEnvironment, rows: Sequence[StreamRow], *, policy: str, knobs: Sequence[float],
               baseline_knobs: Sequence[float] | None, seed: int = 42, limit: int | None = None,
               oos_label: str = "oos", workers: int = 2, feedback_rate: float = 0.0, progress: bool = True,
               params: dict[str, Any] | None = None, answers: Answers = "label", judge: str = "off"
               ) -> tuple[list[OperatingPoint], list[OperatingPoint], dict[str, dict[str, float]]]:
    """Run the stream protocol: one lane per knob of ``policy`` and per knob of the baseline (threshold).

    Lanes run in ``workers`` processes, each with its own private embedded Redis unless the environment was given
    a URL (Redis runs commands on one core: one server per worker is what makes lanes run in parallel).
    The baseline fetches only the nearest entry (k=1), as the peers do. ``params`` are written as each lane's
    global calibration record, so ``semcache calibrate`` tries parameters through the real read path.
    ``answers``: what a miss stores (``label``: the intent, ``response``: the row's response). ``judge``: the write
    path's judge for the policy's lanes (the baseline's threshold rule ignores groups, so its lanes ask none).
    Returns ``(curve, baseline_curve, lookup_ms)``.
    """
    if answers == "response" and any(not r.response for r in rows):
        raise InvalidInput("--answers response needs a response column with a response in every row", field="answers")
    parse_judge_spec(judge)  # fail before any lane starts
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    order = stream_order(rows, seed, limit)
    lanes = [_Lane("curve", policy, k, i) for i, k in enumerate(knobs)]
    if baseline_knobs:
        lanes += [_Lane("baseline", "threshold", k, len(lanes) + i) for i, k in enumerate(baseline_knobs)]
    texts = list(dict.fromkeys(rows[i].text for i in order))
    if parse_judge_spec(judge)[0] == "embedding":  # that judge embeds answers: the lanes never load the model
        texts = list(dict.fromkeys([*texts, *(r.response or r.intent for r in rows)]))
    matrix = env.embedder.embed(texts)
    ctx = mp.get_context("spawn")  # never fork a process holding torch threads and Redis connections
    counter = ctx.Value("q", 0)
    shared = _LaneShared(url=env.url, private=env.server is not None, settings=env.settings.model_dump(mode="json"),
                         prefix=env.prefix,
                         rows=[(r.text, r.intent) for r in rows], order=list(order), texts=texts, matrix=matrix,
                         answers=[r.response if answers == "response" else r.intent for r in rows], judge=judge,
                         model_name=env.embedder.name, oos_label=oos_label, feedback_rate=feedback_rate, seed=seed,
                         params=params)
    bar = _Progress(len(lanes) * len(order), progress, f"stream ({len(lanes)} lanes x {len(order):,} queries)")
    # the lanes that store the most (strict knobs) first, so the pool does not end on one straggler
    schedule = sorted(lanes, key=lambda lane: (-lane.knob, lane.curve))
    results: dict[int, tuple[OperatingPoint, list[float]]] = {}
    try:
        with ProcessPoolExecutor(max_workers=max(1, min(workers, len(lanes))), mp_context=ctx,
                                 initializer=_lane_init, initargs=(shared, counter)) as pool:
            futures = {pool.submit(_lane_main, lane.curve, lane.policy, lane.knob, lane.n): lane for lane in schedule}
            pending = set(futures)
            while pending:
                done = {f for f in pending if f.done()}
                for future in done:
                    results[futures[future].n] = future.result()
                pending -= done
                bar.set(counter.value)
                if pending:
                    time.sleep(0.2)
            bar.set(counter.value)
    finally:
        bar.close()
    for lane in lanes:
        lane.point, lane.latencies = results[lane.n]
    curve = [lane.point for lane in lanes if lane.curve == "curve"]
    baseline = [lane.point for lane in lanes if lane.curve == "baseline"]
    lookup_ms = {}
    for name, label in (("curve", "policy"), ("baseline", "baseline")):
        values = [x for lane in lanes if lane.curve == name for x in lane.latencies]
        if values:
            lookup_ms[label] = _percentiles(values)
    return curve, baseline, lookup_ms


@dataclass
class _LaneShared:
    """What every lane process needs, sent once per process."""

    url: str
    private: bool
    settings: dict[str, Any]
    prefix: str
    rows: list[tuple[str, str]]
    order: list[int]
    texts: list[str]
    matrix: np.ndarray
    model_name: str
    oos_label: str
    feedback_rate: float
    seed: int
    params: dict[str, Any] | None
    answers: list[str]
    judge: str


class _NoModel:
    """The lane processes never load the model: every text they see was embedded up front."""

    def __init__(self, name: str, dim: int) -> None:
        self.name, self.dim = name, dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        raise RuntimeError(f"evaluation lane asked to embed {len(texts)} unexpected text(s)")


_LANE: dict[str, Any] = {}


def _die_with_parent() -> None:
    """A lane process (and with it its private Redis) ends when the evaluation does, even on SIGKILL."""
    import contextlib
    import ctypes
    import signal

    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _lane_init(shared: _LaneShared, counter: Any) -> None:
    _die_with_parent()
    if shared.private:
        from multiprocessing.util import Finalize

        tmp = tempfile.TemporaryDirectory(prefix="semcache-eval-lane-")
        server = EmbeddedRedis(Path(tmp.name), appendonly=False)  # dies with this process (PR_SET_PDEATHSIG)
        shared.url = server.start()
        Finalize(server, server.stop, exitpriority=20)
        Finalize(tmp, tmp.cleanup, exitpriority=10)
        _LANE["server"] = server
    _LANE["shared"] = shared
    _LANE["counter"] = counter
    _LANE["embedder"] = PrecomputedEmbedder(_NoModel(shared.model_name, shared.matrix.shape[1]),
                                            dict(zip(shared.texts, shared.matrix)))
    _LANE["client"] = make_client(shared.url, timeout_ms=30_000)


def _lane_main(curve: str, policy: str, knob: float, n: int) -> tuple[OperatingPoint, list[float]]:
    from .feedback import apply_feedback

    shared: _LaneShared = _LANE["shared"]
    client: redis.Redis = _LANE["client"]
    embedder: PrecomputedEmbedder = _LANE["embedder"]
    counter = _LANE["counter"]
    base = Settings.model_validate(shared.settings)
    overrides: dict[str, Any] = {"redis_url": shared.url, "index": f"{shared.prefix}-{n}", "policy": policy}
    if curve == "baseline":
        overrides["knn_k"] = 1  # the peers' method: the nearest entry only
    settings = base.model_copy(update=overrides)
    cache = SemanticCache(settings, client, embedder, stats=None, strict=True, policy=make_policy(policy, settings))
    if shared.params and curve == "curve":
        import json

        client.hset(settings.key("calibration"), "*", json.dumps(shared.params))
    scope = Scope(tenant="eval")
    rng = random.Random(f"{shared.seed}:{curve}:{knob}")
    intent_of: dict[str, str] = {}  # entry id -> the intent of the row that wrote it
    judge = _lane_judge(shared, settings, curve, knob, intent_of)
    hits = wrong = demoted = done = calls = tokens = 0
    latencies: list[float] = []
    try:
        for i in shared.order:
            text, intent = shared.rows[i]
            result = cache.lookup(text, scope, min_similarity=knob)
            latencies.append(result.total_ms)
            if result.hit:
                hits += 1
                bad = intent == shared.oos_label or intent_of.get(result.entry.id, result.entry.response) != intent
                wrong += bad
                if shared.feedback_rate and rng.random() < shared.feedback_rate:
                    demoted += apply_feedback(client, settings, result.entry.id, result.similarity or 1.0,
                                              not bad, by="eval").demoted
            else:
                vector = embedder.embed([text])[0]
                command = WriteCommand(prompt=text, response=shared.answers[i], scope=scope,
                                       embedding=vector.tolist(), source="eval")
                if judge is not None:  # the worker's own grouping step, with this lane's judge
                    if isinstance(judge, SimulatedJudge):
                        judge.current = intent
                    decision = judged_groups(client, settings, [(command, vector)], judge,
                                             own_groups=[answer_group(command.response)])[0]
                    calls += decision.asked
                    tokens += sum(v["prompt_tokens"] + v["completion_tokens"] for v in decision.verdicts)
                    if decision.group:
                        command = command.model_copy(update={"group": decision.group})
                entry, _ = write_command(client, settings, embedder, command)
                intent_of[entry] = intent
            done += 1
            if done % 100 == 0:
                with counter.get_lock():
                    counter.value += 100
        with counter.get_lock():
            counter.value += done % 100
    finally:
        _drop(client, settings)
    total = len(shared.order)
    point = OperatingPoint(knob=knob, hit_rate=hits / total if total else 0.0, wrong_rate=wrong / hits if hits else 0.0,
                           queries=total, hits=hits, wrong=wrong,
                           demoted=demoted if shared.feedback_rate else None,
                           judge_calls_per_query=calls / total if judge is not None and total else None,
                           judge_tokens_per_query=tokens / total if judge is not None and tokens and total else None)
    return point, latencies


def _lane_judge(shared: _LaneShared, settings: Settings, curve: str, knob: float,
                intent_of: dict[str, str]) -> Any:
    """The judge of one lane: none for the baseline or ``off``; a seeded :class:`SimulatedJudge`; or the
    configured real judge (built like the worker builds it)."""
    name, rates = parse_judge_spec(shared.judge)
    if curve == "baseline" or name == "off":
        return None
    if rates is not None:
        return SimulatedJudge(*rates, intent_of, seed=f"{shared.seed}:judge:{knob}")
    from .judge import make_judge

    return make_judge(settings.model_copy(update={"judge": name}), embedder=_LANE.get("embedder"),
                      client=_LANE.get("client"))


def _drop(client: redis.Redis, settings: Settings) -> None:
    """Remove a lane's index, documents and every other key under its name."""
    drop_index(client, settings, delete_documents=True)
    keys = list(client.scan_iter(match=f"{settings.index}:*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])


# --- pairs protocol ------------------------------------------------------------------------------------------
def run_pairs(env: EvalEnvironment, rows: Sequence[PairRow], *, policy: str, knobs: Sequence[float],
              baseline_knobs: Sequence[float] | None, seed: int = 42, limit: int | None = None,
              progress: bool = True, params: dict[str, Any] | None = None
              ) -> tuple[list[OperatingPoint], list[OperatingPoint], dict[str, dict[str, float]]]:
    """Run the pairs protocol. The stored set does not depend on the knob, so every ``q2`` is looked up once
    (the read path's own FT.SEARCH) and each knob's decision is the policy's, on those same candidates."""
    import json

    from tqdm import tqdm

    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    if limit:
        order = order[:limit]
    chosen = [rows[i] for i in order]
    settings = env.lane_settings("pairs", policy=policy)
    cache = SemanticCache(settings, env.client, env.embedder, stats=None, strict=True,
                          policy=make_policy(policy, settings))
    scope = Scope(tenant="eval")
    if params:
        env.client.hset(settings.key("calibration"), "*", json.dumps(params))
    try:
        q1s = list(dict.fromkeys(r.q1 for r in chosen))
        batch = []
        with tqdm(total=len(q1s) + len(chosen), desc="pairs (store q1, look up q2)", unit="q",
                  disable=not progress) as bar:
            for q1 in q1s:
                command = WriteCommand(prompt=q1, response=q1, scope=scope, source="eval")
                batch.append(build_entry(command, settings=settings, embedding=env.embedder.embed([q1])[0].tolist()))
                if len(batch) >= 200:
                    write_entries(env.client, settings, batch)
                    bar.update(len(batch))
                    batch = []
            if batch:
                write_entries(env.client, settings, batch)
                bar.update(len(batch))
            stored = {entry_id(q, scope) for q in q1s}
            looked: list[tuple[PairRow, list, str | None]] = []
            latencies = []
            for row in chosen:
                t0 = time.perf_counter()
                cands, _, scope_params = cache.candidates(row.q2, scope, vector=env.embedder.embed([row.q2])[0])
                latencies.append((time.perf_counter() - t0) * 1000)
                exact = entry_id(row.q2, scope)
                looked.append((row, cands, exact if exact in stored else None))
                bar.update(1)
        policies = {"curve": make_policy(policy, settings), "baseline": make_policy("threshold", settings)}
        curves: dict[str, list[OperatingPoint]] = {}
        for name, knob_list in (("curve", knobs), ("baseline", baseline_knobs or [])):
            curves[name] = [_pairs_point(policies[name], looked, knob, scope, scope_params if looked else {})
                            for knob in knob_list]
    finally:
        env.drop(settings)
    return curves["curve"], curves["baseline"], {"policy": _percentiles(latencies)}


def _pairs_point(policy: Any, looked: list, knob: float, scope: Scope, params: dict[str, Any]) -> OperatingPoint:
    hits = tp = 0
    positives = sum(1 for row, _, _ in looked if row.duplicate)
    for row, cands, exact in looked:
        if exact is not None:
            served = exact
        else:
            pick = policy.choose(cands, knob, params)
            served = pick.fields.get("id") if pick is not None else None
        if served is None:
            continue
        hits += 1
        if row.duplicate and served == entry_id(row.q1, scope):
            tp += 1
    n = len(looked)
    precision = tp / hits if hits else 1.0
    recall = tp / positives if positives else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return OperatingPoint(knob=knob, hit_rate=hits / n if n else 0.0, wrong_rate=(hits - tp) / hits if hits else 0.0,
                          queries=n, hits=hits, wrong=hits - tp, precision=precision, recall=recall, f1=f1)


# --- latency before/after ---------------------------------------------------------------------------------------
def measure_latency(env: EvalEnvironment, dataset: Dataset, *, queries: int, seed: int = 42,
                    progress: bool = True) -> dict[str, Any]:
    """Lookup latency of the read path before (threshold policy, k=5: the peers' rule as semcache first shipped)
    and after (the configured policy and k), on one index holding the data, with the same queries alternating
    between the two so that load on the machine hits both alike. Vectors are precomputed: the figures are the
    read path without the embedding (exact check, FT.SEARCH, policy), in milliseconds."""
    from tqdm import tqdm

    rng = random.Random(seed)
    if dataset.protocol == "stream":
        texts = [r.text for r in dataset.rows]
        rng.shuffle(texts)
        probe, stored = texts[:queries], list(dict.fromkeys(texts[queries:]))
        answers = {r.text: r.intent for r in dataset.rows}
    else:
        rows = list(dataset.rows)
        rng.shuffle(rows)
        probe, stored = [r.q2 for r in rows[:queries]], list(dict.fromkeys(r.q1 for r in rows))
        answers = {t: t for t in stored}
    settings = env.lane_settings("latency")
    scope = Scope(tenant="eval")
    configs = {"before": settings.model_copy(update={"policy": "threshold", "knn_k": 5}), "after": settings}
    caches = {name: SemanticCache(s, env.client, env.embedder, stats=None, strict=True) for name, s in configs.items()}
    out: dict[str, Any] = {"entries": len(stored), "queries": len(probe)}
    try:
        batch = []
        for text in stored:
            command = WriteCommand(prompt=text, response=answers[text], scope=scope, source="eval")
            batch.append(build_entry(command, settings=settings, embedding=env.embedder.embed([text])[0].tolist()))
            if len(batch) >= 200:
                write_entries(env.client, settings, batch)
                batch = []
        if batch:
            write_entries(env.client, settings, batch)
        times: dict[str, list[float]] = {name: [] for name in caches}
        searches: dict[str, list[float]] = {name: [] for name in caches}
        for i, text in enumerate(tqdm(probe, desc="latency", unit="q", disable=not progress)):
            names = list(caches) if i % 2 == 0 else list(reversed(caches))
            for name in names:
                result = caches[name].lookup(text, scope)
                times[name].append(result.total_ms)
                searches[name].append(result.search_ms)
        for name, s in configs.items():
            out[name] = {"policy": s.policy, "k": s.knn_k, "total_ms": _percentiles(times[name]),
                         "search_ms": _percentiles(searches[name])}
    finally:
        env.drop(settings)
    return out


# --- the whole evaluation ------------------------------------------------------------------------------------
def evaluate(settings: Settings, data: str | Path, *, protocol: Protocol | None = None, seed: int = 42,
             limit: int | None = None, knobs: Sequence[float] = DEFAULT_KNOBS,
             baseline_knobs: Sequence[float] | None = DEFAULT_KNOBS, splits: Iterable[str] | None = None,
             embedder: Embedder | None = None, redis_url: str | None = None, workers: int = 2,
             feedback_rate: float = 0.0, oos_label: str = "oos", progress: bool = True,
             params: dict[str, Any] | None = None, cache_vectors: bool = True, latency: int = 0,
             answers: Answers | None = None, judge: str = "off") -> EvalReport:
    """Evaluate ``settings.policy`` against the baseline on a labeled CSV (see the module docstring).

    ``answers`` (stream protocol): ``label`` or ``response``; default ``response`` when the CSV has a ``response``
    column, else ``label``. ``judge``: the write path's judge (:func:`parse_judge_spec`), default off."""
    from .embedder import load_embedder

    started = time.perf_counter()
    if limit is not None and limit < 1:
        raise InvalidInput("must be at least 1", field="limit")
    if not 0.0 <= feedback_rate <= 1.0:
        raise InvalidInput("must be between 0 and 1", field="feedback_rate")
    for knob in (*knobs, *(baseline_knobs or ())):
        if not (-1.0 <= knob <= 1.0) or math.isnan(knob):
            raise InvalidInput(f"knob {knob} is not a cosine similarity in [-1, 1]", field="knobs")
    judge_name, _ = parse_judge_spec(judge)
    if answers is not None and answers not in ANSWERS:
        raise InvalidInput(f"unknown answers protocol {answers!r} (known: {', '.join(ANSWERS)})", field="answers")
    dataset = read_dataset(data, protocol, splits=splits, max_chars=settings.max_prompt_chars)
    if dataset.protocol == "pairs" and (answers == "response" or judge_name != "off"):
        raise InvalidInput("--answers and --judge apply to the stream protocol (text,intent[,response]); the pairs "
                           "protocol stores each q1 with its own text", field="judge" if judge_name != "off"
                           else "answers")
    if answers == "response" and not dataset.has_responses:
        raise InvalidInput(f"--answers response needs a response column; {data} has none (use --answers label)",
                           field="answers")
    answers = answers or ("response" if dataset.has_responses else "label")
    embedder = embedder or load_embedder(settings.model, backend=settings.embedding_backend, cache_size=0,
                                          precision=settings.embedding_precision)
    needed = _needed_texts(dataset, seed, limit) + (dataset.texts() if latency else [])
    if judge_name == "embedding" and dataset.protocol == "stream":
        needed += [r.response or r.intent for r in dataset.rows]
    vectors = embed_rows(embedder, needed,
                         cache_dir=(settings.data_dir / "eval-cache") if cache_vectors else None, progress=progress)
    pre = PrecomputedEmbedder(embedder, vectors)
    with EvalEnvironment(settings, pre, redis_url=redis_url) as env:
        if dataset.protocol == "stream":
            curve, baseline, lookup_ms = run_stream(
                env, dataset.rows, policy=settings.policy, knobs=knobs, baseline_knobs=baseline_knobs, seed=seed,
                limit=limit, oos_label=oos_label, workers=workers, feedback_rate=feedback_rate, progress=progress,
                params=params, answers=answers, judge=judge)
            rows = min(limit or len(dataset.rows), len(dataset.rows))
        else:
            curve, baseline, lookup_ms = run_pairs(
                env, dataset.rows, policy=settings.policy, knobs=knobs, baseline_knobs=baseline_knobs, seed=seed,
                limit=limit, progress=progress, params=params)
            rows = min(limit or len(dataset.rows), len(dataset.rows))
        measured = measure_latency(env, dataset, queries=latency, seed=seed, progress=progress) if latency else None
    consensus = ConsensusParams(settings.consensus_floor, settings.consensus_support, settings.consensus_conflict,
                                settings.consensus_min_agree, settings.consensus_compete_range,
                                settings.consensus_judged_conflict)
    report = EvalReport(
        protocol=dataset.protocol, data=str(data), rows=rows, seed=seed, policy=settings.policy,
        params={"k": settings.knn_k, **({"consensus_floor": consensus.floor, "consensus_support": consensus.support,
                                         "consensus_conflict": consensus.conflict,
                                         "consensus_min_agree": consensus.min_agree,
                                         "consensus_compete_range": consensus.compete_range,
                                         "consensus_judged_conflict": consensus.judged_conflict}
                                        if settings.policy == "consensus" else {}), **(params or {})},
        model=embedder.name, curve=curve, baseline_curve=baseline, lookup_ms=lookup_ms, feedback_rate=feedback_rate,
        latency=measured, answers=answers if dataset.protocol == "stream" else "label", judge=judge or "off",
        simulated_judge=judge_name == "simulated",
    )  # fmt: skip
    if dataset.protocol == "stream" and judge_name != "off":
        report.params.update({"judge_min_similarity": settings.judge_min_similarity,
                              "judge_max_groups": settings.judge_max_groups})
        at = best_at(curve, 0.01) or min(curve, key=lambda p: p.knob, default=None)
        if at is not None:
            report.judge_calls_per_query = at.judge_calls_per_query
            report.judge_tokens_per_query = at.judge_tokens_per_query
    report.summary = _summary(report)
    report.elapsed_s = round(time.perf_counter() - started, 1)
    return report


def _needed_texts(dataset: Dataset, seed: int, limit: int | None) -> list[str]:
    if dataset.protocol == "stream":
        return [dataset.rows[i].text for i in stream_order(dataset.rows, seed, limit)]
    order = list(range(len(dataset.rows)))
    random.Random(seed).shuffle(order)
    picked = [dataset.rows[i] for i in (order[:limit] if limit else order)]
    return [t for r in picked for t in (r.q1, r.q2)]


def plot(report: EvalReport, path: str | Path, *, title: str | None = None) -> None:
    """Both curves, hit rate against wrong rate (pairs: recall against precision too), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.6), dpi=120)
    for curve, label, style, width in ((report.baseline_curve, "baseline: nearest neighbour, one threshold", "o--", 3),
                                       (report.curve, f"semcache {report.policy} policy" + (
                                           f", {'SIMULATED ' if report.simulated_judge else ''}judge {report.judge}"
                                           if report.judge != "off" else ""), "s-", 1.5)):
        pts = sorted(curve, key=lambda p: p.knob)  # a path along the knob: wrong rate need not be monotone
        ax.plot([100 * p.wrong_rate for p in pts], [100 * p.hit_rate for p in pts], style, label=label, markersize=4,
                linewidth=width, alpha=0.55 if width > 2 else 1.0)  # identical curves stay visible, one over the other
        for p in pts:
            ax.annotate(f"{p.knob:.2f}", (100 * p.wrong_rate, 100 * p.hit_rate), fontsize=6, alpha=0.6,
                        xytext=(3, -8), textcoords="offset points")
    for target in TARGETS:
        ax.axvline(100 * target, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("wrong hits / hits (%)")
    ax.set_ylabel("hit rate (%)")
    name = Path(report.data).name
    ax.set_title(title or f"{name}, {report.protocol} protocol, {report.rows:,} rows, seed {report.seed} "
                 f"({report.model})" + protocol_label(report, "\n"), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def protocol_label(report: EvalReport, sep: str = "; ") -> str:
    """What the stream stored and who judged: every output of a simulated judge says it is simulated.

    >>> r = EvalReport(protocol="stream", data="d.csv", rows=1, seed=1, policy="consensus", curve=[],
    ...                baseline_curve=[], answers="response", judge="simulated:0.05,0.05", simulated_judge=True)
    >>> protocol_label(r)
    '; answers: response; judge: simulated:0.05,0.05 (SIMULATED from the labels: a sensitivity analysis)'
    """
    if report.protocol != "stream":
        return ""
    out = f"{sep}answers: {report.answers}; judge: {report.judge}"
    if report.simulated_judge:
        out += " (SIMULATED from the labels: a sensitivity analysis)"
    return out


def fmt_table(report: EvalReport) -> str:
    """A plain-text summary: both curves side by side and the best hit rate at 0.5/1/2% wrong."""
    lines = [f"{report.protocol} protocol on {report.data}: {report.rows:,} rows, seed {report.seed}, "
             f"policy {report.policy} {report.params}{protocol_label(report)}"]
    extra = report.protocol == "pairs"
    head = f"{'knob':>6} | {'policy hit%':>11} {'wrong%':>7}" + (f" {'P':>6} {'R':>6} {'F1':>6}" if extra else "")
    head += f" | {'baseline hit%':>13} {'wrong%':>7}" + (f" {'P':>6} {'R':>6} {'F1':>6}" if extra else "")
    lines.append(head)
    by_knob: dict[float, dict[str, OperatingPoint]] = {}
    for name, curve in (("p", report.curve), ("b", report.baseline_curve)):
        for p in curve:
            by_knob.setdefault(p.knob, {})[name] = p

    def cell(p: OperatingPoint | None, width: int) -> str:
        if p is None:
            return f"{'':>{width}} {'':>7}" + (f" {'':>6} {'':>6} {'':>6}" if extra else "")
        out = f"{100 * p.hit_rate:>{width}.1f} {100 * p.wrong_rate:>7.2f}"
        if extra:
            out += f" {p.precision:>6.3f} {p.recall:>6.3f} {p.f1:>6.3f}"
        return out

    for knob in sorted(by_knob):
        lines.append(f"{knob:>6.2f} | {cell(by_knob[knob].get('p'), 11)} | {cell(by_knob[knob].get('b'), 13)}")
    for key, row in report.summary.items():
        if not key.startswith("wrong<="):
            continue

        def show(point: dict | None) -> str:
            if point is None:
                return "-"
            return (f"{100 * point['hit_rate']:.1f}% hits at {100 * point['wrong_rate']:.2f}% wrong "
                    f"(knob {point['knob']})")

        lines.append(f"{key}: policy {show(row['policy'])}; baseline {show(row['baseline'])}")
    for name in ("policy", "baseline"):
        best = report.summary.get(f"best_f1_{name}")
        if best:
            lines.append(f"best F1 {name}: {best['f1']:.3f} (P {best['precision']:.3f}, R {best['recall']:.3f}, "
                         f"knob {best['knob']})")
    if report.judge_calls_per_query is not None:
        tokens = (f", {report.judge_tokens_per_query:.0f} judge tokens per query"
                  if report.judge_tokens_per_query else "")
        lines.append(f"judge: {report.judge_calls_per_query:.3f} questions per query at the policy's <=1% point"
                     + tokens + "; per knob: " + ", ".join(
                         f"{p.knob:.2f}: {p.judge_calls_per_query:.3f}" for p in sorted(report.curve, key=lambda p: p.knob)
                         if p.judge_calls_per_query is not None))
    if report.lookup_ms:
        lines.append("lookup ms during the sweep (read path without embedding, lanes in parallel): " + "; ".join(
            f"{k} p50 {v['p50']:.2f} p95 {v['p95']:.2f}" for k, v in report.lookup_ms.items()))
    if report.latency:
        lat = report.latency
        lines.append(f"latency on one index of {lat['entries']:,} entries, {lat['queries']:,} lookups each: "
                     + "; ".join(
            f"{name} ({lat[name]['policy']}, k={lat[name]['k']}) p50 {lat[name]['total_ms']['p50']:.2f} ms "
            f"p95 {lat[name]['total_ms']['p95']:.2f} ms" for name in ("before", "after")))
    lines.append(f"elapsed {report.elapsed_s:.0f}s")
    return "\n".join(lines)


