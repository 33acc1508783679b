"""The read path's one KNN returns every EntryView field as one JSONPath union (DIALECT 3): what comes back must be
exactly the stored entry, whatever its text, with null or absent optional keys, over RESP2 and RESP3."""

from __future__ import annotations

import json

import numpy as np
import pytest
import redis
from hypothesis import given, settings as hsettings
from hypothesis import strategies as st

from cache_core.cache import SemanticCache
from cache_core.connection import make_client
from cache_core.policy import FEEDBACK_KEY
from cache_core.query import (
    _OPTIONAL,
    _UNION_ORDER,
    VIEW_PATHS,
    VIEW_UNION,
    knn_query,
    parse_knn,
    scope_filter,
    search_args,
)
from cache_core.schema import SCHEMA_VERSION, EntryView, Scope, Status, WriteCommand
from cache_core.store import get_entry, write_command
from cache_core.testing import CountingEmbedder
from cache_core.writequeue import SyncWriteQueue

SCOPE = {"tenant": "acme"}
PROMPT = "How do I reset my password?"
PARAPHRASE = "how can i reset my password"


@pytest.fixture
def cache(make_settings, redis_client, embedder):
    s = make_settings(policy="threshold")
    c = SemanticCache(s, redis_client, CountingEmbedder(embedder))
    c.write_queue = SyncWriteQueue(lambda cmd: write_command(redis_client, s, embedder, cmd))
    yield c
    c.close()


def store(cache, prompt=PROMPT, response="Click 'Forgot password'.", **fields):
    cmd = WriteCommand(prompt=prompt, response=response, scope=Scope(**SCOPE), **fields)
    return write_command(cache.client, cache.settings, cache.embedder.inner, cmd)[0]


def key_of(cache, entry_id: str) -> str:
    return cache.settings.key_prefix + entry_id


def stored_view(cache, entry_id: str) -> EntryView:
    """The entry as the store reads it back (JSON.GET of the whole document)."""
    return get_entry(cache.client, cache.settings, entry_id)


def knn_reply(client, cache, vector):
    """The read path's KNN exactly as it is sent, on any client."""
    s = cache.settings
    filt, params = scope_filter(Scope(**SCOPE), s.extra_scope_fields, status=Status.APPROVED)
    query, params = knn_query(filt, params, vector, k=s.knn_k, ef_runtime=s.hnsw_ef_runtime,
                              vector_type=s.vector_type)
    return client.execute_command(*search_args(cache.index_name, query, params, s.knn_k))


HOSTILE_TEXT = [
    "He said \"it's fine\" and left",
    "close the union: '] , $['id'] and $.prompt",
    '{"id": "0" * 32, "v": 2, "status": "approved"}',
    '["a", "b", null, 1.5]',
    "null",
    "東京の天気は？ 🌧️ Ünïcödé — ok",
    "back\\slash \\\" and \\u0000-looking text",
    "line one\nline two\ttabbed\r\n",
]


@pytest.mark.parametrize("text", HOSTILE_TEXT)
def test_a_hit_carries_the_stored_entry_whatever_its_text(cache, text):
    meta = {"note": text, "nested": {"list": [1, 2.5, None, text], "flag": True}, "prompt_tokens": 12}
    entry_id = store(cache, prompt=f"{PROMPT} {text}", response=text, metadata=meta, flags=["pii.email"])
    hit = cache.lookup(f"{PARAPHRASE} {text}", SCOPE, min_similarity=0.3)
    assert hit.hit and hit.strategy == "semantic", hit
    assert hit.entry.model_dump(exclude={"hit_count", "last_hit_at"}) == stored_view(cache, entry_id).model_dump(
        exclude={"hit_count", "last_hit_at"})
    assert hit.entry.response == text and hit.entry.metadata == meta and hit.entry.flags == ["pii.email"]


def test_candidates_carry_every_view_field_with_full_precision(cache):
    entry_id = store(cache, group="billing", metadata={"a": 1})
    cands, _, _ = cache.candidates(PARAPHRASE, SCOPE)
    (cand,) = cands
    doc = json.loads(cache.client.execute_command("JSON.GET", key_of(cache, entry_id), "$"))[0]
    # every key of the document but the vector, its tags and the hit statistics; moderation is null: left out
    assert set(cand.fields) == set(VIEW_PATHS) - {"moderation"}
    assert cand.group == "billing" and cand.fields["metadata"] == {"a": 1}
    for name in ("created_at", "updated_at", "expires_at", "v", "scope", "provenance"):
        assert cand.fields[name] == doc[name]  # JSON values, not their text: timestamps keep every digit
    assert 0.9 < cand.similarity <= 1.0


@pytest.mark.parametrize("absent", [("group",), ("metadata",), ("moderation",), ("v",), ("flags", "reasons"),
                                    ("provenance",), tuple(_OPTIONAL)])
