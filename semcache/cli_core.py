"""Core commands: ``semcache redis``, ``semcache lookup``, ``semcache index info|create|migrate``, ``semcache config``."""

from __future__ import annotations

import json
import signal
import threading

import click

from cache_core.connection import open_redis
from cache_core.embedded import EmbeddedRedis, redacted
from cache_core.index import IndexSpec, ensure_index, index_info, migrate
from cache_core.settings import Settings


def register(cli: click.Group) -> None:
    cli.add_command(redis_cmd)
    cli.add_command(lookup_cmd)
    cli.add_command(index_group)
    cli.add_command(config_cmd)


@click.command("redis")
@click.option("--port", type=int, default=None, help="Port (default SEMCACHE_EMBEDDED_PORT, 0 = a free one).")
def redis_cmd(port: int | None) -> None:
    """Run the embedded Redis (Search + JSON) in the foreground and print its URL; Ctrl-C stops it."""
    from .cli import load_settings

    settings = load_settings(embedded_port=port)
    server = EmbeddedRedis(settings.data_dir, port=settings.embedded_port, appendonly=settings.embedded_appendonly,
                           maxmemory=settings.embedded_maxmemory, maxmemory_policy=settings.embedded_maxmemory_policy)
    url = redacted(server.start())  # never the password on a terminal (issue 15): it is in a 0600 file
    if not server.owned:
        click.echo(f"an embedded redis for {settings.data_dir} is already running: {url}")
        return
    click.echo(url)
    click.echo(f"data dir: {settings.data_dir}   (semcache commands with this SEMCACHE_DATA_DIR use it; the password "
               f"is in {server.password_file}; Ctrl-C stops it)", err=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(0.5):
        if server.process.poll() is not None:
            raise click.ClickException(f"redis-server exited with code {server.process.returncode}; "
                                       f"see {settings.data_dir / 'redis.log'}")
    server.stop()


@click.command("lookup")
@click.argument("prompt")
@click.option("--tenant", required=True)
@click.option("--locale", default="und", show_default=True)
@click.option("--model", "model_version", default="default", show_default=True, help="Model version scope tag.")
@click.option("--extra", multiple=True, metavar="FIELD=VALUE", help="Extra scope field (repeatable).")
@click.option("--min-similarity", type=float, default=None, help="Cosine similarity in [-1, 1] for this lookup.")
@click.option("--json", "as_json", is_flag=True, help="Print the LookupResult as JSON.")
def lookup_cmd(prompt: str, tenant: str, locale: str, model_version: str, extra: tuple[str, ...],
               min_similarity: float | None, as_json: bool) -> None:
    """Look PROMPT up in the cache within one scope."""
    from cache_core.cache import SemanticCache

    from .cli import load_settings

    extras = dict(item.split("=", 1) for item in extra if "=" in item)
    with SemanticCache.open(load_settings(), stats=False) as cache:
        result = cache.lookup(prompt, {"tenant": tenant, "locale": locale, "model": model_version, "extra": extras},
                              min_similarity=min_similarity)
    if as_json:
        click.echo(result.model_dump_json(indent=2))
        return
    sim = f"{result.similarity:.4f}" if result.similarity is not None else "-"
    if result.hit:
        click.echo(f"HIT ({result.strategy}, similarity {sim} >= {result.threshold})  entry {result.entry.id}")
        click.echo(result.entry.response)
    else:
        why = f"  [{result.degraded}]" if result.degraded else ""
        click.echo(f"MISS (nearest similarity {sim}, threshold {result.threshold}){why}")
    click.echo(f"embed {result.embed_ms:.2f} ms, search {result.search_ms:.2f} ms, total {result.total_ms:.2f} ms",
               err=True)


@click.group("index")
def index_group() -> None:
    """Inspect, create or migrate the vector index."""


def _spec(settings: Settings, model: str | None = None) -> tuple[IndexSpec, object]:
    from cache_core.embedder import load_embedder

    embedder = load_embedder(model if model is not None else settings.model, backend=settings.embedding_backend,
                             precision=settings.embedding_precision)
    return IndexSpec(settings=settings, dim=embedder.dim, model_name=embedder.name), embedder


@index_group.command("info")
def index_info_cmd() -> None:
    """Print the live index: documents, failures, memory, attributes, metadata (JSON)."""
    from .cli import load_settings

    settings = load_settings()
    with open_redis(settings) as handle:
        click.echo(json.dumps(index_info(handle.writer(), settings), indent=2))


@index_group.command("create")
def index_create_cmd() -> None:
    """Create the index if missing, or verify the live one against this configuration."""
    from .cli import load_settings

    settings = load_settings()
    spec, _ = _spec(settings)
    with open_redis(settings) as handle:
        name = ensure_index(handle.writer(), spec)
    click.echo(f"index {name} is ready (dim {spec.dim}, model {spec.model_name})")


@index_group.command("migrate")
@click.option("--reembed", is_flag=True, help="Re-embed every entry with the configured model (model change).")
def index_migrate_cmd(reembed: bool) -> None:
    """Build a matching index beside the live one, then swap the alias (no downtime)."""
    from tqdm import tqdm

    from .cli import load_settings

    settings = load_settings()
    spec, embedder = _spec(settings)
    with open_redis(settings) as handle:
        bar = tqdm(total=0, unit="entries", disable=not reembed)

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        out = migrate(handle.writer(), spec, reembed=(lambda texts: embedder.embed(texts).tolist()) if reembed
                      else None, progress=progress)
        bar.close()
    click.echo(json.dumps(out))


@click.command("config")
@click.option("--markdown", is_flag=True, help="Print the table of SEMCACHE_* variables (for the README).")
def config_cmd(markdown: bool) -> None:
    """Print the effective settings (secrets hidden), or the table of every SEMCACHE_* variable."""
    from .cli import load_settings

    if markdown:
        click.echo(settings_table())
        return
    values = load_settings().model_dump(mode="json")
    for secret in ("secret_key", "admin_password_hash", "admin_token", "upstream_api_key"):
        if values.get(secret):
            values[secret] = "***"
    click.echo(json.dumps(values, indent=2))


def settings_table() -> str:
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = field.default if field.default_factory is None else ("(per user)" if name == "data_dir" else "")
        default = "unset" if default is None else str(default)
        rows.append(f"| `SEMCACHE_{name.upper()}` | `{default}` | {field.description or ''} |")
    return "\n".join(rows)
