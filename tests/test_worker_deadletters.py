"""Dead letters: a task that exhausts its retries lands in the list with its reason, and
``semcache worker replay-dead`` sends it again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest
from click.testing import CliRunner

from cache_core.deadletters import (
    DeadLetter,
    count_dead_letters,
    get_dead_letter,
    list_dead_letters,
    push_dead_letter,
    remove_dead_letter,
    replay_dead_letters,
)
from cache_core.schema import Scope, entry_id
from cache_core.store import get_document
from cache_core.tasks import WRITE_ENTRY
from semcache.cli import cli
from tests.fixtures_worker import ROOT, make_command, run_task, settings_env


def test_a_task_that_fails_for_good_lands_in_the_dead_letters_and_replay_dead_writes_it(
        worker_settings, celery_app, celery_worker, redis_client):
    tenant = f"d-{uuid.uuid4().hex[:8]}"
    prompt = "What is the melting point of iron?"
    key = worker_settings.key_prefix + entry_id(prompt, Scope(tenant=tenant))
    redis_client.set(key, "a key some other program wrote")  # every write of this entry now fails (not retried)
    command = make_command(tenant, prompt, "About 1538 C.", embedding=[0.05] * 384)
    failed = run_task(celery_app, WRITE_ENTRY, command=command)
    assert failed.state == "FAILURE" and type(failed.result).__name__ == "ConfigError"
    assert redis_client.get(key) == b"a key some other program wrote"  # never overwritten, no TTL set on it
    assert redis_client.ttl(key) == -1

    letters = [d for d in list_dead_letters(redis_client, worker_settings, limit=1000) if d.task_id == failed.id]
    assert len(letters) == 1
    letter = letters[0]
    assert letter.task == WRITE_ENTRY and letter.tenant == tenant
    assert letter.retries == 0  # a key of another type is not "Redis down": retrying cannot help (issue 15)
    assert letter.reason.startswith("failed: ") and "not a cache entry" in letter.reason
    assert letter.kwargs["command"]["prompt"] == prompt and "embedding" not in letter.kwargs["command"]
    log = celery_worker.log_text()
    assert letter.id in log and prompt not in log

    env = {k: v for k, v in os.environ.items() if not k.startswith("SEMCACHE_")}
    env.update(settings_env(worker_settings))
    listed = CliRunner().invoke(cli, ["worker", "dead-letters", "--json", "--limit", "1000"], env=settings_env(
        worker_settings))
    assert listed.exit_code == 0, listed.output
    assert letter.id in {json.loads(line)["id"] for line in listed.stdout.splitlines()}

    redis_client.delete(key)  # the operator fixes the cause, then replays
    out = subprocess.run([sys.executable, "-m", "semcache", "worker", "replay-dead", "--id", letter.id], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    replayed = json.loads(out.stdout.strip().splitlines()[-1])
    assert replayed["id"] == letter.id and "replayed 1 dead letter" in out.stderr
    result = celery_app.AsyncResult(replayed["task_id"]).get(timeout=90)
    assert result["outcome"] == "written"
    doc = get_document(redis_client, worker_settings, result["id"])
    assert doc["response"] == "About 1538 C." and doc["status"] == "approved"
    assert get_dead_letter(redis_client, worker_settings, letter.id) is None


def test_invalid_commands_are_not_dead_letters(worker_settings, celery_app, redis_client):
    before = count_dead_letters(redis_client, worker_settings)
    result = run_task(celery_app, WRITE_ENTRY, command={"prompt": ["not", "text"]})
    assert result.state == "FAILURE"
    assert count_dead_letters(redis_client, worker_settings) == before


def test_dead_letter_storage_is_bounded_newest_first_and_removal_happens_once(make_settings, redis_client):
    settings = make_settings(deadletter_maxlen=10)
    base = time.time() - 1000  # within SEMCACHE_DEADLETTER_TTL_S: only the count bound drops letters here
    ids = [push_dead_letter(redis_client, settings, DeadLetter(task="semcache.purge", kwargs={"n": i},
                                                               reason=f"r{i}", at=base + i, tenant=f"t{i % 2}"))
           for i in range(13)]  # fmt: skip
    assert count_dead_letters(redis_client, settings) == 10
    listed = list_dead_letters(redis_client, settings, limit=100)
    assert [d.kwargs["n"] for d in listed] == list(range(12, 2, -1))  # newest first, the 3 oldest dropped
    assert [d.kwargs["n"] for d in list_dead_letters(redis_client, settings, offset=2, limit=3)] == [10, 9, 8]
    assert {d.tenant for d in list_dead_letters(redis_client, settings, tenant="t1")} == {"t1"}
    assert get_dead_letter(redis_client, settings, ids[0]) is None
    assert remove_dead_letter(redis_client, settings, ids[5]) is True
    assert remove_dead_letter(redis_client, settings, ids[5]) is False
    assert count_dead_letters(redis_client, settings) == 9


def test_replay_removes_what_was_sent_and_puts_back_what_could_not_be(make_settings, redis_client):
    settings = make_settings()
    base = time.time() - 1000
    first = push_dead_letter(redis_client, settings, DeadLetter(task="semcache.write_entry", at=base + 1,
                                                                kwargs={"command": {"prompt": "p", "embedding": [1]}}))
    second = push_dead_letter(redis_client, settings, DeadLetter(task="semcache.purge", at=base + 2, kwargs={"ids": []}))
    sent = []

    def send(name, kwargs):
        if name == "semcache.purge":
            raise ConnectionError("broker down")
        sent.append((name, kwargs))
        return "task-1"

    with pytest.raises(ConnectionError):
        replay_dead_letters(redis_client, settings, send)
    assert sent == [("semcache.write_entry", {"command": {"prompt": "p"}})]  # oldest first, embedding not kept
    assert get_dead_letter(redis_client, settings, first) is None
    assert get_dead_letter(redis_client, settings, second) is not None  # its send failed: still there
    assert replay_dead_letters(redis_client, settings, lambda n, k: "task-2", ids=[second]) == [
        {"id": second, "task": "semcache.purge", "task_id": "task-2"}]
    assert count_dead_letters(redis_client, settings) == 0
