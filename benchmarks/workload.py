"""The benchmark workload: seeded, identical for every system.

Stores are ``N`` prompts of CLINC150 ``train`` with one answer each; lookups are ``M`` prompts drawn from CLINC150
``test`` and ``oos_test``, of which a fraction (30% by default) repeat an earlier lookup prompt exactly, as real
FAQ traffic does. A semantic-only lookup list (no repeats) uses other test prompts than the mixed list, so neither
run warms the other.

>>> w = make_workload(entries=100, lookups=50, seed=7)
>>> len(w.stores), len(w.lookups), sum(w.repeats)
(100, 50, 15)
>>> make_workload(entries=100, lookups=50, seed=7).lookups == w.lookups
True
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

__all__ = ["Row", "Workload", "clinc150", "make_workload", "answer_for", "synthetic_prompts"]

_FILLER = (
    "Here is what you need to know. Open the app, go to the relevant section and follow the steps shown there; "
    "if anything looks wrong, contact support and mention this answer so they can help you faster."
)


@dataclass(frozen=True)
class Row:
    text: str
    intent: str
    split: str


@lru_cache(maxsize=1)
def clinc150() -> tuple[Row, ...]:
    """Every row of the shipped CLINC150 (``semcache/data/clinc150.csv``, CC BY 3.0)."""
    with resources.files("semcache").joinpath("data/clinc150.csv").open(encoding="utf-8") as handle:
        return tuple(Row(r["text"], r["intent"], r["split"]) for r in csv.DictReader(handle))


def answer_for(intent: str) -> str:
    """The one answer of an intent: about 230 characters, like a short LLM reply."""
    return f"[{intent}] {_FILLER}"


@dataclass
class Workload:
    """What every system stores and looks up. ``intents`` say which intent a lookup prompt has (``oos`` when out
    of scope), so a hit can be checked: it is wrong when the served answer belongs to another intent."""

    seed: int
    stores: list[tuple[str, str]]  # (prompt, answer)
    store_intents: list[str]
    lookups: list[str]
    lookup_intents: list[str]
    repeats: list[bool]
    semantic_lookups: list[str] = field(default_factory=list)
    semantic_intents: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {
            "seed": self.seed,
            "entries": len(self.stores),
            "lookups": len(self.lookups),
            "repeat_fraction": round(sum(self.repeats) / max(len(self.lookups), 1), 4),
            "semantic_lookups": len(self.semantic_lookups),
            "stores_from": "CLINC150 train",
            "lookups_from": "CLINC150 test + oos_test",
        }


def make_workload(entries: int, lookups: int, *, seed: int = 42, repeat_fraction: float = 0.30,
                  semantic_lookups: int | None = None) -> Workload:
    """The seeded workload. ``semantic_lookups`` (default: ``lookups``) fresh prompts form the no-repeat list."""
    rows = clinc150()
    train = [r for r in rows if r.split == "train"]
    pool = [r for r in rows if r.split in ("test", "oos_test")]
    if entries > len(train):
        raise ValueError(f"at most {len(train)} entries come from CLINC150 train (use the scaling run for more)")
    rng = random.Random(seed)
    stored = rng.sample(train, entries)
    rng.shuffle(pool)
    n_repeat = round(lookups * repeat_fraction) if lookups > 1 else 0
    n_fresh = lookups - n_repeat
    n_semantic = lookups if semantic_lookups is None else semantic_lookups
    if n_fresh + n_semantic > len(pool):
        raise ValueError(f"{n_fresh} fresh + {n_semantic} semantic-only lookups exceed the {len(pool)} test prompts")
    fresh, rest = pool[:n_fresh], pool[n_fresh : n_fresh + n_semantic]
    # Repeats go anywhere but first; each repeats a uniformly chosen earlier lookup.
    repeat_at = set(rng.sample(range(1, lookups), n_repeat)) if n_repeat else set()
    seq: list[Row] = []
    flags: list[bool] = []
    fresh_iter = iter(fresh)
    for i in range(lookups):
        if i in repeat_at:
            seq.append(seq[rng.randrange(len(seq))])
            flags.append(True)
        else:
            seq.append(next(fresh_iter))
            flags.append(False)
    return Workload(
        seed=seed,
        stores=[(r.text, answer_for(r.intent)) for r in stored],
        store_intents=[r.intent for r in stored],
        lookups=[r.text for r in seq],
        lookup_intents=[r.intent for r in seq],
        repeats=flags,
        semantic_lookups=[r.text for r in rest],
        semantic_intents=[r.intent for r in rest],
    )


_SLOTS = (
    "for my account", "in london", "before friday", "for two people", "next week", "on my phone", "in spanish",
    "for the kids", "this weekend", "at home", "for work", "by tomorrow", "in the morning", "for my trip",
    "without fees", "from my savings", "with my partner", "for tonight", "near me", "after lunch",
)


def synthetic_prompts(count: int, *, seed: int = 0, start: int = 0) -> list[str]:
    """``count`` distinct prompts for the scaling run: a CLINC150 prompt, one or two slot phrases and a number.

    Deterministic in ``(seed, start + i)``, so a run can add prompts in chunks and get the same ones every time.
    """
    base = [r.text for r in clinc150() if r.split in ("train", "val")]
    out = []
    for i in range(start, start + count):
        rng = random.Random(seed * 1_000_003 + i)
        slots = rng.sample(_SLOTS, rng.randint(1, 2))
        out.append(f"{rng.choice(base)} {' '.join(slots)} (ref {i})")
    return out
