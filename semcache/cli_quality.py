"""Quality commands: ``semcache eval`` (hit rate against wrong hits on labeled data, policy against the baseline)
and ``semcache calibrate`` (fit the match policy for a target wrong rate and store it per scope)."""

from __future__ import annotations

import json
from pathlib import Path

import click


def register(cli: click.Group) -> None:
    cli.add_command(eval_cmd)
    cli.add_command(calibrate_cmd)


def _floats(value: str | None, name: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError as exc:
        raise click.BadParameter(f"comma-separated numbers expected, got {value!r}", param_hint=name) from exc
    if not out or any(not -1.0 <= v <= 1.0 for v in out):
        raise click.BadParameter("cosine similarities in [-1, 1] expected", param_hint=name)
    return tuple(sorted(set(out)))


def _splits(value: str | None) -> list[str] | None:
    return [s.strip() for s in value.split(",") if s.strip()] if value else None


_PROTOCOL = click.Choice(["stream", "pairs"])


@click.command("eval")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Labeled CSV: text,intent[,split] (stream) or q1,q2,is_duplicate[,split] (pairs). "
              "Default: the shipped CLINC150.")
@click.option("--protocol", type=_PROTOCOL, default=None, help="Default: read from the CSV header.")
@click.option("--seed", type=int, default=42, show_default=True, help="Shuffle seed.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N rows after shuffling.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Draw both curves (hit rate against wrong rate) into this PNG.")
@click.option("--policy", type=click.Choice(["threshold", "consensus"]), default=None,
              help="Policy to measure against the baseline (default: SEMCACHE_POLICY).")
@click.option("--knobs", default=None, help="Comma-separated min_similarity values of the policy's curve.")
@click.option("--baseline-knobs", default=None,
              help="Comma-separated thresholds of the baseline curve (default 0.70 to 0.99).")
@click.option("--split", "split", default=None, help="Keep only rows of these splits (comma-separated).")
@click.option("--workers", type=click.IntRange(1, 32), default=2, show_default=True,
              help="Lanes run in parallel (stream protocol), each with its own private Redis.")
@click.option("--feedback-rate", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
              help="Simulate feedback: this share of hits is rated right or wrong from the labels (stream).")
@click.option("--oos-label", default="oos", show_default=True, help="Intent of out-of-scope rows (stream).")
@click.option("--redis-url", default=None, help="Run on this Redis (unique index names) instead of private ones.")
@click.option("--latency", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also time N lookups before (threshold, k=5) and after (configured policy) on one index.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the JSON report to this file.")
@click.option("--answers", type=click.Choice(["response", "label"]), default=None,
              help="Stream protocol: what a miss stores, the row's free-text response (chat traffic; needs a "
              "response column, the default when there is one) or its intent label (short answers).")
@click.option("--judge", "judge", default="off", show_default=True,
              help="The write path's judge forming answer groups: off, llm, cross-encoder, embedding (configured "
              "by SEMCACHE_JUDGE_*), or simulated:FA,FR (from the labels: wrongly accepts FA of different-intent "
              "pairs, wrongly rejects FR of same-intent ones; a sensitivity analysis).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def eval_cmd(data: Path | None, protocol: str | None, seed: int, limit: int | None, as_json: bool, plot: Path | None,
             policy: str | None, knobs: str | None, baseline_knobs: str | None, split: str | None, workers: int,
             feedback_rate: float, oos_label: str, redis_url: str | None, latency: int, output: Path | None,
             answers: str | None, judge: str, quiet: bool) -> None:
    """Measure hits and wrong hits on labeled data: the policy's curve against the single-threshold baseline.

    Runs through the real stack (a private embedded Redis, the real index and read path, the configured
    embedder). Stream protocol: rows shuffled with --seed, each looked up in one scope, a miss stores the row
    with its response (--answers response) or its intent (--answers label) as the answer, after the write path's
    judge (--judge) may have put it into a neighbour's answer group; a hit is wrong if the served entry's intent
    differs or the row is out of scope.
    """
    from cache_core.evaluation import DEFAULT_KNOBS, bundled_dataset, evaluate, fmt_table
    from cache_core.evaluation import plot as draw

    from .cli import load_settings

    settings = load_settings(policy=policy)
    report = evaluate(
        settings, data or bundled_dataset(), protocol=protocol, seed=seed, limit=limit,
        knobs=_floats(knobs, "--knobs") or DEFAULT_KNOBS,
        baseline_knobs=_floats(baseline_knobs, "--baseline-knobs") or DEFAULT_KNOBS, splits=_splits(split),
        workers=workers, feedback_rate=feedback_rate, oos_label=oos_label, redis_url=redis_url, progress=not quiet,
        latency=latency, answers=answers, judge=judge,
    )  # fmt: skip
    payload = report.model_dump(mode="json")
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(payload, indent=1) + "\n")
    if plot:
        draw(report, plot)
    if as_json:
        click.echo(json.dumps(payload))
    else:
        click.echo(fmt_table(report))
        if plot:
            click.echo(f"plot: {plot}")


