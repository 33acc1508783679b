"""The judges of cache_core.judge against real parts: the llm judge against a fake OpenAI-compatible server over
real HTTP with its budget in the session Redis, a real (tiny) CrossEncoder loaded from a path, the real MiniLM for
the embedding judge."""

from __future__ import annotations

import time

import pytest

from cache_core.connection import make_client
from cache_core.embedded import free_port
from cache_core.errors import ConfigError
from cache_core.judge import CrossEncoderJudge, EmbeddingJudge, JudgeRequest, make_judge
from cache_core.judge_llm import MAX_TEXT_CHARS, NOT_ASKED, LLMJudge, parse_verdict

from .fake_judge import FakeJudge

SECRET_PROMPT = "How do I reset the password of account zq-4417?"
REQUEST = JudgeRequest(prompt=SECRET_PROMPT, response="Open Settings, then Security, then Reset.",
                       neighbour_id="n" * 32,
                       neighbour_prompt="How can I change my password?",
                       neighbour_response="Go to Settings > Security and press Reset password.", similarity=0.71)


@pytest.fixture(scope="module")
def fake_judge():
    server = FakeJudge().start()
    yield server
    server.stop()


@pytest.fixture
def judge_server(fake_judge):
    fake_judge.reset()
    return fake_judge


@pytest.fixture
def llm(judge_server, make_settings, redis_client):
    def make(**overrides):
        s = make_settings(judge="llm", judge_url=judge_server.url, judge_model="judge-model", **overrides)
        return make_judge(s, client=redis_client)

    return make


@pytest.mark.parametrize("text, expected", [
    ("yes", True), ("no", False), ("Yes", True), ("NO", False), ("yes.", True), ("No.\n", False), ("  yes  ", True),
    ("yes!", None), ("yes, it does", None), ("no..", None), ("maybe", None), ("", None), ("y", None),
    ("Yes. It answers it.", None), ("yesno", None), (None, None),
])  # fmt: skip
def test_parse_verdict_is_strict(text, expected):
    assert parse_verdict(text) is expected


def test_llm_judge_asks_once_with_temperature_0_and_reads_yes_and_tokens(llm, judge_server):
    judge = llm(judge_api_key="sk-judge-123")
    judge_server.reply = "Yes."
    verdict = judge.judge(REQUEST)
    assert verdict.agree is True and verdict.detail == "yes"
    assert (verdict.prompt_tokens, verdict.completion_tokens) == (57, 1)
    assert judge_server.calls == 1
    body = judge_server.bodies[0]
    assert body["model"] == "judge-model" and body["temperature"] == 0 and body["max_tokens"] <= 5
    assert body["stream"] is False
    assert SECRET_PROMPT in body["messages"][-1]["content"]  # the texts go to the judge, and only there
    assert judge_server.headers[0]["Authorization"] == "Bearer sk-judge-123"
    judge_server.reply = "no"
    assert judge.judge(REQUEST).agree is False


@pytest.mark.parametrize("reply, detail", [
    ("Yes, it answers the question.", "neither yes nor no"), ("500", "HTTP 500"),
    ("badjson", "not a chat completion"),
])  # fmt: skip
def test_llm_judge_failures_are_no_verdict_without_text(llm, judge_server, reply, detail):
    judge_server.reply = reply
    verdict = llm().judge(REQUEST)
    assert verdict.agree is None and detail in verdict.detail
    assert "zq-4417" not in verdict.detail and "Settings" not in verdict.detail
    assert judge_server.calls == 1  # no retry


def test_llm_judge_times_out(llm, judge_server):
    judge_server.reply = "slow"
    verdict = llm(judge_timeout_ms=300).judge(REQUEST)
    assert verdict.agree is None and verdict.detail.startswith("timeout")


def test_llm_judge_unreachable_is_no_verdict(make_settings, redis_client):
    s = make_settings(judge="llm", judge_url=f"http://127.0.0.1:{free_port()}/v1", judge_model="m")
    verdict = make_judge(s, client=redis_client).judge(REQUEST)
    assert verdict.agree is None and verdict.detail == "request failed (ConnectError)"


def test_llm_judge_budget_is_shared_and_stops_calls(judge_server, make_settings, redis_url, redis_client):
    judge_server.reply = "yes"
    if time.time() % 60 > 55:  # the three questions must fall into one minute's counter
        time.sleep(61 - time.time() % 60)
    s = make_settings(judge="llm", judge_url=judge_server.url, judge_model="m", judge_budget_per_minute=2)
    other = make_client(redis_url, timeout_ms=5000)  # two judges on two connections: two worker processes
    first, second = make_judge(s, client=redis_client), make_judge(s, client=other)
    assert first.judge(REQUEST).agree is True
    assert second.judge(REQUEST).agree is True
    spent = first.judge(REQUEST)
    assert spent.agree is None and spent.detail.startswith(NOT_ASKED) and "budget" in spent.detail
    assert judge_server.calls == 2
    keys = [k.decode() for k in redis_client.scan_iter(match=f"{first.settings.index}:judge:budget:*")]
    assert len(keys) == 1 and 0 < redis_client.ttl(keys[0]) <= 120


