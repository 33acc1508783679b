"""The OpenAI-compatible proxy (``/v1/chat/completions``, ``/v1/models``) against a real fake upstream: a
:class:`semcache.fakellm.FakeLLMServer` on 127.0.0.1, the session's real Redis and real Celery worker.

Misses are forwarded and written back by the worker, then answered from the cache (streamed or not); context,
tenant and bypass rules; upstream errors relayed and never cached; an unreachable upstream; a Redis that dies while
the proxy keeps answering. Each test uses its own tenants (the worker's index is shared by the session)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from cache_core.apikeys import create_key
from cache_core.embedded import EmbeddedRedis, free_port
from cache_core.schema import entry_id
from cache_core.store import get_entry
from cache_core.testing import test_settings
from semcache.fakellm import FakeLLMServer, SimulatedLLM, count_tokens
from web.openai_chat import ChatRequest, cache_key

from .fixtures_web import _make_app, unique_tenant

pytestmark = pytest.mark.usefixtures("celery_worker")

UPSTREAM_KEY = "sk-upstream-test-key"
SYSTEM = {"role": "system", "content": "You are the help desk of Example Air. Answer in one sentence."}
ANSWERS = {
    "how many bags can i bring on board": "One cabin bag of up to 8 kg and one personal item.",
    "do you fly to lisbon": "Yes, Example Air flies to Lisbon daily from Paris and Madrid.",
    "what is the baggage allowance for checked luggage": "Economy fares include one 23 kg checked bag.",
}


def answer_for(prompt: str) -> str:
    key = prompt.lower().strip(" ?!.")
    return ANSWERS.get(key, f"A general answer about: {prompt.strip()}")


def error_for(prompt: str) -> tuple[int, dict] | None:
    if prompt.startswith("RATE LIMIT"):
        return 429, {"error": {"message": "Rate limit reached for requests", "type": "requests",
                               "param": None, "code": "rate_limit_exceeded"}}
    if prompt.startswith("SERVER ERROR"):
        return 500, {"detail": "the model crashed"}  # not OpenAI-shaped: the proxy wraps it
    return None


@pytest.fixture(scope="module")
def llm() -> SimulatedLLM:
    return SimulatedLLM(answer_for=answer_for, error_for=error_for, base_ms=5, per_token_ms=0.2, model="sim-test")


@pytest.fixture(scope="module")
def upstream(llm):
    with FakeLLMServer(llm) as server:
        yield server


def _app(settings, embedder, **kwargs):
    app = _make_app(settings, embedder, **kwargs)
    return app


def _close(app) -> None:
    app.extensions["semcache_proxy"].close()
    app.extensions["semcache"].close()


@pytest.fixture(scope="module")
def proxy_app(worker_web_settings, embedder, upstream):
    settings = worker_web_settings.model_copy(update={"upstream_url": upstream.url, "upstream_api_key": UPSTREAM_KEY})
    app = _app(settings, embedder, queue=None)
    yield app
    _close(app)


@pytest.fixture
def proxy(proxy_app):
    return proxy_app.test_client()


def key_for(app, tenant: str | None = None, *, admin: bool = False) -> dict[str, str]:
    state = app.extensions["semcache"]
    key, _ = create_key(state.redis, state.settings, tenant=tenant, admin=admin)
    return {"Authorization": f"Bearer {key}"}


def chat(client, headers, question: str, *, system: dict | None = SYSTEM, history: list | None = None,
         **params: Any):
    messages = ([system] if system else []) + (history or []) + [{"role": "user", "content": question}]
    return client.post("/v1/chat/completions", headers=headers, json={"model": "sim-test", "messages": messages,
                                                                      **params})


def scope_of(app, tenant: str, question: str, **body: Any):
    req = ChatRequest.model_validate({"model": "sim-test", "messages": [SYSTEM, {"role": "user", "content": question}],
                                      **body})
    return cache_key(req, app.extensions["semcache"].settings, tenant=tenant).scope


def wait_entry(app, question: str, scope, timeout_s: float = 60.0):
    """The entry the worker wrote for a proxy miss (polls: the write-back is asynchronous)."""
    state = app.extensions["semcache"]
    app.extensions["semcache_proxy"].writeback.flush()
    deadline = time.monotonic() + timeout_s
    while True:
        entry = get_entry(state.redis, state.settings, entry_id(question, scope))
        if entry is not None or time.monotonic() > deadline:
            return entry
        time.sleep(0.05)


def sse_events(response) -> list[Any]:
    """The ``data:`` payloads of a server-sent event stream (JSON decoded, ``[DONE]`` as a string)."""
    out = []
    for block in response.get_data(as_text=True).split("\n\n"):
        data = "\n".join(line[5:].lstrip() for line in block.splitlines() if line.startswith("data:"))
        if data:
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def streamed_text(events: list[Any]) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if isinstance(e, dict) and e.get("choices"))


# --- the read-through path -------------------------------------------------------------------------------------------
def test_miss_is_forwarded_written_back_by_the_worker_then_answered_from_the_cache(proxy_app, proxy, llm):
    tenant = unique_tenant("px")
    headers = key_for(proxy_app, tenant)
    question = "How many bags can I bring on board?"
    calls = llm.calls
    first = chat(proxy, headers, question, temperature=0)
    assert first.status_code == 200, first.get_data(as_text=True)
    assert first.headers["X-Semcache"] == "miss"
    body = first.get_json()
    assert body["object"] == "chat.completion" and body["model"] == "sim-test"
    assert body["choices"][0]["message"]["content"] == ANSWERS["how many bags can i bring on board"]
    assert llm.calls == calls + 1
    sent = llm.requests[-1]
    assert sent["authorization"] == f"Bearer {UPSTREAM_KEY}"  # the upstream's key, never the client's semcache key
    assert sent["body"]["messages"][-1]["content"] == question

    entry = wait_entry(proxy_app, question, scope_of(proxy_app, tenant, question))
    assert entry is not None and entry.status.value == "approved"
    assert entry.response == body["choices"][0]["message"]["content"]
    assert entry.metadata["prompt_tokens"] == body["usage"]["prompt_tokens"]
    assert entry.metadata["completion_tokens"] == body["usage"]["completion_tokens"]
    assert entry.provenance.source == "proxy" and entry.provenance.lookup_id == first.headers["X-Semcache-Lookup-Id"]
    assert entry.scope.tenant == tenant and entry.scope.model.startswith("sim-test#ctx:")

    again = chat(proxy, headers, question, temperature=0)
    assert again.headers["X-Semcache"] == "hit" and again.headers["X-Semcache-Strategy"] == "exact"
    assert again.get_json()["choices"][0]["message"]["content"] == entry.response
    assert again.get_json()["usage"]["total_tokens"] == 0  # a hit spends nothing upstream
    assert again.headers["X-Semcache-Saved-Completion-Tokens"] == str(entry.metadata["completion_tokens"])
    paraphrase = chat(proxy, headers, "how many bags may I take on board")
    assert paraphrase.headers["X-Semcache"] == "hit", paraphrase.headers
    assert paraphrase.headers["X-Semcache-Strategy"] == "semantic"
    assert float(paraphrase.headers["X-Semcache-Similarity"]) < 1.0
    assert paraphrase.get_json()["choices"][0]["message"]["content"] == entry.response
    assert llm.calls == calls + 1  # both answered without the upstream


def test_the_write_back_carries_the_lookups_vector_and_the_usage(web_settings, embedder, upstream):
    """The task sent by name: ``semcache.write_entry`` with the vector the lookup computed (the worker does not embed
    again) and the upstream's token counts. Sent to a queue no worker consumes, to read the message itself."""
    import base64

    from cache_core.connection import make_client, with_db

    from .fixtures_web import UNCONSUMED

    app = _app(web_settings.model_copy(update={"upstream_url": upstream.url}), embedder)
    try:
        question = f"Do you fly to Lisbon? ({unique_tenant('q')})"
        response = chat(app.test_client(), key_for(app, unique_tenant("px")), question)
        assert response.headers["X-Semcache"] == "miss"
        assert app.extensions["semcache_proxy"].writeback.flush()
        broker = make_client(with_db(web_settings.redis_url, 1), timeout_ms=5000)
        found = []
        for raw in broker.lrange(UNCONSUMED, 0, -1):
            message = json.loads(raw)
            _, kwargs, _ = json.loads(base64.b64decode(message["body"]))
            if message["headers"]["task"] == "semcache.write_entry" and kwargs["command"]["prompt"] == question:
                found.append(kwargs["command"])
        broker.close()
        assert len(found) == 1
        command = found[0]
        expected = embedder.embed([question])[0]
        assert len(command["embedding"]) == len(expected)
        assert max(abs(a - b) for a, b in zip(command["embedding"], expected)) < 1e-6
        usage = response.get_json()["usage"]
        assert command["metadata"]["prompt_tokens"] == usage["prompt_tokens"]
        assert command["metadata"]["completion_tokens"] == usage["completion_tokens"]
        assert command["source"] == "proxy" and command["finish_reason"] == "stop"
        assert command["lookup_id"] == response.headers["X-Semcache-Lookup-Id"]
    finally:
        _close(app)


