"""Match policies: given the k nearest approved entries of a scope, decide whether one of them answers the prompt.

KNN always returns k results however far they are; the policy is what compares similarity to the threshold.
All similarities are cosine similarities in [-1, 1] (1 = same direction).

Two policies:

- :class:`ThresholdPolicy`, the peers' rule (RedisVL, LangCache, GPTCache): serve the nearest entry when its
  similarity reaches one global number. Kept as the baseline ``semcache eval`` measures against.
- :class:`ConsensusPolicy`, the default: the k neighbours vote with their answer ``group`` (entries whose responses
  are the same text share a group). Enough agreeing neighbours widen the radius around the nearest entry of a
  group, a competing group about as near narrows it. On CLINC150 it serves about twice as many hits at 1% wrong
  hits as the baseline; where neighbours rarely share answers it stays at or above the baseline (docs/quality.md).

Both honour a per-entry floor learned from feedback (:mod:`cache_core.feedback`): an entry someone reported as a
wrong answer at similarity ``s`` is never served again below ``s`` (plus a margin).

>>> from cache_core.query import Candidate
>>> def cand(i, s, g):
...     return Candidate(key=f"k{i}", fields={"id": str(i), "group": g}, similarity=s)
>>> agree = [cand(i, 0.84 - i / 100, "a") for i in range(6)]  # the nearest entry and five more with its answer
>>> ThresholdPolicy().choose(agree, 0.90, {}) is None
True
>>> ConsensusPolicy().choose(agree, 0.90, {}).key
'k0'
>>> ConsensusPolicy().choose(agree[:3], 0.90, {}) is None  # two agreeing neighbours: too few to widen
True
>>> split = [cand(1, 0.92, "a"), cand(2, 0.91, "b"), cand(3, 0.90, "b")]
>>> ConsensusPolicy().choose(split, 0.90, {}) is None
True
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Protocol

from .query import Candidate

JUDGED_PREFIX = "j:"  # cache_core.grouping.JUDGED_PREFIX (the read path does not import the write side)

if TYPE_CHECKING:
    from .settings import Settings

__all__ = [
    "MatchPolicy",
    "ThresholdPolicy",
    "ConsensusPolicy",
    "ConsensusParams",
    "make_policy",
    "entry_floor",
    "POLICY_NAMES",
    "FEEDBACK_KEY",
]

POLICY_NAMES = ("threshold", "consensus")

# Where feedback keeps its per-entry state inside the entry's ``metadata`` (returned by the one KNN query, so the
# read path needs no second round trip). See cache_core.feedback.
FEEDBACK_KEY = "_semcache_feedback"


class MatchPolicy(Protocol):
    name: str

    def choose(self, candidates: list[Candidate], threshold: float, params: Mapping[str, Any]) -> Candidate | None:
        """The candidate to serve, or None for a miss. ``candidates`` are nearest first; ``threshold`` is the
        scope's (or the call's) ``min_similarity``; ``params`` are the scope's calibrated parameters."""


def entry_floor(candidate: Candidate) -> float:
    """The similarity this entry itself requires (learned from wrong-answer feedback); -1 when none.

    Only ever raises the bar: a value written by a caller into ``metadata`` cannot make an entry easier to hit.
    """
    meta = candidate.fields.get("metadata")
    if not isinstance(meta, dict):
        return -1.0
    state = meta.get(FEEDBACK_KEY)
    if not isinstance(state, dict):
        return -1.0
    try:
        return float(state.get("min_similarity", -1.0))
    except (TypeError, ValueError):
        return -1.0


class ThresholdPolicy:
    """The peers' rule: serve the nearest entry when its similarity reaches the threshold."""

    name = "threshold"

    def choose(self, candidates: list[Candidate], threshold: float, params: Mapping[str, Any]) -> Candidate | None:
        if candidates and candidates[0].similarity >= max(threshold, entry_floor(candidates[0])):
            return candidates[0]
        return None


@dataclass(frozen=True)
class ConsensusParams:
    """The knobs of :class:`ConsensusPolicy` (defaults: ``SEMCACHE_CONSENSUS_*``; per scope: calibration).

    ``floor``: neighbours less similar than this are no evidence at all. A neighbour's weight rises linearly from 0
    at ``floor`` to 1 at similarity 1. ``support``: how much the agreeing weight widens the radius. ``conflict``:
    how much a competing group's weight narrows it. ``min_agree``: the radius widens only when at least this many
    other members of the served entry's group are among the k (fewer is no evidence: it is how answer groups of
    two or three look when they are not the same question). ``compete_range``: a competing neighbour counts fully
    when it is as similar as the served entry, and not at all when it is ``compete_range`` less similar (0: every
    competing neighbour counts by its weight alone, the rule before this knob).
    """

    floor: float = 0.3
    support: float = 1.0
    conflict: float = 1.0
    min_agree: int = 5
    compete_range: float = 0.2
    judged_conflict: float = 0.5

    def merged(self, params: Mapping[str, Any]) -> "ConsensusParams":
        """These defaults overridden by a scope's calibrated values (``consensus_floor`` ...); junk is ignored."""
        values = {"floor": self.floor, "support": self.support, "conflict": self.conflict,
                  "min_agree": float(self.min_agree), "compete_range": self.compete_range,
                  "judged_conflict": self.judged_conflict}
        for name in values:
            raw = params.get(f"consensus_{name}")
            if isinstance(raw, (int, float)) and not isinstance(raw, bool) and -1.0 <= raw <= 100.0:
                values[name] = float(raw)
        values["floor"] = min(values["floor"], 0.99)
        values["support"] = max(values["support"], 0.0)
        values["conflict"] = max(values["conflict"], 0.0)
        values["min_agree"] = int(max(values["min_agree"], 0.0))
        values["compete_range"] = min(max(values["compete_range"], 0.0), 2.0)
        values["judged_conflict"] = min(max(values["judged_conflict"], 0.0), 1.0)
        return ConsensusParams(**values)


