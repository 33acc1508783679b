"""Helpers of the quality tests: small labeled CSVs made on the fly (stream and pairs formats), and an independent
re-implementation of both protocols in plain numpy that the tests compare ``semcache eval`` against."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np

from cache_core.query import Candidate
from cache_core.schema import Scope, entry_id, normalize_prompt
from cache_core.store import answer_group

INTENTS = {
    "balance": ["what is my account balance", "how much money is in my account", "show me my account balance",
                "tell me my bank balance", "how much do i have in checking", "what's left in my account"],
    "weather": ["what is the weather today", "how is the weather today", "what's the weather like outside",
                "will it rain today", "weather forecast for today", "is it going to be sunny today"],
    "timer": ["set a timer for ten minutes", "start a 10 minute timer", "timer for ten minutes please",
              "please set a ten minute timer", "can you set a timer for 10 minutes", "count down ten minutes"],
    "greeting": ["hello there", "hi there", "hey how are you", "good morning to you", "hello", "hi"],
    "transfer": ["send money to my brother", "transfer 50 dollars to savings", "move money between accounts",
                 "wire money to john", "make a transfer to my savings account", "pay my friend 20 dollars"],
}  # fmt: skip
OOS = ["who won the football game yesterday", "how do i bake sourdough bread", "what is the capital of peru",
       "recommend a good novel to read", "how tall is mount everest", "what is my account balance in bitcoin"]
PAIRS = [
    ("How do I learn Python quickly?", "What is the fastest way to learn Python?", 1),
    ("How do I learn Python quickly?", "How do I learn Java quickly?", 0),
    ("What is the capital of France?", "Which city is the capital of France?", 1),
    ("How can I lose weight fast?", "What is the quickest way to lose weight?", 1),
    ("How can I lose weight fast?", "How can I gain weight fast?", 0),
    ("What is the best phone to buy in 2024?", "Which smartphone should I buy this year?", 1),
    ("Why is the sky blue?", "Why is the sky blue?", 1),
    ("How do I make pizza dough?", "What is a good pizza topping?", 0),
    ("What causes earthquakes?", "Why do earthquakes happen?", 1),
    ("Is coffee bad for your health?", "Is tea bad for your health?", 0),
    ("How do I reset my iPhone?", "How can I factory reset an iPhone?", 1),
    ("What is machine learning?", "Can you explain what machine learning is?", 1),
]


def write_stream_csv(path: Path) -> Path:
    rows = [(t, intent, "train" if i < 4 else "test") for intent, texts in INTENTS.items() for i, t in enumerate(texts)]
    rows += [(t, "oos", "oos_test") for t in OOS]
    rows.append(("what is my account balance", "balance", "test"))  # an exact repeat: served by the exact path
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "intent", "split"])
        writer.writerows(rows)
    return path


def write_pairs_csv(path: Path) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["q1", "q2", "is_duplicate", "split"])
        writer.writerows([(a, b, d, "test") for a, b, d in PAIRS])
    return path


def read_stream(path: Path) -> list[tuple[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return [(r["text"], r["intent"]) for r in csv.DictReader(fh)]


def _candidates(vector: np.ndarray, stored: list[dict], k: int) -> list[Candidate]:
    if not stored:
        return []
    sims = np.stack([e["vector"] for e in stored]) @ vector
    top = np.argsort(-sims, kind="stable")[:k]
    return [Candidate(key=stored[j]["id"], fields={"id": stored[j]["id"], "group": stored[j]["group"]},
                      similarity=float(sims[j])) for j in top]


def simulate_stream(rows: list[tuple[str, str]], vectors: dict[str, np.ndarray], policy, knob: float, k: int,
                    seed: int = 42, oos: str = "oos") -> tuple[int, int]:
    """(hits, wrong hits) of the stream protocol, by brute force: the expected answer of ``semcache eval``."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    scope = Scope(tenant="eval")
    stored: list[dict] = []
    by_norm: dict[str, dict] = {}
    hits = wrong = 0
    for i in order:
        text, intent = rows[i]
        entry = by_norm.get(normalize_prompt(text))
        if entry is None:
            chosen = policy.choose(_candidates(vectors[text], stored, k), knob, {})
            entry = next((e for e in stored if chosen is not None and e["id"] == chosen.key), None)
        if entry is not None:
            hits += 1
            wrong += intent == oos or entry["intent"] != intent
        else:
            new = {"id": entry_id(text, scope), "vector": vectors[text], "intent": intent,
                   "group": answer_group(intent)}
            stored.append(new)
            by_norm[normalize_prompt(text)] = new
    return hits, wrong


def simulate_pairs(vectors: dict[str, np.ndarray], policy, knob: float, k: int) -> tuple[int, int, int]:
    """(hits, correct hits, positives) of the pairs protocol by brute force."""
    scope = Scope(tenant="eval")
    stored, by_id = [], {}
    for q1, _, _ in PAIRS:
        eid = entry_id(q1, scope)
        if eid not in by_id:
            by_id[eid] = {"id": eid, "vector": vectors[q1], "group": answer_group(q1)}
            stored.append(by_id[eid])
    hits = correct = 0
    for q1, q2, dup in PAIRS:
        served = entry_id(q2, scope) if entry_id(q2, scope) in by_id else None
        if served is None:
            chosen = policy.choose(_candidates(vectors[q2], stored, k), knob, {})
            served = chosen.key if chosen else None
        if served is not None:
            hits += 1
            correct += bool(dup) and served == entry_id(q1, scope)
    return hits, correct, sum(d for _, _, d in PAIRS)


def test_the_made_csvs_are_valid_data(tmp_path):
    from cache_core.evaluation import read_dataset

    stream = read_dataset(write_stream_csv(tmp_path / "s.csv"))
    pairs = read_dataset(write_pairs_csv(tmp_path / "p.csv"))
    assert stream.protocol == "stream" and len(stream.rows) == 5 * 6 + len(OOS) + 1
    assert pairs.protocol == "pairs" and sum(r.duplicate for r in pairs.rows) == 8
