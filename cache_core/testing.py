"""Test helpers shipped to users: a deterministic fake embedder and a settings factory.

Use the fake only in unit tests of your own code: its vectors know words, not meanings.

>>> emb = HashingEmbedder(dim=64)
>>> v = emb.embed(["hello world", "hello world"])
>>> bool((v[0] == v[1]).all()), v.shape
(True, (2, 64))
"""

from __future__ import annotations

import hashlib
import re
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .settings import Settings

__all__ = ["HashingEmbedder", "CountingEmbedder", "test_settings"]


class HashingEmbedder:
    """Bag of hashed words (and word pairs): prompts sharing most words are close. Deterministic, no model."""

    def __init__(self, dim: int = 384, name: str = "hashing-test-embedder") -> None:
        self.dim = dim
        self.name = name
        self.calls = 0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            words = re.findall(r"\w+", text.lower()) or [""]
            grams = words + [a + " " + b for a, b in zip(words, words[1:])]
            for gram in grams:
                digest = hashlib.blake2b(gram.encode("utf-8", "surrogatepass"), digest_size=8).digest()
                index = int.from_bytes(digest[:4], "little") % self.dim
                out[row, index] += 1.0 if digest[4] & 1 else -1.0
            norm = np.linalg.norm(out[row])
            out[row] /= norm if norm else 1.0
        return out


class CountingEmbedder:
    """Wraps an embedder and counts the texts it was asked to embed (to assert that a path skipped it)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.dim = inner.dim
        self.texts = 0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.texts += len(texts)
        return self.inner.embed(texts)


def test_settings(redis_url: str, *, index: str | None = None, data_dir: Path | None = None, **overrides: Any) -> Settings:
    """Settings for one test: a fresh index name (so tests never see each other's entries) on a given Redis."""
    fields: dict[str, Any] = {"redis_url": redis_url, "index": index or f"t{uuid.uuid4().hex[:12]}"}
    if data_dir is not None:
        fields["data_dir"] = data_dir
    return Settings(**{**fields, **overrides})


test_settings.__test__ = False  # not a pytest test
