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

from dataclasses import dataclass
from typing import Protocol

__all__ = ["JudgeRequest", "JudgeVerdict", "Judge", "JUDGE_NAMES"]

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