def test_the_same_question_in_another_conversation_or_tenant_does_not_hit(proxy_app, proxy, llm):
    tenant = unique_tenant("px")
    headers = key_for(proxy_app, tenant)
    question = "What is the baggage allowance for checked luggage?"
    assert chat(proxy, headers, question).headers["X-Semcache"] == "miss"
    assert wait_entry(proxy_app, question, scope_of(proxy_app, tenant, question)) is not None
    assert chat(proxy, headers, question).headers["X-Semcache"] == "hit"

    calls = llm.calls
    other_system = {"role": "system", "content": "You are a pirate. Answer like one."}
    assert chat(proxy, headers, question, system=other_system).headers["X-Semcache"] == "miss"
    history = [{"role": "user", "content": "I fly business class."}, {"role": "assistant", "content": "Noted."}]
    assert chat(proxy, headers, question, history=history).headers["X-Semcache"] == "miss"
    shaped = chat(proxy, headers, question, max_tokens=5)  # a parameter that shapes the answer: its own scope
    assert shaped.headers["X-Semcache"] == "miss"
    assert chat(proxy, key_for(proxy_app, unique_tenant("other")), question).headers["X-Semcache"] == "miss"
    assert llm.calls == calls + 4
    # delivery details are not part of the key: a `user` field or streaming still hits
    assert chat(proxy, headers, question, user="u-123").headers["X-Semcache"] == "hit"


