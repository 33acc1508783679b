"""Feedback: the read path logs hits off the hot path; a wrong-answer report raises the entry's own threshold and can
demote it to review; reports are tenant-bound and counted once."""

from __future__ import annotations

import pytest

from cache_core.cache import SemanticCache
from cache_core.errors import InvalidInput, NotFound
from cache_core.feedback import lookup_key, record_feedback
from cache_core.policy import FEEDBACK_KEY
from cache_core.schema import Scope, Status, WriteCommand
from cache_core.stats import StatsRecorder
from cache_core.store import get_document, write_command

PROMPT = "How do I reset my password?"
QUERY = "how do i reset my password now"  # MiniLM similarity to PROMPT about 0.96
CLOSER = "how can i reset my password"  # about 0.985


@pytest.fixture
def cache(make_settings, redis_client, embedder):
    s = make_settings(policy="threshold", min_similarity=0.5, feedback_demote_after=2)
    recorder = StatsRecorder(redis_client, s, interval_s=3600)  # flushed by hand: deterministic
    c = SemanticCache(s, redis_client, embedder, stats=recorder)
    for tenant in ("acme", "globex"):
        write_command(redis_client, s, embedder, WriteCommand(prompt=PROMPT, response="Use the reset link.",
                                                              scope=Scope(tenant=tenant)))
    yield c
    recorder.close()


def hit(cache: SemanticCache, query: str = QUERY, tenant: str = "acme"):
    result = cache.lookup(query, {"tenant": tenant})
    cache.stats.flush()
    return result


def test_a_hit_is_logged_with_a_ttl_and_a_miss_is_not(cache, redis_client):
    result = hit(cache)
    assert result.hit and result.strategy == "semantic"
    key = lookup_key(cache.settings, result.lookup_id)
    record = {k.decode(): v.decode() for k, v in redis_client.hgetall(key).items()}
    assert record["entry"] == result.entry.id and record["tenant"] == "acme"
    assert float(record["similarity"]) == pytest.approx(result.similarity)
    assert 0 < redis_client.ttl(key) <= cache.settings.feedback_window_s
    miss = cache.lookup("what is the boiling point of water", {"tenant": "acme"}, min_similarity=0.99)
    cache.stats.flush()
    assert not miss.hit and not redis_client.exists(lookup_key(cache.settings, miss.lookup_id))


def test_a_wrong_report_raises_the_entrys_threshold_above_that_similarity(cache, redis_client):
    first = hit(cache)
    out = record_feedback(redis_client, cache.settings, first.lookup_id, False, by="alice")
    assert not out.demoted and out.state.wrong == 1
    assert out.state.min_similarity == pytest.approx(first.similarity + cache.settings.feedback_margin)
    doc = get_document(redis_client, cache.settings, first.entry.id)
    assert doc["metadata"][FEEDBACK_KEY]["wrong"] == 1 and doc["status"] == "approved"
    again = cache.lookup(QUERY, {"tenant": "acme"})
    assert not again.hit  # the same query now misses: the entry requires more than it reached
    assert cache.lookup(PROMPT, {"tenant": "acme"}).hit  # the exact prompt is still served
    closer = cache.lookup(CLOSER, {"tenant": "acme"})
    assert closer.hit and closer.strategy == "semantic"  # a closer paraphrase (above the new floor) is too
    assert hit(cache, tenant="globex").hit  # the other tenant's entry is untouched


def test_each_lookup_is_rated_once(cache, redis_client):
    first = hit(cache)
    record_feedback(redis_client, cache.settings, first.lookup_id, True)
    dup = record_feedback(redis_client, cache.settings, first.lookup_id, False)
    assert dup.duplicate and dup.state.wrong == 0 and dup.state.correct == 1


def test_repeated_wrong_reports_demote_to_review(cache, redis_client):
    a = hit(cache)
    record_feedback(redis_client, cache.settings, a.lookup_id, False)
    b = hit(cache, CLOSER)  # a closer paraphrase is still served; it is reported wrong too
    assert b.hit and b.strategy == "semantic"
    out = record_feedback(redis_client, cache.settings, b.lookup_id, False)
    assert out.demoted and out.state.wrong == 2
    doc = get_document(redis_client, cache.settings, a.entry.id)
    assert doc["status"] == Status.PENDING_REVIEW.value and doc["moderation"]["by"] == "feedback"
    assert not cache.lookup(PROMPT, {"tenant": "acme"}).hit


def test_a_wrong_exact_hit_demotes_at_once(make_settings, redis_client, embedder):
    s = make_settings(feedback_demote_after=0)  # no demotion by count: only the exact-hit rule applies
    recorder = StatsRecorder(redis_client, s, interval_s=3600)
    cache = SemanticCache(s, redis_client, embedder, stats=recorder)
    write_command(redis_client, s, embedder, WriteCommand(prompt=PROMPT, response="wrong", scope=Scope(tenant="a")))
    try:
        result = cache.lookup(PROMPT, {"tenant": "a"})
        recorder.flush()
        out = record_feedback(redis_client, s, result.lookup_id, False)
        assert out.demoted
        assert get_document(redis_client, s, result.entry.id)["status"] == "pending_review"
    finally:
        recorder.close()


def test_feedback_is_tenant_bound_and_validated(cache, redis_client):
    first = hit(cache)
    with pytest.raises(NotFound):
        record_feedback(redis_client, cache.settings, first.lookup_id, False, tenant="globex")
    with pytest.raises(NotFound):
        record_feedback(redis_client, cache.settings, "0" * 32, False)
    for bad in ("", "xyz", "0" * 31, "0" * 32 + "\n", "*"):
        with pytest.raises(InvalidInput):
            record_feedback(redis_client, cache.settings, bad, False)
    with pytest.raises(InvalidInput):
        record_feedback(redis_client, cache.settings, first.lookup_id, "no")  # type: ignore[arg-type]
    # the right tenant can still rate it: the refused attempts changed nothing
    assert record_feedback(redis_client, cache.settings, first.lookup_id, False, tenant="acme").state.wrong == 1


def test_feedback_on_a_deleted_entry_is_not_found(cache, redis_client):
    from cache_core.store import delete_entries

    first = hit(cache)
    delete_entries(redis_client, cache.settings, [first.entry.id])
    with pytest.raises(NotFound, match="no longer exists"):
        record_feedback(redis_client, cache.settings, first.lookup_id, False)


def test_no_log_when_the_window_is_zero(make_settings, redis_client, embedder):
    s = make_settings(feedback_window_s=0, min_similarity=0.5)
    recorder = StatsRecorder(redis_client, s, interval_s=3600)
    cache = SemanticCache(s, redis_client, embedder, stats=recorder)
    write_command(redis_client, s, embedder, WriteCommand(prompt=PROMPT, response="x", scope=Scope(tenant="a")))
    try:
        result = cache.lookup(QUERY, {"tenant": "a"})
        recorder.flush()
        assert result.hit and not redis_client.exists(lookup_key(s, result.lookup_id))
    finally:
        recorder.close()
