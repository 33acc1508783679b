"""The admin UI's "wrong answer" action (``POST /entries/<id>/wrong``) and the function under it,
:func:`cache_core.feedback.record_entry_feedback`: CSRF, login, tenant binding, garbage ids, the task it sends, and
what the real worker then does in Redis (counts, audit, demotion to review)."""

from __future__ import annotations

import json
import re
import time

import pytest
from pydantic import ValidationError

from cache_core.connection import make_client, text, with_db
from cache_core.errors import InvalidInput, NotFound
from cache_core.feedback import MAX_REASON_CHARS, apply_feedback, entry_feedback, record_entry_feedback
from cache_core.policy import FEEDBACK_KEY
from cache_core.schema import Status
from cache_core.store import get_document
from cache_core.tasks import FeedbackCommand

from .fixtures_web import UNCONSUMED, login, unique_tenant

HOSTILE = '<script>alert("reason")</script> says Paris is in Italy'


def audit_of(client, settings, entry_id: str) -> list[dict[str, str]]:
    rows = [{text(k): text(v) for k, v in fields.items()} for _, fields in client.xrange(settings.key("audit"))]
    return [r for r in rows if r.get("id") == entry_id]


# --- the shared function ---------------------------------------------------------------------------------------
def test_entry_reports_count_like_rated_lookups_and_demote_by_the_same_rule(web_settings, seed, redis_client):
    s = web_settings
    assert s.feedback_demote_after == 3
    ident = seed("What is the capital of France?", "Rome", tenant="acme")
    first = record_entry_feedback(redis_client, s, ident, False, tenant="acme", by="ui:alice", reason="it is Paris")
    assert first.state.wrong == 1 and not first.demoted and first.status == "approved" and first.similarity is None
    # a rated lookup (what POST /api/v1/feedback ends in) adds to the same state, and raises the floor
    api = apply_feedback(redis_client, s, ident, 0.91, True, by="key:0123456789ab", lookup_id="f" * 32)
    assert api.state.wrong == 1 and api.state.correct == 1 and api.state.min_similarity == -1.0  # correct: no floor
    api = apply_feedback(redis_client, s, ident, 0.93, False, by="key:0123456789ab", lookup_id="e" * 32)
    assert api.state.min_similarity == pytest.approx(0.93 + s.feedback_margin)
    third = record_entry_feedback(redis_client, s, ident, False, tenant="acme", by="ui:alice", reason="still Rome")
    # three wrong reports outnumbering the one correct: demoted; the entry-level report left the floor alone
    assert third.demoted and third.status == "pending_review" and third.state.wrong == 3
    assert third.state.min_similarity == pytest.approx(0.93 + s.feedback_margin)
    doc = get_document(redis_client, s, ident)
    assert doc["status"] == "pending_review" and doc["moderation"]["by"] == "ui:alice"
    assert doc["moderation"]["reason"] == "3 wrong-answer report(s), 1 correct; last: still Rome"
    assert entry_feedback(doc["metadata"]).wrong == 3
    events = audit_of(redis_client, s, ident)
    assert [e["event"] for e in events] == ["write", "feedback", "feedback", "feedback", "feedback", "status"]
    assert events[1]["reason"] == "wrong (report on the entry itself): it is Paris" and events[1]["by"] == "ui:alice"
    assert events[3]["reason"] == "wrong at similarity 0.9300" and events[1]["tenant"] == "acme"
    # already in review: counted, not demoted again
    again = record_entry_feedback(redis_client, s, ident, False, tenant="acme")
    assert not again.demoted and again.status == "pending_review" and again.state.wrong == 4


def test_entry_reports_are_tenant_bound_and_validated(web_settings, seed, redis_client):
    s = web_settings
    ident = seed("How long is the warranty?", "Two years.", tenant="acme")
    with pytest.raises(NotFound) as info:
        record_entry_feedback(redis_client, s, ident, False, tenant="globex")
    assert info.value.field == "entry_id"
    with pytest.raises(NotFound):
        record_entry_feedback(redis_client, s, "0" * 32, False)
    for bad in ("", "xyz", "0" * 31, "A" * 32, "0" * 32 + "\n", "*", None):
        with pytest.raises(InvalidInput):
            record_entry_feedback(redis_client, s, bad, False)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        record_entry_feedback(redis_client, s, ident, "no")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        record_entry_feedback(redis_client, s, ident, False, reason="x" * (MAX_REASON_CHARS + 1))
    doc = get_document(redis_client, s, ident)
    assert FEEDBACK_KEY not in doc["metadata"] and len(audit_of(redis_client, s, ident)) == 1  # nothing recorded


