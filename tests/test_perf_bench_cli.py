"""The benchmark's contract, without running it: the command and its flags exist, the workload is seeded, has its
30% exact repeats, and the semantic-only list shares no prompt with the mixed one; the table and ratios read the
result the way ``--json`` prints it."""

from __future__ import annotations

from click.testing import CliRunner

from benchmarks.compare import goals, ratios
from benchmarks.report import comparison_table
from benchmarks.workload import make_workload, synthetic_prompts
from semcache.cli import cli


def test_bench_command_and_flags_are_registered():
    result = CliRunner().invoke(cli, ["bench", "--help"])
    assert result.exit_code == 0, result.output
    for flag in ("--against", "--entries", "--lookups", "--threads", "--json", "--plot", "--scaling",
                 "--memory-options"):
        assert flag in result.output


def test_bench_rejects_bad_sizes():
    result = CliRunner().invoke(cli, ["bench", "--scaling", "--sizes", "ten"])
    assert result.exit_code != 0 and "sizes" in result.output


def test_workload_is_seeded_with_exact_repeats_and_disjoint_semantic_lookups():
    a = make_workload(entries=500, lookups=400, seed=3)
    b = make_workload(entries=500, lookups=400, seed=3)
    assert (a.stores, a.lookups, a.semantic_lookups) == (b.stores, b.lookups, b.semantic_lookups)
    assert make_workload(entries=500, lookups=400, seed=4).lookups != a.lookups
    assert sum(a.repeats) == 120 and not a.repeats[0]
    for i, repeated in enumerate(a.repeats):
        if repeated:
            assert a.lookups[i] in a.lookups[:i]  # a repeat repeats an earlier lookup, exactly
    assert not set(a.semantic_lookups) & set(a.lookups)
    assert len(set(p for p, _ in a.stores)) == 500


def test_synthetic_prompts_are_deterministic_by_position():
    assert synthetic_prompts(5, seed=1, start=10) == synthetic_prompts(15, seed=1)[10:]
    assert len(set(synthetic_prompts(1000))) == 1000


def test_ratios_goals_and_table_read_the_json_shape():
    s = {"lookup_p50_ms": 3.0, "lookup_p95_ms": 6.0, "lookups_per_s": 300.0, "lookups_per_s_threads": 500.0,
         "semantic_p50_ms": 4.0, "semantic_p95_ms": 7.0, "store_per_s": 500.0, "bytes_per_entry": 12000.0,
         "threads": 4, "store_mode": "worker"}
    v = {"lookup_p50_ms": 9.0, "lookup_p95_ms": 10.0, "lookups_per_s": 100.0, "lookups_per_s_threads": 120.0,
         "semantic_p50_ms": 9.0, "semantic_p95_ms": 10.0, "store_per_s": 46.0, "bytes_per_entry": 5000.0}
    r = ratios(s, v)
    assert r["lookup_p50_ms"] == 0.333 and r["store_per_s"] == round(500 / 46, 3)
    g = goals(s, v)
    assert g["lookup_p50"]["met"] and g["store_per_s"]["met"] and not g["bytes_per_entry"]["met"]
    table = comparison_table({"semcache": s, "redisvl": v, "ratios": r, "goals": g}, markdown=True)
    assert "| lookup p50 (ms), mixed | 3.00 | 9.00 | 0.33x | <= 0.5x met |" in table
    assert "NOT met" in table


def test_store_only_entry_point_accepts_only_known_phases(capsys):
    """``python -m benchmarks.compare --phases store`` (the quick side-by-side store run) refuses a phase list it
    cannot run, before starting anything."""
    import pytest

    from benchmarks.compare import BenchOptions, main

    assert BenchOptions().phases == ("store", "lookups") and BenchOptions().store_blocks >= 2
    for bad in ("lookups", "store,writes", ""):
        with pytest.raises(SystemExit) as exc:
            main(["--phases", bad])
        assert exc.value.code == 2
    assert "--phases takes store" in capsys.readouterr().err
