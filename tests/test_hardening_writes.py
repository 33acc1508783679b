"""Issue 15 hardening of the write path (items 1, 9 and parts of 14): each test injects the defect the issue names.

Poison metadata (nested past RedisJSON's 128 levels, integers beyond 64 bits, token counts that would corrupt the
savings metrics), Redis refusing a document, a key of another type, a status change that keeps conflicting, dead
letters that grow without a byte or age bound, and feedback marked rated before it was applied.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis
from pydantic import ValidationError

from cache_core import deadletters
from cache_core.deadletters import (
    DeadLetter,
    count_dead_letters,
    get_dead_letter,
    list_dead_letters,
    push_dead_letter,
    remove_dead_letter,
)
from cache_core.errors import BackendUnavailable, ConfigError, InvalidInput
from cache_core.feedback import log_lookup, record_feedback
from cache_core.policy import FEEDBACK_KEY
from cache_core.schema import Scope, Status, WriteCommand, entry_id
from cache_core.store import build_entry, get_document, set_status, write_command, write_entries
from cache_core.tasks import SET_STATUS, WRITE_ENTRY

from .fixtures_worker import make_command, run_task


def _nested(depth: int, kind: str = "dict"):
    """A value of ``depth`` levels of objects (or arrays) inside metadata, which is itself level 1."""
    value: object = 1
    for _ in range(depth - 1):
        value = {"a": value} if kind == "dict" else [value]
    return value


POISON = {
    "objects 130 deep": {"deep": _nested(130)},
    "arrays 130 deep": {"deep": _nested(130, "list")},
    "a 400-digit integer": {"n": 10**400},
    "an integer below -2**63": {"n": -(2**63) - 1},
    "negative prompt_tokens": {"prompt_tokens": -5000},
    "boolean completion_tokens": {"completion_tokens": True},
    "float prompt_tokens": {"prompt_tokens": 12.5},
    "absurd completion_tokens": {"completion_tokens": 10**15},
    "a lone surrogate key": {"\ud800": "x"},
}


# --- item 1: poison writes are refused at the door ---------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(POISON))
def test_poison_metadata_is_refused_by_the_one_write_command_model(case):
    with pytest.raises(ValidationError) as caught:
        WriteCommand(prompt="p", response="r", scope=Scope(tenant="t"), metadata=POISON[case])
    assert caught.value.errors()[0]["loc"] == ("metadata",)


def test_metadata_within_the_limits_is_kept_as_given():
    metadata = {"deep": _nested(32), "n": 2**63 - 1, "m": -(2**63), "prompt_tokens": 0, "completion_tokens": 4096,
                "tokens_estimated": True, "note": "ünïcode"}
    assert WriteCommand(prompt="p", response="r", scope=Scope(tenant="t"), metadata=metadata).metadata == metadata


@pytest.mark.parametrize("case", ["objects 130 deep", "arrays 130 deep", "a 400-digit integer",
                                  "negative prompt_tokens"])
def test_the_api_answers_400_naming_metadata_instead_of_202(client, api_headers, case):
    """Before: 202, then the worker retried Redis's refusal 8 times and dead-lettered the command."""
    body = {"prompt": "What is the boiling point of water?", "response": "100 C at sea level.",
            "metadata": POISON[case]}
    response = client.post("/api/v1/entries", headers=api_headers("acme"),
                           data=json.dumps(body), content_type="application/json")
    assert response.status_code == 400, response.get_data(as_text=True)[:300]
    assert response.get_json()["error"]["field"] == "metadata"


def _task_log(worker, task_id: str) -> list[str]:
    return [line for line in worker.log_text().splitlines() if task_id in line]


def test_a_poison_command_sent_to_the_worker_fails_once_and_is_no_dead_letter(
        worker_settings, celery_app, celery_worker, redis_client):
    tenant = f"p-{uuid.uuid4().hex[:8]}"
    before = count_dead_letters(redis_client, worker_settings)
    command = make_command(tenant, "How deep can this go?", "Deep.", metadata={"deep": _nested(130)})
    result = run_task(celery_app, WRITE_ENTRY, command=command)
    assert result.state == "FAILURE" and type(result.result).__name__ == "InvalidInput"
    assert "metadata" in str(result.result)
    assert not any("retry" in line for line in _task_log(celery_worker, result.id))
    assert count_dead_letters(redis_client, worker_settings) == before
    assert [d for d in list_dead_letters(redis_client, worker_settings, limit=1000) if d.task_id == result.id] == []


