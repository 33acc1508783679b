"""How ``$.embedding`` is stored (SEMCACHE_EMBEDDING_STORAGE, SEMCACHE_JSON_FPHA): quantization, its validation,
old float documents beside new integer ones in one index, and the refusal of FPHA by a server without it.
Real embedded Redis, real MiniLM model."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from pydantic import ValidationError

from cache_core.browse import entry_detail
from cache_core.cache import SemanticCache
from cache_core.errors import ConfigError, IndexMismatch, InvalidInput
from cache_core.index import IndexSpec, alias_name, ensure_index, index_info, migrate
from cache_core.schema import CacheEntry, Scope, WriteCommand, embedding_vector, quantize_embedding
from cache_core.settings import Settings
from cache_core.store import build_entry, document_set_args, get_document, write_command

PROMPTS = [
    ("How do I reset my password?", "Use 'Forgot password' on the login page."),
    ("What are your opening hours?", "9 to 5, Monday to Friday."),
    ("How can I cancel my subscription?", "Settings > Billing > Cancel."),
    ("Do you ship to Canada?", "Yes, in 5 to 8 days."),
    ("How do I change my email address?", "Settings > Account > Email."),
    ("Is there a student discount?", "Yes, 20% with a student id."),
    ("Where can I download my invoices?", "Billing > Invoices."),
    ("How do I contact support?", "support@example.com"),
]
QUERIES = ["i forgot my password, how do i reset it", "when are you open", "cancel my subscription please",
           "can you deliver to canada", "change the e-mail of my account", "discount for students?",
           "where are my invoices", "how to reach customer support", "what is the capital of France"]


def unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


# --- quantization: pure functions --------------------------------------------------------------------------------
@pytest.mark.parametrize("storage,limit,min_cos", [("int8", 127, 0.999), ("int16", 32767, 0.9999999)])
def test_quantization_round_trip_keeps_the_direction(embedder, storage, limit, min_cos):
    vectors = embedder.embed([p for p, _ in PROMPTS] + QUERIES)
    for v in vectors:
        q = quantize_embedding(v, storage)
        assert all(type(x) is int for x in q) and max(abs(x) for x in q) == limit  # the scale uses the range
        back = embedding_vector(q)
        assert back.dtype == np.float32 and abs(float(np.linalg.norm(back)) - 1.0) < 1e-6
        assert float(unit(v) @ back) >= min_cos
    # the scale of the input does not matter: the stored integers are the same
    assert quantize_embedding(vectors[0] * 3.7, storage) == quantize_embedding(vectors[0], storage)


def test_float32_storage_keeps_the_floats_and_bad_vectors_are_refused():
    assert quantize_embedding(np.asarray([0.25, -0.5], dtype=np.float32), "float32") == [0.25, -0.5]
    for bad in ([0.0, 0.0], [], [float("nan"), 1.0], [float("inf"), 1.0]):
        with pytest.raises(ValueError):
            quantize_embedding(bad, "int8")
    with pytest.raises(ValueError, match="unknown embedding storage"):
        quantize_embedding([1.0], "int4")
    with pytest.raises(ValueError):
        embedding_vector([0, 0, 0])


def test_similarities_through_int8_stay_within_a_few_thousandths(embedder):
    stored = embedder.embed([p for p, _ in PROMPTS])
    queries = embedder.embed(QUERIES)
    exact = queries @ stored.T
    quant = queries @ np.stack([embedding_vector(quantize_embedding(v, "int8")) for v in stored]).T
    assert float(np.abs(exact - quant).max()) < 3e-3
    assert (exact.argmax(axis=1) == quant.argmax(axis=1)).all()


# --- the schema --------------------------------------------------------------------------------------------------
def _doc(settings, embedding, **kw):
    command = WriteCommand(prompt="p", response="r", scope=Scope(tenant="t"))
    return build_entry(command, settings=settings, embedding=embedding, **kw)


def test_the_document_keeps_integers_as_integers(make_settings):
    ints = _doc(make_settings(embedding_storage="int8"), [0.1, -0.2, 0.4])
    assert ints.embedding == [32, -64, 127] and json.dumps(ints.document()["embedding"]) == "[32, -64, 127]"
    floats = _doc(make_settings(embedding_storage="float32"), [0.1, -0.2, 0.4])
    assert all(type(x) is float for x in floats.document()["embedding"])
    assert _doc(make_settings(), [0.1, -0.2, 0.4]).embedding == ints.embedding  # int8 is the default


def test_cache_entry_validates_integer_embeddings(make_settings):
    fields = _doc(make_settings(), [0.1, -0.2, 0.4]).model_dump()
    assert CacheEntry.model_validate({**fields, "embedding": [1, -2, 3]}).embedding == [1, -2, 3]
    assert CacheEntry.model_validate({**fields, "embedding": [1, 2.5]}).embedding == [1.0, 2.5]  # mixed: floats
    assert CacheEntry.model_validate({**fields, "embedding": [1, 2, 3]}, context={"dim": 3}).embedding == [1, 2, 3]
    bad = {
        "empty": [],
        "all zeros": [0, 0, 0],
        "NaN": [1.0, float("nan")],
        "infinity": [1.0, float("inf")],
        "booleans": [True, False, True],
        "strings": ["1", "2"],
        "nulls": [1, None],
        "beyond int16": [40_000, 1],
        "not a list": "1,2,3",
    }
    for name, value in bad.items():
        with pytest.raises(ValidationError):
            CacheEntry.model_validate({**fields, "embedding": value})
            pytest.fail(name)
    with pytest.raises(ValidationError, match="3 dimensions, the index has 384"):
        CacheEntry.model_validate({**fields, "embedding": [1, 2, 3]}, context={"dim": 384})


def test_build_entry_refuses_a_wrong_dimension_or_a_zero_vector(make_settings):
    settings = make_settings()
    with pytest.raises(InvalidInput, match="3 dimensions, the index has 384"):
        _doc(settings, [0.1, 0.2, 0.3], dim=384)
    with pytest.raises(InvalidInput, match="zeros"):
        _doc(settings, [0.0] * 384)
    assert len(_doc(settings, [0.1] * 384, dim=384).embedding) == 384


# --- real index --------------------------------------------------------------------------------------------------
def _fill(redis_client, settings, embedder, pairs, tenant="acme"):
    ensure_index(redis_client, IndexSpec(settings=settings, dim=embedder.dim, model_name=embedder.name))
    ids = []
    for prompt, response in pairs:
        ids.append(write_command(redis_client, settings, embedder,
                                 WriteCommand(prompt=prompt, response=response, scope=Scope(tenant=tenant)))[0])
    return ids


def _knn(cache, prompt):
    """The read path's own KNN (the k nearest approved entries), as (entry id, similarity)."""
    vector = cache.embedder.embed([prompt])[0]
    ctx = {"scope": Scope(tenant="acme"), "params": {}}
    return [(c.fields["id"], c.similarity) for c in cache._knn(ctx, vector)]


