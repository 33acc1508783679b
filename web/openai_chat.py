"""The OpenAI chat-completions format, as far as the proxy needs it: the request model, what of a request is the
cache key (or why it bypasses the cache), OpenAI-style answers and errors, and server-sent events.

The cache key of a request is its last user message (the prompt, matched semantically) within a scope of the API
key's tenant and a ``model`` value made of the request's model and, when the conversation has anything before that
message, a hash of it: the system prompt, the earlier turns and the parameters that shape the answer. The same last
question in another conversation (another system prompt, other earlier turns, another ``response_format``...) is
another scope, so it never hits.

>>> req = ChatRequest.model_validate({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi?"}]})
>>> key = cache_key(req, Settings())
>>> key.prompt, key.scope.model
('Hi?', 'gpt-4o')
>>> with_system = ChatRequest.model_validate({"model": "gpt-4o", "messages": [
...     {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]})
>>> cache_key(with_system, Settings()).scope.model
'gpt-4o#ctx:f65cf988a194e790'
>>> cache_key(ChatRequest.model_validate({**req.model_dump(), "temperature": 0.7}), Settings()).reason
'temperature 0.7 is above SEMCACHE_PROXY_MAX_TEMPERATURE (0.0)'
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cache_core.schema import Scope
from cache_core.settings import Settings

__all__ = [
    "ChatMessage",
    "ChatRequest",
    "CacheKey",
    "cache_key",
    "message_text",
    "IGNORED_PARAMS",
    "completion_body",
    "completion_chunks",
    "openai_error",
    "sse",
    "parse_request",
    "ChatRequestError",
]

# Parameters that do not change what the answer says, so they are not part of the context hash: how it is delivered
# (stream, stream_options), who asks (user, metadata, safety_identifier), billing and storage (store, service_tier,
# prompt_cache_key), the model (its own part of the scope), the messages (hashed separately), and temperature and n,
# which decide whether the cache is used at all.
IGNORED_PARAMS = frozenset({"model", "messages", "stream", "stream_options", "temperature", "n", "user", "metadata",
                            "store", "service_tier", "safety_identifier", "prompt_cache_key"})
_CONTEXT_SEP = "#ctx:"


class ChatMessage(BaseModel):
    """One message. Unknown fields (``tool_calls``, ``refusal``...) are kept and forwarded as they are."""

    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = Field(None, max_length=256)


class ChatRequest(BaseModel):
    """A ``POST /v1/chat/completions`` body. Only what the proxy decides on is typed; the rest is forwarded as is."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(..., min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=10_000)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    n: int | None = Field(None, ge=1, le=128)
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    logprobs: bool | None = None

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatRequestError(ValueError):
    """A request body that is not a valid chat-completions request; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def parse_request(body: Any) -> ChatRequest:
    """Validate a JSON body; :class:`ChatRequestError` with the first problem's field if it is not valid."""
    if not isinstance(body, dict):
        raise ChatRequestError("the body must be a JSON object (Content-Type: application/json)")
    try:
        return ChatRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        loc = [str(p) for p in first.get("loc", ()) if not _is_union_tag(p)]
        param = ".".join(loc) or None
        message = str(first.get("msg", "invalid value"))
        raise ChatRequestError(f"{param}: {message}" if param else message, param) from None


def _is_union_tag(part: object) -> bool:
    return isinstance(part, str) and (part in {"str", "list", "dict", "none"} or "[" in part)


