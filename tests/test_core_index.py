"""The index: created from the schema, idempotent, verified, migrated by alias swap; never rebuilt silently."""

import numpy as np
import pytest

from cache_core.errors import IndexMismatch
from cache_core.index import IndexSpec, alias_name, ensure_index, index_info, migrate, verify_index
from cache_core.schema import Scope, WriteCommand
from cache_core.store import write_command
from cache_core.testing import HashingEmbedder


def test_create_is_idempotent_and_derived_from_the_schema(redis_client, settings):
    spec = IndexSpec(settings=settings, dim=384, model_name="m")
    name = ensure_index(redis_client, spec)
    assert ensure_index(redis_client, spec) == name == f"{alias_name(settings)}-v1"
    info = index_info(redis_client, settings)
    attrs = info["attributes"]
    assert attrs["embedding"]["type"] == "VECTOR" and attrs["embedding"]["dim"] == "384"
    assert attrs["embedding"]["distance_metric"] == "COSINE"
    for tag in ("tenant", "locale", "model", "status", "flags"):
        assert attrs[tag]["type"] == "TAG"
    assert attrs["tenant"]["casesensitive"] == "True"
    assert attrs["created_at"]["type"] == "NUMERIC" and attrs["expires_at"]["type"] == "NUMERIC"
    assert info["meta"]["model"] == "m" and info["meta"]["dim"] == "384"


def test_dimension_mismatch_is_reported_with_the_migrate_command(redis_client, settings):
    ensure_index(redis_client, IndexSpec(settings=settings, dim=64, model_name="m"))
    with pytest.raises(IndexMismatch) as info:
        ensure_index(redis_client, IndexSpec(settings=settings, dim=384, model_name="m"))
    assert "dimension is 64" in str(info.value) and "semcache index migrate" in str(info.value)


def test_missing_field_and_model_change_are_reported(redis_client, make_settings):
    settings = make_settings()
    ensure_index(redis_client, IndexSpec(settings=settings, dim=64, model_name="m1"))
    with pytest.raises(IndexMismatch, match="entries were embedded with model 'm1'"):
        verify_index(redis_client, IndexSpec(settings=settings, dim=64, model_name="m2"))
    wider = make_settings(index=settings.index, extra_scope_fields="region")
    with pytest.raises(IndexMismatch, match="attribute 'region'"):
        ensure_index(redis_client, IndexSpec(settings=wider, dim=64, model_name="m1"))


def test_migrate_swaps_the_alias_and_keeps_entries(redis_client, make_settings):
    settings = make_settings()
    old_embedder = HashingEmbedder(dim=64, name="old")
    ensure_index(redis_client, IndexSpec(settings=settings, dim=64, model_name="old"))
    for i in range(5):
        write_command(redis_client, settings, old_embedder,
                      WriteCommand(prompt=f"question {i}", response="a", scope=Scope(tenant="t")))
    new_embedder = HashingEmbedder(dim=32, name="new")
    spec = IndexSpec(settings=settings, dim=32, model_name="new")
    out = migrate(redis_client, spec, reembed=lambda texts: new_embedder.embed(texts).tolist())
    assert out["old"].endswith("-v1") and out["new"].endswith("-v2") and out["reembedded"] == 5
    verify_index(redis_client, spec)
    info = index_info(redis_client, settings)
    assert info["index"] == out["new"] and info["num_docs"] == 5
    # the re-embedded documents answer a KNN in the new dimension through the alias
    dtype = np.float16 if settings.vector_type == "FLOAT16" else np.float32  # the index's own vector type
    vec = new_embedder.embed(["question 3"])[0].astype(dtype).tobytes()
    reply = redis_client.execute_command(
        "FT.SEARCH", alias_name(settings), "*=>[KNN 1 @embedding $v AS d]", "PARAMS", "2", "v", vec,
        "RETURN", "1", "$.prompt", "DIALECT", "2")
    assert reply[b"results"][0][b"extra_attributes"][b"$.prompt"] == b"question 3"