def test_in_a_batch_only_the_poison_command_is_refused(worker_settings, celery_app, redis_client):
    tenant = f"p-{uuid.uuid4().hex[:8]}"
    good = make_command(tenant, "What is the capital of Peru?", "Lima.", metadata={"prompt_tokens": 7})
    bad = make_command(tenant, "And of Chile?", "Santiago.", metadata={"n": 10**400})
    result = run_task(celery_app, "semcache.write_entries", commands=[good, bad])
    assert result.state == "SUCCESS", result.result
    assert [item["index"] for item in result.result["invalid"]] == [1]
    assert result.result["results"][0]["outcome"] == "written"
    assert get_document(redis_client, worker_settings, entry_id(good["prompt"], Scope(tenant=tenant)))


def test_a_document_redis_refuses_is_invalid_input_not_redis_unavailable(settings, redis_client, embedder):
    """Past the door (a caller building entries itself): Redis's refusal is not "Redis down"."""
    command = WriteCommand.model_construct(prompt="deep one", response="r", scope=Scope(tenant="t"), flags=[],
                                           metadata={"deep": _nested(130)}, ttl_seconds=None, group=None,
                                           source="test", lookup_id=None, embedding=None)
    entry = build_entry(command, settings=settings, embedding=[float(x) for x in embedder.embed(["deep one"])[0]])
    with pytest.raises(InvalidInput, match="refused"):
        write_entries(redis_client, settings, [entry])


# --- item 14: a key of another type is not "Redis down" ------------------------------------------------------------
def test_a_key_of_another_type_is_dead_lettered_at_once_not_retried(
        worker_settings, celery_app, celery_worker, redis_client):
    tenant = f"w-{uuid.uuid4().hex[:8]}"
    prompt = "What is the melting point of tin?"
    key = worker_settings.key_prefix + entry_id(prompt, Scope(tenant=tenant))
    redis_client.set(key, "a key some other program wrote")
    result = run_task(celery_app, WRITE_ENTRY, command=make_command(tenant, prompt, "About 232 C."))
    assert result.state == "FAILURE" and type(result.result).__name__ == "ConfigError"
    assert not any("retry" in line for line in _task_log(celery_worker, result.id))
    letters = [d for d in list_dead_letters(redis_client, worker_settings, limit=1000) if d.task_id == result.id]
    assert len(letters) == 1 and letters[0].retries == 0 and "not a cache entry" in letters[0].reason
    assert redis_client.get(key) == b"a key some other program wrote" and redis_client.ttl(key) == -1


def test_a_status_change_on_a_key_of_another_type_is_not_retried(worker_settings, celery_app, redis_client):
    entry = uuid.uuid4().hex
    redis_client.set(worker_settings.key_prefix + entry, "not an entry")
    with pytest.raises(ConfigError):
        set_status(redis_client, worker_settings, entry, Status.REJECTED, by="test")
    result = run_task(celery_app, SET_STATUS, entry_id=entry, status="rejected", by="test")
    assert result.state == "FAILURE" and type(result.result).__name__ == "ConfigError"
    letters = [d for d in list_dead_letters(redis_client, worker_settings, limit=1000) if d.task_id == result.id]
    assert len(letters) == 1 and letters[0].retries == 0


class _Conflicting(redis.Redis):
    """A real client whose every transaction meets a concurrent change: between WATCH and EXEC another connection
    writes the watched key (the fault a busy entry meets)."""

    touches = 0

    def pipeline(self, transaction=True, shard_hint=None):
        outer = self
        pipe = super().pipeline(transaction, shard_hint)
        original = pipe.multi

        def multi():
            outer.touches += 1
            other = redis.Redis(connection_pool=outer.connection_pool)
            for key in pipe.watched_keys:
                if other.type(key) == b"hash":
                    other.hset(key, "touched", str(time.time()))
                else:
                    other.execute_command("JSON.SET", key, "$.updated_at", str(time.time()))
            original()

        pipe.watched_keys = []
        watch = pipe.watch

        def watching(*names):
            pipe.watched_keys.extend(names)
            return watch(*names)

        pipe.watch, pipe.multi = watching, multi
        return pipe


def test_a_status_change_that_keeps_conflicting_gives_up_after_a_bounded_number_of_tries(
        settings, redis_url, redis_client, embedder):
    """Before: set_status called itself on every conflict, with no bound, until a RecursionError."""
    command = WriteCommand(prompt="Busy entry?", response="Yes.", scope=Scope(tenant="t"), source="test")
    entry, _ = write_command(redis_client, settings, embedder, command)
    client = _Conflicting.from_url(redis_url)
    try:
        with pytest.raises(BackendUnavailable, match="kept conflicting"):
            set_status(client, settings, entry, Status.REJECTED, by="test")
        assert client.touches == 10
    finally:
        client.close()


