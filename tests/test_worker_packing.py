"""Vectors on the wire as one base64 matrix (``worker.packing``): lossless, validated, and written like before."""

from __future__ import annotations

import base64
import uuid

import numpy as np
import pytest

from cache_core.errors import InvalidInput
from cache_core.schema import WriteCommand, quantize_embedding
from cache_core.store import get_document
from tests.fixtures_worker import entry_keys, make_command, run_task
from worker.packing import pack_embeddings, unpack_embeddings
from worker.queue import CeleryWriteQueue
from worker.tasks import WRITE_ENTRIES


def _commands(vectors: list[list[float] | None]) -> list[dict]:
    return [make_command("t", f"prompt {i}", embedding=v) for i, v in enumerate(vectors)]


def test_embedder_vectors_travel_as_float32_and_come_back_bit_for_bit():
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((3, 384)).astype(np.float32).tolist()  # what an embedder's tolist() gives
    commands = _commands([vectors[0], None, vectors[1], vectors[2]])
    slim, packed = pack_embeddings(commands)
    assert packed["dtype"] == "float32" and packed["dim"] == 384 and packed["rows"] == [0, 2, 3]
    assert all("embedding" not in slim[i] for i in (0, 2, 3)) and slim[1]["embedding"] is None
    assert len(base64.b64decode(packed["data"])) == 3 * 384 * 4  # 1.5 KB a vector, not about 8 KB of JSON text
    back = unpack_embeddings(slim, packed)
    assert [c.get("embedding") for c in back] == [vectors[0], None, vectors[1], vectors[2]]
    assert back[1] == commands[1] and "embedding" not in slim[0]  # new dicts: the task's own arguments unchanged


def test_vectors_that_are_not_float32_travel_as_float64_unchanged():
    vectors = [[0.1, 0.2, 0.3], [1 / 3, -2 / 3, 0.5]]  # 0.1 is no float32: narrowing would move the vector
    slim, packed = pack_embeddings(_commands(vectors))
    assert packed["dtype"] == "float64"
    assert [c["embedding"] for c in unpack_embeddings(slim, packed)] == vectors


def test_nothing_is_packed_without_vectors_or_with_vectors_of_several_lengths():
    plain = _commands([None, None])
    assert pack_embeddings(plain) == (plain, None)
    ragged = _commands([[0.5, 0.5], [0.5, 0.5, 0.5]])  # the worker reports the wrong one, as it always did
    assert pack_embeddings(ragged) == (ragged, None)


@pytest.mark.parametrize("change, message", [
    (lambda p: p.update(data="not base64!"), "not base64"),
    (lambda p: p.update(data=base64.b64encode(b"\0" * 12).decode()), "bytes for 2 rows"),
    (lambda p: p.update(rows=[0, 0]), "distinct positions"),
    (lambda p: p.update(rows=[0, 5]), "distinct positions"),
    (lambda p: p.update(dtype="int8"), "invalid embeddings"),
    (lambda p: p.update(extra="x"), "invalid embeddings"),
    (lambda p: p.pop("dim"), "invalid embeddings"),
])  # fmt: skip
def test_a_malformed_matrix_is_invalid_input(change, message):
    slim, packed = pack_embeddings(_commands([[0.5, -0.5], [0.25, 0.75]]))
    change(packed)
    with pytest.raises(InvalidInput, match=message):
        unpack_embeddings(slim, packed)
    with pytest.raises(InvalidInput, match="invalid embeddings"):
        unpack_embeddings(slim, "nope")


def test_a_command_with_a_vector_of_its_own_and_a_packed_row_is_invalid_input():
    slim, packed = pack_embeddings(_commands([[0.5, -0.5], [0.25, 0.75]]))
    slim[1]["embedding"] = [1.0, 0.0]
    with pytest.raises(InvalidInput, match="command #1 carries its own embedding"):
        unpack_embeddings(slim, packed)


def test_the_queue_sends_packed_vectors_and_the_worker_stores_them_as_before(worker_settings, celery_app,
                                                                             redis_client, embedder):
    t = f"t-{uuid.uuid4().hex[:10]}"
    prompts = ["How long do elephants live?", "What do koalas eat?", "How fast can a cheetah run?"]
    vectors = embedder.embed(prompts).tolist()
    commands = [WriteCommand.model_validate(make_command(t, p, "An answer.", embedding=v))
                for p, v in zip(prompts, vectors)]
    commands.append(WriteCommand.model_validate(make_command(t, "Why is the sky blue?", "Rayleigh scattering.")))
    nan_row = make_command(t, "A vector with a hole", "x", embedding=[float("nan")] * embedder.dim)
    queue = CeleryWriteQueue(celery_app, worker_settings, batch_size=len(commands), linger_ms=2000)
    task_ids = {queue.enqueue(c) for c in commands}
    assert queue.flush(10) and len(task_ids) == 1 and queue.tasks_sent == 1
    summary = celery_app.AsyncResult(task_ids.pop()).get(timeout=90)
    assert summary["counts"] == {"approve": 4, "hold": 0, "drop": 0, "invalid": 0}
    ids = [r["id"] for r in summary["results"]]
    for entry_id, vector in zip(ids, vectors):  # the read path's vector, stored as SEMCACHE_EMBEDDING_STORAGE says
        stored = get_document(redis_client, worker_settings, entry_id)["embedding"]
        assert stored == quantize_embedding(vector, worker_settings.embedding_storage)
    assert len(entry_keys(redis_client, worker_settings, t)) == 4
    queue.close()

    # a packed row is validated like an inline vector: a NaN row is an invalid command, the others are written
    slim, packed = pack_embeddings([make_command(t, "Where do penguins live?", "South.", embedding=vectors[0]),
                                    {**nan_row, "embedding": [0.0] * embedder.dim}])
    raw = np.frombuffer(base64.b64decode(packed["data"]), dtype=np.float32).copy()
    raw[embedder.dim:] = np.nan
    packed["data"] = base64.b64encode(raw.tobytes()).decode()
    result = run_task(celery_app, WRITE_ENTRIES, commands=slim, embeddings=packed)
    assert result.state == "SUCCESS", result.result
    assert result.result["counts"]["approve"] == 1 and [i["index"] for i in result.result["invalid"]] == [1]
    assert "NaN" in result.result["invalid"][0]["error"]

    # a malformed matrix fails the whole task as invalid input (never retried) and writes nothing
    before = len(entry_keys(redis_client, worker_settings, t))
    bad = run_task(celery_app, WRITE_ENTRIES, commands=slim, embeddings={**packed, "rows": [0, 7]})
    assert bad.state == "FAILURE" and type(bad.result).__name__ == "InvalidInput"
    assert len(entry_keys(redis_client, worker_settings, t)) == before == 5
