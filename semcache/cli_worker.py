"""Worker commands: ``semcache worker`` (run the write pipeline), ``semcache worker dead-letters`` and
``semcache worker replay-dead``."""

from __future__ import annotations

import json

import click


def register(cli: click.Group) -> None:
    cli.add_command(worker_group)


@click.group("worker", invoke_without_command=True)
@click.option("-c", "--concurrency", type=click.IntRange(1, 64), default=None,
              help="Worker processes (default SEMCACHE_WORKER_CONCURRENCY).")
@click.option("-l", "--loglevel", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], case_sensitive=False))
@click.option("-n", "--hostname", default=None, help="Celery node name (default celery@<host>).")
@click.pass_context
def worker_group(ctx: click.Context, concurrency: int | None, loglevel: str, hostname: str | None) -> None:
    """Run the writer worker: validate, check and write the cache entries the read path and the API send.

    Uses the project's settings (SEMCACHE_*); starts the embedded Redis when SEMCACHE_REDIS_URL is unset.
    """
    if ctx.invoked_subcommand is not None:
        return
    from worker.app import run_worker

    from .cli import load_settings

    run_worker(load_settings(), concurrency=concurrency, loglevel=loglevel, hostname=hostname)


def _open():
    from cache_core.connection import open_redis

    from .cli import load_settings

    settings = load_settings()
    return settings, open_redis(settings)


@worker_group.command("dead-letters")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the dead letters as JSON lines.")
def dead_letters_cmd(limit: int, as_json: bool) -> None:
    """List dead letters (tasks that failed for good), newest first."""
    from cache_core.deadletters import count_dead_letters, list_dead_letters

    settings, handle = _open()
    with handle:
        client = handle.writer()
        letters = list_dead_letters(client, settings, limit=limit)
        total = count_dead_letters(client, settings)
    for letter in letters:
        if as_json:
            click.echo(letter.model_dump_json())
        else:
            click.echo(f"{letter.id}  {letter.task}  tenant={letter.tenant!r}  retries={letter.retries}  "
                       f"{letter.reason[:120]}")
    if not as_json:
        click.echo(f"{total} dead letter(s)", err=True)


@worker_group.command("replay-dead")
@click.option("--id", "ids", multiple=True, help="Replay only this dead letter (repeatable).")
@click.option("--limit", type=click.IntRange(1, 1_000_000), default=None, help="Replay at most this many.")
def replay_dead_cmd(ids: tuple[str, ...], limit: int | None) -> None:
    """Send dead letters to the worker again (oldest first) and remove them from the list."""
    from cache_core.deadletters import replay_dead_letters
    from worker.app import create_celery

    settings, handle = _open()
    with handle:
        app = create_celery(settings, redis_url=handle.url)

        def send(name: str, kwargs: dict) -> str:
            return app.send_task(name, kwargs=kwargs, kwargsrepr="<replayed dead letter>").id

        replayed = replay_dead_letters(handle.writer(), settings, send, ids=list(ids) or None, limit=limit)
    for item in replayed:
        click.echo(json.dumps(item))
    click.echo(f"replayed {len(replayed)} dead letter(s)", err=True)