# --- item 1: dead letters bounded in bytes and age -----------------------------------------------------------------
def _sizes(client, settings) -> int:
    data = settings.key("deadletters")
    return sum(client.hstrlen(data, field) for field in client.hkeys(data))


def test_dead_letters_are_bounded_in_bytes_and_the_total_matches_what_is_stored(make_settings, redis_client):
    """Before: only the count was bounded (10,000 letters of any size, kept forever)."""
    settings = make_settings(deadletter_max_bytes=64 * 1024)
    now = time.time() - 100
    for i in range(60):
        push_dead_letter(redis_client, settings, DeadLetter(task="semcache.write_entry", at=now + i,
                                                            kwargs={"command": {"prompt": "x" * 3000, "n": i}}))
    stored = _sizes(redis_client, settings)
    assert stored <= 64 * 1024 and deadletters.dead_letter_bytes(redis_client, settings) == stored
    letters = list_dead_letters(redis_client, settings, limit=100)
    assert 10 < len(letters) < 60 and letters[0].kwargs["command"]["n"] == 59  # the oldest went first
    assert remove_dead_letter(redis_client, settings, letters[0].id)
    assert deadletters.dead_letter_bytes(redis_client, settings) == _sizes(redis_client, settings)


def test_one_huge_dead_letter_keeps_its_reason_but_not_its_arguments(make_settings, redis_client):
    settings = make_settings(deadletter_max_bytes=64 * 1024)
    small = push_dead_letter(redis_client, settings, DeadLetter(task="semcache.purge", kwargs={"ids": []}))
    huge = push_dead_letter(redis_client, settings, DeadLetter(
        task="semcache.write_entries", reason="failed: boom", kwargs={"commands": [{"prompt": "y" * 5000}] * 40}))
    letter = get_dead_letter(redis_client, settings, huge)
    assert letter.kwargs == {} and letter.kwargs_dropped_bytes > 200_000 and letter.reason == "failed: boom"
    assert get_dead_letter(redis_client, settings, small) is not None  # it did not push the others out


def test_dead_letters_older_than_their_ttl_are_gone_on_the_next_read(make_settings, redis_client):
    settings = make_settings(deadletter_ttl_s=3600)
    old = push_dead_letter(redis_client, settings, DeadLetter(task="semcache.purge", at=time.time() - 3700))
    new = push_dead_letter(redis_client, settings, DeadLetter(task="semcache.purge", at=time.time() - 60))
    assert [d.id for d in list_dead_letters(redis_client, settings)] == [new]
    assert get_dead_letter(redis_client, settings, old) is None and count_dead_letters(redis_client, settings) == 1
    for key in ("deadletters", "deadletters:order", "deadletters:bytes"):
        assert redis_client.ttl(settings.key(key)) == -1  # no Redis TTL: a volatile-* eviction never takes them


# --- item 9: feedback that failed transiently is applied by its retry ------------------------------------------------
def test_feedback_whose_first_attempt_failed_is_applied_by_the_retry_and_counted_once(
        settings, redis_url, redis_client, embedder):
    """Before: the lookup was marked rated before the entry was updated, so the retry of a failed attempt was
    answered "duplicate" and the report was lost."""
    tenant = f"f-{uuid.uuid4().hex[:8]}"
    command = WriteCommand(prompt="Is this answer right?", response="Maybe.", scope=Scope(tenant=tenant),
                           source="test")
    entry, _ = write_command(redis_client, settings, embedder, command)
    lookup_id = uuid.uuid4().hex
    pipe = redis_client.pipeline(transaction=False)
    log_lookup(pipe, settings, lookup_id, entry, 0.93, "semantic", Scope(tenant=tenant))
    pipe.execute()
    client = _Conflicting.from_url(redis_url)
    try:
        with pytest.raises(BackendUnavailable):  # every attempt meets a concurrent change of the entry
            record_feedback(client, settings, lookup_id, False, tenant=tenant)
    finally:
        client.close()
    retried = record_feedback(redis_client, settings, lookup_id, False, tenant=tenant)
    assert not retried.duplicate and retried.state.wrong == 1
    again = record_feedback(redis_client, settings, lookup_id, False, tenant=tenant)
    assert again.duplicate and again.state.wrong == 1
    doc = get_document(redis_client, settings, entry)
    assert doc["metadata"][FEEDBACK_KEY]["wrong"] == 1
