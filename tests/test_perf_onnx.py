"""The ONNX backend: exported once, gives the torch model's vectors, survives a fork, is shared between data dirs."""

from __future__ import annotations

import json
import multiprocessing

import numpy as np
import pytest

from cache_core.embedder import OnnxEmbedder, export_onnx, load_embedder, onnx_export_dir

TEXTS = [
    "How do I reset my password?",
    "what's the capital of australia",
    "Ünïcödé and emoji 🚀 in a prompt",
    "a",
    "word " * 600,  # beyond the model's window: truncated the same way by both backends
]


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("onnx-data")
    export_onnx("", data_dir, share=False)  # a real export, not a link to one made elsewhere
    return data_dir


@pytest.fixture(scope="module")
def onnx_embedder(onnx_dir):
    return OnnxEmbedder(data_dir=onnx_dir)


def test_onnx_vectors_equal_torch_vectors(onnx_embedder, embedder):
    a = onnx_embedder.embed(TEXTS)
    b = embedder.embed(TEXTS)
    assert a.shape == b.shape == (len(TEXTS), 384) and a.dtype == np.float32
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert (a * b).sum(axis=1).min() > 0.9999
    assert onnx_embedder.name == embedder.name  # same model for the index's metadata: backends are interchangeable


def test_export_happens_once(onnx_dir):
    target = onnx_export_dir("", onnx_dir)
    meta = json.loads((target / "export.json").read_text())
    assert meta["dim"] == 384 and meta["max_seq_length"] == 256 and "input_ids" in meta["inputs"]
    stamp = (target / "model.onnx").stat().st_mtime_ns
    again = OnnxEmbedder(data_dir=onnx_dir)
    assert again.export_dir == target and (target / "model.onnx").stat().st_mtime_ns == stamp


def _embed_in_child(embedder, conn):
    conn.send(embedder.embed(["embedded in a forked child"]).tolist())
    conn.close()


def test_embedding_works_in_a_forked_child(onnx_embedder):
    """``semcache worker`` loads the model, then forks its pool: the child must make its own session."""
    onnx_embedder.clear_cache()
    parent = onnx_embedder.embed(["embedded in a forked child"])  # the parent's session exists before the fork
    onnx_embedder.clear_cache()
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_embed_in_child, args=(onnx_embedder, sender))
    child.start()
    assert receiver.poll(120), "the forked child did not answer (a session made before the fork hangs)"
    vector = np.array(receiver.recv(), dtype=np.float32)
    child.join(30)
    assert child.exitcode == 0
    assert np.allclose(vector, parent, atol=1e-6)


def test_exports_are_shared_between_data_dirs(onnx_dir, tmp_path, monkeypatch):
    from cache_core.embedder import _link_tree

    home = tmp_path / "xdg"
    monkeypatch.setenv("XDG_DATA_HOME", str(home))  # the per-user default data dir, here in tmp
    shared = onnx_export_dir("", home / "semcache")
    shared.mkdir(parents=True)
    _link_tree(onnx_export_dir("", onnx_dir), shared)  # as if an earlier process had exported there
    first = export_onnx("", tmp_path / "one")
    second = export_onnx("", tmp_path / "two")
    inode = (shared / "model.onnx").stat().st_ino
    assert (first / "model.onnx").stat().st_ino == inode == (second / "model.onnx").stat().st_ino


def test_load_embedder_picks_the_backend(onnx_dir):
    assert load_embedder(backend="onnx", data_dir=onnx_dir).backend == "onnx"
    from cache_core.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown embedding backend"):
        load_embedder(backend="tensorflow")


def test_thread_count_can_be_set(onnx_embedder):
    onnx_embedder.set_num_threads(1)
    try:
        assert onnx_embedder.embed(["one thread"]).shape == (1, 384)
        assert onnx_embedder._runner.session.get_session_options().intra_op_num_threads == 1
    finally:
        onnx_embedder.set_num_threads(0)


def test_length_buckets_cover_every_position_once_within_the_limits():
    from hypothesis import given, settings, strategies as st

    from cache_core.embedder import PADDING_SLACK, length_buckets

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.integers(min_value=0, max_value=300), max_size=200), st.integers(min_value=1, max_value=64))
    def check(lengths, batch_size):
        buckets = length_buckets(lengths, batch_size)
        assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
        for bucket in buckets:
            assert 1 <= len(bucket) <= batch_size
            if len(bucket) > 1:  # a bucket of one pads nothing; a bigger one stays within the slack
                sizes = [max(1, lengths[i]) for i in bucket]
                assert len(sizes) * max(sizes) <= (1 + PADDING_SLACK) * sum(sizes) + 1e-9

    check()


def test_bucketed_batch_gives_each_text_its_own_vector_in_order(onnx_embedder):
    """One call with prompts of very different lengths (several buckets, out of order) returns, row by row, what
    each prompt embeds to alone: the length sorting is undone."""
    texts = ["short", "a much longer prompt about the opening hours of the museum on public holidays, please",
             "hi", "medium sized question here", "x " * 300, "what is the weather", "ok"] * 5
    onnx_embedder.clear_cache()
    together = onnx_embedder._encode(texts)  # the runner itself: no LRU, no de-duplication in between
    alone = np.stack([onnx_embedder._encode([t])[0] for t in texts[:7]] * 5)
    together /= np.linalg.norm(together, axis=1, keepdims=True)
    alone /= np.linalg.norm(alone, axis=1, keepdims=True)
    assert (together * alone).sum(axis=1).min() > 0.9999
    # and the rows are not interchangeable: a mix-up would pair a prompt with another one's vector
    assert (together[0] * alone[1]).sum() < 0.9
