"""The pieces of `semcache demo`: a FAQ workload from CLINC150, the simulated LLM that answers it, the replay through
the proxy by concurrent clients, and the summary and chart of what happened.

The workload (seeded, so two runs with the same seed ask the same questions in the same order):

* questions come from the shipped CLINC150 (``semcache/data/clinc150.csv``, CC BY 3.0), 150 intents in 10 domains;
* intents are asked with a Zipf-like popularity (a few are asked a lot, most rarely), as FAQ traffic is;
* ``repeat_fraction`` of the questions repeat one asked before for that intent, word for word (sometimes with other
  capitals or punctuation); the rest are new phrasings (a semantic hit, or a miss);
* ``oos_fraction`` are out of scope (CLINC150's ``oos``): the assistant refuses them, the worker drops refusals, so
  they are never cached, and any hit they get is a wrong one;
* ``followup_fraction`` come after an earlier turn of conversation (another context: the cache must not answer
  them from a first-turn entry), ``hot_fraction`` ask for temperature 0.9 (the proxy bypasses the cache),
  ``stream_fraction`` ask for a streamed answer.

The simulated LLM answers every question of an intent with that intent's canned answer (so a hit is *wrong* when it
serves another intent's answer), with realistic latency and token counts; the answers of a few intents carry a phone
number or an e-mail address (the worker holds them for review: the review queue fills), and it refuses
out-of-scope questions and one small-talk intent (the worker drops refusals).

>>> w = make_workload(200, seed=7)
>>> len(w), w[0] == make_workload(200, seed=7)[0]
(200, True)
>>> answers = FaqAnswers()
>>> answers.intent_of(answers.answer("lost_luggage")), answers.answer("oos").startswith("I'm sorry")
('lost_luggage', True)
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

from cache_core.schema import normalize_prompt

__all__ = [
    "Row",
    "DemoQuery",
    "Record",
    "FaqAnswers",
    "clinc150",
    "make_workload",
    "replay",
    "summarize",
    "format_summary",
    "write_chart",
    "SYSTEM_PROMPT",
    "PII_INTENTS",
    "REFUSED_INTENTS",
]

SYSTEM_PROMPT = ("You are the virtual assistant of Example Bank & Travel. Answer the customer's question in a few "
                 "friendly sentences.")
# intents whose canned answer carries contact details: the safety pipeline holds them for review (PII)
PII_INTENTS = {"lost_luggage": "phone", "restaurant_reservation": "phone", "new_card": "phone",
               "rollover_401k": "email", "insurance": "email"}
REFUSED_INTENTS = ("oos", "meaning_of_life")  # refusals: the safety pipeline drops them
_REFUSAL = ("I'm sorry, but I can't help with that: it is outside what this assistant covers. You can ask me about "
            "your accounts, cards, travel, dining, your home, your car, work or everyday questions.")


@dataclass(frozen=True)
class Row:
    text: str
    intent: str
    split: str


@lru_cache(maxsize=1)
def clinc150() -> tuple[Row, ...]:
    """Every row of the shipped CLINC150 (``semcache/data/clinc150.csv``)."""
    with resources.files("semcache").joinpath("data/clinc150.csv").open(encoding="utf-8") as handle:
        return tuple(Row(r["text"], r["intent"], r["split"]) for r in csv.DictReader(handle))


@lru_cache(maxsize=1)
def intent_domains() -> dict[str, str]:
    with resources.files("semcache").joinpath("data/intent_domains.csv").open(encoding="utf-8") as handle:
        return {r["intent"]: r["domain"] for r in csv.DictReader(handle)}


# --- the canned answers --------------------------------------------------------------------------------------------
_DOMAIN_LINES = {
    "banking": "You can do this in the Example Bank app under Accounts, or at any branch with your ID.",
    "credit_cards": "Open the Cards tab in the app, pick your card and follow the steps shown there.",
    "kitchen_and_dining": "Here is a simple way to go about it in the kitchen or when eating out.",
    "home": "Your smart home assistant can take care of this; just ask it in plain words.",
    "auto_and_commute": "Check your car's manual or the app's Commute section for the details.",
    "travel": "Before you travel, check the airline's and the destination's current rules as well.",
    "utility": "I can work this out for you right away; just give me the details you have.",
    "work": "Your HR portal has the forms and the policy; your manager can approve the request there.",
    "small_talk": "I'm always glad to chat for a moment.",
    "meta": "You can change this in the assistant's settings at any time.",
}
_EXTRA = (
    "Most customers have it sorted out in a few minutes.",
    "If anything looks wrong, our support team can look into it with you.",
    "You will get a confirmation by notification once it is done.",
    "There is no fee for this.",
    "The same steps work on the website and in the mobile app.",
    "Keep your reference number until everything is settled.",
    "Let me know if you want me to set a reminder about it.",
)


class FaqAnswers:
    """The simulated assistant's canned answer per intent, and the way back from an answer to its intent."""

    def __init__(self) -> None:
        self._by_intent: dict[str, str] = {}
        for intent, domain in sorted(intent_domains().items()):
            self._by_intent[intent] = self._compose(intent, domain)
        for intent in REFUSED_INTENTS:
            self._by_intent[intent] = _REFUSAL if intent == "oos" else (
                "I'm sorry, but I can't answer that one: it is a question for philosophers, not for a bank assistant.")
        self._intent_of = {normalize_prompt(a): i for i, a in self._by_intent.items() if i != "oos"}

    @staticmethod
    def _compose(intent: str, domain: str) -> str:
        digest = int(hashlib.sha256(intent.encode()).hexdigest(), 16)
        topic = intent.replace("_", " ")
        extra = [_EXTRA[(digest >> (4 * i)) % len(_EXTRA)] for i in range(2 + digest % 3)]
        parts = [f"About {topic}: {_DOMAIN_LINES.get(domain, '')}", *dict.fromkeys(extra)]
        contact = PII_INTENTS.get(intent)
        if contact == "phone":
            parts.append(f"For help, call our desk at +1 (555) 010-{1000 + digest % 9000}.")
        elif contact == "email":
            parts.append(f"For help, write to {intent.replace('_', '-')}@example.com.")
        return " ".join(parts)

    def answer(self, intent: str) -> str:
        return self._by_intent.get(intent, self._by_intent["oos"])

    def intent_of(self, answer: str) -> str | None:
        """The intent whose canned answer this is (None for a refusal or an answer a moderator edited)."""
        return self._intent_of.get(normalize_prompt(answer))