class ConsensusPolicy:
    """Neighbour consensus over the k nearest approved entries, using their answer ``group``.

    With ``r = 1 - threshold`` the radius (cosine distance) the baseline would allow, the nearest entry (of the
    nearest entry's group, skipping members whose feedback floor it misses) is served when its distance is within::

        r * (1 + support * agreeing weight) / (1 + conflict * competing weight)

    where the agreeing weight sums the group's other members among the k (counted only when there are at least
    ``min_agree`` of them), and the competing weight sums the members of every *other group that has at least two
    members* among the k, each scaled down by how much less similar than the served entry it is
    (``compete_range``), and by ``judged_conflict`` for a group a judge formed. A lone neighbour with another answer is no evidence of disagreement: answers that mean
    the same thing in other words land in different groups, and most entries of a plain LLM cache are alone in
    their group. So with no group information (every neighbour in its own group) this is exactly
    :class:`ThresholdPolicy`. Only the nearest entry's group is considered: serving a farther group that outvotes
    it measured worse. As ``threshold`` approaches 1 the radius shrinks to 0 whatever the neighbours say.

    ``min_agree`` and ``compete_range`` keep the policy from doing worse than the threshold rule on traffic whose
    answer groups are small (paraphrase clusters of two or three next to a few large ones): without them it
    widened into large neighbouring groups and refused small groups for distant competitors (docs/quality.md,
    "Sets it was not tuned on").
    """

    name = "consensus"

    def __init__(self, defaults: ConsensusParams | None = None) -> None:
        self.defaults = defaults or ConsensusParams()

    def choose(self, candidates: list[Candidate], threshold: float, params: Mapping[str, Any]) -> Candidate | None:
        if not candidates:
            return None
        p = self.defaults.merged(params)
        radius = 1.0 - threshold
        weight: dict[str, float] = defaultdict(float)
        members: dict[str, list[Candidate]] = defaultdict(list)
        for i, cand in enumerate(candidates):
            group = cand.group or f"\x00{i}"  # no group recorded: alone in its own
            weight[group] += self._weight(cand.similarity, p.floor)
            members[group].append(cand)
        group = candidates[0].group or "\x000"
        cands = members[group]
        served = next((c for c in cands if c.similarity >= entry_floor(c)), None)
        if served is None:
            return None
        agree = 0.0
        if len(members[group]) - 1 >= p.min_agree:
            agree = weight[group] - self._weight(served.similarity, p.floor)
        compete = 0.0
        for g, cands_g in members.items():
            if g == group or len(cands_g) < 2:
                continue
            trust = p.judged_conflict if g.startswith(JUDGED_PREFIX) else 1.0
            for c in cands_g:
                w = trust * self._weight(c.similarity, p.floor)
                if p.compete_range > 0:
                    w *= min(max(1.0 - (served.similarity - c.similarity) / p.compete_range, 0.0), 1.0)
                compete += w
        factor = (1.0 + p.support * agree) / (1.0 + p.conflict * compete)
        if factor == 1.0:  # no evidence either way: the threshold rule itself, without float round-off
            return served if served.similarity >= threshold else None
        return served if 1.0 - served.similarity <= radius * factor else None

    @staticmethod
    def _weight(similarity: float, floor: float) -> float:
        return min(max((similarity - floor) / (1.0 - floor), 0.0), 1.0)


def make_policy(name: str, settings: "Settings | None" = None) -> MatchPolicy:
    """The policy ``SEMCACHE_POLICY`` names, with its defaults from the settings."""
    if name == "threshold":
        return ThresholdPolicy()
    if name == "consensus":
        if settings is None:
            return ConsensusPolicy()
        return ConsensusPolicy(ConsensusParams(
            floor=settings.consensus_floor, support=settings.consensus_support, conflict=settings.consensus_conflict,
            min_agree=settings.consensus_min_agree, compete_range=settings.consensus_compete_range,
            judged_conflict=settings.consensus_judged_conflict,
        ))  # fmt: skip
    raise ValueError(f"unknown match policy {name!r} (known: {', '.join(POLICY_NAMES)})")
