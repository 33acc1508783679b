"""Match policies: given the k nearest approved entries of a scope, decide whether one of them answers the prompt.

KNN always returns k results however far they are; the policy is what compares similarity to the threshold.
All similarities are cosine similarities in [-1, 1] (1 = same direction).
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

from .query import Candidate

__all__ = ["MatchPolicy", "ThresholdPolicy", "make_policy"]


class MatchPolicy(Protocol):
    name: str

    def choose(self, candidates: list[Candidate], threshold: float, params: Mapping[str, Any]) -> Candidate | None:
        """The candidate to serve, or None for a miss. ``candidates`` are nearest first."""


class ThresholdPolicy:
    """The peers' rule: serve the nearest entry when its similarity reaches the threshold."""

    name = "threshold"

    def choose(self, candidates: list[Candidate], threshold: float, params: Mapping[str, Any]) -> Candidate | None:
        if candidates and candidates[0].similarity >= threshold:
            return candidates[0]
        return None


def make_policy(name: str) -> MatchPolicy:
    if name == "threshold":
        return ThresholdPolicy()
    raise ValueError(f"unknown match policy {name!r}")
