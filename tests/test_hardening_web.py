"""Issue 15 hardening of the web app, keys and logs: each test injects the defect the issue names.

Unicode digits in query strings, sessions that outlive a logout or a rotated credential, the login limiter behind a
TLS proxy, punctuation-only purge filters, PII in the access log and in Celery headers, upstream error bodies and
rate-limit headers, and keys without a tenant."""

from __future__ import annotations

import pytest

from .fixtures_web import csrf_of, login


# --- item 5: unicode digits in query strings ---------------------------------------------------------------------
@pytest.mark.parametrize("name,value", [("limit", "²"), ("limit", "٣"), ("offset", "²"), ("offset", "٣"),
                                        ("limit", "１"), ("minutes", "²"), ("minutes", "٣")])
def test_unicode_digits_in_query_strings_are_a_400_naming_the_field(client, api_headers, name, value):
    headers = api_headers(admin=True)
    path = "/api/v1/stats" if name == "minutes" else "/api/v1/entries"
    response = client.get(path, query_string={name: value}, headers=headers)
    assert response.status_code == 400, response.get_data(as_text=True)[:300]
    assert response.get_json()["error"]["field"] == name


@pytest.mark.parametrize("path", ["/entries/", "/review/", "/deadletters/"])
@pytest.mark.parametrize("value", ["²", "٣", "１"])
def test_ui_page_numbers_take_only_ascii_digits(ui_client, path, value):
    for name in ("page", "per_page"):
        response = ui_client.get(path, query_string={name: value})
        assert response.status_code == 200, (name, response.status_code)