# --- the workload ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoQuery:
    """One request of the replay."""

    text: str
    intent: str
    repeat: bool = False
    stream: bool = False
    temperature: float = 0.0
    history: tuple[tuple[str, str], ...] = ()  # earlier (role, content) turns of the conversation

    def messages(self) -> list[dict[str, str]]:
        out = [{"role": "system", "content": SYSTEM_PROMPT}]
        out += [{"role": role, "content": content} for role, content in self.history]
        out.append({"role": "user", "content": self.text})
        return out


def _variant(text: str, rng: random.Random) -> str:
    """The same question typed differently: capitals and punctuation (the exact match normalizes them away)."""
    choice = rng.randrange(3)
    if choice == 0:
        return text[:1].upper() + text[1:] + ("?" if not text.endswith("?") else "")
    if choice == 1:
        return text.upper() if len(text) < 40 else text.capitalize()
    return text


def make_workload(queries: int, *, seed: int = 42, zipf: float = 0.9, repeat_fraction: float = 0.25,
                  oos_fraction: float = 0.04, followup_fraction: float = 0.04, hot_fraction: float = 0.03,
                  stream_fraction: float = 0.25) -> list[DemoQuery]:
    """The seeded FAQ workload (see the module docstring)."""
    if queries < 1:
        raise ValueError("queries must be at least 1")
    rng = random.Random(seed)
    pools: dict[str, list[str]] = {}
    for row in clinc150():
        intent = "oos" if row.intent == "oos" else row.intent
        pools.setdefault(intent, []).append(row.text)
    for texts in pools.values():
        rng.shuffle(texts)
    intents = sorted(i for i in pools if i != "oos")
    rng.shuffle(intents)  # popularity order
    weights = [1 / (rank + 1) ** zipf for rank in range(len(intents))]
    asked: dict[str, list[str]] = {}
    used: dict[str, int] = {}
    answers = FaqAnswers()
    out = []
    for _ in range(queries):
        intent = "oos" if rng.random() < oos_fraction else rng.choices(intents, weights)[0]
        earlier = asked.get(intent)
        repeat = bool(earlier) and rng.random() < repeat_fraction
        if repeat:
            text = _variant(rng.choice(earlier), rng)
        else:
            pool = pools[intent]
            index = used.get(intent, 0)
            text = pool[index % len(pool)]
            used[intent] = index + 1
            asked.setdefault(intent, []).append(text)
        history: tuple[tuple[str, str], ...] = ()
        if rng.random() < followup_fraction:
            before = rng.choice(intents)
            history = (("user", rng.choice(pools[before])), ("assistant", answers.answer(before)))
        out.append(DemoQuery(text=text, intent=intent, repeat=repeat, stream=rng.random() < stream_fraction,
                             temperature=0.9 if rng.random() < hot_fraction else 0.0, history=history))
    return out


