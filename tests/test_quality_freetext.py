"""``semcache eval --answers response --judge ...``: the free-text stream protocol through the real stack (embedded
Redis, the real index, read path and the write path's own grouping step), checked against an independent
brute-force implementation; the simulated judge; the CLI contract of the new flags."""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest
from click.testing import CliRunner

from cache_core.errors import InvalidInput
from cache_core.evaluation import SimulatedJudge, embed_rows, evaluate, parse_judge_spec, read_dataset
from cache_core.judge import JudgeRequest
from cache_core.policy import make_policy
from cache_core.query import Candidate
from semcache.cli import cli
from tests.test_quality_helpers import INTENTS, OOS, write_stream_csv

KNOBS = (0.6, 0.75, 0.9)


def write_freetext_csv(path):
    """The helpers' intents, each row with its own free-text answer (no two the same text, as from an LLM)."""
    rows = []
    for intent, texts in INTENTS.items():
        for i, text in enumerate(texts):
            rows.append((text, intent, f"Answer {i} about {intent}: here is what you asked, in other words #{i}."))
    rows += [(t, "oos", f"Something else entirely, number {i}.") for i, t in enumerate(OOS)]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "intent", "response", "split"])
        writer.writerows([(t, intent, r, "all") for t, intent, r in rows])
    return path


