"""Issue 15, item 6: an extra scope field removed from ``SEMCACHE_EXTRA_SCOPE_FIELDS`` while the live index still
has it is a loud :class:`IndexMismatch` with the migrate command, never a silent loss of the boundary."""

import pytest

from cache_core.cache import SemanticCache
from cache_core.errors import IndexMismatch
from cache_core.index import IndexSpec, ensure_index, migrate, verify_index
from cache_core.schema import Scope, WriteCommand
from cache_core.store import write_command
from cache_core.testing import HashingEmbedder


def test_removing_a_declared_extra_scope_field_is_refused_with_the_migrate_command(redis_client, make_settings):
    embedder = HashingEmbedder(dim=64)
    declared = make_settings(extra_scope_fields="region,plan")
    ensure_index(redis_client, IndexSpec(settings=declared, dim=64, model_name=embedder.name))
    for region in ("eu", "us"):
        write_command(redis_client, declared, embedder, WriteCommand(
            prompt="What is the VAT rate?", response=f"the {region} rate",
            scope=Scope(tenant="acme", extra={"region": region, "plan": "pro"})))
    removed = make_settings(index=declared.index, extra_scope_fields="plan")
    with pytest.raises(IndexMismatch) as info:
        ensure_index(redis_client, IndexSpec(settings=removed, dim=64, model_name=embedder.name))
    message = f"{info.value} {info.value.hint}"
    assert "'region'" in message and "SEMCACHE_EXTRA_SCOPE_FIELDS" in message
    assert "semcache index migrate" in message
    # the read path refuses to open too (it would otherwise serve the eu answer to a us caller)
    with pytest.raises(IndexMismatch, match="'region'"):
        SemanticCache(removed, redis_client, embedder)
    # all of them removed is refused as well; the declared set itself still passes
    with pytest.raises(IndexMismatch, match="'plan'"):
        verify_index(redis_client, IndexSpec(settings=make_settings(index=declared.index), dim=64,
                                             model_name=embedder.name))
    verify_index(redis_client, IndexSpec(settings=declared, dim=64, model_name=embedder.name))
    # the deliberate way out: migrate builds the index without the field; then the check passes
    migrate(redis_client, IndexSpec(settings=removed, dim=64, model_name=embedder.name))
    verify_index(redis_client, IndexSpec(settings=removed, dim=64, model_name=embedder.name))
