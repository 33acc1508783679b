"""The one Redis Search index over the entry documents, derived from :class:`~cache_core.schema.Fields`.

The physical index is versioned (``<index>-idx-v1``, ``-v2``, ...) and reached through the alias ``<index>-idx``,
so :func:`migrate` can build a new version beside the old one and swap the alias without downtime.
The index's metadata (model, dimension, schema version) is kept in the hash ``<index>:meta``: a read path whose
embedder differs from the one the entries were written with is refused, because its vectors would be meaningless.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import redis

from .connection import module_version, text
from .errors import BackendUnavailable, ConfigError, IndexMismatch
from .schema import SCHEMA_VERSION, Fields, quantize_embedding
from .settings import Settings
from .store import embedding_set_args

__all__ = ["IndexSpec", "ensure_index", "index_info", "migrate", "alias_name", "drop_index", "check_json_fpha"]

log = logging.getLogger(__name__)


def alias_name(settings: Settings) -> str:
    return f"{settings.index}-idx"


@dataclass(frozen=True)
class IndexSpec:
    """What the index must look like for these settings and this embedding model."""

    settings: Settings
    dim: int
    model_name: str

    def attributes(self) -> list[tuple[str, str, str, tuple[str, ...]]]:
        """(json path, attribute, type, options) for every indexed field."""
        s = self.settings
        out = [
            (
                f"$.{Fields.EMBEDDING}", Fields.EMBEDDING, "VECTOR",
                ("HNSW", "12", "TYPE", s.vector_type, "DIM", str(self.dim), "DISTANCE_METRIC", "COSINE",
                 "M", str(s.hnsw_m), "EF_CONSTRUCTION", str(s.hnsw_ef_construction),
                 "EF_RUNTIME", str(s.hnsw_ef_runtime)),
            ),
        ]  # fmt: skip
        for name in (*Fields.CORE_SCOPE, *s.extra_scope_fields):
            out.append((f"$.{Fields.TAGS}.{name}", name, "TAG", ("CASESENSITIVE",)))
        out += [
            (f"$.{Fields.STATUS}", Fields.STATUS, "TAG", ()),
            (f"$.{Fields.FLAGS}[*]", Fields.FLAGS, "TAG", ()),
            (f"$.{Fields.GROUP}", Fields.GROUP, "TAG", ("CASESENSITIVE",)),
            (f"$.{Fields.PROMPT_HASH}", Fields.PROMPT_HASH, "TAG", ("CASESENSITIVE",)),
            (f"$.{Fields.CREATED_AT}", Fields.CREATED_AT, "NUMERIC", ("SORTABLE",)),
            (f"$.{Fields.EXPIRES_AT}", Fields.EXPIRES_AT, "NUMERIC", ("SORTABLE",)),
            (f"$.{Fields.PROMPT}", Fields.PROMPT, "TEXT", ()),
        ]
        return out

    def create_args(self, name: str) -> list[str]:
        args = ["FT.CREATE", name, "ON", "JSON", "PREFIX", "1", self.settings.key_prefix, "SCHEMA"]
        for path, attribute, kind, options in self.attributes():
            args += [path, "AS", attribute, kind, *options]
        return args

    def meta(self) -> dict[str, str]:
        return {
            "schema_version": str(SCHEMA_VERSION),
            "model": self.model_name,
            "dim": str(self.dim),
            "vector_type": self.settings.vector_type,
            "extra_scope_fields": ",".join(self.settings.extra_scope_fields),
        }


def _meta_key(settings: Settings) -> str:
    return settings.key("meta")


def _physical_name(client: redis.Redis, settings: Settings) -> str | None:
    try:
        info = client.execute_command("FT.INFO", alias_name(settings))
    except redis.ResponseError as exc:
        if "no such index" in str(exc).lower() or "unknown index" in str(exc).lower():
            return None
        raise
    return text(_get(info, "index_name"))


def _get(mapping: Any, key: str) -> Any:
    if isinstance(mapping, dict):
        return mapping.get(key.encode(), mapping.get(key))
    items = list(mapping)  # RESP2 flat list
    for i in range(0, len(items) - 1, 2):
        if text(items[i]) == key:
            return items[i + 1]
    return None


def _live_attributes(info: Any) -> dict[str, dict[str, str]]:
    out = {}
    for attr in _get(info, "attributes") or []:
        fields = {text(k).lower(): v for k, v in attr.items()} if isinstance(attr, dict) else {
            text(attr[i]).lower(): attr[i + 1] for i in range(0, len(attr) - 1, 2)
        }  # fmt: skip
        flags = [text(f).upper() for f in fields.get("flags") or []]
        out[text(fields["attribute"])] = {
            "identifier": text(fields["identifier"]),
            "type": text(fields["type"]).upper(),
            "dim": text(fields.get("dim", "")),
            "data_type": text(fields.get("data_type", "")).upper(),
            "distance_metric": text(fields.get("distance_metric", "")).upper(),
            "casesensitive": str("CASESENSITIVE" in flags),
        }
    return out


def differences(spec: IndexSpec, info: Any) -> list[str]:
    """How a live index differs from the spec, one human sentence per difference."""
    live = _live_attributes(info)
    problems = []
    for path, attribute, kind, options in spec.attributes():
        got = live.get(attribute)
        if got is None:
            problems.append(f"attribute {attribute!r} ({path}) is missing")
            continue
        if got["identifier"] != path or got["type"] != kind:
            problems.append(f"attribute {attribute!r} is {got['type']} on {got['identifier']}, expected {kind} on {path}")
        if kind == "VECTOR":
            if got["dim"] != str(spec.dim):
                problems.append(f"vector dimension is {got['dim']}, the model gives {spec.dim}")
            if got["data_type"] != spec.settings.vector_type:
                problems.append(f"vector type is {got['data_type']}, settings ask {spec.settings.vector_type}")
            if got["distance_metric"] != "COSINE":
                problems.append(f"distance metric is {got['distance_metric']}, expected COSINE")
        if kind == "TAG" and "CASESENSITIVE" in options and got["casesensitive"] != "True":
            problems.append(f"tag {attribute!r} is not CASESENSITIVE")
    # Issue 15: a scope tag the live index has and the settings no longer declare. The read path would stop
    # filtering on it, so entries written with different values of it (region=eu, region=us) would answer each
    # other's callers: the boundary would disappear without a word.
    expected = {attribute for _, attribute, _, _ in spec.attributes()}
    for attribute, got in sorted(live.items()):
        if attribute not in expected and got["identifier"].startswith(f"$.{Fields.TAGS}."):
            problems.append(f"extra scope field {attribute!r} is in the live index but not in "
                            f"SEMCACHE_EXTRA_SCOPE_FIELDS: entries written with it would match callers of any "
                            f"{attribute}")
    return problems


def ensure_index(client: redis.Redis, spec: IndexSpec) -> str:
    """Create the index if it is missing; verify it if it exists. Returns the physical index name.

    Raises :class:`IndexMismatch` (with the command that migrates) when the live index or its metadata differs.
    Never drops or rebuilds anything by itself.
    """
    settings = spec.settings
    if settings.json_fpha != "off":
        check_json_fpha(client, settings)
    try:
        name = _physical_name(client, settings)
        if name is None:
            name = f"{alias_name(settings)}-v1"
            try:
                client.execute_command(*spec.create_args(name))
                client.execute_command("FT.ALIASADD", alias_name(settings), name)
                client.hset(_meta_key(settings), mapping={**spec.meta(), "physical": name, "created": str(time.time())})
                log.info("created index %s (alias %s, dim %d)", name, alias_name(settings), spec.dim)
            except redis.ResponseError as exc:
                if "already exists" not in str(exc).lower():
                    raise
                name = _physical_name(client, settings) or name  # another process won the race
            return name
        verify_index(client, spec, name)
        return name
    except redis.RedisError as exc:
        if isinstance(exc, redis.ResponseError):
            raise IndexMismatch(f"cannot create or read index {alias_name(settings)}: {exc}") from exc
        raise BackendUnavailable(f"Redis failed while checking the index: {exc}") from exc


def check_json_fpha(client: redis.Redis, settings: Settings) -> None:
    """Refuse ``SEMCACHE_JSON_FPHA`` (raise :class:`ConfigError`) unless the server accepts ``JSON.SET ... FPHA``.

    The check is what the writers will do: a ``JSON.SET`` of a one-element float array with the option, on a
    scratch key that is deleted at once. (A version number would not do: Redis 8's built-in JSON module and the
    separate RedisJSON 2.x number their versions differently, and managed services may hide them.)
    """
    probe = settings.key("fpha-probe")
    try:
        client.execute_command("JSON.SET", probe, "$", "[0.5]", "FPHA", settings.json_fpha)
    except redis.ResponseError as exc:
        version = module_version(client, "ReJSON") or "unknown"  # managed services may refuse MODULE LIST
        raise ConfigError(
            f"SEMCACHE_JSON_FPHA={settings.json_fpha} needs a Redis whose JSON module accepts JSON.SET ... FPHA "
            f"(Redis 8.8 or later); this server's JSON module is version {version} and "
            f"answered: {exc}",
            hint="unset SEMCACHE_JSON_FPHA (SEMCACHE_EMBEDDING_STORAGE=int8 is the compact storage that works on "
            "every server), or upgrade to redis:8.8",
        ) from exc
    except redis.RedisError as exc:
        raise BackendUnavailable(f"Redis failed while checking JSON.SET ... FPHA: {exc}") from exc
    finally:
        try:
            client.delete(probe)
        except redis.RedisError:
            pass


def verify_index(client: redis.Redis, spec: IndexSpec, name: str | None = None) -> None:
    settings = spec.settings
    name = name or _physical_name(client, settings)
    if name is None:
        raise IndexMismatch(f"index {alias_name(settings)} does not exist", hint="run `semcache index create`")
    problems = differences(spec, client.execute_command("FT.INFO", name))
    meta = {text(k): text(v) for k, v in client.hgetall(_meta_key(settings)).items()}
    # The model name carries the embedding precision (``all-MiniLM-L6-v2+int8``): int8 and fp32 vectors of one
    # model are other vectors, and mixing them in one index would blur every similarity.
    model_changed = bool(meta.get("model")) and meta["model"] != spec.model_name
    if model_changed:
        problems.append(f"entries were embedded with model {meta['model']!r}, this process uses {spec.model_name!r}")
    if meta.get("schema_version") and meta["schema_version"] != str(SCHEMA_VERSION):
        problems.append(f"documents have schema version {meta['schema_version']}, this code expects {SCHEMA_VERSION}")
    if problems:
        hint = ("run `semcache index migrate --reembed` to re-embed every entry with this model into a new index "
                "and swap the alias (or go back to the settings the index was built with)" if model_changed else
                "run `semcache index migrate` to build a matching index beside it and swap the alias "
                "(add --reembed when the model changed)")
        if any(p.startswith("extra scope field") for p in problems):
            hint = ("declare the field again in SEMCACHE_EXTRA_SCOPE_FIELDS, or, to drop that boundary on purpose "
                    "(entries of every value of it then answer each other's callers), " + hint)
        raise IndexMismatch(
            f"index {name} (alias {alias_name(settings)}) does not match this configuration: " + "; ".join(problems),
            hint=hint,
        )


def index_info(client: redis.Redis, settings: Settings) -> dict[str, Any]:
    """A plain summary of the live index: name, alias, documents, failures, memory, metadata."""
    name = _physical_name(client, settings)
    if name is None:
        return {"alias": alias_name(settings), "exists": False}
    info = client.execute_command("FT.INFO", name)
    errors = _get(info, "Index Errors") or {}
    meta = {text(k): text(v) for k, v in client.hgetall(_meta_key(settings)).items()}
    return {
        "alias": alias_name(settings),
        "exists": True,
        "index": name,
        "prefix": settings.key_prefix,
        "num_docs": int(_get(info, "num_docs") or 0),
        "indexing_failures": int(_get(errors, "indexing failures") or 0),
        "vector_index_mb": float(_get(info, "vector_index_sz_mb") or 0.0),
        "total_index_mb": float(_get(info, "total_index_memory_sz_mb") or 0.0),
        "percent_indexed": float(_get(info, "percent_indexed") or 0.0),
        "attributes": _live_attributes(info),
        "meta": meta,
    }


def drop_index(client: redis.Redis, settings: Settings, *, delete_documents: bool = False) -> bool:
    """Drop the index behind the alias (with its documents when ``delete_documents``); False when there was none."""
    name = _physical_name(client, settings)
    if name is None:
        return False
    args = ["FT.DROPINDEX", name] + (["DD"] if delete_documents else [])
    client.execute_command(*args)
    try:
        client.execute_command("FT.ALIASDEL", alias_name(settings))
    except redis.ResponseError:
        pass
    client.delete(_meta_key(settings))
    return True


def migrate(
    client: redis.Redis,
    spec: IndexSpec,
    *,
    reembed: Callable[[list[str]], list[list[float]]] | None = None,
    batch: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Build the index the spec describes beside the live one, then point the alias at it and drop the old one.

    With ``reembed`` (the new model's batch embedder), every document's ``$.embedding`` is rewritten first, so the
    documents move from the old index to the new one; without it the documents are kept as they are.
    Lookups keep being answered by the old index until the alias moves.
    """
    settings = spec.settings
    old = _physical_name(client, settings)
    version = 1
    if old and old.rsplit("-v", 1)[-1].isdigit():
        version = int(old.rsplit("-v", 1)[-1]) + 1
    new = f"{alias_name(settings)}-v{version}"
    client.execute_command(*spec.create_args(new))
    rewritten = 0
    if reembed is not None:
        keys = [text(k) for k in client.scan_iter(match=f"{settings.key_prefix}*", count=1000)]
        for start in range(0, len(keys), batch):
            chunk = keys[start : start + batch]
            raw = client.execute_command("JSON.MGET", *chunk, f"$.{Fields.PROMPT}")
            prompts = [json.loads(r) if isinstance(r, (str, bytes)) else r for r in raw]
            live = [(k, p[0]) for k, p in zip(chunk, prompts) if p]
            vectors = reembed([p for _, p in live]) if live else []
            pipe = client.pipeline(transaction=False)
            for (key, _), vector in zip(live, vectors):
                # stored as SEMCACHE_EMBEDDING_STORAGE says, like every other writer (a migration converts old
                # float documents to the configured storage)
                stored = quantize_embedding(vector, settings.embedding_storage)
                pipe.execute_command(*embedding_set_args(key, stored, settings, "XX"))
            pipe.execute()
            rewritten += len(live)
            if progress:
                progress(min(start + batch, len(keys)), len(keys))
    if old:
        client.execute_command("FT.ALIASUPDATE", alias_name(settings), new)
        client.execute_command("FT.DROPINDEX", old)
    else:
        client.execute_command("FT.ALIASADD", alias_name(settings), new)
    client.hset(_meta_key(settings), mapping={**spec.meta(), "physical": new, "migrated": str(time.time())})
    return {"old": old, "new": new, "reembedded": rewritten}

