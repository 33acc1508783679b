"""The memory-options benchmark's quality streams (benchmarks/memory_options.py) agree with a plain, slow
simulation of the same protocol: every lookup searches all stored entries from scratch and asks the real policy."""

from __future__ import annotations

import numpy as np

from benchmarks.memory_options import (
    best_hit_rate,
    consensus_stream_quality,
    stored_vectors,
    stream_quality,
)
from cache_core.policy import ConsensusPolicy, ThresholdPolicy
from cache_core.query import Candidate
from cache_core.schema import embedding_vector, quantize_embedding


def _clustered(n=400, dim=24, groups=12, seed=5):
    """Unit vectors around a few centres (so there are near neighbours, agreeing and competing groups)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(groups, dim))
    labels = rng.integers(0, groups, n)
    x = centres[labels] + rng.normal(scale=0.35, size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    intents = [f"i{g}" for g in labels]
    oos = list(rng.random(n) < 0.05)
    return x.astype(np.float32), intents, oos


def _naive(sims, intents, oos, knob, policy, k):
    stored: list[int] = []
    hits = wrong = 0
    for i in range(sims.shape[1]):
        order = sorted(stored, key=lambda j: (-sims[j, i], j))[:k]  # nearest first, the earlier entry on a tie
        cands = [Candidate(key=str(j), fields={"group": intents[j]}, similarity=float(sims[j, i])) for j in order]
        served = policy.choose(cands, knob, {}) if cands else None
        if served is None:
            stored.append(i)
            continue
        hits += 1
        wrong += oos[i] or intents[int(served.key)] != intents[i]
    return hits / sims.shape[1], wrong / max(hits, 1)


def test_consensus_and_threshold_streams_match_a_plain_simulation():
    x, intents, oos = _clustered()
    stored = stored_vectors(x, "int8")
    sims = stored @ x.T
    knobs = [0.6, 0.75, 0.85]
    fast = consensus_stream_quality(sims, intents, oos, knobs, k=8)
    for (knob, hit, wrong) in fast:
        assert (hit, wrong) == _naive(sims, intents, oos, knob, ConsensusPolicy(), 8)
    fast_t = stream_quality(x, stored, intents, oos, knobs, sims=sims)
    for (knob, hit, wrong) in fast_t:
        assert (hit, wrong) == _naive(sims, intents, oos, knob, ThresholdPolicy(), 1)
    assert len({h for _, h, _ in fast}) == 3 and fast[0][1] > 0.3  # the knobs matter, hits happen


def test_stored_vectors_are_what_the_product_stores_and_best_hit_rate_picks_within_the_budget():
    x, _, _ = _clustered(n=20)
    expected = np.stack([embedding_vector(quantize_embedding(v, "int8")) for v in x])
    assert np.allclose(stored_vectors(x, "int8"), expected, atol=1e-6)
    assert np.allclose(stored_vectors(x, "float32"), x, atol=1e-6)
    curve = [(0.8, 0.6, 0.02), (0.9, 0.5, 0.009), (0.95, 0.3, 0.004)]
    assert best_hit_rate(curve, 0.01) == {"knob": 0.9, "hit_rate": 0.5, "wrong_rate": 0.009}
    assert best_hit_rate(curve, 0.005)["knob"] == 0.95 and best_hit_rate(curve, 0.001) is None
