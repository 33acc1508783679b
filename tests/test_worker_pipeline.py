"""The write pipeline end to end through a real ``semcache worker`` process: read-through, validation, idempotency."""

from __future__ import annotations

import json
import logging
import uuid

import pytest

from cache_core.celeryconf import task_queue
from cache_core.cache import SemanticCache
from cache_core.embedded import free_port
from cache_core.schema import WriteCommand, quantize_embedding
from cache_core.stats import read_stats
from cache_core.store import get_document
from cache_core.tasks import SET_STATUS, WRITE_ENTRY
from tests.fixtures_worker import audit_writes, entry_keys, make_command, run_task
from worker.app import create_celery
from worker.queue import CeleryWriteQueue
from worker.tasks import WRITE_ENTRIES


def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def test_read_through_miss_ends_as_an_approved_entry_that_a_paraphrase_hits(worker_settings, celery_app,
                                                                             redis_client, embedder):
    queue = CeleryWriteQueue(celery_app, worker_settings)
    cache = SemanticCache(worker_settings, redis_client, embedder, write_queue=queue)
    scope = {"tenant": tenant()}
    calls = []

    def llm() -> str:
        calls.append(1)
        return "Paris is the capital of France."

    first = cache.get_or_generate("What is the capital of France?", scope, llm)
    assert not first.cached and first.task_id and calls == [1]
    assert queue.flush(10) and queue.failures == 0
    result = celery_app.AsyncResult(first.task_id).get(timeout=90)
    assert result["decision"] == "approve" and result["outcome"] == "written"

    second = cache.get_or_generate("What's the capital city of France?", scope, llm)
    assert second.cached, second.lookup
    assert second.lookup.strategy == "semantic"
    assert second.response == "Paris is the capital of France."
    assert calls == [1]  # the second lookup did not call the LLM
    doc = get_document(redis_client, worker_settings, result["id"])
    assert doc["status"] == "approved" and doc["provenance"]["task_id"] == first.task_id
    assert doc["provenance"]["lookup_id"] == first.lookup.lookup_id
    queue.close()


