"""cache_core.browse: listings, counts, tenant totals, neighbours and detail, against the real index and MiniLM."""

from __future__ import annotations

import time

import pytest

from cache_core import browse
from cache_core.errors import InvalidInput
from cache_core.schema import Status
from cache_core.tasks import EntryFilter


@pytest.fixture
def corpus(web_app, seed):
    """Six entries over two tenants (one of them with a hostile name), three statuses and two locales."""
    ids = {
        "paris": seed("What is the capital of France?", "Paris", tenant="acme"),
        "berlin": seed("What is the capital of Germany?", "Berlin", tenant="acme", locale="de"),
        "held": seed("How do I reset my password?", "Click reset", tenant="acme", status=Status.PENDING_REVIEW,
                     flags=("review",)),
        "bad": seed("Tell me a joke about cats", "no", tenant="acme", status=Status.REJECTED),
        "evil": seed("What is the capital of France?", "Paris (evil)", tenant="x} | @tenant:{*"),
        "evil2": seed("Where is the Eiffel tower?", "Paris", tenant="x} | @tenant:{*"),
    }
    state = web_app.extensions["semcache"]
    return state.redis, state.settings, ids


def test_list_filters_by_tenant_status_locale_text_and_flags(corpus):
    client, settings, ids = corpus
    acme = browse.list_entries(client, settings, EntryFilter(tenant="acme"))
    assert acme.total == 4 and {e.id for e in acme.entries} == {ids["paris"], ids["berlin"], ids["held"], ids["bad"]}
    assert browse.list_entries(client, settings, EntryFilter(tenant="acme", locale="de")).entries[0].id == ids["berlin"]
    held = browse.list_entries(client, settings, EntryFilter(status=Status.PENDING_REVIEW))
    assert [e.id for e in held.entries] == [ids["held"]]
    assert [e.id for e in browse.list_entries(client, settings, EntryFilter(flags=["review"])).entries] == [ids["held"]]
    capital = browse.list_entries(client, settings, EntryFilter(text="capital"))
    assert {e.id for e in capital.entries} == {ids["paris"], ids["berlin"], ids["evil"]}
    # a hostile tenant name is a value, not query syntax: it matches itself only
    evil = browse.list_entries(client, settings, EntryFilter(tenant="x} | @tenant:{*"))
    assert {e.id for e in evil.entries} == {ids["evil"], ids["evil2"]}
    # the tenant bound of an API key overrides the filter's tenant
    bound = browse.list_entries(client, settings, EntryFilter(tenant="acme"), tenant="x} | @tenant:{*")
    assert {e.id for e in bound.entries} == {ids["evil"], ids["evil2"]}


def test_sort_pagination_and_created_range(corpus):
    client, settings, ids = corpus
    newest = browse.list_entries(client, settings, EntryFilter(), order="desc", limit=2)
    oldest = browse.list_entries(client, settings, EntryFilter(), order="asc", limit=2)
    assert newest.total == oldest.total == 6 and newest.pages == 3
    assert newest.entries[0].id == ids["evil2"] and oldest.entries[0].id == ids["paris"]
    page2 = browse.list_entries(client, settings, EntryFilter(), order="asc", offset=2, limit=2)
    assert [e.id for e in page2.entries] == [ids["held"], ids["bad"]] and page2.page == 2
    assert browse.list_entries(client, settings, EntryFilter(created_after=time.time() + 60)).total == 0
    with pytest.raises(InvalidInput):
        browse.list_entries(client, settings, EntryFilter(), sort="prompt")
    with pytest.raises(InvalidInput):
        browse.list_entries(client, settings, EntryFilter(), offset=browse.MAX_WINDOW)


def test_counts_and_tenant_summary(corpus):
    client, settings, _ = corpus
    assert browse.count_by_status(client, settings) == {"approved": 4, "pending_review": 1, "rejected": 1}
    assert browse.count_by_status(client, settings, tenant="acme") == {"approved": 2, "pending_review": 1,
                                                                        "rejected": 1}
    assert browse.count_entries(client, settings, EntryFilter(tenant="x} | @tenant:{*")) == 2
    summary = {t["tenant"]: t for t in browse.tenant_summary(client, settings)}
    assert summary["acme"]["total"] == 4 and summary["acme"]["pending_review"] == 1
    assert summary["x} | @tenant:{*"]["approved"] == 2


def test_detail_has_hits_audit_and_neighbours_within_scope(corpus):
    client, settings, ids = corpus
    client.hincrby(settings.key("hits"), ids["paris"], 3)
    detail = browse.entry_detail(client, settings, ids["paris"])
    assert detail.entry.hit_count == 3 and detail.entry.prompt == "What is the capital of France?"
    assert detail.audit and detail.audit[0]["event"] == "write"
    # neighbours stay inside the scope: same tenant, locale and model (so never the evil tenant's twin)
    neighbour_ids = [n.entry.id for n in detail.neighbours]
    assert ids["paris"] not in neighbour_ids and ids["evil"] not in neighbour_ids
    assert set(neighbour_ids) <= {ids["held"], ids["bad"]}
    assert all(-1.0 <= n.similarity <= 1.0 for n in detail.neighbours)
    assert neighbour_ids == [n.entry.id for n in sorted(detail.neighbours, key=lambda n: -n.similarity)]
    assert browse.entry_detail(client, settings, ids["paris"], tenant="other") is None
    assert browse.entry_detail(client, settings, "0" * 32) is None


def test_missing_index_reads_as_empty(make_settings, redis_client):
    settings = make_settings()
    assert browse.list_entries(redis_client, settings, EntryFilter()).total == 0
    assert browse.count_by_status(redis_client, settings) == {"approved": 0, "pending_review": 0, "rejected": 0}
    assert browse.tenant_summary(redis_client, settings) == []
