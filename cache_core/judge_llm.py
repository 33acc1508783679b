"""The ``llm`` judge: asks any OpenAI-compatible chat endpoint "does the stored answer also answer this question?".

One question is one ``POST <SEMCACHE_JUDGE_URL>/chat/completions`` (temperature 0, a few tokens) whose reply must be
exactly ``yes`` or ``no`` (:func:`parse_verdict`). Every way of not getting that is ``agree=None`` with a short
``detail`` and never an exception: a timeout (``SEMCACHE_JUDGE_TIMEOUT_MS``), a refused connection, a non-2xx
status, a body that is not a chat completion, any other wording, and a spent budget. The budget
(``SEMCACHE_JUDGE_BUDGET_PER_MINUTE``) is one Redis counter per minute (``<index>:judge:budget:<minute>``), shared
by every worker process; a question that finds it spent, or cannot read it, is not sent. Nothing is retried: a
question without a verdict leaves the entry in its own group, which is what it had without a judge.

Prompt and answer texts go to the judge only: never into logs, ``detail`` or the audit trail.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import httpx
import redis
from pydantic import BaseModel, ConfigDict, Field

from .judge import JudgeRequest, JudgeVerdict
from .settings import Settings

__all__ = ["LLMJudge", "parse_verdict", "judge_messages", "take_budget", "MAX_TEXT_CHARS", "NOT_ASKED"]

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 4000  # per text sent: bounds the cost of one question (a cut answer rather gets a "no")
_BUDGET_TTL_S = 120  # a minute's counter outlives its minute a little (clock skew between workers)
NOT_ASKED = "not asked: "  # the detail of a question the budget stopped (counted apart from failed calls)
_VERDICT = re.compile(r"\s*(yes|no)\.?\s*", re.IGNORECASE)

_SYSTEM = ("You review a cache of answers. You get a new question, and a stored question with its stored answer. "
           "Decide whether the stored answer also correctly and fully answers the new question. Reply with exactly "
           "one word: yes or no.")


def parse_verdict(content: str | None) -> bool | None:
    """``True`` for ``yes``, ``False`` for ``no`` (any case, optional trailing period and whitespace), else None.

    >>> [parse_verdict(t) for t in ("yes", "No.", " YES \\n", "yes!", "Yes, it does", "", None)]
    [True, False, True, None, None, None, None]
    """
    if not isinstance(content, str):
        return None
    match = _VERDICT.fullmatch(content)
    return None if match is None else match.group(1).lower() == "yes"


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT_CHARS else text[:MAX_TEXT_CHARS] + " [...]"


def judge_messages(request: JudgeRequest) -> list[dict[str, str]]:
    """The chat messages of one question (texts cut at :data:`MAX_TEXT_CHARS` characters each)."""
    user = (f"New question:\n{_cut(request.prompt)}\n\nStored question:\n{_cut(request.neighbour_prompt)}\n\n"
            f"Stored answer:\n{_cut(request.neighbour_response)}\n\n"
            "Does the stored answer also correctly and fully answer the new question? Reply yes or no.")
    return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": user}]


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    content: str | None = None


class _Choice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    message: _Message


class _Usage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt_tokens: int = Field(0, ge=0)
    completion_tokens: int = Field(0, ge=0)


class _Reply(BaseModel):
    """The part of a chat completion the judge reads."""

    model_config = ConfigDict(extra="ignore")
    choices: list[_Choice] = Field(..., min_length=1)
    usage: _Usage | None = None


def take_budget(client: redis.Redis, settings: Settings, limit: int, *, now: float | None = None) -> bool:
    """Count one question against this minute's budget; False when the minute already had ``limit``.
    Raises :class:`redis.RedisError` when the counter cannot be read (the caller then asks nothing)."""
    minute = int((now or time.time()) // 60)
    pipe = client.pipeline(transaction=False)
    key = settings.key(f"judge:budget:{minute}")
    pipe.incr(key)
    pipe.expire(key, _BUDGET_TTL_S)
    count, _ = pipe.execute()
    return int(count) <= limit


class LLMJudge:
    """The ``llm`` judge. Thread-safe; its HTTP connection pool is made per process (again after a fork)."""

    name = "llm"

    def __init__(self, *, url: str, model: str, api_key: str | None, timeout_ms: int, budget_per_minute: int,
                 client: redis.Redis, settings: Settings) -> None:
        self.url = url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout_s = timeout_ms / 1000
        self.budget_per_minute = budget_per_minute
        self.client = client  # redis-py pools reconnect in a forked child by themselves
        self.settings = settings
        self._http: httpx.Client | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def _session(self) -> httpx.Client:
        if self._http is None or self._pid != os.getpid():
            with self._lock:
                if self._http is None or self._pid != os.getpid():
                    # a connection must not cross a fork: the child makes its own pool (the parent's is left alone)
                    self._http = httpx.Client(timeout=httpx.Timeout(self.timeout_s), follow_redirects=False,
                                              limits=httpx.Limits(max_connections=32, max_keepalive_connections=8))
                    self._pid = os.getpid()
        return self._http

    def judge(self, request: JudgeRequest) -> JudgeVerdict:
        """One question; never raises (a failure is ``agree=None`` with the reason in ``detail``)."""
        started = time.perf_counter()

        def none(detail: str) -> JudgeVerdict:
            log.debug("llm judge: no verdict on neighbour %s: %s", request.neighbour_id, detail)
            return JudgeVerdict(agree=None, detail=detail, ms=(time.perf_counter() - started) * 1000)

        try:
            if not take_budget(self.client, self.settings, self.budget_per_minute):
                return none(f"{NOT_ASKED}budget of {self.budget_per_minute} questions per minute spent")
        except redis.RedisError as exc:
            return none(f"{NOT_ASKED}budget counter unreadable ({type(exc).__name__})")
        body = {"model": self.model, "messages": judge_messages(request), "temperature": 0, "max_tokens": 3,
                "stream": False}
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            response = self._session().post(self.url, json=body, headers=headers)
        except httpx.TimeoutException as exc:
            return none(f"timeout after {self.timeout_s:g}s ({type(exc).__name__})")
        except httpx.HTTPError as exc:
            return none(f"request failed ({type(exc).__name__})")
        if not 200 <= response.status_code < 300:
            return none(f"HTTP {response.status_code}")
        try:
            reply = _Reply.model_validate(response.json())
        except ValueError:  # not JSON (JSONDecodeError), or not a chat completion (pydantic's ValidationError)
            return none("reply is not a chat completion")
        usage = reply.usage or _Usage()
        content = reply.choices[0].message.content
        agree = parse_verdict(content)
        detail = ("yes" if agree else "no") if agree is not None else \
            f"reply is neither yes nor no ({len(content or '')} characters)"
        return JudgeVerdict(agree=agree, detail=detail, ms=(time.perf_counter() - started) * 1000,
                            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)

    def close(self) -> None:
        if self._http is not None and self._pid == os.getpid():
            self._http.close()
        self._http = None
