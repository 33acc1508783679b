"""A simulated OpenAI-compatible LLM, for the demo and for tests of the proxy.

It answers ``POST /v1/chat/completions`` (plain and ``stream: true``) and ``GET /v1/models`` like an OpenAI-style
server would, with a canned answer per known prompt, a realistic delay (a fixed time to the first token plus a
per-token part) and token counts. It never calls a real model; it exists so that `semcache demo` and the proxy
tests run with no network and no API key.

Streams are paced like a real server's: the first chunk comes after ``base_ms``, each next one after
``per_token_ms`` per token it carries; the usage chunk of ``stream_options: {"include_usage": true}`` comes last.
``error_for`` lets a test make the server answer an error (status and OpenAI-style body) for chosen prompts, and
``requests`` keeps the last requests received (path, ``Authorization`` header, body) for tests to inspect.

>>> llm = SimulatedLLM(answer_for=lambda prompt: "Paris.", base_ms=0, per_token_ms=0)
>>> llm.complete([{"role": "user", "content": "Capital of France?"}])
('Paris.', {'prompt_tokens': 4, 'completion_tokens': 2, 'total_tokens': 6})
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from flask import Flask, Response, jsonify, request
from werkzeug.serving import WSGIRequestHandler, make_server

__all__ = ["SimulatedLLM", "Completion", "create_fake_llm_app", "FakeLLMServer", "count_tokens", "last_user_text"]


def count_tokens(text: str) -> int:
    """A rough token count (about 0.75 words a token), good enough for a simulation."""
    return max(1, round(len(re.findall(r"\w+|[^\w\s]", text)) * 1.1))


def last_user_text(messages: list[dict]) -> str:
    """The text of the last user message ('' if there is none); content parts keep their text parts."""
    last = next((m.get("content") or "" for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"),
                "")
    if not isinstance(last, str):
        last = " ".join(p.get("text", "") for p in last if isinstance(p, dict))
    return last


@dataclass(frozen=True)
class Completion:
    """What the simulated model answers, before any waiting: the text, its usage and how long it "takes"."""

    text: str
    usage: dict[str, int]
    first_token_s: float
    per_token_s: float

    @property
    def total_s(self) -> float:
        return self.first_token_s + self.per_token_s * self.usage["completion_tokens"]


@dataclass
class SimulatedLLM:
    """Maps the last user message to an answer; ``answer_for`` decides, ``base_ms`` + ``per_token_ms`` delay."""

    answer_for: Callable[[str], str]
    base_ms: float = 250.0
    per_token_ms: float = 4.0
    model: str = "sim-1"
    error_for: Callable[[str], tuple[int, dict] | None] | None = None
    calls: int = 0
    requests: deque = field(default_factory=lambda: deque(maxlen=100), repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def plan(self, messages: list[dict]) -> Completion:
        """The answer to ``messages`` and its timing, without waiting (counts as a call)."""
        with self.lock:
            self.calls += 1
        text = self.answer_for(last_user_text(messages))
        prompt_tokens = sum(count_tokens(str(m.get("content") or "")) for m in messages if isinstance(m, dict))
        completion_tokens = count_tokens(text)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        return Completion(text, usage, self.base_ms / 1000, self.per_token_ms / 1000)

    def complete(self, messages: list[dict]) -> tuple[str, dict]:
        """The answer and its usage, after the simulated generation time."""
        done = self.plan(messages)
        time.sleep(done.total_s)
        return done.text, done.usage


def _error(status: int, message: str, kind: str = "invalid_request_error"):
    return jsonify({"error": {"message": message, "type": kind, "param": None, "code": None}}), status


def create_fake_llm_app(llm: SimulatedLLM) -> Flask:
    app = Flask("semcache-fakellm")

    @app.before_request
    def _record() -> None:
        body = request.get_json(silent=True) if request.method == "POST" else None
        llm.requests.append({"path": request.path, "authorization": request.headers.get("Authorization"),
                             "body": body})

    @app.get("/v1/models")
    def models():
        return jsonify({"object": "list", "data": [{"id": llm.model, "object": "model", "owned_by": "semcache"}]})

    @app.get("/healthz")
    def healthz():
        return jsonify({"ok": True, "calls": llm.calls})

    @app.post("/v1/chat/completions")
    def chat():
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "messages must be a non-empty list")
        if llm.error_for is not None:
            failure = llm.error_for(last_user_text(messages))
            if failure is not None:
                with llm.lock:
                    llm.calls += 1
                status, payload = failure
                return jsonify(payload), status
        done = llm.plan(messages)
        cid = "chatcmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())
        model = body.get("model") or llm.model
        if body.get("stream"):
            options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
            chunks = _stream(cid, created, model, done, include_usage=bool(options.get("include_usage")))
            return Response(chunks, mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})
        time.sleep(done.total_s)
        return jsonify({
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text}, "finish_reason": "stop",
                         "logprobs": None}],
            "usage": done.usage,
        })  # fmt: skip

    return app


def _stream(cid: str, created: int, model: str, done: Completion, *, include_usage: bool) -> Iterator[str]:
    def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        if include_usage:
            body.setdefault("usage", None)
        return f"data: {json.dumps(body)}\n\n"

    time.sleep(done.first_token_s)
    yield chunk({"role": "assistant", "content": ""})
    for piece in re.findall(r"\S+\s*", done.text):
        time.sleep(done.per_token_s * count_tokens(piece))
        yield chunk({"content": piece})
    yield chunk({}, "stop")
    if include_usage:
        usage = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
                 "usage": done.usage}
        yield f"data: {json.dumps(usage)}\n\n"
    yield "data: [DONE]\n\n"


class _QuietHandler(WSGIRequestHandler):
    """No access log line per request (the demo's terminal shows its own progress)."""

    def log_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class FakeLLMServer:
    """Serves a :class:`SimulatedLLM` on 127.0.0.1 from a thread. ``with FakeLLMServer(llm) as srv: srv.url``."""

    def __init__(self, llm: SimulatedLLM, host: str = "127.0.0.1", port: int = 0) -> None:
        self.llm = llm
        self._server = make_server(host, port, create_fake_llm_app(llm), threaded=True, request_handler=_QuietHandler)
        self.port = self._server.server_port
        self.url = f"http://{host}:{self.port}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fakellm", daemon=True)

    def start(self) -> "FakeLLMServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> "FakeLLMServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