def test_the_feedback_task_takes_a_lookup_or_an_entry():
    assert FeedbackCommand(lookup_id="a" * 32, correct=True).entry_id is None
    assert FeedbackCommand(entry_id="b" * 32, correct=False, reason="r").lookup_id is None
    for bad in ({"correct": False}, {"lookup_id": "a" * 32, "entry_id": "b" * 32, "correct": False},
                {"entry_id": "B" * 32, "correct": False},
                {"entry_id": "b" * 32, "correct": False, "reason": "x" * 1001}):
        with pytest.raises(ValidationError):
            FeedbackCommand.model_validate(bad)


def test_the_worker_function_reports_an_entry_gone_meanwhile(web_settings, seed, redis_client):
    """The UI checks the entry before it sends the task; if it is purged before the worker runs, nothing is recorded
    and the task's result says so (``describe`` turns it into "nothing recorded")."""
    from worker.service import give_feedback

    tenant = unique_tenant()
    ident = seed("Soon purged?", "Yes.", tenant=tenant)
    kwargs = FeedbackCommand(entry_id=ident, correct=False, by="ui:token", tenant=tenant).model_dump(mode="json")
    redis_client.delete(web_settings.key_prefix + ident)
    assert give_feedback(redis_client, web_settings, kwargs)["found"] is False
    assert [e["event"] for e in audit_of(redis_client, web_settings, ident)] == ["write"]
    with pytest.raises(InvalidInput):
        give_feedback(redis_client, web_settings, {"correct": False, "entry_id": "nope"})


def test_the_outcome_sentences():
    from web.actions import describe

    def said(result):
        return describe({"state": "success", "result": result})

    state = {"wrong": 3, "correct": 0}
    assert said({"found": True, "correct": False, "demoted": True, "status": "pending_review", "state": state}) == \
        "done: marked wrong; 3 wrong reports (0 correct), demoted to review"
    assert said({"found": True, "correct": False, "demoted": False, "status": "approved",
                 "state": {"wrong": 1, "correct": 2}}) == "done: marked wrong; 1 wrong report (2 correct), still served"
    assert said({"found": True, "correct": False, "demoted": False, "status": "pending_review", "state": state}
                ).endswith("already in review")
    assert said({"found": False, "entry_id": "a" * 32, "error": "gone"}) == "done: nothing recorded (the entry is gone)"
    assert said({"entry_id": "a" * 32, "status": "approved", "changed": True, "found": True}) == "done: approved"


# --- the route, sending side (tasks wait in a queue no worker reads) ---------------------------------------------
@pytest.fixture
def sent_for(web_settings):
    """``sent_for(entry_id)`` -> the kwargs of every queued message that is about that entry."""
    broker = make_client(with_db(web_settings.redis_url, 1), timeout_ms=5000)

    def find(entry_id: str) -> list[dict]:
        import base64

        out = []
        for raw in broker.lrange(UNCONSUMED, 0, -1):
            _, kwargs, _ = json.loads(base64.b64decode(json.loads(raw)["body"]))
            if entry_id in (kwargs.get("entry_id"), *kwargs.get("ids", [])):
                out.append(kwargs)
        return out

    yield find
    broker.close()


def test_wrong_answer_needs_a_login_and_the_csrf_token(client, seed, sent_for):
    ident = seed("Do you ship to Norway?", "No.", tenant=(tenant := unique_tenant()))
    form = {"tenant": tenant, "reason": "we do"}
    assert client.post(f"/entries/{ident}/wrong", data=form).status_code == 401  # not logged in
    csrf = login(client)
    assert client.post(f"/entries/{ident}/wrong", data=form).status_code == 400
    assert client.post(f"/entries/{ident}/wrong", data={**form, "csrf_token": "forged"}).status_code == 400
    assert client.get(f"/entries/{ident}/wrong").status_code == 405  # a state change is never a GET
    assert sent_for(ident) == []
    assert client.post(f"/entries/{ident}/wrong", data={**form, "csrf_token": csrf}).status_code == 302
    assert len(sent_for(ident)) == 1