def brute_force(rows, vectors, policy, knob, k, *, judge_min, judge_max, judge=True, seed=42, oos="oos"):
    """(hits, wrong, judge questions) of the free-text stream with a perfect judge, written from the protocol's
    description: a miss asks about the nearest member of each distinct group in the gray zone, nearest first,
    and joins the first group of its own intent."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    stored: list[dict] = []
    hits = wrong = asked = 0
    for i in order:
        text, intent, _ = rows[i]
        cands = []
        if stored:
            sims = np.stack([e["vector"] for e in stored]) @ vectors[text]
            top = np.argsort(-sims, kind="stable")[:max(k, judge_max)]
            cands = [(stored[j], float(sims[j])) for j in top]
        chosen = policy.choose([Candidate(key=e["key"], fields={"id": e["key"], "group": e["group"]}, similarity=s)
                                for e, s in cands[:k]], knob, {})
        if chosen is not None:
            hits += 1
            served = next(e for e in stored if e["key"] == chosen.key)
            wrong += intent == oos or served["intent"] != intent
            continue
        group, seen = (f"j:own-{i}" if judge else f"own-{i}"), set()  # judged groups: the j: prefix
        for entry, sim in cands if judge else []:
            if sim < judge_min or len(seen) >= judge_max:
                break
            if entry["group"] in seen:
                continue
            seen.add(entry["group"])
            asked += 1
            if entry["intent"] == intent:
                group = entry["group"]
                break
        stored.append({"key": f"e{i}", "vector": vectors[text], "intent": intent, "group": group})
    return hits, wrong, asked


@pytest.fixture
def freetext_csv(tmp_path):
    return write_freetext_csv(tmp_path / "freetext.csv")


def _rows(path):
    with path.open(newline="", encoding="utf-8") as fh:
        return [(r["text"], r["intent"], r["response"]) for r in csv.DictReader(fh)]


def test_free_text_stream_with_a_perfect_judge_matches_a_brute_force_implementation(settings, redis_url, embedder,
                                                                                   freetext_csv):
    settings = settings.model_copy(update={"judge_min_similarity": 0.3, "consensus_min_agree": 1})
    report = evaluate(settings, freetext_csv, knobs=KNOBS, baseline_knobs=KNOBS, embedder=embedder,
                      redis_url=redis_url, progress=False, cache_vectors=False, judge="simulated:0,0")
    assert report.answers == "response" and report.judge == "simulated:0,0" and report.simulated_judge
    rows = _rows(freetext_csv)
    vectors = embed_rows(embedder, [t for t, _, _ in rows], progress=False)
    policy = make_policy("consensus", settings)
    widened = 0
    for point in report.curve:
        hits, wrong, asked = brute_force(rows, vectors, policy, point.knob, settings.knn_k, judge_min=0.3,
                                         judge_max=settings.judge_max_groups)
        assert (point.hits, point.wrong) == (hits, wrong), point
        assert point.judge_calls_per_query == pytest.approx(asked / len(rows))
        no_groups = brute_force(rows, vectors, policy, point.knob, settings.knn_k, judge_min=0.3, judge_max=2,
                                judge=False)
        widened += point.hits > no_groups[0]
    assert widened, "judged groups never widened the radius: the judge step formed no group"
    assert all(p.judge_calls_per_query is None for p in report.baseline_curve)  # the baseline asks no judge
    assert report.judge_calls_per_query is not None and report.judge_calls_per_query > 0


def test_free_text_answers_without_a_judge_are_exactly_the_threshold_rule(settings, redis_url, embedder,
                                                                         freetext_csv):
    report = evaluate(settings, freetext_csv, knobs=KNOBS, baseline_knobs=KNOBS, embedder=embedder,
                      redis_url=redis_url, progress=False, cache_vectors=False)  # default: response, judge off
    assert report.answers == "response" and report.judge == "off" and not report.simulated_judge
    assert report.judge_calls_per_query is None
    for ours, base in zip(report.curve, report.baseline_curve):
        assert (ours.knob, ours.hits, ours.wrong) == (base.knob, base.hits, base.wrong)
    # the label protocol on the same rows groups answers by intent: consensus can widen there, and does
    labels = evaluate(settings, freetext_csv, knobs=KNOBS, baseline_knobs=None, embedder=embedder,
                      redis_url=redis_url, progress=False, cache_vectors=False, answers="label")
    assert labels.answers == "label"
    assert sum(p.hits for p in labels.curve) >= sum(p.hits for p in report.curve)


def test_the_simulated_judge_errs_at_the_given_rates():
    intent_of = {f"e{i}": ("a" if i % 2 else "b") for i in range(4000)}
    judge = SimulatedJudge(0.1, 0.3, intent_of, seed="t")
    judge.current = "a"
    same = [judge.judge(JudgeRequest("q", "r", f"e{i}", "p", "x", 0.7)).agree for i in range(1, 4000, 2)]
    other = [judge.judge(JudgeRequest("q", "r", f"e{i}", "p", "x", 0.7)).agree for i in range(0, 4000, 2)]
    assert abs(same.count(False) / len(same) - 0.3) < 0.04  # wrongly rejects 30% of same-intent pairs
    assert abs(other.count(True) / len(other) - 0.1) < 0.03  # wrongly accepts 10% of different-intent pairs
    again = SimulatedJudge(0.1, 0.3, intent_of, seed="t")
    again.current = "a"
    assert [again.judge(JudgeRequest("q", "r", f"e{i}", "p", "x", 0.7)).agree for i in range(1, 4000, 2)] == same


@pytest.mark.parametrize("spec,message", [("simulated:0.1", "two rates"), ("simulated:2,0", "between 0 and 1"),
                                          ("oracle", "unknown judge"), ("simulated:a,b", "two rates")])
def test_bad_judge_specs_are_clear_errors(spec, message):
    with pytest.raises(InvalidInput, match=message):
        parse_judge_spec(spec)


def test_response_answers_need_a_response_column(settings, tmp_path, embedder):
    labels_only = write_stream_csv(tmp_path / "labels.csv")
    assert not read_dataset(labels_only).has_responses
    with pytest.raises(InvalidInput, match="needs a response column"):
        evaluate(settings, labels_only, answers="response", embedder=embedder, progress=False)
    empty = tmp_path / "empty.csv"
    empty.write_text("text,intent,response\nhello,greet,\n")
    with pytest.raises(InvalidInput, match=":2: empty response"):
        read_dataset(empty)


def test_eval_cli_reports_the_protocol_and_the_judge(redis_url, freetext_csv, tmp_path):
    env = {"SEMCACHE_REDIS_URL": redis_url, "SEMCACHE_DATA_DIR": str(tmp_path / "data")}
    result = CliRunner().invoke(cli, ["eval", "--data", str(freetext_csv), "--answers", "response",
                                      "--judge", "simulated:0.05,0.05", "--knobs", "0.8", "--baseline-knobs", "0.8",
                                      "--redis-url", redis_url, "--json", "-q"], env=env)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["answers"] == "response" and payload["judge"] == "simulated:0.05,0.05"
    assert payload["simulated_judge"] is True and payload["judge_calls_per_query"] is not None
    for key in ("curve", "baseline_curve", "summary", "params", "protocol", "rows"):  # the existing keys stay
        assert key in payload
    table = CliRunner().invoke(cli, ["eval", "--data", str(freetext_csv), "--judge", "simulated:0.05,0.05",
                                     "--knobs", "0.8", "--baseline-knobs", "0.8", "--redis-url", redis_url, "-q"], env=env)
    assert table.exit_code == 0, table.output
    assert "SIMULATED" in table.output and "questions per query" in table.output
    bad = CliRunner().invoke(cli, ["eval", "--data", str(freetext_csv), "--judge", "simulated:7", "-q"], env=env)
    assert bad.exit_code != 0 and "two rates" in bad.output