@pytest.mark.parametrize("params, reason", [
    ({"temperature": 0.9}, "temperature 0.9"),
    ({"tools": [{"type": "function", "function": {"name": "lookup_booking", "parameters": {"type": "object"}}}]},
     "tools"),
    ({"n": 2}, "n = 2"),
])
def test_hot_tool_and_multi_answer_requests_bypass_the_cache(proxy_app, proxy, llm, params, reason):
    tenant = unique_tenant("px")
    headers = key_for(proxy_app, tenant)
    question = "Do you fly to Lisbon?"
    writeback = proxy_app.extensions["semcache_proxy"].writeback
    submitted, calls = writeback.submitted, llm.calls
    for _ in range(2):
        response = chat(proxy, headers, question, **params)
        assert response.status_code == 200
        assert response.headers["X-Semcache"] == "bypass"
        assert reason in response.headers["X-Semcache-Bypass-Reason"]
    assert llm.calls == calls + 2  # never answered from the cache
    assert writeback.submitted == submitted  # and never written back


def test_streamed_miss_is_relayed_then_written_back_and_a_streamed_hit_follows(proxy_app, proxy, llm):
    tenant = unique_tenant("px")
    headers = key_for(proxy_app, tenant)
    question = "Can I bring my bicycle on the plane?"
    miss = chat(proxy, headers, question, stream=True)
    assert miss.status_code == 200 and miss.mimetype == "text/event-stream"
    assert miss.headers["X-Semcache"] == "miss"
    events = sse_events(miss)
    assert events[-1] == "[DONE]"
    assert streamed_text(events) == answer_for(question)
    assert all("usage" not in e for e in events[:-1])  # the client did not ask for usage: the proxy's own is hidden
    assert llm.requests[-1]["body"]["stream_options"] == {"include_usage": True}

    entry = wait_entry(proxy_app, question, scope_of(proxy_app, tenant, question))
    assert entry is not None and entry.response == answer_for(question)
    assert entry.metadata["completion_tokens"] == count_tokens(answer_for(question))

    calls = llm.calls
    hit = chat(proxy, headers, question, stream=True, stream_options={"include_usage": True})
    assert hit.headers["X-Semcache"] == "hit" and hit.mimetype == "text/event-stream"
    events = sse_events(hit)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 0  # asked for: the usage chunk
    assert streamed_text(events) == entry.response
    assert llm.calls == calls
    plain = chat(proxy, headers, question)  # the streamed miss serves non-streamed requests too
    assert plain.headers["X-Semcache"] == "hit"


