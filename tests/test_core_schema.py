"""Pure logic of the schema and settings: no Redis, no model."""

import pytest
from pydantic import ValidationError

from cache_core.errors import InvalidInput
from cache_core.schema import Scope, WriteCommand, entry_id, normalize_prompt, prompt_hash, tag_token, untag_token
from cache_core.settings import Settings
from cache_core.tasks import EntryFilter, PurgeCommand
from cache_core.query import entry_filter_query, scope_filter


def test_normalize_prompt_folds_case_space_and_trailing_punctuation():
    assert normalize_prompt("  What is   the Capital of FRANCE?? ") == "what is the capital of france"
    assert normalize_prompt("ｗｈａｔ") == "ｗｈａｔ"  # no NFKC (issue 15): compatibility forms stay what they are
    assert normalize_prompt("a.b") == "a.b"  # only trailing punctuation goes


def test_entry_id_is_deterministic_and_scope_bound():
    a = Scope(tenant="acme")
    assert entry_id("Hello there!", a) == entry_id("hello   there", a)
    assert entry_id("hello", a) != entry_id("hello", Scope(tenant="acme2"))
    assert entry_id("hello", a) != entry_id("hello", Scope(tenant="acme", locale="fr"))
    assert entry_id("hello", a) != entry_id("hello", Scope(tenant="acme", model="gpt-5"))
    assert entry_id("hello", a) != entry_id("hello", Scope(tenant="acme", extra={"plan": "pro"}))
    assert len(entry_id("x", a)) == 32
    assert prompt_hash("Hi!") == prompt_hash("hi")


@pytest.mark.parametrize("value", ["acme} | @tenant:{*", "Acme", "acme ", " acme", "a,b", "ü-ñ 東京", "*", "\\", "x"])
def test_tag_tokens_are_reversible_and_distinct(value):
    token = tag_token(value)
    assert untag_token(token) == value
    assert set(token[1:]) <= set("0123456789abcdef")
    assert token != tag_token(value.lower()) or value == value.lower()


@pytest.mark.parametrize("bad", ["", "a\x00b", "tab\there", "bell\x07", "\ud800"])
def test_scope_rejects_empty_and_control_characters(bad):
    with pytest.raises(ValidationError):
        Scope(tenant=bad)


def test_write_command_rejects_nan_bad_flags_and_surrogates():
    with pytest.raises(ValidationError):
        WriteCommand(prompt="p", response="r", scope=Scope(tenant="t"), embedding=[0.1, float("nan")])
    with pytest.raises(ValidationError):
        WriteCommand(prompt="p", response="r", scope=Scope(tenant="t"), flags=["Bad Flag!"])
    with pytest.raises(ValidationError):
        WriteCommand(prompt="p\ud800", response="r", scope=Scope(tenant="t"))
    ok = WriteCommand(prompt="p", response="r", scope={"tenant": "t"}, flags=["b", "a", "a"], extra_field=1)
    assert ok.flags == ["a", "b"]


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SEMCACHE_INDEX", "prod-eu")
    monkeypatch.setenv("SEMCACHE_MIN_SIMILARITY", "0.85")
    monkeypatch.setenv("SEMCACHE_EXTRA_SCOPE_FIELDS", "region, plan")
    monkeypatch.setenv("SEMCACHE_DATA_DIR", str(tmp_path))
    s = Settings()
    assert s.index == "prod-eu" and s.key_prefix == "prod-eu:entry:"
    assert s.min_similarity == 0.85
    assert s.extra_scope_fields == ["region", "plan"]
    assert s.data_dir == tmp_path
    assert s.redis_url is None


@pytest.mark.parametrize("env,value", [("SEMCACHE_INDEX", "bad name!"), ("SEMCACHE_MIN_SIMILARITY", "1.5"),
                                       ("SEMCACHE_EXTRA_SCOPE_FIELDS", "tenant"), ("SEMCACHE_KNN_K", "0")])
def test_bad_settings_are_clear_errors(monkeypatch, env, value):
    monkeypatch.setenv(env, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    assert env.removeprefix("SEMCACHE_").lower() in str(info.value)


def test_scope_filter_never_inlines_values():
    query, params = scope_filter(Scope(tenant="acme} | @tenant:{*", locale="fr"), ["region"], now=100.0)
    assert "acme" not in query and "*" not in query
    assert params["s_tenant"] == tag_token("acme} | @tenant:{*")
    assert params["s_region"] == tag_token("")
    assert "@status:{$s_status}" in query and params["s_status"] == "approved"


def test_entry_filter_query_words_are_parameters():
    query, params = entry_filter_query(EntryFilter(text="reset) | @tenant:{*} pass-word", tenant="a"), [])
    assert "reset" not in query and "@tenant:{*}" not in query
    assert [v for k, v in sorted(params.items()) if k.startswith("f_w")] == ["reset", "tenant", "pass", "word"]
    with pytest.raises(InvalidInput):
        entry_filter_query(EntryFilter(extra={"region": "eu"}), [])


def test_purge_command_refuses_an_unbounded_purge():
    with pytest.raises(ValidationError):
        PurgeCommand(mode="filter", filter=EntryFilter())
    assert PurgeCommand(mode="filter", filter=EntryFilter(), tenant="acme").tenant == "acme"
    with pytest.raises(ValidationError):
        PurgeCommand(ids=["not-an-id"])
