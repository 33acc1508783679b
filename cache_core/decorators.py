"""``@cached``: put a semantic cache in front of a plain function that calls an LLM.

>>> @cached(cache, scope={"tenant": "acme", "model": "gpt-4o-2024-08-06"})   # doctest: +SKIP
... def ask(prompt: str) -> str:
...     return client.chat.completions.create(...).choices[0].message.content
>>> ask("What is your refund policy?")   # the LLM is called on a miss only      # doctest: +SKIP
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping, TypeVar

from .cache import Answer, Generated, ScopeLike, SemanticCache

__all__ = ["cached"]

F = TypeVar("F", bound=Callable[..., Any])


def cached(
    cache: SemanticCache,
    *,
    scope: ScopeLike | Callable[[Mapping[str, Any]], ScopeLike],
    prompt_arg: str = "prompt",
    min_similarity: float | None = None,
    ttl_seconds: int | None = None,
) -> Callable[[F], F]:
    """Decorate ``fn(prompt, ...) -> str | Generated``: answer from the cache, call ``fn`` on a miss.

    ``scope`` is a scope, or a function of the call's bound arguments returning one (to take the tenant from an
    argument). The decorated function returns what ``fn`` returns as text; ``fn.answer(...)`` returns the full
    :class:`~cache_core.cache.Answer` (hit or not, similarity, timings).
    """

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)
        if prompt_arg not in signature.parameters:
            raise TypeError(f"{fn.__qualname__} has no parameter {prompt_arg!r} to use as the prompt")

        def answer(*args: Any, **kwargs: Any) -> Answer:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            prompt = bound.arguments[prompt_arg]
            sc = scope(bound.arguments) if callable(scope) else scope

            def generate() -> str | Generated:
                return fn(*args, **kwargs)

            return cache.get_or_generate(prompt, sc, generate, min_similarity=min_similarity, ttl_seconds=ttl_seconds)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> str:
            return answer(*args, **kwargs).response

        wrapper.answer = answer  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate
