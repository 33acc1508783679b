"""Architecture rules that a reviewer would otherwise have to remember."""

import ast
from pathlib import Path

import pytest

import cache_core

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"cache_core": {"worker", "web", "semcache"}, "worker": {"web", "semcache"}, "web": {"worker", "semcache"}}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependencies_flow_one_way(package):
    offenders = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = imported_packages(path) & FORBIDDEN[package]
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}


def test_public_names_do_not_grow_by_accident():
    assert sorted(cache_core.__all__) == [
        "Answer", "BackendUnavailable", "CacheEntry", "ConfigError", "EmbeddingError", "EntryView", "Generated",
        "IndexMismatch", "InvalidInput", "LookupResult", "NotFound", "NullWriteQueue", "Scope", "SemanticCache",
        "SemcacheError", "Settings", "Status", "SyncWriteQueue", "WriteCommand", "WriteQueue",
    ]
    for name in cache_core.__all__:
        assert hasattr(cache_core, name)