def test_documents_without_optional_keys_are_still_served(cache, absent):
    """A document written by something other than semcache may lack optional keys: EntryView's defaults apply."""
    entry_id = store(cache, group="billing", metadata={"a": 1}, flags=["pii.email"])
    for name in absent:
        assert cache.client.execute_command("JSON.DEL", key_of(cache, entry_id), f"$.{name}") == 1
    hit = cache.lookup(PARAPHRASE, SCOPE, min_similarity=0.5)
    assert hit.hit, hit
    defaults = EntryView.model_validate(hit.entry.model_dump(exclude=set(absent)))
    assert hit.entry == defaults
    expected = stored_view(cache, entry_id).model_dump(exclude={"hit_count", "last_hit_at"})
    assert hit.entry.model_dump(exclude={"hit_count", "last_hit_at"}) == expected
    if "v" in absent:
        assert hit.entry.v == SCHEMA_VERSION


@pytest.mark.parametrize("name", ["metadata", "moderation", "group", "provenance"])
def test_null_optional_values_read_as_defaults(cache, name):
    entry_id = store(cache, group="billing", metadata={"a": 1})
    cache.client.execute_command("JSON.SET", key_of(cache, entry_id), f"$.{name}", "null")
    (cand,), _, _ = cache.candidates(PARAPHRASE, SCOPE)
    assert name not in cand.fields
    hit = cache.lookup(PARAPHRASE, SCOPE, min_similarity=0.5)
    assert hit.hit and hit.entry == EntryView.model_validate({**hit.entry.model_dump(exclude={name})})


def test_feedback_floor_in_metadata_still_blocks_a_hit(cache):
    entry_id = store(cache)
    floor = {FEEDBACK_KEY: {"min_similarity": 0.999}}
    cache.client.execute_command("JSON.SET", key_of(cache, entry_id), "$.metadata", json.dumps(floor))
    (cand,), _, _ = cache.candidates(PARAPHRASE, SCOPE)
    assert cand.fields["metadata"] == floor
    assert not cache.lookup(PARAPHRASE, SCOPE, min_similarity=0.5).hit


@pytest.mark.parametrize("required", ["prompt", "response", "scope", "created_at"])
def test_a_document_missing_a_required_key_is_never_served(cache, required):
    entry_id = store(cache)
    cache.client.execute_command("JSON.DEL", key_of(cache, entry_id), f"$.{required}")
    (cand,), _, _ = cache.candidates(PARAPHRASE, SCOPE)
    assert cand.fields == {} and cand.key == key_of(cache, entry_id) and cand.similarity > 0.9
    result = cache.lookup(PARAPHRASE, SCOPE, min_similarity=0.5)
    assert not result.hit and result.degraded is None


def test_the_expiry_prefilter_drops_exactly_the_expired_entries(cache):
    """The pre-filter says "not expired" (-@expires_at:[-inf now]): an entry whose expires_at passed (its key not yet
    reaped) is no candidate; one expiring later is."""
    past = store(cache)
    later = store(cache, prompt="How can I reset the password of my account?")
    cache.client.execute_command("JSON.SET", key_of(cache, past), "$.expires_at", json.dumps(1.0))
    cands, _, _ = cache.candidates(PARAPHRASE, SCOPE)
    assert [c.key for c in cands] == [key_of(cache, later)]
    cache.client.execute_command("JSON.SET", key_of(cache, later), "$.expires_at", json.dumps(2e9 * 2))
    assert [c.key for c in cache.candidates(PARAPHRASE, SCOPE)[0]] == [key_of(cache, later)]
    hit = cache.lookup(PARAPHRASE, SCOPE, min_similarity=0.5)
    assert hit.hit and hit.entry.id == later


def test_resp2_resp3_and_decoded_clients_parse_alike(cache, redis_url):
    store(cache)
    store(cache, prompt="How do I change my e-mail address?", response="Settings → Account → E-mail.", group="g1",
          metadata={"q": "it's \"quoted\""})
    vector = cache.embedder.inner.embed([PARAPHRASE])[0]
    expected = parse_knn(knn_reply(cache.client, cache, vector))
    assert len(expected) == 2
    for kwargs in ({"protocol": 2}, {"protocol": 2, "decode_responses": True},
                   {"protocol": 3, "decode_responses": True}):
        client = redis.Redis.from_url(redis_url, **kwargs)
        try:
            got = parse_knn(knn_reply(client, cache, vector))
        finally:
            client.close()
        assert [(c.key, c.fields) for c in got] == [(c.key, c.fields) for c in expected], kwargs
        assert [round(c.similarity, 6) for c in got] == [round(c.similarity, 6) for c in expected]