def answer_lookup(workload: Sequence[DemoQuery] | None = None) -> Callable[[str], str]:
    """``answer_for`` of the simulated LLM: the canned answer of the question's intent (refusal when unknown)."""
    answers = FaqAnswers()
    intents = {}
    for row in clinc150():
        intents.setdefault(normalize_prompt(row.text), row.intent)
    for query in workload or ():
        intents.setdefault(normalize_prompt(query.text), query.intent)

    def answer_for(prompt: str) -> str:
        return answers.answer(intents.get(normalize_prompt(prompt), "oos"))

    return answer_for


# --- the replay ------------------------------------------------------------------------------------------------------
@dataclass
class Record:
    """What one request of the replay got."""

    index: int
    intent: str
    repeat: bool
    stream: bool
    started_s: float
    latency_ms: float
    cache: str  # hit | miss | bypass | error
    status: int = 0
    strategy: str = ""
    degraded: bool = False  # a miss because Redis failed or was too slow (X-Semcache-Degraded)
    coalesced: bool = False  # a miss that relayed an identical request's upstream answer (X-Semcache-Coalesced)
    served_intent: str | None = None
    saved_prompt_tokens: int = 0
    saved_completion_tokens: int = 0
    error: str = ""

    @property
    def wrong(self) -> bool:
        return self.cache == "hit" and self.served_intent != self.intent


def _sse_text(body: str) -> str:
    text = []
    for block in body.split("\n\n"):
        data = "\n".join(line[5:].lstrip() for line in block.splitlines() if line.startswith("data:"))
        if not data or data == "[DONE]":
            continue
        chunk = json.loads(data)
        if chunk.get("error"):
            raise ValueError(chunk["error"].get("message", "stream error"))
        for choice in chunk.get("choices") or []:
            text.append((choice.get("delta") or {}).get("content") or "")
    return "".join(text)


def _ask(client: Any, url: str, query: DemoQuery, model: str) -> tuple[int, dict[str, str], str]:
    body: dict[str, Any] = {"model": model, "messages": query.messages(), "temperature": query.temperature}
    if query.stream:
        body["stream"] = True
        with client.stream("POST", url, json=body) as response:
            raw = response.read().decode("utf-8", "replace")
            if response.status_code != 200:
                return response.status_code, dict(response.headers), raw
            return 200, dict(response.headers), _sse_text(raw)
    response = client.post(url, json=body)
    if response.status_code != 200:
        return response.status_code, dict(response.headers), response.text
    return 200, dict(response.headers), response.json()["choices"][0]["message"]["content"]


