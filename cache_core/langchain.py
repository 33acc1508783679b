"""A LangChain cache backed by semcache (optional extra: ``pip install "semcache[langchain]"``).

>>> from langchain_core.globals import set_llm_cache                        # doctest: +SKIP
>>> set_llm_cache(SemcacheLangChainCache(cache, tenant="acme"))              # doctest: +SKIP

LangChain hands a cache the prompt (for chat models, a JSON serialization of the messages) and ``llm_string``
(the model and its invocation parameters). The adapter keeps the scope hard: the ``model`` scope value is a hash of
``llm_string`` plus the conversation before the last user turn, so the same last question asked of another model,
with other parameters or in another conversation never hits. The semantic match runs on the last user message.
Writes go through the cache's write queue (the worker), like every other write.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from langchain_core.caches import RETURN_VAL_TYPE, BaseCache
from langchain_core.messages import AIMessage
from langchain_core.outputs import ChatGeneration, Generation

from .cache import SemanticCache
from .schema import Scope, WriteCommand
from .tasks import EntryFilter, PurgeCommand

__all__ = ["SemcacheLangChainCache"]


def _split_prompt(prompt: str) -> tuple[str, str]:
    """(text to match, context that must match exactly). Chat prompts are LangChain-serialized message lists."""
    try:
        messages = json.loads(prompt)
    except ValueError:
        return prompt, ""
    if not isinstance(messages, list) or not messages:
        return prompt, ""
    def content(m: Any) -> str:
        kwargs = m.get("kwargs", {}) if isinstance(m, dict) else {}
        value = kwargs.get("content", "")
        return value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    last = messages[-1]
    return (content(last) or prompt), json.dumps([content(m) for m in messages[:-1]])


class SemcacheLangChainCache(BaseCache):
    """LangChain ``BaseCache`` over a :class:`~cache_core.cache.SemanticCache`, bound to one tenant."""

    def __init__(self, cache: SemanticCache, *, tenant: str, locale: str = "und", ttl_seconds: int | None = None,
                 min_similarity: float | None = None) -> None:
        self.cache = cache
        self.tenant = tenant
        self.locale = locale
        self.ttl_seconds = ttl_seconds
        self.min_similarity = min_similarity

    def _scope(self, prompt: str, llm_string: str) -> tuple[str, Scope]:
        text, context = _split_prompt(prompt)
        model = hashlib.sha256(f"{llm_string}\x1f{context}".encode()).hexdigest()[:24]
        return text, self.cache.scope({"tenant": self.tenant, "locale": self.locale, "model": f"lc-{model}"})

    def lookup(self, prompt: str, llm_string: str) -> RETURN_VAL_TYPE | None:
        text, scope = self._scope(prompt, llm_string)
        result = self.cache.lookup(text, scope, min_similarity=self.min_similarity)
        if not result.hit:
            return None
        # Rebuilt from the text, never deserialized: entry metadata is caller data, and LangChain's loads() of
        # untrusted input could instantiate arbitrary classes.
        if result.entry.metadata.get("langchain_kind") == "chat":
            return [ChatGeneration(message=AIMessage(content=result.entry.response))]
        return [Generation(text=result.entry.response)]

    def update(self, prompt: str, llm_string: str, return_val: RETURN_VAL_TYPE) -> None:
        if not return_val:
            return
        text, scope = self._scope(prompt, llm_string)
        first = return_val[0]
        response = first.message.content if isinstance(first, ChatGeneration) else first.text
        if not isinstance(response, str):
            response = json.dumps(response)
        metadata = {"langchain_kind": "chat" if isinstance(first, ChatGeneration) else "text"}
        command = WriteCommand(prompt=text, response=response, scope=scope, ttl_seconds=self.ttl_seconds,
                               metadata=metadata, source="langchain")
        self.cache.write_queue.enqueue(command)

    def clear(self, **kwargs: Any) -> None:
        """Delete every entry of the adapter's tenant (LangChain's ``clear`` empties the whole cache)."""
        from .purge import purge

        handle = getattr(self.cache, "handle", None)
        client = handle.writer() if handle is not None else self.cache.client
        purge(client, self.cache.settings, PurgeCommand(mode="filter", filter=EntryFilter(), tenant=self.tenant,
                                                        by="langchain", reason="BaseCache.clear"))