def _garbage(t: str, settings) -> list[tuple[str, dict]]:
    ok = make_command(t, "How tall is Mount Everest?")
    return [
        ("not an object", {"command": "How tall is Mount Everest?"}),
        ("no command", {}),
        ("prompt of the wrong type", {"command": {**ok, "prompt": 123}}),
        ("scope of the wrong type", {"command": {**ok, "scope": ["tenant", t]}}),
        ("tenant of the wrong type", {"command": {**ok, "scope": {"tenant": {"$ne": None}}}}),
        ("no scope", {"command": {k: v for k, v in ok.items() if k != "scope"}}),
        ("huge prompt", {"command": {**ok, "prompt": "why " * (settings.max_prompt_chars // 4 + 1)}}),
        ("huge response", {"command": {**ok, "response": "x" * (settings.max_response_chars + 1)}}),
        ("huge tenant", {"command": {**ok, "scope": {"tenant": t + "x" * settings.max_scope_value_chars}}}),
        ("invalid utf-8 in the prompt", {"command": {**ok, "prompt": "caf\udce9 au lait"}}),
        ("invalid utf-8 in the response", {"command": {**ok, "response": "bad \udcff byte"}}),
        ("NUL in the prompt", {"command": {**ok, "prompt": "a\x00b"}}),
        ("NaN in the embedding", {"command": {**ok, "embedding": [float("nan")] + [0.1] * 383}}),
        ("infinity in the embedding", {"command": {**ok, "embedding": [float("inf")] + [0.1] * 383}}),
        ("wrong dimension", {"command": {**ok, "embedding": [0.1] * 17}}),
        ("zero vector", {"command": {**ok, "embedding": [0.0] * 384}}),
        ("strings in the embedding", {"command": {**ok, "embedding": ["a"] * 384}}),
        ("bad flag", {"command": {**ok, "flags": ["NOT A FLAG; DROP TABLE"]}}),
        ("undeclared extra scope field", {"command": {**ok, "scope": {"tenant": t, "extra": {"region": "eu"}}}}),
        ("control character in the tenant", {"command": {**ok, "scope": {"tenant": t + "\x01"}}}),
        ("negative ttl", {"command": {**ok, "ttl_seconds": -5}}),
        ("huge metadata", {"command": {**ok, "metadata": {"blob": "y" * 20_000}}}),
        ("too many flags", {"command": {**ok, "flags": [f"f{i}" for i in range(40)]}}),
    ]


def test_garbage_commands_are_rejected_without_crashing_the_worker_or_writing_anything(
        worker_settings, celery_app, celery_worker, redis_client):
    t = tenant()
    before = read_stats(redis_client, worker_settings, minutes=5)["writes"]["invalid"]
    cases = _garbage(t, worker_settings)
    sent = [(name, celery_app.send_task(WRITE_ENTRY, kwargs=kwargs)) for name, kwargs in cases]
    sent.append(("positional arguments", celery_app.send_task(WRITE_ENTRY, args=[make_command(t, "hello?")])))
    for name, result in sent:
        result.get(timeout=90, propagate=False)
        assert result.state == "FAILURE", name
        assert type(result.result).__name__ == "InvalidInput", (name, result.result)
    # the reason says which field is wrong (pydantic's message, without the offending input)
    assert "prompt" in str(sent[2][1].result) and "embedding" in str(sent[14][1].result)
    assert entry_keys(redis_client, worker_settings, t) == []
    assert entry_keys(redis_client, worker_settings, t + "x" * worker_settings.max_scope_value_chars) == []
    after = read_stats(redis_client, worker_settings, minutes=5)["writes"]["invalid"]
    assert after - before >= len(sent)
    # the worker is still there and still writes
    ok = run_task(celery_app, WRITE_ENTRY, command=make_command(t, "How tall is Mount Everest?", "8,849 m."))
    assert ok.state == "SUCCESS" and ok.result["outcome"] == "written"
    assert celery_worker.alive()


def test_a_message_that_is_not_json_at_all_is_discarded_and_the_worker_carries_on(worker_settings, celery_app,
                                                                                  celery_worker, redis_client):
    t = tenant()
    task_id = uuid.uuid4().hex
    headers = {"lang": "py", "task": WRITE_ENTRY, "id": task_id, "root_id": task_id, "parent_id": None,
               "group": None, "retries": 0, "argsrepr": "", "kwargsrepr": ""}
    with celery_app.producer_or_acquire() as producer:
        producer.publish(b'\xff\xfe[[], {"command": \xc3\x28}]', exchange="", routing_key=task_queue(worker_settings),
                         content_type="application/json", content_encoding="utf-8", headers=headers,
                         serializer=None)  # fmt: skip
    ok = run_task(celery_app, WRITE_ENTRY, command=make_command(t, "What is the boiling point of water?", "100 C."))
    assert ok.state == "SUCCESS"
    assert celery_worker.alive()
    assert entry_keys(redis_client, worker_settings, t) == [worker_settings.key_prefix + ok.result["id"]]


def test_unknown_arguments_are_logged_and_ignored(worker_settings, celery_app, celery_worker, redis_client):
    t = tenant()
    result = run_task(celery_app, WRITE_ENTRY, command=make_command(t, "Who painted the Mona Lisa?", "Leonardo."),
                      priority_hint="high", zz_unknown_argument=1)
    assert result.state == "SUCCESS" and result.result["outcome"] == "written"
    assert "ignoring unknown arguments ['priority_hint', 'zz_unknown_argument']" in celery_worker.log_text()


def test_a_redelivered_task_writes_one_document_and_one_audit_record(worker_settings, celery_app, redis_client):
    t = tenant()
    command = make_command(t, "What is the speed of light?", "About 299,792 km/s.")
    task_id = uuid.uuid4().hex
    first = celery_app.send_task(WRITE_ENTRY, kwargs={"command": command}, task_id=task_id)
    assert first.get(timeout=90)["outcome"] == "written"
    first.forget()  # so that waiting below waits for the second delivery's own result
    again = celery_app.send_task(WRITE_ENTRY, kwargs={"command": command}, task_id=task_id)  # same message again
    assert again.get(timeout=90)["outcome"] == "duplicate"
    assert len(entry_keys(redis_client, worker_settings, t)) == 1
    assert len(audit_writes(redis_client, worker_settings, t)) == 1
    # a new task with the same command is a new write of the same key (idempotent by entry id)
    third = run_task(celery_app, WRITE_ENTRY, command=command)
    assert third.result["outcome"] == "written" and third.result["id"] == first.result["id"]
    assert len(entry_keys(redis_client, worker_settings, t)) == 1
    assert len(audit_writes(redis_client, worker_settings, t)) == 2


def test_a_late_write_never_overrides_a_moderators_decision(worker_settings, celery_app, redis_client):
    t = tenant()
    command = make_command(t, "Which planet is the largest?", "Jupiter.")
    first = run_task(celery_app, WRITE_ENTRY, command=command).result
    rejected = run_task(celery_app, SET_STATUS, entry_id=first["id"], status="rejected", by="mod", reason="wrong")
    assert rejected.result == {"entry_id": first["id"], "status": "rejected", "changed": True, "found": True}
    late = run_task(celery_app, WRITE_ENTRY, command={**command, "response": "Saturn."}).result
    assert late["outcome"] == "kept_moderated" and late["status"] is None  # the moderator's status stands
    doc = get_document(redis_client, worker_settings, first["id"])
    assert doc["status"] == "rejected" and doc["response"] == "Jupiter." and doc["moderation"]["by"] == "mod"


def test_set_status_of_a_missing_or_foreign_entry_changes_nothing(worker_settings, celery_app, redis_client):
    t = tenant()
    first = run_task(celery_app, WRITE_ENTRY, command=make_command(t, "What is the chemical symbol of gold?", "Au."))
    entry = first.result["id"]
    foreign = run_task(celery_app, SET_STATUS, entry_id=entry, status="rejected", tenant="someone-else")
    assert foreign.result["changed"] is False
    missing = run_task(celery_app, SET_STATUS, entry_id="0" * 32, status="approved")
    assert missing.result["changed"] is False
    bad = run_task(celery_app, SET_STATUS, entry_id="../../etc", status="approved")
    assert bad.state == "FAILURE" and type(bad.result).__name__ == "InvalidInput"
    assert get_document(redis_client, worker_settings, entry)["status"] == "approved"


def test_write_entries_embeds_and_writes_a_batch_and_reports_each_command(worker_settings, celery_app, redis_client,
                                                                          embedder):
    t = tenant()
    vector = [float(x) for x in embedder.embed(["How many legs does a spider have?"])[0]]
    commands = [
        make_command(t, "How many legs does a spider have?", "Eight.", embedding=vector),
        make_command(t, "How many moons does Mars have?", "Two: Phobos and Deimos."),
        make_command(t, "What is my account balance?", "$12.00"),  # personal: dropped
        make_command(t, "Email the answer", "Write to jane.doe@example.com"),  # PII: held
        {"prompt": 7},  # invalid: reported, the rest still written
        make_command(t, "How many moons does Mars have?", "Two."),  # same entry id as #1: the last one wins
    ]
    result = run_task(celery_app, WRITE_ENTRIES, commands=commands, trace="x")
    summary = result.result
    assert result.state == "SUCCESS", summary
    assert summary["counts"] == {"approve": 3, "hold": 1, "drop": 1, "invalid": 1}
    assert [i["index"] for i in summary["invalid"]] == [4]
    by_index = {r["index"]: r for r in summary["results"]}
    assert by_index[0]["outcome"] == by_index[5]["outcome"] == "written"
    assert by_index[1]["outcome"] == "superseded" and by_index[1]["id"] == by_index[5]["id"]
    assert by_index[2]["outcome"] == "dropped" and by_index[3]["status"] == "pending_review"
    assert len(entry_keys(redis_client, worker_settings, t)) == 3
    assert get_document(redis_client, worker_settings, by_index[5]["id"])["response"] == "Two."
    stored = get_document(redis_client, worker_settings, by_index[0]["id"])["embedding"]
    # the read path's vector is used as given, stored as SEMCACHE_EMBEDDING_STORAGE says (int8 by default)
    assert stored == quantize_embedding(vector, worker_settings.embedding_storage)
    garbage = run_task(celery_app, WRITE_ENTRIES, commands="nope")
    assert garbage.state == "FAILURE" and type(garbage.result).__name__ == "InvalidInput"


def test_the_queue_batches_commands_into_one_task(worker_settings, celery_app, redis_client):
    t = tenant()
    queue = CeleryWriteQueue(celery_app, worker_settings, batch_size=8, linger_ms=2000)
    prompts = [f"What does the word {w} mean?" for w in ("ephemeral", "ubiquitous", "serendipity", "laconic",
                                                          "quixotic", "sanguine", "taciturn", "verbose")]
    ids = {queue.enqueue(WriteCommand.model_validate(make_command(t, p, "A definition."))) for p in prompts}
    assert len(ids) == 1 and None not in ids  # a full batch is sent at once, as one task
    assert queue.flush(10) and queue.tasks_sent == 1 and queue.sent == 8
    summary = celery_app.AsyncResult(ids.pop()).get(timeout=90)
    assert summary["counts"]["approve"] == 8
    assert len(entry_keys(redis_client, worker_settings, t)) == 8
    queue.close()


def test_the_queue_never_fails_the_caller_when_the_broker_is_down(worker_settings, redis_client, embedder, caplog):
    dead = worker_settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{free_port()}/1"})
    queue = CeleryWriteQueue(create_celery(dead), dead, linger_ms=0)
    cache = SemanticCache(worker_settings, redis_client, embedder, write_queue=queue)
    with caplog.at_level(logging.WARNING, logger="worker.queue"):
        answer = cache.get_or_generate("What is the tallest tree species?", {"tenant": tenant()},
                                       lambda: "Coast redwood.")
        assert answer.response == "Coast redwood." and not answer.cached
        assert queue.flush(30)
    assert queue.failures == 1 and queue.sent == 0
    assert any("not sent" in r.getMessage() and "Coast redwood" not in r.getMessage() for r in caplog.records)
    assert cache.enqueue_failures == 0  # the queue absorbed the failure; get_or_generate saw nothing
    queue.close()


def test_worker_results_and_logs_never_carry_the_prompt_or_response(celery_worker, celery_app):
    t = tenant()
    secret = f"secret-{uuid.uuid4().hex}"
    result = run_task(celery_app, WRITE_ENTRY, command=make_command(t, f"Card 4111 1111 1111 1111 {secret}",
                                                                      f"Reach {secret}@example.com"))
    assert result.result["decision"] == "hold"
    assert secret not in json.dumps(result.result)
    assert secret not in celery_worker.log_text()
    assert "4111 1111" not in celery_worker.log_text()


def test_every_live_pool_process_has_warmed_its_model(celery_worker):
    """Each pool process makes its model session at start (in the background), not in the first task it gets."""
    import re
    import time

    stats = celery_worker.app.control.inspect(destination=[celery_worker.hostname], timeout=10).stats() or {}
    pids = {str(pid) for pid in stats[celery_worker.hostname]["pool"]["processes"]}
    assert len(pids) == celery_worker.concurrency
    deadline = time.monotonic() + 60
    while True:
        ready = set(re.findall(r"pool process (\d+): model ready in \d+ ms", celery_worker.log_text()))
        if pids <= ready or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert pids <= ready, celery_worker.log_text()[-2000:]
    assert "model warm-up failed" not in celery_worker.log_text()


def test_a_failing_warm_up_is_logged_and_leaves_the_process_running(worker_settings, redis_url, caplog):
    import threading

    from worker.runtime import WorkerRuntime

    class BrokenEmbedder:
        dim, name = 384, "broken"

        def embed(self, texts):
            raise RuntimeError("model file unreadable")

    runtime = WorkerRuntime(worker_settings, redis_url=redis_url, embedder=BrokenEmbedder())
    with caplog.at_level(logging.INFO, logger="worker.runtime"):
        runtime.after_fork(2)  # what Celery's worker_process_init calls in each pool process
        for thread in threading.enumerate():
            if thread.name == "semcache-warm-up":
                thread.join(10)
    assert any("model warm-up failed: model file unreadable" in r.getMessage() for r in caplog.records)
    assert not any("model ready" in r.getMessage() for r in caplog.records)
    assert runtime.client.ping()  # the process's collaborators still work