def test_wrong_answer_sends_the_feedback_task_and_the_flash_follows_it(ui_client, seed, queued, web_settings,
                                                                     redis_client):
    tenant = unique_tenant()
    ident = seed("What is the capital of Australia?", "Sydney", tenant=tenant)
    back = f"/entries/?tenant={tenant}"
    response = ui_client.post(f"/entries/{ident}/wrong", data={
        "csrf_token": ui_client.csrf, "tenant": tenant, "reason": f"  {HOSTILE}\r\n(Canberra) ", "next": back})
    assert response.status_code == 302 and response.headers["Location"] == back
    page = ui_client.get(back).get_data(as_text=True)
    flash = re.search(r'<div class="flash task" role="status" data-task-id="([0-9a-f]{32})">(.*?)</div>', page, re.S)
    assert flash and f"Wrong answer reported for entry {ident[:8]}" in flash.group(2)
    name, kwargs = queued(flash.group(1))
    assert name == "semcache.feedback"
    assert kwargs == {"lookup_id": None, "entry_id": ident, "correct": False, "by": "ui:token",
                      "reason": HOSTILE + " (Canberra)", "tenant": tenant}
    polled = ui_client.get(f"/ui/tasks/{flash.group(1)}").get_json()
    assert polled["state"] == "pending" and polled["label"].startswith(f"wrong answer {ident[:8]}")
    # the default target is the entry's page; an off-site "next" is not followed
    elsewhere = ui_client.post(f"/entries/{ident}/wrong", data={"csrf_token": ui_client.csrf, "tenant": tenant,
                                                                "next": "//evil.example/x"})
    assert elsewhere.headers["Location"] == f"/entries/{ident}"
    # nothing changes in Redis before the worker runs the task: the UI only sends it
    assert FEEDBACK_KEY not in get_document(redis_client, web_settings, ident)["metadata"]


def test_another_tenants_entry_is_not_found_and_nothing_is_sent(ui_client, seed, sent_for, redis_client, web_settings):
    mine, theirs = unique_tenant("a"), unique_tenant("b")
    seed("my question", tenant=mine)
    foreign = seed("their question", "their answer", tenant=theirs)
    for tenant in (mine, theirs.upper(), theirs + " ", "*"):
        response = ui_client.post(f"/entries/{foreign}/wrong", data={"csrf_token": ui_client.csrf, "tenant": tenant})
        assert response.status_code == 404 and "their question" not in response.get_data(as_text=True)
    assert sent_for(foreign) == []
    assert FEEDBACK_KEY not in get_document(redis_client, web_settings, foreign)["metadata"]
    assert [e["event"] for e in audit_of(redis_client, web_settings, foreign)] == ["write"]
    page = ui_client.get("/entries/").get_data(as_text=True)
    assert 'class="flash task"' not in page  # no action was recorded for the session either


@pytest.mark.parametrize("entry_id", ["x", "0" * 31, "0" * 33, "A" * 32, "g" * 32, "..%2f..%2fadmin", "0" * 32])
def test_garbage_and_unknown_ids_are_not_found(ui_client, entry_id):
    response = ui_client.post(f"/entries/{entry_id}/wrong", data={"csrf_token": ui_client.csrf, "tenant": "t"})
    assert response.status_code == 404 and "Traceback" not in response.get_data(as_text=True)


def test_a_form_without_its_tenant_or_with_a_huge_reason_sends_nothing(ui_client, seed, sent_for):
    tenant = unique_tenant()
    ident = seed("Is there a student discount?", "Yes, 10%.", tenant=tenant)
    missing = ui_client.post(f"/entries/{ident}/wrong", data={"csrf_token": ui_client.csrf})
    assert missing.status_code == 400 and "which tenant" in missing.get_data(as_text=True)
    huge = ui_client.post(f"/entries/{ident}/wrong", data={"csrf_token": ui_client.csrf, "tenant": tenant,
                                                           "reason": "x" * (MAX_REASON_CHARS + 1)})
    assert huge.status_code == 302
    assert "longer than 1000 characters; nothing was recorded" in ui_client.get(huge.headers["Location"]).get_data(
        as_text=True)
    assert sent_for(ident) == []


