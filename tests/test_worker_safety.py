"""The safety pipeline: each check as a unit (plain functions), then each one through the real worker, where a
dropped command leaves no entry, a held one is stored as ``pending_review`` with its flags and spans and never hits,
and a moderator's approval makes it servable."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from cache_core.cache import SemanticCache
from cache_core.errors import ConfigError
from cache_core.schema import Scope, WriteCommand
from cache_core.settings import Settings
from cache_core.store import get_document
from cache_core.tasks import SET_STATUS, WRITE_ENTRY
from tests.fixtures_worker import BLOCKED_WORD, POLICY_TENANT, entry_keys, make_command, run_task
from worker.safety import SafetyPipeline, SafetyPolicy, find_pii, iban_ok, luhn_ok


def tenant() -> str:
    return f"s-{uuid.uuid4().hex[:10]}"


def evaluate(prompt: str, response: str = "Fine.", settings: Settings | None = None, tenant_: str = "acme", **kw):
    pipeline = SafetyPipeline.from_settings(settings or Settings())
    return pipeline.evaluate(WriteCommand(prompt=prompt, response=response, scope=Scope(tenant=tenant_), **kw))


# --- units -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "kind"), [
    ("write to jane.doe+news@example.co.uk today", "email"),
    ("call +1 (555) 123-4567", "phone"),
    ("call 020 7946 0958", "phone"),
    ("my card is 4111-1111-1111-1111", "card"),
    ("amex 3782 822463 10005", "card"),
    ("IBAN GB82 WEST 1234 5698 7654 32", "iban"),
    ("SSN 123-45-6789", "national_id"),
    ("NINO AB 12 34 56 C", "national_id"),
])  # fmt: skip
def test_pii_kinds_are_found_with_their_spans(text, kind):
    found = find_pii(text)
    assert kind in found
    start, end = found[kind][0]
    assert text[start:end].strip() and start < end


@pytest.mark.parametrize("text", [
    "card 4111 1111 1111 1112",  # fails the Luhn check
    "server 192.168.100.200, version 10.0.19041.1",
    "on 2024-01-15 at 12:30, 1 000 000 people",
    "ISBN 978-3-16-148410-0 and order 12345678",
    "pi is 3.14159265358979",
])  # fmt: skip
def test_numbers_that_are_not_pii_are_left_alone(text):
    assert find_pii(text) == {}


def test_checksums():
    assert "iban" not in find_pii("IBAN GB82 WEST 1234 5698 7654 33")  # fails mod 97
    assert luhn_ok("79927398713") and not luhn_ok("79927398710")
    assert iban_ok("DE89 3704 0044 0532 0130 00") and not iban_ok("DE89 3704 0044 0532 0130 01")


@pytest.mark.parametrize(("response", "extra", "flag"), [
    ("", {}, "nonanswer:empty"),
    (" \n\t ", {}, "nonanswer:empty"),
    ('{"error": {"message": "The server is overloaded", "type": "server_error"}}', {}, "nonanswer:error"),
    ("Error: 429 Too Many Requests", {}, "nonanswer:error"),
    ("Traceback (most recent call last):\n  File ...", {}, "nonanswer:error"),
    ("503 Service Unavailable", {}, "nonanswer:error"),
    ("Paris is the capital", {"finish_reason": "length"}, "nonanswer:truncated"),
    ("Paris is", {"finish_reason": "content_filter"}, "nonanswer:content_filter"),
    ("I'm sorry, but I can't help with that.", {}, "nonanswer:refusal"),
    ("I\u2019m afraid I cannot assist with that request.", {}, "nonanswer:refusal"),
    ("As an AI language model, I cannot browse the internet.", {}, "nonanswer:refusal"),
    ("I'm sorry, but as an AI I cannot help with that.", {}, "nonanswer:refusal"),
])  # fmt: skip
def test_non_answers_are_dropped(response, extra, flag):
    verdict = evaluate("What is the capital of France?", response, **extra)
    assert verdict.decision.value == "drop" and flag in verdict.flags


@pytest.mark.parametrize("response", [
    "Error handling in Python uses try and except.",
    "I'm sorry to hear that you can't sleep. Try a regular bedtime.",
    "I can't stress enough how good this is: Paris.",
    '{"answer": 42}',
])  # fmt: skip
def test_answers_that_merely_look_like_non_answers_are_approved(response):
    assert evaluate("A question?", response).decision.value == "approve"


def test_personal_and_time_sensitive_prompts_follow_the_settings():
    assert evaluate("Where is my order #1234?").decision.value == "drop"
    assert evaluate("How do I track my order?").decision.value == "approve"  # instructions are the same for all
    verdict = evaluate("What's the weather like today in Paris?")
    assert verdict.decision.value == "approve" and verdict.ttl_cap == 3600
    assert verdict.flags == ["prompt:time_sensitive"]
    relaxed = Settings(safety_personal="short_ttl", safety_time_sensitive="drop", safety_short_ttl_seconds=60)
    assert evaluate("Where is my order?", settings=relaxed).ttl_cap == 60
    assert evaluate("What is the current bitcoin price?", settings=relaxed).decision.value == "drop"
    off = Settings(safety_personal="off", safety_time_sensitive="off", safety_pii="off", safety_refusals="off")
    assert evaluate("What is my balance today? mail a@b.co", "I'm sorry, I can't.", settings=off).flags == []


def test_caller_flags_hold_or_drop_and_other_flags_are_only_stored():
    assert evaluate("Q?", flags=["moderation:flagged"]).decision.value == "hold"
    assert evaluate("Q?", flags=["no_cache"]).decision.value == "drop"
    assert evaluate("Q?", flags=["from:batch"]).decision.value == "approve"
    custom = Settings(safety_caller_flags_drop="nsfw", safety_caller_flags_hold="")
    assert evaluate("Q?", flags=["nsfw"], settings=custom).decision.value == "drop"
    assert evaluate("Q?", flags=["moderation:flagged"], settings=custom).decision.value == "approve"


def test_the_strictest_decision_wins_and_every_reason_is_kept():
    verdict = evaluate("Email me at a@b.co about today's news", "I'm sorry, but I cannot do that.")
    assert verdict.decision.value == "drop"
    assert set(verdict.flags) == {"pii:email", "prompt:time_sensitive", "nonanswer:refusal"}
    assert {r.check for r in verdict.reasons} == {"pii", "prompt", "refusal"}
    assert all("a@b.co" not in r.detail for r in verdict.reasons)


def test_tenant_policies_layer_over_the_defaults(tmp_path):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"default": {"block_words": ["darkweb"]},
                                "tenants": {"kids": {"block_patterns": [r"(?i)\bgambl\w*"], "pii": "drop"}}}))
    settings = Settings(safety_policy_file=path)
    assert evaluate("visit the DarkWeb", settings=settings, tenant_="any").flags == ["policy:blocked"]
    kids = evaluate("Is gambling fun?", "Gambling is risky.", settings=settings, tenant_="kids")
    assert kids.decision.value == "drop" and [r.field for r in kids.reasons] == ["prompt", "response"]
    assert evaluate("Is gambling fun?", settings=settings, tenant_="adults").decision.value == "approve"
    assert evaluate("mail a@b.co", settings=settings, tenant_="kids").decision.value == "drop"  # pii: drop
    assert evaluate("mail a@b.co", settings=settings, tenant_="adults").decision.value == "hold"


@pytest.mark.parametrize("content", ["{not json", '{"tenants": {"a": {"block_patterns": ["(unclosed"]}}}',
                                     '{"tenants": {"a": {"colour": "red"}}}'])
def test_a_broken_policy_file_is_a_clear_configuration_error(tmp_path, content):
    path = tmp_path / "policy.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match="policy"):
        SafetyPolicy.load(Settings(safety_policy_file=path))


# --- through the worker ------------------------------------------------------------------------------------------
CASES = [
    # (prompt, response, command fields, decision, flags)
    ("Who wrote Hamlet?", "   ", {}, "drop", ["nonanswer:empty"]),
    ("Who wrote Hamlet?", '{"error": {"code": 500, "message": "upstream failed"}}', {}, "drop", ["nonanswer:error"]),
    ("Who wrote Hamlet?", "I'm sorry, but I can't help with that request.", {}, "drop", ["nonanswer:refusal"]),
    ("Who wrote Hamlet?", "William Shakespe", {"finish_reason": "length"}, "drop", ["nonanswer:truncated"]),
    ("Who wrote Hamlet?", "Shakespeare.", {"flags": ["moderation:blocked"]}, "drop", ["moderation:blocked"]),
    ("Where is my parcel?", "Out for delivery.", {}, "drop", ["prompt:personal"]),
    (f"Tell me about {BLOCKED_WORD}", "It is a thing.", {}, "drop", ["policy:blocked"]),
    ("Who wrote Hamlet?", "Ask shakespeare.fan@example.com", {}, "hold", ["pii:email"]),
    ("Is 4111 1111 1111 1111 a valid test card?", "Yes, for testing.", {}, "hold", ["pii:card"]),
    ("Who wrote Hamlet?", "Call +44 20 7946 0958", {}, "hold", ["pii:phone"]),
    ("Who wrote Hamlet?", "Shakespeare.", {"flags": ["moderation:flagged"]}, "hold", ["moderation:flagged"]),
]


@pytest.mark.parametrize(("prompt", "response", "fields", "decision", "flags"), CASES,
                         ids=[f"{c[3]}-{c[4][0]}" for c in CASES])
def test_each_check_drops_or_holds_with_the_right_flags(worker_settings, celery_app, redis_client, prompt, response,
                                                        fields, decision, flags):
    t = tenant()
    result = run_task(celery_app, WRITE_ENTRY, command=make_command(t, prompt, response, **fields))
    assert result.state == "SUCCESS", result.result
    assert result.result["decision"] == decision and result.result["flags"] == flags
    keys = entry_keys(redis_client, worker_settings, t)
    if decision == "drop":
        assert keys == [] and result.result["outcome"] == "dropped"
        return
    doc = get_document(redis_client, worker_settings, result.result["id"])
    assert doc["status"] == "pending_review" and set(flags) <= set(doc["flags"])
    reason = next(r for r in doc["reasons"] if r["flag"] == flags[0])
    if flags[0].startswith("pii:"):
        start, end = reason["spans"][0]
        text = doc[reason["field"]]
        assert text[start:end].strip() and text[start:end] not in reason["detail"]


def test_held_entries_never_hit_until_a_moderator_approves_them(worker_settings, celery_app, redis_client, embedder):
    t = tenant()
    prompt = "How do I contact the support team?"
    held = run_task(celery_app, WRITE_ENTRY, command=make_command(t, prompt, "Write to help@example.org")).result
    assert held["status"] == "pending_review"
    cache = SemanticCache(worker_settings, redis_client, embedder)
    assert not cache.lookup(prompt, {"tenant": t}).hit  # exact
    assert not cache.lookup("How can I contact the support team?", {"tenant": t}).hit  # semantic
    approved = run_task(celery_app, SET_STATUS, entry_id=held["id"], status="approved", by="moderator")
    assert approved.result["changed"]
    hit = cache.lookup(prompt, {"tenant": t})
    assert hit.hit and hit.entry.status.value == "approved" and hit.entry.flags == ["pii:email"]
    assert cache.lookup("How can I contact the support team?", {"tenant": t}).hit


def test_edit_and_approve_replaces_the_response(worker_settings, celery_app, redis_client, embedder):
    t = tenant()
    held = run_task(celery_app, WRITE_ENTRY,
                    command=make_command(t, "Who handles refunds?", "Mail refunds.lead@example.org")).result
    run_task(celery_app, SET_STATUS, entry_id=held["id"], status="approved", by="mod",
             response="Use the refund form on our website.")
    hit = SemanticCache(worker_settings, redis_client, embedder).lookup("Who handles refunds?", {"tenant": t})
    assert hit.hit and hit.response == "Use the refund form on our website."


def test_a_time_sensitive_prompt_gets_a_short_ttl(worker_settings, celery_app, redis_client):
    t = tenant()
    result = run_task(celery_app, WRITE_ENTRY,
                      command=make_command(t, "What is the weather forecast for Paris?", "Sunny.")).result
    assert result["decision"] == "approve" and result["flags"] == ["prompt:time_sensitive"]
    assert result["ttl_seconds"] == worker_settings.safety_short_ttl_seconds
    ttl = redis_client.ttl(worker_settings.key_prefix + result["id"])
    assert 0 < ttl <= worker_settings.safety_short_ttl_seconds + 1
    doc = get_document(redis_client, worker_settings, result["id"])
    assert doc["expires_at"] <= time.time() + worker_settings.safety_short_ttl_seconds + 1


def test_a_tenants_own_policy_applies_to_that_tenant_only(worker_settings, celery_app, redis_client):
    # the session worker's policy file (tests/fixtures_worker.py:POLICY) has rules for POLICY_TENANT
    blocked = run_task(celery_app, WRITE_ENTRY, command=make_command(
        POLICY_TENANT, f"Any casino bonus codes {uuid.uuid4().hex[:6]}?", "Here is one.")).result
    assert blocked["decision"] == "drop" and blocked["flags"] == ["policy:blocked"]
    held = run_task(celery_app, WRITE_ENTRY, command=make_command(
        POLICY_TENANT, f"How long does a wire transfer take {uuid.uuid4().hex[:6]}?", "1-3 days.")).result
    assert held["decision"] == "hold" and held["flags"] == ["policy:held"]
    personal = run_task(celery_app, WRITE_ENTRY, command=make_command(
        POLICY_TENANT, f"Where is my order {uuid.uuid4().hex[:6]}?", "Shipped.")).result
    assert personal["decision"] == "approve" and personal["ttl_seconds"] == 3600  # this tenant: short TTL, not drop
    plain = run_task(celery_app, WRITE_ENTRY, command=make_command(
        POLICY_TENANT, f"What is a haiku {uuid.uuid4().hex[:6]}?", "A short poem.")).result
    assert plain["ttl_seconds"] == 7200  # the tenant's default TTL
    other = tenant()
    for prompt in ("Any casino bonus codes?", "How long does a wire transfer take?"):
        assert run_task(celery_app, WRITE_ENTRY, command=make_command(other, prompt, "x y z")).result["decision"] == \
            "approve"
    assert len(entry_keys(redis_client, worker_settings, other)) == 2


@pytest.mark.parametrize("module", ["worker.safety", "worker.app", "worker.tasks"])
def test_the_docstring_examples_hold(module):
    import doctest
    import importlib

    failures, tried = doctest.testmod(importlib.import_module(module))
    assert tried and not failures
