"""Judges: does a stored neighbour's answer also answer a new prompt? Asked by the write path, never the read path.

When a miss is written and approved entries of its scope lie in the gray zone (similar enough to be worth asking,
:data:`~cache_core.settings.Settings.judge_min_similarity`), the worker asks a judge whether the neighbour's
answer also answers the new prompt; a yes puts the new entry into the neighbour's answer ``group``
(:mod:`cache_core.grouping`). Groups are what the consensus policy votes with: real LLM answers to two paraphrases
are never the same text, so without a judge (or an explicit group from the app) every entry is alone in its group.

Every judge answers a :class:`JudgeRequest` with a :class:`JudgeVerdict`; ``agree=None`` means the judge could
not answer (timeout, budget spent, an unparseable reply, a crash) and is treated as "no join", never as an error
of the write.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .errors import ConfigError

if TYPE_CHECKING:
    import redis

    from .embedder import Embedder
    from .settings import Settings

__all__ = ["JudgeRequest", "JudgeVerdict", "Judge", "JUDGE_NAMES", "EmbeddingJudge", "CrossEncoderJudge",
           "make_judge"]

log = logging.getLogger(__name__)

JUDGE_NAMES = ("off", "llm", "cross-encoder", "embedding")


@dataclass(frozen=True)
class JudgeRequest:
    """One question to a judge: does ``neighbour_response`` (stored for ``neighbour_prompt``) answer ``prompt``?"""

    prompt: str
    response: str  # the new entry's own answer (the embedding judge compares the two answers)
    neighbour_id: str
    neighbour_prompt: str
    neighbour_response: str
    similarity: float  # cosine similarity of the two prompts


@dataclass(frozen=True)
class JudgeVerdict:
    """``agree``: True = the neighbour's answer answers the prompt, False = it does not, None = no verdict."""

    agree: bool | None
    detail: str = ""  # a short reason for the audit trail; never prompt or response text
    ms: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Judge(Protocol):
    name: str

    def judge(self, request: JudgeRequest) -> JudgeVerdict:
        """Never raises: a failure is ``JudgeVerdict(agree=None, detail=...)``."""


class EmbeddingJudge:
    """The ``embedding`` judge: yes when the two *answers* embed alike (cosine >= ``threshold``).

    It needs no model beyond the worker's embedder and costs one embedding of two answers, but it only sees
    wording, not whether an answer fits the question: measured weak, see docs/quality.md.

    >>> from cache_core.testing import HashingEmbedder
    >>> judge = EmbeddingJudge(HashingEmbedder(), threshold=0.9)
    >>> judge.judge(JudgeRequest("q", "Reset it in Settings.", "n1", "q2", "Reset it in Settings.", 0.7)).agree
    True
    """

    name = "embedding"

    def __init__(self, embedder: "Embedder", *, threshold: float) -> None:
        self.embedder = embedder
        self.threshold = threshold

    def judge(self, request: JudgeRequest) -> JudgeVerdict:
        started = time.perf_counter()
        try:
            a, b = np.asarray(self.embedder.embed([request.response, request.neighbour_response]), dtype=np.float64)
            cosine = float(a @ b / ((np.linalg.norm(a) * np.linalg.norm(b)) or 1.0))
        except Exception as exc:  # noqa: BLE001 - a judge never fails a write
            return JudgeVerdict(None, f"embedding failed ({type(exc).__name__})",
                                (time.perf_counter() - started) * 1000)
        return JudgeVerdict(cosine >= self.threshold, f"answer similarity {cosine:.3f}",
                            (time.perf_counter() - started) * 1000)