def test_pages_show_the_action_and_the_counts(ui_client, seed, redis_client, web_settings):
    tenant = unique_tenant()
    long_model = "gpt-4o#ctx:" + "9f" * 55
    ident = seed("Where is my order?", "In transit.", tenant=tenant, model=long_model)
    record_entry_feedback(redis_client, web_settings, ident, False, tenant=tenant, by="ui:alice", reason=HOSTILE)
    apply_feedback(redis_client, web_settings, ident, 0.95, True, lookup_id="c" * 32)
    held = seed("Can I return a gift?", "Yes.", tenant=tenant, status=Status.PENDING_REVIEW, model=long_model)
    record_entry_feedback(redis_client, web_settings, held, False, tenant=tenant)
    detail = ui_client.get(f"/entries/{ident}").get_data(as_text=True)
    assert 'id="feedback-wrong">1<' in detail and 'id="feedback-correct">1<' in detail
    assert f'action="/entries/{ident}/wrong"' in detail and f'name="tenant" value="{tenant}"' in detail
    assert "<script>alert(" not in detail and "&lt;script&gt;alert(&#34;reason&#34;)&lt;/script&gt;" in detail
    assert "_semcache_feedback" not in detail  # shown as its own card, not in the metadata dump
    listing = ui_client.get(f"/entries/?tenant={tenant}").get_data(as_text=True)
    assert f'data-wrong="{ident}"' in listing and f'data-wrong="{held}"' not in listing  # only served entries
    assert "1 wrong · 1 correct" in listing and "1 wrong · 0 correct" in listing
    review = ui_client.get(f"/review/?tenant={tenant}").get_data(as_text=True)
    assert "1 wrong · 0 correct" in review and f'title="model: {long_model}"' in review
    rejected = seed("Is this rejected?", "Yes.", tenant=tenant, status=Status.REJECTED)
    assert 'id="wrong-answer"' not in ui_client.get(f"/entries/{rejected}").get_data(as_text=True)


# --- through the real worker -------------------------------------------------------------------------------------
def wait_ui_task(test_client, task_id: str, timeout_s: float = 60.0) -> dict:
    """Poll ``/ui/tasks/<id>`` until the task is done (a bound on a busy machine, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while True:
        body = test_client.get(f"/ui/tasks/{task_id}").get_json()
        if body["state"] in ("success", "failure") or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


@pytest.mark.usefixtures("celery_worker")
def test_three_wrong_answers_demote_the_entry_through_the_worker(worker_client, worker_seed, worker_web_settings,
                                                                 worker_api_headers):
    s = worker_web_settings
    client = make_client(s.redis_url, timeout_ms=5000)
    tenant = unique_tenant("fb")
    ident = worker_seed("What are your opening hours?", "We never open.", tenant=tenant)
    csrf = login(worker_client)
    texts = []
    for n in range(3):
        response = worker_client.post(f"/entries/{ident}/wrong", data={
            "csrf_token": csrf, "tenant": tenant, "reason": f"report {n}: {HOSTILE}"})
        page = worker_client.get(response.headers["Location"]).get_data(as_text=True)
        task_id = re.search(r'class="flash task" role="status" data-task-id="([0-9a-f]{32})"', page).group(1)
        done = wait_ui_task(worker_client, task_id)
        assert done["state"] == "success", done
        texts.append(done["text"])
    assert texts == ["done: marked wrong; 1 wrong report (0 correct), still served",
                     "done: marked wrong; 2 wrong reports (0 correct), still served",
                     "done: marked wrong; 3 wrong reports (0 correct), demoted to review"]
    doc = get_document(client, s, ident)
    assert doc["status"] == "pending_review" and doc["moderation"]["by"] == "ui:token"
    assert doc["metadata"][FEEDBACK_KEY]["wrong"] == 3 and doc["metadata"][FEEDBACK_KEY]["min_similarity"] == -1.0
    events = audit_of(client, s, ident)
    assert [e["event"] for e in events] == ["write", "feedback", "feedback", "feedback", "status"]
    assert events[1]["reason"] == f"wrong (report on the entry itself): report 0: {HOSTILE}"
    assert all(e["tenant"] == tenant for e in events[1:])
    # the API sees the demotion: the entry is held, and a lookup no longer serves it
    headers = worker_api_headers(tenant)
    assert worker_client.get(f"/api/v1/entries/{ident}", headers=headers).get_json()["status"] == "pending_review"
    lookup = worker_client.post("/api/v1/lookup", headers=headers, json={"prompt": "What are your opening hours?",
                                                                         "scope": {"locale": "en"}}).get_json()
    assert lookup["hit"] is False
    detail = worker_client.get(f"/entries/{ident}").get_data(as_text=True)
    assert 'id="feedback-wrong">3<' in detail and "report 2: &lt;script&gt;" in detail
    client.close()
