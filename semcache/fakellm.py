"""A simulated OpenAI-compatible LLM, for the demo and for tests of the proxy.

It answers ``POST /v1/chat/completions`` (plain and ``stream: true``) and ``GET /v1/models`` like an OpenAI-style
server would, with a canned answer per known prompt, a realistic delay (a fixed part plus a per-token part) and
token counts. It never calls a real model; it exists so that `semcache demo` and the proxy tests run with no
network and no API key.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterator

from flask import Flask, Response, jsonify, request
from werkzeug.serving import make_server

__all__ = ["SimulatedLLM", "create_fake_llm_app", "FakeLLMServer", "count_tokens"]


def count_tokens(text: str) -> int:
    """A rough token count (about 0.75 words a token), good enough for a simulation."""
    return max(1, round(len(re.findall(r"\w+|[^\w\s]", text)) * 1.1))


@dataclass
class SimulatedLLM:
    """Maps the last user message to an answer; ``answer_for`` decides, ``base_ms`` + ``per_token_ms`` delay."""

    answer_for: Callable[[str], str]
    base_ms: float = 250.0
    per_token_ms: float = 4.0
    model: str = "sim-1"
    calls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def complete(self, messages: list[dict]) -> tuple[str, dict]:
        with self.lock:
            self.calls += 1
        last = next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), "")
        if not isinstance(last, str):  # content parts: keep the text parts
            last = " ".join(p.get("text", "") for p in last if isinstance(p, dict))
        text = self.answer_for(last)
        prompt_tokens = sum(count_tokens(str(m.get("content") or "")) for m in messages)
        completion_tokens = count_tokens(text)
        time.sleep((self.base_ms + self.per_token_ms * completion_tokens) / 1000)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        return text, usage


def create_fake_llm_app(llm: SimulatedLLM) -> Flask:
    app = Flask("semcache-fakellm")

    @app.get("/v1/models")
    def models():
        return jsonify({"object": "list", "data": [{"id": llm.model, "object": "model", "owned_by": "semcache"}]})

    @app.get("/healthz")
    def healthz():
        return jsonify({"ok": True, "calls": llm.calls})

    @app.post("/v1/chat/completions")
    def chat():
        body = request.get_json(silent=True) or {}
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return jsonify({"error": {"message": "messages must be a non-empty list", "type": "invalid_request_error"}}), 400
        text, usage = llm.complete(messages)
        cid = "chatcmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())
        model = body.get("model") or llm.model
        if body.get("stream"):
            return Response(_stream(cid, created, model, text), mimetype="text/event-stream")
        return jsonify({
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": usage,
        })  # fmt: skip

    return app


def _stream(cid: str, created: int, model: str, text: str) -> Iterator[str]:
    def chunk(delta: dict, finish: str | None = None) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    for piece in re.findall(r"\S+\s*", text):
        yield chunk({"content": piece})
    yield chunk({}, "stop")
    yield "data: [DONE]\n\n"


class FakeLLMServer:
    """Serves a :class:`SimulatedLLM` on 127.0.0.1 from a thread. ``with FakeLLMServer(llm) as srv: srv.url``."""

    def __init__(self, llm: SimulatedLLM, host: str = "127.0.0.1", port: int = 0) -> None:
        self.llm = llm
        self._server = make_server(host, port, create_fake_llm_app(llm), threaded=True)
        self.url = f"http://{host}:{self._server.server_port}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fakellm", daemon=True)

    def start(self) -> "FakeLLMServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(5)

    def __enter__(self) -> "FakeLLMServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