def test_the_knn_sends_one_union_path_under_dialect_3():
    args = search_args("idx", "*", {"a": "b"}, 8)
    ret = args.index("RETURN")
    assert args[ret + 1:ret + 6] == ["4", "dist", VIEW_UNION, "AS", "view"]
    assert args[-2:] == ["DIALECT", "3"] and args[args.index("LIMIT") + 2] == "8"
    assert sorted(_UNION_ORDER) == sorted(VIEW_PATHS)


# --- replies built by hand: what the server sends for documents that vanish mid-query --------------------------

def _resp3(rows):
    return {b"total_results": len(rows), b"format": b"STRING", b"warning": [], b"attributes": [],
            b"results": [{b"id": key, b"extra_attributes": attrs, b"values": []} for key, attrs in rows]}


def _resp2(rows):
    out: list = [len(rows)]
    for key, attrs in rows:
        out += [key, [item for pair in (attrs or {}).items() for item in pair]]
    return out


FULL = {"id": "a" * 32, "v": 1, "prompt": "p", "flags": [], "prompt_hash": "b" * 32, "reasons": [], "response": "r",
        "metadata": {}, "status": "approved", "provenance": {"writer": "semcache"}, "created_at": 1.5,
        "group": "g", "updated_at": 1.5, "moderation": None, "expires_at": 9e9,
        "scope": {"tenant": "acme", "locale": "und", "model": "default", "extra": {}}}


def _union(doc):
    return json.dumps([doc[name] for name in _UNION_ORDER if name in doc]).encode()


@pytest.mark.parametrize("wrap", [_resp3, _resp2])
def test_vanished_documents_are_skipped(wrap):
    rows = [(b"k:gone", {}), (b"k:gone2", None), (b"k:nodist", {b"view": _union(FULL)}),
            (b"k:ok", {b"dist": b"0.25", b"view": _union(FULL)})]
    (cand,) = parse_knn(wrap(rows))
    assert cand.key == "k:ok" and cand.similarity == 0.75 and cand.group == "g"
    assert EntryView.model_validate(cand.fields).prompt == "p" and "moderation" not in cand.fields


def test_an_unreadable_union_gives_a_candidate_without_fields():
    rows = [(b"k:1", {b"dist": b"0.1", b"view": b"not json"}), (b"k:2", {b"dist": b"0.2", b"view": b'{"id": 1}'}),
            (b"k:3", {b"dist": b"0.3", b"view": json.dumps([1] * (len(_UNION_ORDER) + 1)).encode()})]
    assert [(c.key, c.fields) for c in parse_knn(_resp3(rows))] == [("k:1", {}), ("k:2", {}), ("k:3", {})]


@hsettings(max_examples=300, deadline=None)
@given(st.sets(st.sampled_from(sorted(_OPTIONAL))), st.sets(st.sampled_from(sorted(_OPTIONAL))),
       st.text(), st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3))
def test_any_set_of_absent_or_null_optional_keys_decodes_exactly(absent, nulls, text, meta):
    doc = {**FULL, "prompt": text, "response": text, "group": text, "metadata": meta,
           "moderation": {"decision": "approved"}, "flags": ["x"], "reasons": [{"flag": "x"}]}
    doc = {k: (None if k in nulls else v) for k, v in doc.items() if k not in absent}
    (cand,) = parse_knn(_resp3([(b"k", {b"dist": b"0", b"view": _union(doc)})]))
    assert cand.fields == {k: v for k, v in doc.items() if v is not None}


@hsettings(max_examples=300, deadline=None)
@given(st.sets(st.sampled_from(sorted(set(_UNION_ORDER) - _OPTIONAL)), min_size=1),
       st.sets(st.sampled_from(sorted(_OPTIONAL))), st.sets(st.sampled_from(sorted(_OPTIONAL))))
def test_a_missing_required_key_never_shifts_values_into_other_fields(missing, absent, nulls):
    doc = {**FULL, "moderation": {"decision": "approved"}, "flags": ["x"], "reasons": [{"flag": "x"}]}
    doc = {k: (None if k in nulls else v) for k, v in doc.items() if k not in missing | absent}
    (cand,) = parse_knn(_resp3([(b"k", {b"dist": b"0", b"view": _union(doc)})]))
    assert cand.fields == {} and cand.similarity == 1.0


def test_numpy_vector_round_trip_through_make_client(redis_url, cache):
    """make_client (RESP3, bytes) is what the read path uses: the one KNN answers with the union attribute."""
    store(cache)
    client = make_client(redis_url, timeout_ms=5000)
    try:
        reply = knn_reply(client, cache, np.asarray(cache.embedder.inner.embed([PARAPHRASE])[0]))
    finally:
        client.close()
    (row,) = reply[b"results"]
    assert set(row[b"extra_attributes"]) == {b"dist", b"view"}
