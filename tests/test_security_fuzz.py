"""Issue 7, promise 5: hostile input to the library, the worker's service functions and the raw HTTP API.

The API's JSON fields are fuzzed by tests/test_api_properties.py (every field of lookup, entries, purge, admin
status, paths and query strings, raw bodies). Added here:

* ``SemanticCache.lookup``: prompts and scope values drawn from unicode text, control characters, RediSearch
  syntax (``@tenant:{*}``, ``x} | @tenant:{*``, ``*``, ``-inf``, ``((``, ``$vec``, ``=>[KNN``), lone surrogates
  (invalid UTF-8), NUL, empty and huge values, wrong types (int, None, list, dict, NaN, inf) for prompt,
  scope and ``min_similarity``: a correct result or :class:`InvalidInput`, nothing else; and scope values that look
  like query syntax match only themselves (an entry written under one hostile tenant is hit from that exact tenant
  and from no other).
* ``worker.service.write_commands`` / ``write_one`` (the worker's write path, in-process): commands with the same
  classes of values plus deep JSON, NaN/inf in embeddings and TTLs, wrong-dimension vectors, wrong types: a
  summary that lists the invalid commands or :class:`InvalidInput`, never another exception, and every document
  in Redis afterwards is a complete, valid ``CacheEntry`` (never a partial document).
* Raw HTTP bodies: invalid UTF-8, a 100,000-deep JSON array, ``NaN``/``Infinity`` literals, a 2 MB body, a
  prompt far over the limit: a 4xx, never a 500.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache_core.cache import SemanticCache
from cache_core.errors import InvalidInput
from cache_core.schema import CacheEntry, LookupResult, Scope, WriteCommand
from cache_core.store import write_command

FUZZ = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

QUERY_SYNTAX = ["*", "@tenant:{*}", "x} | @tenant:{*", "-inf", "((", "$vec", "=>[KNN 3 @embedding $v]", "a|b",
                "{a}", "\\", "%abc%", "@status:{approved}", "'\"", "~x", "-x", "ab*"]
HOSTILE = ["", " ", "\x00", "a\x00b", "\x1b[31m", "\r\n", "\ud800", "\u202e", "<script>alert(1)</script>",
           "a" * 5000, "💥" * 50, *QUERY_SYNTAX]
WRONG_TYPES = [None, 0, -1, 1.5, math.nan, math.inf, [], ["a"], {}, {"a": "b"}, True]

hostile_text = st.one_of(st.text(max_size=80), st.sampled_from(HOSTILE))
wrong = st.sampled_from(WRONG_TYPES)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=30))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                           max_leaves=12)


@pytest.fixture
def cache(settings, redis_client, embedder):
    return SemanticCache(settings, redis_client, embedder)


# --- the library -------------------------------------------------------------------------------------------------
@FUZZ
@given(prompt=st.one_of(hostile_text, wrong),
       scope=st.one_of(wrong, st.dictionaries(st.sampled_from(["tenant", "locale", "model", "extra", "zz"]),
                                              st.one_of(hostile_text, wrong), max_size=4)),
       min_similarity=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), wrong))
def test_lookup_answers_or_raises_invalid_input(cache, prompt, scope, min_similarity):
    try:
        result = cache.lookup(prompt, scope, min_similarity=min_similarity)
    except InvalidInput as exc:
        assert str(exc)
        return
    assert isinstance(result, LookupResult) and result.degraded is None
    assert not result.hit  # nothing was written in this index


@FUZZ
@given(mine=st.one_of(st.sampled_from(QUERY_SYNTAX), st.text(min_size=1, max_size=30)),
       other=st.one_of(st.sampled_from(QUERY_SYNTAX), st.text(min_size=1, max_size=30)),
       field=st.sampled_from(["tenant", "locale", "model"]))
def test_hostile_scope_values_match_only_themselves(cache, settings, redis_client, embedder, mine, other, field):
    try:
        scope_mine, scope_other = Scope(**{"tenant": "t", field: mine}), Scope(**{"tenant": "t", field: other})
    except Exception:  # noqa: BLE001 - a value the model refuses (blank, NUL) never reaches a query
        return
    if scope_mine == scope_other:
        return
    prompt = "What is the refund policy?"
    write_command(redis_client, settings, embedder, WriteCommand(prompt=prompt, response=f"for {mine!r}",
                                                                 scope=scope_mine))
    hit = cache.lookup(prompt, scope_mine)
    assert hit.hit and hit.entry.scope == scope_mine
    for asked in (prompt, "What's your refund policy?"):
        result = cache.lookup(asked, scope_other, min_similarity=0.0)
        assert not result.hit or result.entry.scope == scope_other, (mine, other, result.entry)


# --- the worker's write path --------------------------------------------------------------------------------------
def _command_strategy(dim: int):
    vectors = st.one_of(st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=5),
                        st.just([0.0] * dim), st.just([math.nan] * dim), st.just([1.0] * (dim + 1)), wrong)
    fields = {"prompt": st.one_of(hostile_text, wrong), "response": st.one_of(hostile_text, wrong),
              "scope": st.one_of(wrong, st.fixed_dictionaries({"tenant": st.one_of(hostile_text, wrong)},
                                                              optional={"locale": hostile_text, "extra": json_values})),
              "ttl_seconds": st.one_of(st.integers(-5, 10**12), st.floats(allow_nan=True), wrong),
              "flags": st.one_of(st.lists(hostile_text, max_size=3), wrong), "metadata": json_values,
              "embedding": vectors}
    return st.one_of(json_values, st.fixed_dictionaries({}, optional=fields))


def _check_documents(client, settings) -> None:
    for key in client.scan_iter(match=f"{settings.key_prefix}*", count=1000):
        name = key.decode() if isinstance(key, bytes) else key
        kind = client.type(name)
        if (kind.decode() if isinstance(kind, bytes) else kind) != "ReJSON-RL":
            continue
        raw = client.execute_command("JSON.GET", name)
        CacheEntry.model_validate(json.loads(raw))  # complete and valid, never partial
        assert client.ttl(name) > 0


@FUZZ
@given(data=st.data())
def test_worker_write_path_reports_or_refuses_hostile_commands(make_settings, redis_client, embedder, data):
    from worker.safety import SafetyPipeline
    from worker.service import write_commands, write_one

    settings = make_settings(index="fuzzw")
    pipeline = SafetyPipeline.from_settings(settings)
    commands = data.draw(st.lists(_command_strategy(embedder.dim), min_size=1, max_size=3))
    summary = write_commands(redis_client, settings, embedder, pipeline, commands)
    assert len(summary["results"]) + len(summary["invalid"]) == len(commands)
    try:
        write_one(redis_client, settings, embedder, pipeline, commands[0])
    except InvalidInput:
        pass
    _check_documents(redis_client, settings)


# --- raw HTTP bodies ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("path", "data"), [
    ("/api/v1/lookup", b"\xff\xfe\xfa"),
    ("/api/v1/lookup", b'{"prompt": "\xc3\x28"}'),
    ("/api/v1/entries", b'{"prompt": "a", "response": "\xed\xa0\x80"}'),
    ("/api/v1/lookup", b"[" * 100_000 + b"]" * 100_000),
    ("/api/v1/lookup", b'{"prompt": "hi", "min_similarity": NaN}'),
    ("/api/v1/lookup", b'{"prompt": "hi", "min_similarity": Infinity}'),
    ("/api/v1/entries", b'{"prompt": "hi", "response": "r", "ttl_seconds": -Infinity}'),
    ("/api/v1/entries", b'{"prompt": "hi", "response": "r", "metadata": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000
     + b"}"),
    ("/api/v1/purge", b'{"scope": {"tenant": "x} | @tenant:{*"}}'),
    ("/api/v1/lookup", json.dumps({"prompt": "x" * 200_000}).encode()),
    ("/api/v1/entries", b'{"prompt": "' + b"y" * 2_000_000 + b'", "response": "r"}'),
], ids=["invalid-utf8", "invalid-utf8-in-string", "surrogate-in-string", "deep-array", "nan", "infinity",
        "neg-infinity-ttl", "deep-metadata", "query-syntax-purge", "huge-prompt", "2mb-body"])
def test_raw_hostile_bodies_are_4xx(client, api_headers, path, data):
    response = client.post(path, data=data, headers={**api_headers("fuzz-raw"), "Content-Type": "application/json"})
    text = response.get_data(as_text=True)
    assert response.status_code < 500 and "Traceback" not in text, (response.status_code, text[:300])
    if path == "/api/v1/purge":
        assert response.status_code in (202, 400, 403)
    else:
        assert 400 <= response.status_code < 500, (response.status_code, text[:300])


@pytest.mark.parametrize("data", [b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe\xfa", b'{"model": NaN}',
                                  b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"],
                         ids=["deep-array", "invalid-utf8", "nan", "deep-messages"])
def test_raw_hostile_bodies_to_the_proxy_are_4xx(make_settings, embedder, data):
    """The OpenAI-compatible proxy (``/v1/chat/completions``) parses its own bodies: the same classes, a 4xx."""
    from .fixtures_web import _key_factory, _make_app

    app = _make_app(make_settings(upstream_url="http://127.0.0.1:9/v1"), embedder)
    try:
        headers = {**_key_factory(app)("fuzz-proxy"), "Content-Type": "application/json"}
        response = app.test_client().post("/v1/chat/completions", data=data, headers=headers)
        assert 400 <= response.status_code < 500, (response.status_code, response.get_data(as_text=True)[:300])
    finally:
        app.extensions["semcache"].close()
