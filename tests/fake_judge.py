"""A fake OpenAI-compatible judge: a real HTTP server (http.server in a thread on 127.0.0.1) for the ``llm`` judge.

``FakeJudge.reply`` says what ``POST /chat/completions`` answers: ``"yes"``, ``"no"`` or any other text (the
content of the one choice), ``"500"`` (an error status), ``"badjson"`` (a 200 that is not JSON), ``"slow"`` (sleeps
``slow_s`` before answering yes). ``rules`` are ``(substring, reply)`` pairs tried first against the new question
of the request. Every request is recorded (``calls``, ``bodies``) so tests can count questions and check what was
sent.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["FakeJudge"]


class FakeJudge:
    def __init__(self) -> None:
        self.reply = "no"
        self.rules: list[tuple[str, str]] = []
        self.slow_s = 5.0
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.lock = threading.Lock()
        self.release = threading.Event()  # set by stop(): a slow answer ends at once
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet test output
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with judge.lock:
                    judge.bodies.append(body)
                    judge.headers.append(dict(self.headers))
                reply = judge.reply_for(body)
                if self.path != "/v1/chat/completions":
                    return self._send(404, b'{"error": {"message": "not found"}}')
                if reply == "500":
                    return self._send(500, b'{"error": {"message": "upstream broke"}}')
                if reply == "badjson":
                    return self._send(200, b"<html>not json</html>")
                if reply == "slow":
                    judge.release.wait(judge.slow_s)
                    reply = "yes"
                answer = {"id": "chatcmpl-fake", "object": "chat.completion", "model": body.get("model", ""),
                          "choices": [{"index": 0, "finish_reason": "stop",
                                       "message": {"role": "assistant", "content": reply}}],
                          "usage": {"prompt_tokens": 57, "completion_tokens": 1, "total_tokens": 58}}
                self._send(200, json.dumps(answer).encode())

            def _send(self, status: int, data: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the judge gave up waiting (the timeout test)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-judge", daemon=True)

    def reply_for(self, body: dict[str, Any]) -> str:
        question = _new_question(body)
        for needle, reply in self.rules:
            if needle in question:
                return reply
        return self.reply

    @property
    def calls(self) -> int:
        with self.lock:
            return len(self.bodies)

    def reset(self, reply: str = "no") -> None:
        with self.lock:
            self.bodies.clear()
            self.headers.clear()
        self.reply = reply
        self.rules = []

    def start(self) -> "FakeJudge":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def _new_question(body: dict[str, Any]) -> str:
    """The new question of a judge request (the text between "New question:" and "Stored question:")."""
    try:
        user = body["messages"][-1]["content"]
    except (KeyError, IndexError, TypeError):
        return ""
    match = re.search(r"New question:\n(.*?)\n\nStored question:", user, re.S)
    return match.group(1) if match else ""