def test_a_streamed_miss_with_usage_asked_for_relays_it(proxy_app, proxy):
    headers = key_for(proxy_app, unique_tenant("px"))
    response = chat(proxy, headers, "Is there wifi on board?", stream=True, stream_options={"include_usage": True})
    events = sse_events(response)
    assert response.headers["X-Semcache"] == "miss"
    usage = [e for e in events if isinstance(e, dict) and e.get("usage")]
    assert len(usage) == 1
    assert usage[0]["usage"]["completion_tokens"] == count_tokens(answer_for("Is there wifi on board?"))


# --- errors ----------------------------------------------------------------------------------------------------------
def test_upstream_errors_are_relayed_in_the_openai_format_and_never_cached(proxy_app, proxy, llm):
    """Relayed as semcache's own errors of the same class: the upstream's body describes the operator's account
    (issue 15; tests/test_hardening_web.py checks that nothing of it reaches the tenant)."""
    tenant = unique_tenant("px")
    headers = key_for(proxy_app, tenant)
    writeback = proxy_app.extensions["semcache_proxy"].writeback
    submitted = writeback.submitted
    limited = chat(proxy, headers, "RATE LIMIT please")
    assert limited.status_code == 429 and limited.headers["X-Semcache"] == "miss"
    assert limited.get_json()["error"]["code"] == "upstream_rate_limited"
    crashed = chat(proxy, headers, "SERVER ERROR now", stream=True)
    assert crashed.status_code == 502
    error = crashed.get_json()["error"]
    assert "failed (5xx)" in error["message"] and "the model crashed" not in error["message"]
    assert error["code"] == "upstream_error"
    calls = llm.calls
    assert chat(proxy, headers, "RATE LIMIT please").status_code == 429
    assert llm.calls == calls + 1  # the error was not cached: asked again
    assert writeback.submitted == submitted


def test_an_unreachable_upstream_is_a_502_with_a_clear_message(worker_web_settings, embedder):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    app = _app(worker_web_settings.model_copy(update={"upstream_url": dead, "upstream_connect_timeout_s": 2.0}),
               embedder, queue=None)
    try:
        client = app.test_client()
        headers = key_for(app, unique_tenant("px"))
        for stream in (False, True):
            response = chat(client, headers, "Anything there?", stream=stream)
            assert response.status_code == 502
            error = response.get_json()["error"]
            assert error["code"] == "upstream_unreachable"
            assert "unreachable" in error["message"] and dead in error["message"]
        models = client.get("/v1/models", headers=headers)
        assert models.status_code == 502 and models.get_json()["error"]["code"] == "upstream_unreachable"
        unset = _app(worker_web_settings, embedder, queue=None)
        try:
            response = chat(unset.test_client(), key_for(unset, unique_tenant("px")), "Anything there?")
            assert response.status_code == 503 and "SEMCACHE_UPSTREAM_URL" in response.get_json()["error"]["message"]
        finally:
            _close(unset)
    finally:
        _close(app)