def test_int8_storage_finds_the_same_entries_as_float32(make_settings, redis_client, embedder):
    found = {}
    for storage in ("float32", "int8"):
        settings = make_settings(embedding_storage=storage)
        ids = _fill(redis_client, settings, embedder, PROMPTS)
        doc = get_document(redis_client, settings, ids[0])
        assert all(type(x) is (int if storage == "int8" else float) for x in doc["embedding"])
        cache = SemanticCache(settings, redis_client, embedder, stats=None)
        found[storage] = ([_knn(cache, q) for q in QUERIES],
                          [(r.hit, r.entry.id if r.entry else None) for r in (cache.lookup(q, {"tenant": "acme"},
                                                                                           min_similarity=0.6)
                                                                              for q in QUERIES)])
    (f_knn, f_hits), (i_knn, i_hits) = found["float32"], found["int8"]
    assert i_hits == f_hits and sum(hit for hit, _ in i_hits) >= 5  # the same hits, the same entries
    for f_row, i_row in zip(f_knn, i_knn):
        assert i_row[0][0] == f_row[0][0]  # the same nearest entry
        f_sims, i_sims = dict(f_row), dict(i_row)
        assert set(f_sims) == set(i_sims)  # the same k neighbours (near-ties among far ones may swap places)
        assert max(abs(f_sims[e] - i_sims[e]) for e in f_sims) < 3e-3


def test_float_and_integer_documents_share_one_index(make_settings, redis_client, embedder):
    old = make_settings(embedding_storage="float32")  # documents written before the setting existed
    new = old.model_copy(update={"embedding_storage": "int8"})  # same index, new default
    float_ids = _fill(redis_client, old, embedder, PROMPTS[:4])
    int_ids = _fill(redis_client, new, embedder, PROMPTS[4:])
    info = index_info(redis_client, new)
    assert info["num_docs"] == len(PROMPTS) and info["indexing_failures"] == 0
    cache = SemanticCache(new, redis_client, embedder, stats=None)
    for (prompt, _), entry in zip(PROMPTS, float_ids + int_ids):
        (nearest, similarity), *_ = _knn(cache, prompt)  # the vector search itself, not the exact path
        assert nearest == entry and similarity > 0.998
    for query, (_, response) in zip(QUERIES[:8], PROMPTS):
        assert cache.lookup(query, {"tenant": "acme"}, min_similarity=0.5).entry.response == response
    # the detail page's neighbours come from each document's own stored vector, float or integer
    for entry in (float_ids[0], int_ids[0]):
        detail = entry_detail(redis_client, new, entry)
        assert len(detail.neighbours) == 5 and all(n.entry.id != entry for n in detail.neighbours)
        assert all(-1.0 <= n.similarity <= 1.0 for n in detail.neighbours)


