"""Python integrations: the @cached decorator and the LangChain cache, on the real stack (writes inline)."""

import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import HumanMessage, SystemMessage

from cache_core.cache import Generated, SemanticCache
from cache_core.decorators import cached
from cache_core.langchain import SemcacheLangChainCache
from cache_core.store import write_command
from cache_core.writequeue import SyncWriteQueue


@pytest.fixture
def cache(settings, redis_client, embedder):
    c = SemanticCache(settings, redis_client, embedder)
    c.write_queue = SyncWriteQueue(lambda cmd: write_command(redis_client, settings, embedder, cmd))
    yield c
    c.close()


def test_cached_decorator_calls_the_function_on_misses_only(cache):
    calls = []

    @cached(cache, scope=lambda args: {"tenant": args["customer"]})
    def ask(prompt: str, customer: str) -> str:
        calls.append(prompt)
        return f"answer for {customer}"

    assert ask("How do I export my data?", "acme") == "answer for acme"
    assert ask("how can I export my data", customer="acme") == "answer for acme"
    assert calls == ["How do I export my data?"]
    assert ask("How do I export my data?", "globex") == "answer for globex"  # another tenant: a miss
    assert len(calls) == 2
    full = ask.answer("How do I export my data?", "acme")
    assert full.cached and full.lookup.strategy == "exact"


def test_cached_decorator_passes_generated_metadata(cache):
    @cached(cache, scope={"tenant": "t"})
    def ask(prompt: str) -> Generated:
        return Generated(response="42", metadata={"completion_tokens": 1})

    assert ask("What is the answer?") == "42"
    assert cache.lookup("What is the answer?", {"tenant": "t"}).entry.metadata == {"completion_tokens": 1}


def test_cached_decorator_needs_the_prompt_parameter(cache):
    with pytest.raises(TypeError):
        cached(cache, scope={"tenant": "t"})(lambda question: question)


def test_langchain_chat_model_hits_on_a_paraphrase(cache):
    lc_cache = SemcacheLangChainCache(cache, tenant="acme")
    model = FakeListChatModel(responses=["Use the export button.", "SECOND CALL", "THIRD CALL"], cache=lc_cache)
    system = SystemMessage(content="You are a support bot.")
    first = model.invoke([system, HumanMessage(content="How do I export my data?")])
    assert first.content == "Use the export button."
    again = model.invoke([system, HumanMessage(content="how can I export my data")])
    assert again.content == "Use the export button."  # from the cache, not the model's second response
    # another system prompt is another conversation: a miss
    other = model.invoke([SystemMessage(content="You are a pirate."), HumanMessage(content="How do I export my data?")])
    assert other.content == "SECOND CALL"
    assert isinstance(again, type(first))
    lc_cache.clear()  # empties the tenant: the same question goes to the model again
    assert model.invoke([system, HumanMessage(content="How do I export my data?")]).content == "THIRD CALL"
