"""``semcache``: one command line for the whole system. Each area registers its commands from its own module."""

from __future__ import annotations

import logging
import os
import sys

import click
from pydantic import ValidationError

from cache_core.errors import SemcacheError
from cache_core.settings import Settings


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with command-line overrides; a bad variable is a clear error."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = [f"  SEMCACHE_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors()]
        raise click.ClickException("invalid settings:\n" + "\n".join(lines)) from exc


class _Group(click.Group):
    def invoke(self, ctx: click.Context):  # turn semcache's own errors into one clear line, not a traceback
        try:
            return super().invoke(ctx)
        except SemcacheError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """semcache: a semantic cache for LLM responses on Redis."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _register() -> None:
    from . import cli_core

    cli_core.register(cli)
    for name in ("cli_worker", "cli_web", "cli_quality", "cli_bench", "cli_ops", "cli_loadtest", "cli_demo"):
        try:
            module = __import__(f"semcache.{name}", fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != f"semcache.{name}":
                raise
            continue
        module.register(cli)


_register()


def main() -> None:
    cli(prog_name="semcache")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
