"""``semcache bench``: semcache against RedisVL side by side, the scaling run and the memory options.

The code lives in the ``benchmarks`` package (not part of the test run); this module only parses options.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click


def register(cli: click.Group) -> None:
    cli.add_command(bench_cmd)


def _sizes(value: str) -> list[int]:
    try:
        sizes = sorted({int(x.replace("_", "").replace("k", "000")) for x in value.split(",") if x.strip()})
    except ValueError as exc:
        raise click.BadParameter(f"not a list of sizes: {value!r}") from exc
    if not sizes or sizes[0] < 100:
        raise click.BadParameter("sizes must be at least 100")
    return sizes


@click.command("bench")
@click.option("--against", type=click.Choice(["redisvl"]), default=None,
              help="Compare with RedisVL's SemanticCache in the same run (same Redis, model and workload).")
@click.option("--entries", "-n", type=click.IntRange(10, 15_000), default=2000, show_default=True,
              help="Prompts stored (from CLINC150 train).")
@click.option("--lookups", "-m", type=click.IntRange(10, 3200), default=2000, show_default=True,
              help="Lookups (CLINC150 test + oos_test, 30% exact repeats); as many again semantic-only.")
@click.option("--threads", "-t", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Threads of the concurrent lookup phase.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a PNG of the result here.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the JSON result to this file.")
@click.option("--scaling", is_flag=True, help="Run the scaling run instead: latency, memory and HNSW recall by size.")
@click.option("--sizes", default="10000,100000,300000", show_default=True,
              help="Entries of the scaling run (a size that would not fit in memory stops the run).")
@click.option("--memory-options", "memory_options", is_flag=True,
              help="Measure the memory-per-entry options and their effect on quality instead.")
@click.option("--pairs-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="With --memory-options: a folder of labelled pair sets (qqp/, stsb/, mrpc/) for an out-of-domain "
              "check of the projections.")
@click.option("--store", type=click.Choice(["auto", "worker", "direct"]), default="auto", show_default=True,
              help="How semcache stores: through a real `semcache worker` (auto falls back to direct writes).")
@click.option("--worker-concurrency", type=click.IntRange(1, 16), default=None,
              help="Pool processes of the benchmark's worker (default SEMCACHE_WORKER_CONCURRENCY).")
@click.option("--backend", type=click.Choice(["torch", "onnx"]), default=None,
              help="semcache's embedding backend (default SEMCACHE_EMBEDDING_BACKEND).")
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--markdown", is_flag=True, help="Print the table as Markdown (for docs/performance.md).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def bench_cmd(against: str | None, entries: int, lookups: int, threads: int, as_json: bool, plot_path: Path | None,
              output: Path | None, scaling: bool, sizes: str, memory_options: bool, pairs_dir: Path | None, store: str,
              worker_concurrency: int | None, backend: str | None, seed: int, markdown: bool, quiet: bool) -> None:
    """Benchmark semcache (optionally --against redisvl): latency percentiles, throughput, memory per entry.

    Runs on an embedded Redis started in a temp directory, or on SEMCACHE_REDIS_URL when set (the benchmark
    creates and drops its own indexes there). Results are noisy on a shared machine: compare the ratios of one run.
    """
    from .cli import load_settings

    settings = load_settings()
    redis_url = settings.redis_url or None
    progress = not quiet
    if scaling:
        from benchmarks.report import plot_scaling, scaling_table
        from benchmarks.scaling import ScalingOptions, run_scaling

        def checkpoint(partial: dict) -> None:  # a long run keeps what it measured if it is stopped
            if output:
                output.parent.mkdir(parents=True, exist_ok=True)
                output.write_text(json.dumps(partial, indent=2) + "\n")

        result = run_scaling(ScalingOptions(sizes=_sizes(sizes), seed=seed, backend=backend, redis_url=redis_url,
                                            data_dir=settings.data_dir, overrides=_overrides(settings)),
                             progress=progress, checkpoint=checkpoint)
        table = scaling_table(result, markdown=markdown)
        plot = plot_scaling
    elif memory_options:
        from benchmarks.memory_options import MemoryOptions, quality_table, run_memory_options
        from benchmarks.report import memory_options_table

        result = run_memory_options(MemoryOptions(entries=entries, seed=seed, redis_url=redis_url,
                                                  data_dir=settings.data_dir, backend=backend, pairs_dir=pairs_dir),
                                    progress=progress)
        # memory at the 0.90 knob, then each option's quality curve for both policies (always markdown)
        table = memory_options_table(result, markdown=markdown) + "\n\n" + quality_table(result)
        plot = None
    else:
        from benchmarks.compare import BenchOptions, run_comparison
        from benchmarks.report import comparison_table, plot_comparison

        result = run_comparison(
            BenchOptions(entries=entries, lookups=lookups, threads=threads, against=against, seed=seed,
                         backend=backend, store=store, worker_concurrency=worker_concurrency, redis_url=redis_url,
                         data_dir=settings.data_dir, overrides=_overrides(settings), default_policy=settings.policy),
            progress=progress,
        )  # fmt: skip
        table = comparison_table(result, markdown=markdown)
        plot = plot_comparison
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")
    if plot_path:
        if plot is None:
            raise click.UsageError("--plot is for the comparison and the scaling run")
        plot(result, plot_path)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        click.echo(table, err=True)
    else:
        click.echo(table)
        if plot_path:
            click.echo(f"plot: {plot_path}")


def _overrides(settings) -> dict:
    """Index settings given through SEMCACHE_* variables, so a bench can try HNSW or FLOAT16 options."""
    names = ("vector_type", "hnsw_m", "hnsw_ef_construction", "hnsw_ef_runtime", "embedding_cache_size", "knn_k")
    return {n: getattr(settings, n) for n in names if f"SEMCACHE_{n.upper()}" in os.environ}
