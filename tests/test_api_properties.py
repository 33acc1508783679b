"""Property tests of the API's input validation: whatever a client sends, the answer is a clear JSON error or a
success, never a 500 and never a trace; every 400 names the field that is wrong."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ALLOWED = {200, 202, 400, 403, 404, 413}
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                           max_leaves=12)
hostile_text = st.one_of(st.text(max_size=60), st.sampled_from([
    "", " ", "\x00", "a\x00b", "}", "*", "@tenant:{*}", "x} | @tenant:{*", "-inf", "((", "\ud800", "$vec", "<script>",
    "a" * 300]))  # fmt: skip
scopes = st.one_of(json_values, st.dictionaries(st.sampled_from(["tenant", "locale", "model", "extra", "region", "Z"]),
                                                st.one_of(hostile_text, json_values), max_size=4))


def check(response) -> dict | None:
    assert response.status_code in ALLOWED, (response.status_code, response.get_data(as_text=True)[:500])
    text = response.get_data(as_text=True)
    assert "Traceback" not in text
    body = json.loads(text)
    if response.status_code >= 400:
        assert set(body) == {"error"} and isinstance(body["error"]["message"], str)
        if response.status_code == 400:
            assert body["error"]["code"] == "invalid_input" and body["error"].get("field"), body
    return body


@pytest.fixture
def headers(api_headers):
    return api_headers("prop-tenant")


def _maybe(strategy):
    return st.one_of(st.just(None), strategy)


def _body(**fields):
    """A body with each of ``fields`` present or absent, plus sometimes an unknown key."""
    return st.fixed_dictionaries({}, optional={**fields, "unknown": json_values})


@PROPERTY_SETTINGS
@given(body=st.one_of(json_values, _body(prompt=st.one_of(hostile_text, json_values), scope=scopes,
                                         min_similarity=st.one_of(scalars, st.floats(-1, 1)))))
def test_lookup_never_fails_badly(client, headers, body):
    check(client.post("/api/v1/lookup", headers=headers, json=body))


@PROPERTY_SETTINGS
@given(body=st.one_of(json_values, _body(prompt=hostile_text, response=st.one_of(hostile_text, json_values),
                                         scope=scopes, ttl_seconds=scalars,
                                         flags=st.one_of(json_values, st.lists(hostile_text, max_size=3)),
                                         metadata=json_values)))
def test_post_entries_never_fails_badly(client, headers, body):
    check(client.post("/api/v1/entries", headers=headers, json=body))


@PROPERTY_SETTINGS
@given(body=st.one_of(json_values, _body(scope=scopes, older_than=st.one_of(scalars, hostile_text,
                                                                             st.sampled_from(["7d", "1.5h", "0"])),
                                         status=st.one_of(hostile_text, st.sampled_from(["approved", "rejected"])))))
def test_purge_never_fails_badly(client, headers, body):
    check(client.post("/api/v1/purge", headers=headers, json=body))


@PROPERTY_SETTINGS
@given(raw=st.binary(max_size=300), content_type=st.sampled_from(["application/json", "text/plain", ""]))
def test_raw_bodies_never_fail_badly(client, headers, raw, content_type):
    for path in ("/api/v1/lookup", "/api/v1/entries", "/api/v1/purge"):
        check(client.post(path, headers=headers, data=raw, content_type=content_type))


@PROPERTY_SETTINGS
@given(ident=hostile_text, query=st.dictionaries(st.sampled_from(["status", "limit", "offset", "sort", "order", "text",
                                                                   "flag", "locale", "minutes"]), hostile_text,
                                                 max_size=4))
def test_paths_and_query_strings_never_fail_badly(client, headers, ident, query):
    from urllib.parse import quote

    def raw(text: str) -> str:  # percent-encoded bytes: lone surrogates arrive as invalid UTF-8
        return quote(text.encode("utf-8", "surrogatepass"), safe="")

    safe = raw(ident)
    query_string = "&".join(f"{name}={raw(value)}" for name, value in query.items())
    for method, path in (("get", f"/api/v1/entries/{safe}"), ("delete", f"/api/v1/entries/{safe}"),
                         ("get", f"/api/v1/tasks/{safe}"), ("get", "/api/v1/entries"), ("get", "/api/v1/stats")):
        check(getattr(client, method)(path, headers=headers, query_string=query_string))


@PROPERTY_SETTINGS
@given(body=st.one_of(json_values, _body(status=st.one_of(hostile_text, st.sampled_from(["approved", "rejected"])),
                                         response=st.one_of(hostile_text, json_values), reason=json_values)))
def test_admin_status_never_fails_badly(client, api_headers, body):
    admin = api_headers(admin=True)
    ident = "0" * 32
    check(client.post(f"/api/v1/admin/entries/{ident}/status", headers=admin, json=body))