class CrossEncoderJudge:
    """The ``cross-encoder`` judge: a sentence-transformers ``CrossEncoder`` scores (new question, stored answer);
    a score above ``threshold`` is a yes.

    The model is loaded once, offline (``HF_HUB_OFFLINE=1``: a name must already be in the local Hugging Face
    cache, or give a path), and must give one score per pair (``num_labels == 1``). Scores are what
    ``CrossEncoder.predict`` returns with the model's own activation: a probability in [0, 1] for the usual
    one-label model (sentence-transformers applies a sigmoid), a logit for a model saved with an identity
    activation. Set ``SEMCACHE_JUDGE_CROSS_ENCODER_THRESHOLD`` for the kind your model gives.
    """

    name = "cross-encoder"

    def __init__(self, model: str, *, threshold: float) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            from sentence_transformers import CrossEncoder

            self.model = CrossEncoder(model, device="cpu", local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any loading problem is a configuration problem
            raise ConfigError(f"cannot load the cross-encoder {model!r}: {type(exc).__name__}: {exc}"[:500],
                              hint="SEMCACHE_JUDGE_CROSS_ENCODER_MODEL names a CrossEncoder path (or a name in the "
                                   "local Hugging Face cache: the worker loads models offline)") from exc
        labels = getattr(self.model, "num_labels", 1)
        if labels != 1:
            raise ConfigError(f"the cross-encoder {model!r} gives {labels} scores per pair, the judge needs one",
                              hint="use a one-label (relevance) CrossEncoder")
        self.threshold = threshold
        self._lock = threading.Lock()  # one predict at a time: torch sizes its own thread pool per call

    def judge(self, request: JudgeRequest) -> JudgeVerdict:
        started = time.perf_counter()
        try:
            with self._lock:
                scores = self.model.predict([(request.prompt, request.neighbour_response)], show_progress_bar=False)
            score = float(np.asarray(scores, dtype=np.float64).reshape(-1)[0])
        except Exception as exc:  # noqa: BLE001 - a judge never fails a write
            return JudgeVerdict(None, f"cross-encoder failed ({type(exc).__name__})",
                                (time.perf_counter() - started) * 1000)
        if not np.isfinite(score):
            return JudgeVerdict(None, "cross-encoder score is not finite", (time.perf_counter() - started) * 1000)
        return JudgeVerdict(score > self.threshold, f"score {score:.4f}", (time.perf_counter() - started) * 1000)


def make_judge(settings: "Settings", *, embedder: "Embedder | None" = None, client: "redis.Redis | None" = None
               ) -> Judge | None:
    """The judge ``SEMCACHE_JUDGE`` names, or None for ``off``. Raises :class:`ConfigError` when its settings are
    missing (``llm`` needs a URL, a model and a Redis ``client`` for its budget; ``cross-encoder`` a model;
    ``embedding`` the worker's ``embedder``).

    >>> from cache_core.settings import Settings
    >>> make_judge(Settings()) is None
    True
    """
    name = settings.judge
    if name == "off":
        return None
    if name == "embedding":
        if embedder is None:
            raise ConfigError("SEMCACHE_JUDGE=embedding needs the worker's embedder")
        return EmbeddingJudge(embedder, threshold=settings.judge_embedding_threshold)
    if name == "cross-encoder":
        if not settings.judge_cross_encoder_model:
            raise ConfigError("SEMCACHE_JUDGE=cross-encoder needs a model",
                              hint="set SEMCACHE_JUDGE_CROSS_ENCODER_MODEL to a CrossEncoder path or name")
        return CrossEncoderJudge(settings.judge_cross_encoder_model, threshold=settings.judge_cross_encoder_threshold)
    if name == "llm":
        from .judge_llm import LLMJudge

        url = settings.judge_url or settings.upstream_url
        if not url:
            raise ConfigError("SEMCACHE_JUDGE=llm needs an endpoint",
                              hint="set SEMCACHE_JUDGE_URL (or SEMCACHE_UPSTREAM_URL) to an OpenAI-compatible base URL")
        if not settings.judge_model:
            raise ConfigError("SEMCACHE_JUDGE=llm needs a model", hint="set SEMCACHE_JUDGE_MODEL")
        if client is None:
            raise ConfigError("SEMCACHE_JUDGE=llm needs a Redis client (its budget is a shared counter)")
        return LLMJudge(url=url, model=settings.judge_model,
                        api_key=settings.judge_api_key or settings.upstream_api_key,
                        timeout_ms=settings.judge_timeout_ms, budget_per_minute=settings.judge_budget_per_minute,
                        client=client, settings=settings)
    raise ConfigError(f"unknown judge {name!r}", hint=f"SEMCACHE_JUDGE is one of {', '.join(JUDGE_NAMES)}")
