"""Explicit answer groups where a write starts, checked at the boundary (issue 14): ``group`` on
``POST /api/v1/entries`` (the task sent carries it; a bad value is a 400 naming the field), the proxy's
``X-Semcache-Group`` header (a bad value is a 400 before anything goes upstream), ``Generated.group``; and the
judge's verdicts on the entry page, escaped. The writes themselves, through a real worker with a judge, are in
tests/test_worker_judge.py."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cache_core import Generated
from cache_core.cache import check_group
from cache_core.store import audit

from .fixtures_web import unique_tenant


@pytest.mark.parametrize("group", ["kb:refund-policy", "doc 42 §3", "x" * 128, "路由:账单"])
def test_a_group_on_post_entries_travels_with_the_task(client, api_headers, queued, group):
    headers = api_headers(unique_tenant("g"))
    response = client.post("/api/v1/entries", headers=headers,
                           json={"prompt": "How do I get a refund?", "response": "Within 30 days.", "group": group})
    assert response.status_code == 202, response.get_json()
    name, kwargs = queued(response.get_json()["task_id"])
    assert name == "semcache.write_entry" and kwargs["command"]["group"] == group


def test_no_group_sends_none(client, api_headers, queued):
    response = client.post("/api/v1/entries", headers=api_headers(unique_tenant("g")),
                           json={"prompt": "How do I get a refund?", "response": "Within 30 days."})
    assert queued(response.get_json()["task_id"])[1]["command"]["group"] is None


@pytest.mark.parametrize("group, message", [
    ("", "at least 1 character"), ("x" * 129, "at most 128 characters"), ("   ", "blank"),
    ("a\nb", "control characters"), ("a\x00b", "control characters"), (42, "string"), (["a"], "string"),
])  # fmt: skip
def test_a_bad_group_on_post_entries_is_a_400_naming_the_field(client, api_headers, group, message):
    response = client.post("/api/v1/entries", headers=api_headers(unique_tenant("g")),
                           json={"prompt": "q", "response": "a", "group": group})
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["field"] == "group" and message in error["message"]


def test_the_openapi_document_describes_group(client):
    schema = client.get("/api/v1/openapi.json").get_json()["components"]["schemas"]["EntryRequest"]
    group = schema["properties"]["group"]
    assert "RAG document id" in group["description"]
    assert {"type": "string", "minLength": 1, "maxLength": 128} in group["anyOf"]


@pytest.mark.parametrize("header, message", [
    ("x" * 129, "1 to 128 characters"), ("   ", "blank"), ("a\tb", "control characters"),
    ("bad\xff", "not UTF-8"),  # header bytes travel as latin-1: 0xff is no UTF-8
])  # fmt: skip
def test_a_bad_x_semcache_group_header_is_a_400_before_anything_goes_upstream(client, api_headers, header, message):
    response = client.post("/v1/chat/completions", headers={**api_headers(unique_tenant("g")),
                                                            "X-Semcache-Group": header},
                           json={"model": "m", "messages": [{"role": "user", "content": "hello"}]})
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["param"] == "X-Semcache-Group" and error["message"].startswith("X-Semcache-Group: ")
    assert message in error["message"]


def test_a_good_x_semcache_group_header_passes_the_check(client, api_headers):
    # UTF-8 "café" as the latin-1 text WSGI hands over; no upstream is configured here, so the miss answers 503
    response = client.post("/v1/chat/completions", headers={**api_headers(unique_tenant("g")),
                                                            "X-Semcache-Group": "caf\xc3\xa9"},
                           json={"model": "m", "messages": [{"role": "user", "content": "hello"}]})
    assert response.status_code == 503 and response.get_json()["error"]["code"] == "upstream_not_configured"


def test_generated_checks_its_group():
    assert Generated(response="a", group="router:billing").group == "router:billing"
    assert Generated(response="a").group is None
    for bad in ("", " ", "x" * 129, "a\rb"):
        with pytest.raises(ValidationError):
            Generated(response="a", group=bad)
    with pytest.raises(ValueError, match="lone surrogate"):
        check_group("a\ud800")


def test_the_entry_page_shows_the_judges_verdicts_escaped(ui_client, web_app, seed):
    tenant = unique_tenant("v")
    neighbour = seed("How do I reset my password?", "Settings > Security.", tenant=tenant)
    ident = seed("How can I get a new password?", "Use the link.", tenant=tenant)
    state = web_app.extensions["semcache"]
    pipe = state.redis.pipeline(transaction=False)
    audit(pipe, state.settings, event="judge", id=ident, tenant=tenant, neighbour=neighbour, similarity=0.8123,
          verdict="yes", judge="llm", detail="yes", group="abc123", ms=12.5)
    audit(pipe, state.settings, event="judge", id=ident, tenant=tenant, neighbour="<b>not-an-id</b>",
          similarity=0.61, verdict="none", judge="llm", detail='<script>alert("x")</script>', group="", ms=3.0)
    pipe.execute()
    page = ui_client.get(f"/entries/{ident}").get_data(as_text=True)
    card = page[page.index('id="judge-verdicts"'):page.index('id="feedback"')]
    assert f'<a href="/entries/{neighbour}">{neighbour[:12]}</a>' in card and "0.8123" in card
    assert 'joined group <span class="mono">abc123</span>' in card and "<b>yes</b>" in card
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in card and "<script>" not in card
    assert "&lt;b&gt;not-an-i" in card and 'href="/entries/&lt;' not in card  # no link for what is no entry id
    other = ui_client.get(f"/entries/{neighbour}").get_data(as_text=True)
    assert 'id="judge-verdicts"' not in other  # no verdicts, no card