def test_reembedding_migration_stores_the_configured_storage(make_settings, redis_client, embedder):
    old = make_settings(embedding_storage="float32")
    ids = _fill(redis_client, old, embedder, PROMPTS[:3])
    new = old.model_copy(update={"embedding_storage": "int8"})
    out = migrate(redis_client, IndexSpec(settings=new, dim=embedder.dim, model_name=embedder.name),
                  reembed=lambda texts: embedder.embed(texts).tolist())
    assert out["reembedded"] == 3
    for entry in ids:
        stored = get_document(redis_client, new, entry)["embedding"]
        assert all(type(x) is int for x in stored) and max(abs(x) for x in stored) == 127
    cache = SemanticCache(new, redis_client, embedder, stats=None)
    assert cache.lookup(QUERIES[0], {"tenant": "acme"}).entry.id == ids[0]


def test_an_index_built_before_the_float16_default_needs_a_migration(make_settings, redis_client, embedder):
    settings = make_settings(vector_type="FLOAT32", embedding_storage="float32")  # an index from before issue 6
    _fill(redis_client, settings, embedder, PROMPTS[:2])
    half = make_settings(index=settings.index)  # today's defaults: FLOAT16 index, int8 documents
    assert (half.vector_type, half.embedding_storage) == ("FLOAT16", "int8")
    spec = IndexSpec(settings=half, dim=embedder.dim, model_name=embedder.name)
    with pytest.raises(IndexMismatch, match="vector type is FLOAT32, settings ask FLOAT16.*semcache index migrate"):
        SemanticCache(half, redis_client, embedder, stats=None)  # the read path refuses it at startup
    with pytest.raises(IndexMismatch, match="vector type is FLOAT32, settings ask FLOAT16.*semcache index migrate"):
        ensure_index(redis_client, spec)
    migrate(redis_client, spec)
    assert ensure_index(redis_client, spec).endswith("-v2")
    for _ in range(200):  # the new index fills itself from the documents in the background
        if index_info(redis_client, half)["num_docs"] == 2:
            break
        time.sleep(0.05)
    cache = SemanticCache(half, redis_client, embedder, stats=None)
    assert cache.lookup(QUERIES[0], {"tenant": "acme"}, min_similarity=0.6).entry.response == PROMPTS[0][1]


# --- FPHA (Redis 8.8+) -------------------------------------------------------------------------------------------
def test_fpha_is_refused_by_a_server_without_it(make_settings, redis_client, embedder):
    settings = make_settings(json_fpha="FP16")
    with pytest.raises(ConfigError) as caught:
        ensure_index(redis_client, IndexSpec(settings=settings, dim=embedder.dim, model_name=embedder.name))
    message = str(caught.value)
    assert "SEMCACHE_JSON_FPHA=FP16" in message and "Redis 8.8" in message and "version 2.8.3" in message
    assert "unset SEMCACHE_JSON_FPHA" in message
    assert list(redis_client.scan_iter(match=f"{settings.index}*")) == []  # no probe key, no index, no metadata
    assert not index_info(redis_client, settings)["exists"]


def test_fpha_writes_only_the_embedding_with_the_option(make_settings):
    entry = _doc(make_settings(json_fpha="BF16"), [0.1, -0.2, 0.4])
    whole, vector = document_set_args("k", entry, make_settings(json_fpha="BF16"))
    assert whole[:3] == ["JSON.SET", "k", "$"] and "embedding" not in json.loads(whole[3]) and "FPHA" not in whole
    assert vector[:3] == ["JSON.SET", "k", "$.embedding"] and vector[4:] == ["FPHA", "BF16"]
    assert json.loads(vector[3]) == [32.0, -64.0, 127.0] and "." in vector[3]  # floats: FPHA packs float arrays
    (plain,) = document_set_args("k", entry, make_settings())
    assert json.loads(plain[3])["embedding"] == [32, -64, 127] and len(plain) == 4


# --- configuration -----------------------------------------------------------------------------------------------
def test_the_settings_are_read_from_the_environment_and_shown_by_semcache_config(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMCACHE_EMBEDDING_STORAGE", "int16")
    assert Settings().embedding_storage == "int16" and Settings().json_fpha == "off"
    monkeypatch.setenv("SEMCACHE_EMBEDDING_STORAGE", "float64")
    with pytest.raises(ValidationError):
        Settings()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEMCACHE_")}
    env.update(SEMCACHE_DATA_DIR=str(tmp_path), SEMCACHE_EMBEDDING_STORAGE="float32", SEMCACHE_JSON_FPHA="FP16")
    shown = subprocess.run([sys.executable, "-m", "semcache", "config"], env=env, capture_output=True, text=True,
                           timeout=120)
    assert shown.returncode == 0, shown.stderr
    values = json.loads(shown.stdout)
    assert values["embedding_storage"] == "float32" and values["json_fpha"] == "FP16"
    table = subprocess.run([sys.executable, "-m", "semcache", "config", "--markdown"], env=env, capture_output=True,
                           text=True, timeout=120).stdout
    assert "`SEMCACHE_EMBEDDING_STORAGE`" in table and "`SEMCACHE_JSON_FPHA`" in table
    assert "`int8`" in table.split("SEMCACHE_EMBEDDING_STORAGE")[1].split("\n")[0]
