"""Issue 15, item 4: the proxy's cache key holds every request field that changes the answer, and a crafted model
name cannot address another (model, conversation) scope.

Unit tests of :func:`web.openai_chat.cache_key` (pure logic), then the proxy end to end (the real fake upstream,
the session's Redis and real Celery worker): alice's "What is my name?" is not served to bob."""

from __future__ import annotations

import time

import pytest

from cache_core.apikeys import create_key
from cache_core.schema import entry_id
from cache_core.settings import Settings
from cache_core.store import get_entry
from semcache.fakellm import FakeLLMServer, SimulatedLLM
from web.openai_chat import ChatRequest, cache_key

from .fixtures_web import _make_app, unique_tenant

SYSTEM = {"role": "system", "content": "You are the help desk of Example Air."}
QUESTION = {"role": "user", "content": "What is my name?"}

# Every parameter of the chat-completions API that changes what the answer says, with a value that is not its default.
ANSWER_CHANGING = {
    "response_format": {"type": "json_object"},
    "tool_choice": "none",
    "parallel_tool_calls": False,
    "seed": 7,
    "top_p": 0.1,
    "stop": ["\n"],
    "max_tokens": 5,
    "max_completion_tokens": 5,
    "logit_bias": {"50256": -100},
    "presence_penalty": 1.0,
    "frequency_penalty": 1.0,
    "top_logprobs": 2,
    "reasoning_effort": "high",
    "verbosity": "low",
    "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"},
    "prediction": {"type": "content", "content": "Hello"},
    "web_search_options": {},
    "some_future_parameter": 1,
}


def key_of(body: dict, tenant: str = "acme"):
    return cache_key(ChatRequest.model_validate({"model": "gpt-4o", **body}), Settings(), tenant=tenant)


def test_the_name_of_the_last_message_is_part_of_the_scope():
    alice = key_of({"messages": [{**QUESTION, "name": "alice"}]})
    bob = key_of({"messages": [{**QUESTION, "name": "bob"}]})
    nobody = key_of({"messages": [QUESTION]})
    assert not alice.bypass and not bob.bypass
    assert len({alice.scope.model, bob.scope.model, nobody.scope.model}) == 3
    assert nobody.scope.model == "gpt-4o"  # a request without a name keeps the scope (and entries) it had
    # the same holds with a conversation before it
    with_system = [key_of({"messages": [SYSTEM, {**QUESTION, "name": n}]}).scope for n in ("alice", "bob")]
    assert with_system[0] != with_system[1]


@pytest.mark.parametrize("param", sorted(ANSWER_CHANGING))
def test_every_answer_changing_parameter_is_its_own_scope(param):
    base = key_of({"messages": [SYSTEM, QUESTION]})
    shaped = key_of({"messages": [SYSTEM, QUESTION], param: ANSWER_CHANGING[param]})
    assert not shaped.bypass and shaped.scope != base.scope
    # and without anything before the question as well
    alone = key_of({"messages": [QUESTION], param: ANSWER_CHANGING[param]})
    assert alone.scope != key_of({"messages": [QUESTION]}).scope


def test_answer_changing_parameters_are_all_distinct_from_each_other():
    scopes = {key_of({"messages": [QUESTION], p: v}).scope.model for p, v in ANSWER_CHANGING.items()}
    assert len(scopes) == len(ANSWER_CHANGING)


def test_a_model_name_holding_the_separator_cannot_address_another_conversation():
    """The crafted collision: ``gpt-4o`` under a system prompt is stored as ``gpt-4o#ctx:<hash>``; a request that
    names that string as its model (no system prompt, so no hash of its own) must not land in the same scope."""
    victim = key_of({"messages": [SYSTEM, QUESTION]})
    assert victim.scope.model.startswith("gpt-4o#ctx:")
    crafted = cache_key(ChatRequest.model_validate({"model": victim.scope.model, "messages": [QUESTION]}),
                        Settings(), tenant="acme")
    assert crafted.bypass and "#ctx:" in crafted.reason
    # with a conversation of its own too (``<victim model>#ctx:<its hash>`` is still not the victim's scope, but the
    # separator is refused outright: one rule, nothing to reason about)
    assert key_of({"model": "x#ctx:", "messages": [SYSTEM, QUESTION]}).bypass


# --- end to end -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm() -> SimulatedLLM:
    return SimulatedLLM(answer_for=lambda prompt: f"An answer to: {prompt}", base_ms=1, per_token_ms=0, model="sim")


@pytest.fixture(scope="module")
def proxy_app(worker_web_settings, embedder, llm, celery_worker):
    with FakeLLMServer(llm) as server:
        app = _make_app(worker_web_settings.model_copy(update={"upstream_url": server.url}), embedder, queue=None)
        yield app
        app.extensions["semcache_proxy"].close()
        app.extensions["semcache"].close()


def _written(app, body: dict, tenant: str, timeout_s: float = 60.0):
    """The entry the worker wrote for a proxy miss (polled: the write-back is asynchronous; a bound, not a timing)."""
    state = app.extensions["semcache"]
    app.extensions["semcache_proxy"].writeback.flush()
    ck = cache_key(ChatRequest.model_validate(body), state.settings, tenant=tenant)
    deadline = time.monotonic() + timeout_s
    while True:
        entry = get_entry(state.redis, state.settings, entry_id(ck.prompt, ck.scope))
        if entry is not None or time.monotonic() > deadline:
            return entry
        time.sleep(0.05)


def test_alices_what_is_my_name_is_not_served_to_bob(proxy_app, llm):
    state = proxy_app.extensions["semcache"]
    tenant = unique_tenant("name")
    key, _ = create_key(state.redis, state.settings, tenant=tenant)
    headers = {"Authorization": f"Bearer {key}"}
    client = proxy_app.test_client()

    def ask(name: str):
        body = {"model": "sim", "temperature": 0, "messages": [{**QUESTION, "name": name}]}
        return body, client.post("/v1/chat/completions", headers=headers, json=body)

    alice_body, first = ask("alice")
    assert first.status_code == 200 and first.headers["X-Semcache"] == "miss"
    assert _written(proxy_app, alice_body, tenant) is not None
    assert ask("alice")[1].headers["X-Semcache"] == "hit"  # alice's own question is cached
    calls = llm.calls
    bob = ask("bob")[1]
    assert bob.headers["X-Semcache"] == "miss", bob.headers  # before the fix: an exact hit with alice's answer
    assert llm.calls == calls + 1