def test_llm_judge_with_an_unreadable_budget_counter_asks_nothing(judge_server, make_settings):
    s = make_settings(judge="llm", judge_url=judge_server.url, judge_model="m")
    dead = make_client(f"redis://127.0.0.1:{free_port()}/0", timeout_ms=200)
    verdict = make_judge(s, client=dead).judge(REQUEST)
    assert verdict.agree is None and verdict.detail.startswith(NOT_ASKED + "budget counter unreadable")
    assert judge_server.calls == 0


def test_llm_judge_cuts_long_texts(llm, judge_server):
    judge_server.reply = "no"
    long = JudgeRequest(prompt="q" * 50_000, response="r", neighbour_id="n", neighbour_prompt="p",
                        neighbour_response="a" * 50_000, similarity=0.6)
    llm().judge(long)
    content = judge_server.bodies[0]["messages"][-1]["content"]
    assert content.count("q") <= MAX_TEXT_CHARS + 20 and content.count("a") <= MAX_TEXT_CHARS + 20


def test_make_judge_settings(make_settings, redis_client, embedder):
    assert make_judge(make_settings()) is None
    with pytest.raises(ConfigError, match="needs an endpoint"):
        make_judge(make_settings(judge="llm", judge_model="m"), client=redis_client)
    with pytest.raises(ConfigError, match="SEMCACHE_JUDGE_MODEL"):
        make_judge(make_settings(judge="llm", upstream_url="http://127.0.0.1:1/v1"), client=redis_client)
    with pytest.raises(ConfigError, match="Redis client"):
        make_judge(make_settings(judge="llm", judge_model="m", upstream_url="http://127.0.0.1:1/v1"))
    judge = make_judge(make_settings(judge="llm", judge_model="m", upstream_url="http://127.0.0.1:1/v1/",
                                     upstream_api_key="up-key"), client=redis_client)
    assert isinstance(judge, LLMJudge)
    assert judge.url == "http://127.0.0.1:1/v1/chat/completions" and judge.api_key == "up-key"  # the upstream's
    with pytest.raises(ConfigError, match="needs a model"):
        make_judge(make_settings(judge="cross-encoder"))
    with pytest.raises(ConfigError, match="embedder"):
        make_judge(make_settings(judge="embedding"))
    assert isinstance(make_judge(make_settings(judge="embedding"), embedder=embedder), EmbeddingJudge)


def test_embedding_judge_compares_the_answers(embedder):
    judge = EmbeddingJudge(embedder, threshold=0.9)
    same = JudgeRequest("q1", "Paris is the capital of France.", "n", "q2", "Paris is the capital of France.", 0.6)
    other = JudgeRequest("q1", "Paris is the capital of France.", "n", "q2", "Boil the egg for six minutes.", 0.6)
    assert judge.judge(same).agree is True and judge.judge(same).detail == "answer similarity 1.000"
    assert judge.judge(other).agree is False


def tiny_cross_encoder(path, *, bias: float) -> str:
    """A real one-label CrossEncoder (one small BERT layer, MiniLM's tokenizer) saved to ``path``; the classifier's
    bias pushes every score towards 1 (bias > 0) or 0 (bias < 0)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from cache_core.embedder import packaged_model_path

    tokenizer = AutoTokenizer.from_pretrained(packaged_model_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=1)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        model.classifier.bias.fill_(bias)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_cross_encoder_judge_loads_by_path_and_thresholds_probabilities(tmp_path):
    yes = CrossEncoderJudge(tiny_cross_encoder(tmp_path / "yes", bias=6.0), threshold=0.5)
    verdict = yes.judge(REQUEST)
    assert verdict.agree is True and verdict.detail.startswith("score 0.99")  # a sigmoid probability
    no = CrossEncoderJudge(str(tmp_path / "yes"), threshold=0.999)
    assert no.judge(REQUEST).agree is False
    low = CrossEncoderJudge(tiny_cross_encoder(tmp_path / "no", bias=-6.0), threshold=0.5)
    assert low.judge(REQUEST).agree is False


def test_cross_encoder_judge_missing_model_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot load the cross-encoder"):
        CrossEncoderJudge(str(tmp_path / "nothing-here"), threshold=0.5)