@click.command("calibrate")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Labeled CSV of your traffic: text,intent[,split] or q1,q2,is_duplicate[,split].")
@click.option("--target-wrong-rate", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=0.01,
              show_default=True, help="Wrong hits / hits to stay within (0.01 = 1%).")
@click.option("--tenant", "tenants", multiple=True, help="Store for this tenant (repeatable). Default: every scope.")
@click.option("--protocol", type=_PROTOCOL, default=None, help="Default: read from the CSV header.")
@click.option("--policy", type=click.Choice(["threshold", "consensus"]), default=None,
              help="Policy to calibrate (default: SEMCACHE_POLICY); stored with the record.")
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N rows after shuffling.")
@click.option("--split", "split", default=None, help="Keep only rows of these splits (comma-separated).")
@click.option("--workers", type=click.IntRange(1, 32), default=2, show_default=True)
@click.option("--oos-label", default="oos", show_default=True, help="Intent of out-of-scope rows (stream).")
@click.option("--dry-run", is_flag=True, help="Fit and print, store nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def calibrate_cmd(data: Path, target_wrong_rate: float, tenants: tuple[str, ...], protocol: str | None,
                  policy: str | None, seed: int, limit: int | None, split: str | None, workers: int, oos_label: str,
                  dry_run: bool, as_json: bool, quiet: bool) -> None:
    """Fit the match policy on labeled data for a target wrong rate and store it for the scope(s).

    The read path uses a stored calibration on its next lookup (tenant records override the global one).
    """
    from cache_core.calibration import fit, store_calibration
    from cache_core.connection import open_redis

    from .cli import load_settings

    settings = load_settings(policy=policy)
    for tenant in tenants:
        if not tenant or len(tenant) > settings.max_scope_value_chars:
            raise click.BadParameter(f"1 to {settings.max_scope_value_chars} characters", param_hint="--tenant")
    result = fit(settings, data, target_wrong_rate, protocol=protocol, seed=seed, limit=limit,
                 splits=_splits(split), workers=workers, progress=not quiet, oos_label=oos_label)
    if not dry_run:
        with open_redis(settings) as handle:
            result.stored_fields = store_calibration(handle.writer(), settings, result.record, list(tenants) or None)
    if as_json:
        click.echo(result.model_dump_json())
        return
    p = result.point
    where = ", ".join(f"tenant {t!r}" for t in tenants) or "every scope"
    click.echo(f"{result.policy}: min_similarity {p.knob} -> {100 * p.hit_rate:.1f}% hits, "
               f"{100 * p.wrong_rate:.2f}% wrong on {result.rows:,} rows of {data}")
    if not result.met:
        click.echo(f"warning: no knob reached {100 * target_wrong_rate:g}% wrong; using the strictest tried", err=True)
    click.echo("not stored (--dry-run)" if dry_run else f"stored for {where} in {settings.key('calibration')}")