def message_text(content: str | list[dict[str, Any]] | None) -> str | None:
    """The text of a message's content; None when it holds anything but text parts (an image, audio...)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            return None
        texts.append(part["text"])
    return "".join(texts)


@dataclass(frozen=True)
class CacheKey:
    """Either the prompt and scope of a cacheable request, or why it bypasses the cache (``reason``)."""

    prompt: str = ""
    scope: Scope | None = None
    context_hash: str | None = None
    reason: str | None = None

    @property
    def bypass(self) -> bool:
        return self.reason is not None


def _bypass_reason(req: ChatRequest, settings: Settings) -> str | None:
    if req.temperature is not None and req.temperature > settings.proxy_max_temperature:
        return (f"temperature {req.temperature:g} is above SEMCACHE_PROXY_MAX_TEMPERATURE "
                f"({settings.proxy_max_temperature})")
    if req.tools or req.functions:
        return "the request offers tools"
    if req.n is not None and req.n > 1:
        return f"n = {req.n} asks for several answers"
    if req.logprobs:
        return "logprobs cannot be answered from the cache"
    if req.messages[-1].role != "user":
        return f"the last message is from {req.messages[-1].role!r}, not the user"
    if _CONTEXT_SEP in req.model:
        # Issue 15: the scope's model value is "<model>" or "<model>#ctx:<hash>"; a model name holding the separator
        # could name another conversation's scope ("gpt-4o#ctx:<its hash>") and read its answers
        return f"the model name contains {_CONTEXT_SEP!r}, the separator of the proxy's cache scope"
    return None


def context_hash(req: ChatRequest) -> str | None:
    """A hash of everything before the last message, of the last message's fields but its text (its ``name``...)
    and of the answer-shaping parameters; None when there is none."""
    earlier = [m.model_dump(mode="json", exclude_none=True) for m in req.messages[:-1]]
    # Issue 15: the last message's ``name`` tells the model who asks ("What is my name?" from alice is not bob's
    # question). Its text is the prompt and its role is always "user" here; everything else is context. Only added
    # when present, so a request without such fields keeps the scope (and the entries) it always had.
    last = req.messages[-1].model_dump(mode="json", exclude_none=True, exclude={"content", "role"})
    params = {k: v for k, v in (req.model_extra or {}).items() if k not in IGNORED_PARAMS}
    for name in ("tools", "functions", "logprobs"):  # typed fields that are not ignored
        value = getattr(req, name)
        if value is not None:
            params[name] = value
    if not earlier and not params and not last:
        return None
    parts: dict[str, Any] = {"messages": earlier, "params": params}
    if last:
        parts["last"] = last
    material = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(material.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def cache_key(req: ChatRequest, settings: Settings, *, tenant: str = "-") -> CacheKey:
    """The prompt and scope the cache answers ``req`` from, or the reason it must go to the upstream."""
    reason = _bypass_reason(req, settings)
    if reason:
        return CacheKey(reason=reason)
    prompt = message_text(req.messages[-1].content)
    if prompt is None:
        return CacheKey(reason="the last message holds more than text")
    if not prompt.strip():
        return CacheKey(reason="the last message is empty")
    if len(prompt) > settings.max_prompt_chars:
        return CacheKey(reason=f"the last message is longer than SEMCACHE_MAX_PROMPT_CHARS "
                               f"({settings.max_prompt_chars})")
    if "\x00" in prompt or any(0xD800 <= ord(c) <= 0xDFFF for c in prompt):
        return CacheKey(reason="the last message holds a NUL or invalid UTF-8")
    digest = context_hash(req)
    model = req.model if digest is None else f"{req.model}{_CONTEXT_SEP}{digest}"
    if len(model) > settings.max_scope_value_chars or re.search(r"[\x00-\x1f\x7f]", model):
        return CacheKey(reason="the model name is too long or holds control characters for a cache scope")
    return CacheKey(prompt=prompt, scope=Scope(tenant=tenant, model=model), context_hash=digest)


# --- answers ---------------------------------------------------------------------------------------------------------
def _completion_id(seed: str | None = None) -> str:
    return "chatcmpl-" + (seed or uuid.uuid4().hex)[:29]


def completion_body(content: str, *, model: str, seed: str | None = None,
                    usage: dict[str, int] | None = None) -> dict[str, Any]:
    """A whole ``chat.completion`` answering ``content`` (a cache hit)."""
    return {
        "id": _completion_id(seed), "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        "system_fingerprint": "semcache",
    }  # fmt: skip


def _pieces(content: str, words: int = 4) -> Iterable[str]:
    tokens = re.findall(r"\s*\S+\s*", content) or [content]
    for start in range(0, len(tokens), words):
        yield "".join(tokens[start : start + words])


def completion_chunks(content: str, *, model: str, seed: str | None = None, include_usage: bool = False,
                      usage: dict[str, int] | None = None) -> Iterator[dict[str, Any]]:
    """``chat.completion.chunk`` objects streaming ``content`` (a cache hit), OpenAI's order: the role, the text in
    pieces, the finish reason, and the usage chunk when ``include_usage``."""
    cid, created = _completion_id(seed), int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": "semcache",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = None
        return body

    yield chunk({"role": "assistant", "content": ""})
    for piece in _pieces(content):
        yield chunk({"content": piece})
    yield chunk({}, "stop")
    if include_usage:
        yield {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
               "system_fingerprint": "semcache", "choices": [],
               "usage": usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line (``[DONE]`` as given)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
                404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
                429: "rate_limit_error", 502: "upstream_error", 503: "service_unavailable", 504: "upstream_timeout"}


def openai_error(status: int, message: str, *, kind: str | None = None, param: str | None = None,
                 code: str | None = None) -> dict[str, Any]:
    """An OpenAI-style error body: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind or _ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}