def test_redis_down_makes_misses_that_are_forwarded(tmp_path, embedder, upstream, llm):
    """The proxy keeps answering through a dead Redis: keys it verified recently still work, lookups are misses."""
    server = EmbeddedRedis(tmp_path / "redis", appendonly=False)
    url = server.start()
    settings = test_settings(url, data_dir=tmp_path, upstream_url=upstream.url, breaker_cooldown_ms=200)
    app = _app(settings, embedder)
    try:
        client = app.test_client()
        headers = key_for(app, unique_tenant("px"))
        never_used = key_for(app, unique_tenant("px"))
        assert chat(client, headers, "Do you fly to Lisbon?").headers["X-Semcache"] == "miss"
        server.stop()
        calls = llm.calls
        for stream in (False, True):
            response = chat(client, headers, "Do you fly to Lisbon?", stream=stream)
            assert response.status_code == 200, response.get_data(as_text=True)
            assert response.headers["X-Semcache"] == "miss" and response.headers["X-Semcache-Degraded"]
            text = (response.get_json()["choices"][0]["message"]["content"] if not stream
                    else streamed_text(sse_events(response)))
            assert text == ANSWERS["do you fly to lisbon"]
        assert llm.calls == calls + 2
        # a key the proxy never saw cannot be checked while Redis is down
        refused = chat(client, never_used, "Do you fly to Lisbon?")
        assert refused.status_code == 503 and refused.get_json()["error"]["code"] == "unavailable"
    finally:
        _close(app)
        server.stop()


def test_authentication_and_validation_answer_in_the_openai_format(proxy_app, proxy):
    body = {"model": "sim-test", "messages": [{"role": "user", "content": "hello"}]}
    missing = proxy.post("/v1/chat/completions", json=body)
    assert missing.status_code == 401 and missing.get_json()["error"]["code"] == "missing_api_key"
    wrong = proxy.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer sk-not-a-semcache-key"})
    assert wrong.status_code == 401 and wrong.get_json()["error"]["code"] == "invalid_api_key"
    admin = proxy.post("/v1/chat/completions", json=body, headers=key_for(proxy_app, admin=True))
    assert admin.status_code == 403 and "tenant key" in admin.get_json()["error"]["message"]
    headers = key_for(proxy_app, unique_tenant("px"))
    for bad, param in [({"model": "sim-test", "messages": []}, "messages"),
                       ({"model": "sim-test", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
                       ({"model": "sim-test", "messages": [{"role": "user", "content": "hi"}], "temperature": "0"},
                        "temperature"),
                       ({"messages": [{"role": "user", "content": "hi"}]}, "model")]:
        response = proxy.post("/v1/chat/completions", json=bad, headers=headers)
        assert response.status_code == 400, bad
        error = response.get_json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, error
    garbage = proxy.post("/v1/chat/completions", data=b"\xff{not json", headers=headers)
    assert garbage.status_code == 400 and "JSON object" in garbage.get_json()["error"]["message"]
    wrong_method = proxy.get("/v1/chat/completions", headers=headers)
    assert wrong_method.status_code == 405 and wrong_method.headers["Allow"] == "POST"
    assert wrong_method.get_json()["error"]["type"] == "invalid_request_error"
    unknown = proxy.post("/v1/embeddings", headers=headers, json={"input": "x"})
    assert unknown.status_code == 404 and unknown.get_json()["error"]["code"] == "unknown_url"


def test_models_are_relayed_from_the_upstream(proxy_app, proxy):
    response = proxy.get("/v1/models", headers=key_for(proxy_app, unique_tenant("px")))
    assert response.status_code == 200
    assert response.get_json()["data"][0]["id"] == "sim-test"
    assert proxy.get("/v1/models").status_code == 401


def test_cache_key_scopes_conversations_and_ignores_delivery_details():
    from cache_core.settings import Settings

    settings = Settings()

    def key(**body: Any):
        body.setdefault("messages", [SYSTEM, {"role": "user", "content": "Hi?"}])
        return cache_key(ChatRequest.model_validate({"model": "m", **body}), settings, tenant="t")

    base = key()
    assert base.prompt == "Hi?" and base.scope.tenant == "t"
    assert key(stream=True, user="x", metadata={"a": "b"}, temperature=0.0).scope == base.scope
    assert key(max_tokens=10).scope != base.scope
    assert key(response_format={"type": "json_object"}).scope != base.scope
    assert key(messages=[{"role": "user", "content": "Hi?"}]).scope.model == "m"  # no context: the bare model
    parts = [{"type": "text", "text": "Hi"}, {"type": "text", "text": "?"}]
    assert key(messages=[SYSTEM, {"role": "user", "content": parts}]).scope == base.scope
    image = [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]
    assert key(messages=[{"role": "user", "content": image}]).reason == "the last message holds more than text"
    assert "not the user" in key(messages=[{"role": "user", "content": "a"},
                                           {"role": "assistant", "content": "b"}]).reason
    assert key(logprobs=True).bypass and key(n=1).scope == base.scope


def test_proxy_results_are_counted_for_metrics(proxy_app, proxy):
    from prometheus_client.parser import text_string_to_metric_families

    def counts() -> dict[str, float]:
        proxy_app.extensions["semcache_proxy"].writeback.flush()
        text = proxy.get("/metrics").get_data(as_text=True)
        family = next(f for f in text_string_to_metric_families(text) if f.name == "semcache_proxy_requests")
        return {s.labels["result"]: s.value for s in family.samples}

    tenant = unique_tenant("px")
    headers = key_for(proxy_app, tenant)
    before = counts()
    question = "Where do I find my seat number?"
    chat(proxy, headers, question)
    assert wait_entry(proxy_app, question, scope_of(proxy_app, tenant, question)) is not None
    chat(proxy, headers, question)
    chat(proxy, headers, question, temperature=1.0)
    chat(proxy, headers, "RATE LIMIT again")
    after = counts()
    assert {k: after[k] - before[k] for k in after} == {"hit": 1, "miss": 2, "coalesced": 0, "bypass": 1,
                                                        "upstream_error": 1, "not_cacheable": 0}


def test_a_streamed_miss_is_relayed_as_it_comes_and_written_back_once_complete(worker_web_settings, embedder):
    """An upstream that sends its first chunk, then waits for the test: the client must get that chunk before the
    upstream is done (no buffering), and the write-back happens only after the end of the stream."""
    import threading

    from flask import Flask, Response
    from werkzeug.serving import make_server

    release, resumed = threading.Event(), threading.Event()

    def chunk(delta: dict, finish: str | None = None) -> str:
        body = {"id": "chatcmpl-slow", "object": "chat.completion.chunk", "created": 1, "model": "slow",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(body)}\n\n"

    slow = Flask("slow-upstream")

    @slow.post("/v1/chat/completions")
    def completions():
        def events():
            yield chunk({"role": "assistant", "content": "Boarding closes "})
            release.wait(30)  # a proxy that buffered would wait here for nothing, then see `resumed` set
            resumed.set()
            yield chunk({"content": "20 minutes before departure."})
            yield chunk({}, "stop")
            yield "data: [DONE]\n\n"

        return Response(events(), mimetype="text/event-stream")

    server = make_server("127.0.0.1", 0, slow, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    settings = worker_web_settings.model_copy(update={"upstream_url": f"http://127.0.0.1:{server.server_port}/v1"})
    app = _app(settings, embedder, queue=None)
    try:
        tenant = unique_tenant("px")
        question = "When does boarding close?"
        response = chat(app.test_client(), key_for(app, tenant), question, stream=True)
        assert response.headers["X-Semcache"] == "miss"
        body = iter(response.response)
        first = b""
        while b"Boarding closes" not in first:
            first += next(body)
        assert not resumed.is_set()  # the upstream is still holding its answer: this chunk was relayed as it came
        writeback = app.extensions["semcache_proxy"].writeback
        assert writeback.submitted == 0  # nothing written back from an incomplete answer
        release.set()
        rest = b"".join(body)
        assert rest.rstrip().endswith(b"data: [DONE]")
        entry = wait_entry(app, question, scope_of(app, tenant, question))
        assert entry is not None and entry.response == "Boarding closes 20 minutes before departure."
        assert entry.metadata["tokens_estimated"] is True  # this upstream sent no usage: estimated
    finally:
        release.set()
        _close(app)
        server.shutdown()


# --- request coalescing ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slow_llm() -> SimulatedLLM:
    # Slow enough that every concurrent caller has looked up and joined before the first answer comes back.
    return SimulatedLLM(answer_for=answer_for, error_for=error_for, base_ms=2500, per_token_ms=0, model="sim-test")


@pytest.fixture(scope="module")
def slow_proxy_app(worker_web_settings, embedder, slow_llm):
    with FakeLLMServer(slow_llm) as server:
        settings = worker_web_settings.model_copy(update={"upstream_url": server.url,
                                                          "upstream_api_key": UPSTREAM_KEY})
        app = _app(settings, embedder, queue=None)
        yield app
        _close(app)


def _concurrently(app, requests: list[tuple[dict, str]]) -> list[Any]:
    """Send ``(headers, question)`` requests at once, each from its own thread and test client."""
    import threading

    barrier = threading.Barrier(len(requests))
    out: list[Any] = [None] * len(requests)

    def send(i: int, headers: dict, question: str) -> None:
        client = app.test_client()
        barrier.wait()
        out[i] = chat(client, headers, question)

    threads = [threading.Thread(target=send, args=(i, h, q)) for i, (h, q) in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_concurrent_identical_misses_make_one_upstream_call(slow_proxy_app, slow_llm):
    tenant = unique_tenant("co")
    headers = key_for(slow_proxy_app, tenant)
    question = "Do you fly to Lisbon?"
    calls = slow_llm.calls
    answers = _concurrently(slow_proxy_app, [(headers, question)] * 5)
    assert slow_llm.calls == calls + 1
    assert all(a.status_code == 200 for a in answers), [a.get_data(as_text=True) for a in answers]
    texts = {a.get_json()["choices"][0]["message"]["content"] for a in answers}
    assert texts == {ANSWERS["do you fly to lisbon"]}
    assert all(a.headers["X-Semcache"] == "miss" for a in answers)
    coalesced = [a for a in answers if a.headers.get("X-Semcache-Coalesced") == "1"]
    assert len(coalesced) == 4
    assert len({a.headers["X-Semcache-Lookup-Id"] for a in answers}) == 5  # each request keeps its own lookup
    assert len(slow_proxy_app.extensions["semcache_proxy"].flights) == 0  # nothing left in flight
    entry = wait_entry(slow_proxy_app, question, scope_of(slow_proxy_app, tenant, question))
    assert entry is not None and entry.response == ANSWERS["do you fly to lisbon"]  # written back once, by the leader


def test_coalescing_keeps_tenants_and_prompts_apart(slow_proxy_app, slow_llm):
    a, b = unique_tenant("ca"), unique_tenant("cb")
    ha, hb = key_for(slow_proxy_app, a), key_for(slow_proxy_app, b)
    calls = slow_llm.calls
    answers = _concurrently(slow_proxy_app, [(ha, "How many bags can I bring on board?"),
                                             (hb, "How many bags can I bring on board?"),
                                             (ha, "What is the baggage allowance for checked luggage?")])
    assert slow_llm.calls == calls + 3
    assert not any(x.headers.get("X-Semcache-Coalesced") for x in answers)


def test_when_the_leader_fails_each_follower_forwards_on_its_own(slow_proxy_app, slow_llm):
    headers = key_for(slow_proxy_app, unique_tenant("cf"))
    calls = slow_llm.calls
    answers = _concurrently(slow_proxy_app, [(headers, "RATE LIMIT please")] * 3)
    assert slow_llm.calls == calls + 3  # an upstream error is never shared: each caller sees its own
    assert [x.status_code for x in answers] == [429, 429, 429]
    assert not any(x.headers.get("X-Semcache-Coalesced") for x in answers)


def test_coalescing_can_be_switched_off(worker_web_settings, embedder, slow_llm):
    with FakeLLMServer(slow_llm) as server:
        settings = worker_web_settings.model_copy(update={"upstream_url": server.url, "upstream_api_key": UPSTREAM_KEY,
                                                          "proxy_coalesce": False})
        app = _app(settings, embedder, queue=None)
        try:
            headers = key_for(app, unique_tenant("cx"))
            calls = slow_llm.calls
            answers = _concurrently(app, [(headers, "Do you fly to Lisbon?")] * 3)
            assert slow_llm.calls == calls + 3
            assert all(x.status_code == 200 for x in answers)
        finally:
            _close(app)