def replay(base_url: str, api_key: str, workload: Sequence[DemoQuery], *, clients: int, answers: FaqAnswers,
           model: str = "sim-faq-1", stop: threading.Event | None = None,
           on_done: Callable[[Record], None] | None = None, timeout_s: float = 120.0) -> list[Record]:
    """Send the workload to ``<base_url>/v1/chat/completions`` from ``clients`` concurrent clients, in order.

    Returns one :class:`Record` per request sent (fewer than the workload if ``stop`` was set).
    """
    import httpx

    url = base_url.rstrip("/") + "/v1/chat/completions"
    records: list[Record] = []
    lock = threading.Lock()
    position = iter(range(len(workload)))
    start = time.perf_counter()

    def client_loop() -> None:
        with httpx.Client(timeout=timeout_s, headers={"Authorization": f"Bearer {api_key}"}, trust_env=False) as http:
            while not (stop and stop.is_set()):
                with lock:
                    index = next(position, None)
                if index is None:
                    return
                query = workload[index]
                began = time.perf_counter()
                record = Record(index=index, intent=query.intent, repeat=query.repeat, stream=query.stream,
                                started_s=began - start, latency_ms=0.0, cache="error")
                try:
                    status, headers, text = _ask(http, url, query, model)
                    record.status = status
                    if status != 200:
                        record.error = f"HTTP {status}: {text[:200]}"
                    else:
                        record.cache = headers.get("x-semcache", "miss")
                        record.degraded = bool(headers.get("x-semcache-degraded"))
                        record.coalesced = headers.get("x-semcache-coalesced") == "1"
                        if record.cache == "hit":
                            record.strategy = headers.get("x-semcache-strategy", "")
                            record.served_intent = answers.intent_of(text)
                            record.saved_prompt_tokens = int(headers.get("x-semcache-saved-prompt-tokens", 0) or 0)
                            record.saved_completion_tokens = int(
                                headers.get("x-semcache-saved-completion-tokens", 0) or 0)
                except Exception as exc:  # noqa: BLE001 - one failed request is a record, not the end of the demo
                    record.error = f"{type(exc).__name__}: {exc}"[:300]
                record.latency_ms = (time.perf_counter() - began) * 1000
                with lock:
                    records.append(record)
                if on_done is not None:
                    on_done(record)

    threads = [threading.Thread(target=client_loop, name=f"demo-client-{i}", daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(records, key=lambda r: r.index)


# --- the summary -----------------------------------------------------------------------------------------------------
def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
    return ordered[rank]


def summarize(records: Sequence[Record], *, elapsed_s: float, price_in: float, price_out: float,
              server: dict[str, Any] | None = None) -> dict[str, Any]:
    """The numbers of the summary table (plain data; also written as JSON next to the chart)."""
    hits = [r for r in records if r.cache == "hit"]
    misses = [r for r in records if r.cache == "miss"]
    bypass = [r for r in records if r.cache == "bypass"]
    errors = [r for r in records if r.cache == "error"]
    wrong = [r for r in hits if r.wrong]
    saved_in = sum(r.saved_prompt_tokens for r in hits)
    saved_out = sum(r.saved_completion_tokens for r in hits)
    out = {
        "queries": len(records),
        "elapsed_s": round(elapsed_s, 1),
        "hits": len(hits),
        "hits_exact": sum(r.strategy == "exact" for r in hits),
        "hits_semantic": sum(r.strategy == "semantic" for r in hits),
        "misses": len(misses),
        "coalesced": sum(1 for r in misses if r.coalesced),
        "bypassed": len(bypass),
        "errors": len(errors),
        "degraded": sum(r.degraded for r in misses),
        "hit_rate": len(hits) / len(records) if records else 0.0,
        "wrong_hits": len(wrong),
        "wrong_hit_rate": len(wrong) / len(hits) if hits else 0.0,
        "latency_ms": {
            "hit_p50": _percentile([r.latency_ms for r in hits], 0.5),
            "hit_p95": _percentile([r.latency_ms for r in hits], 0.95),
            "miss_p50": _percentile([r.latency_ms for r in misses], 0.5),
            "miss_p95": _percentile([r.latency_ms for r in misses], 0.95),
        },
        "saved_prompt_tokens": saved_in,
        "saved_completion_tokens": saved_out,
        "saved_money": saved_in / 1000 * price_in + saved_out / 1000 * price_out,
        "prices_per_1k": {"input": price_in, "output": price_out},
        "first_errors": [r.error for r in errors[:3]],
    }
    if server:
        out["server"] = server
    return out


def _ms(value: float | None) -> str:
    return "-" if value is None else (f"{value:,.0f} ms" if value >= 100 else f"{value:.1f} ms")


def format_summary(s: dict[str, Any]) -> str:
    """The summary as a two-column table."""
    lat = s["latency_ms"]
    rows = [
        ("queries", f"{s['queries']:,} in {s['elapsed_s']:.0f} s "
                    f"({s['queries'] / max(s['elapsed_s'], 1e-9):.1f}/s)"),
        ("hit rate", f"{s['hit_rate']:.1%}  ({s['hits']:,} hits: {s['hits_exact']:,} exact, "
                     f"{s['hits_semantic']:,} semantic)"),
        ("wrong hits", f"{s['wrong_hits']:,}  ({s['wrong_hit_rate']:.1%} of hits: answer of another intent)"),
        ("misses / bypassed / errors", f"{s['misses']:,} / {s['bypassed']:,} / {s['errors']:,}"
                                       + (f"  ({s['coalesced']:,} misses shared an identical request's upstream "
                                          f"call)" if s.get("coalesced") else "")
                                       + (f"  ({s['degraded']:,} misses because Redis was slower than "
                                          f"SEMCACHE_REDIS_TIMEOUT_MS)" if s.get("degraded") else "")),
        ("latency of hits", f"p50 {_ms(lat['hit_p50'])}, p95 {_ms(lat['hit_p95'])}"),
        ("latency of misses", f"p50 {_ms(lat['miss_p50'])}, p95 {_ms(lat['miss_p95'])}"),
        ("tokens saved", f"{s['saved_prompt_tokens'] + s['saved_completion_tokens']:,}  "
                         f"({s['saved_prompt_tokens']:,} prompt, {s['saved_completion_tokens']:,} completion)"),
        ("money saved", f"${s['saved_money']:,.4f}  (at ${s['prices_per_1k']['input']:g} / "
                        f"${s['prices_per_1k']['output']:g} per 1k input / output tokens)"),
    ]
    server = s.get("server") or {}
    if server:
        entries = server.get("entries", {})
        writes = server.get("writes", {})
        rows += [
            ("cache entries", f"{entries.get('approved', 0):,} approved, {entries.get('pending_review', 0):,} in the "
                              f"review queue, {entries.get('rejected', 0):,} rejected"),
            ("worker decisions", f"{writes.get('approve', 0):,} approved, {writes.get('hold', 0):,} held for review, "
                                 f"{writes.get('drop', 0):,} dropped (refusals, personal questions)"),
        ]
    width = max(len(name) for name, _ in rows)
    line = "-" * (width + 2 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{name:<{width}}  {value}" for name, value in rows), line])


def write_chart(records: Sequence[Record], path: Path, *, title: str = "semcache demo", window: int = 100) -> Path:
    """A PNG of the replay: hit rate (rolling and cumulative) and the latency of every request, by outcome."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = sorted(records, key=lambda r: r.index)
    xs = list(range(1, len(records) + 1))
    hit = [1.0 if r.cache == "hit" else 0.0 for r in records]
    cumulative, rolling, total = [], [], 0.0
    for i, h in enumerate(hit):
        total += h
        cumulative.append(100 * total / (i + 1))
        lo = max(0, i + 1 - window)
        rolling.append(100 * sum(hit[lo : i + 1]) / (i + 1 - lo))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.2), sharex=True, gridspec_kw={"height_ratios": [1, 1.3]})
    top.plot(xs, rolling, color="#2a7", lw=1.6, label=f"hit rate, last {window} queries")
    top.plot(xs, cumulative, color="#154", lw=1.2, ls="--", label="hit rate, cumulative")
    top.set_ylabel("hit rate (%)")
    top.set_ylim(0, 100)
    top.grid(alpha=0.3)
    top.legend(loc="lower right", fontsize=8)
    top.set_title(title, fontsize=10)
    colors = {"hit": "#2a7", "miss": "#e83", "bypass": "#999", "error": "#c22"}
    for outcome, color in colors.items():
        pts = [(i + 1, r.latency_ms) for i, r in enumerate(records) if r.cache == outcome]
        if pts:
            bottom.scatter([p[0] for p in pts], [p[1] for p in pts], s=6, color=color, alpha=0.6,
                           label=f"{outcome} ({len(pts)})", linewidths=0)
    bottom.set_yscale("log")
    bottom.set_ylabel("latency (ms, log scale)")
    bottom.set_xlabel("query")
    bottom.grid(alpha=0.3, which="both")
    bottom.legend(loc="upper right", fontsize=8, markerscale=2.5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def records_json(records: Sequence[Record]) -> list[dict[str, Any]]:
    return [asdict(r) for r in records]


@dataclass
class Progress:
    """Counts for the progress bar's postfix, updated from the client threads."""

    done: int = 0
    hits: int = 0
    errors: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, record: Record) -> None:
        with self.lock:
            self.done += 1
            self.hits += record.cache == "hit"
            self.errors += record.cache == "error"
