"""``semcache calibrate``: fit the knob on labeled data for a target wrong rate, store it per scope, and the read path
uses it on its next lookup."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cache_core.cache import SemanticCache
from cache_core.calibration import (
    COARSE_KNOBS,
    FINE_PAIR_KNOBS,
    clear_calibration,
    field_for,
    fit,
    read_calibration,
    store_calibration,
)
from cache_core.errors import InvalidInput
from cache_core.schema import tag_token
from semcache.cli import cli
from tests.test_quality_helpers import write_pairs_csv, write_stream_csv


def test_fit_keeps_the_loosest_knob_within_the_target(settings, redis_url, embedder, tmp_path):
    import redis as redislib

    data = write_stream_csv(tmp_path / "s.csv")
    # a private Redis per lane (the default): the test Redis only holds the stored record
    result = fit(settings, data, 0.05, embedder=embedder, progress=False)
    assert result.met and result.protocol == "stream" and result.rows == 37
    assert result.point.wrong_rate <= 0.05
    knobs = [p.knob for p in result.curve]
    assert set(COARSE_KNOBS) <= set(knobs) and len(knobs) > len(COARSE_KNOBS)  # coarse, then finer below
    ok = [p for p in result.curve if p.hits and p.wrong_rate <= 0.05]
    assert result.point.hit_rate == max(p.hit_rate for p in ok)
    record = result.record
    assert record["policy"] == "consensus" and record["min_similarity"] == result.point.knob
    assert record["k"] == settings.knn_k and record["consensus_support"] == settings.consensus_support
    assert record["fitted"]["target_wrong_rate"] == 0.05 and record["fitted"]["data"] == "s.csv"

    client = redislib.Redis.from_url(redis_url)
    try:
        fields = store_calibration(client, settings, record, ["acme", "b} | @tenant:{*"])
        assert fields == [f"t:{tag_token('acme')}", f"t:{tag_token('b} | @tenant:{*')}"]
        assert read_calibration(client, settings, "acme") == record
        assert read_calibration(client, settings) is None
        assert clear_calibration(client, settings, ["acme"]) == 1
        assert read_calibration(client, settings, "acme") is None
    finally:
        client.close()


def test_unreachable_targets_and_bad_arguments(settings, embedder, tmp_path):
    data = write_stream_csv(tmp_path / "s.csv")
    with pytest.raises(InvalidInput):
        fit(settings, data, 0.0, embedder=embedder, progress=False)
    with pytest.raises(InvalidInput):
        fit(settings, data, 1.5, embedder=embedder, progress=False)
    # loose thresholds serve out-of-scope rows: an unreachable target keeps the strictest knob, marked as not met
    loose = settings.model_copy(update={"policy": "threshold"})
    result = fit(loose, data, 1e-9, embedder=embedder, progress=False, coarse=(0.5, 0.55))
    assert not result.met and result.point.knob == 0.55 and result.record["fitted"]["met"] is False
    assert [p.knob for p in result.curve] == [0.5, 0.55]  # no finer sweep without a knob that met the target


def test_fit_on_pairs_uses_one_fine_sweep(settings, redis_url, embedder, tmp_path):
    result = fit(settings, write_pairs_csv(tmp_path / "p.csv"), 0.2, embedder=embedder, progress=False)
    assert result.protocol == "pairs" and [p.knob for p in result.curve] == sorted(FINE_PAIR_KNOBS)
    assert result.point.wrong_rate <= 0.2 and "precision" in result.record["fitted"]


def test_cli_calibrate_stores_per_tenant_and_the_read_path_uses_it(make_settings, redis_url, redis_client, embedder,
                                                                   tmp_path):
    data = write_stream_csv(tmp_path / "s.csv")
    s = make_settings()
    env = {"SEMCACHE_REDIS_URL": redis_url, "SEMCACHE_INDEX": s.index, "SEMCACHE_DATA_DIR": str(tmp_path / "d")}
    runner = CliRunner()
    dry = runner.invoke(cli, ["calibrate", "--data", str(data), "--target-wrong-rate", "0.05", "--dry-run", "-q"],
                        env=env, catch_exceptions=False)
    assert dry.exit_code == 0, dry.output
    assert "not stored (--dry-run)" in dry.output and not redis_client.exists(s.key("calibration"))

    result = runner.invoke(cli, ["calibrate", "--data", str(data), "--target-wrong-rate", "0.05", "--tenant", "acme",
                                 "--json", "-q", "--policy", "threshold"], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["stored_fields"] == [field_for("acme")] and out["policy"] == "threshold"
    stored = json.loads(redis_client.hget(s.key("calibration"), field_for("acme")))
    assert stored["policy"] == "threshold" and stored["min_similarity"] == out["point"]["knob"]

    cache = SemanticCache(s, redis_client, embedder)
    acme = cache.lookup("anything at all", {"tenant": "acme"})
    other = cache.lookup("anything at all", {"tenant": "other"})
    assert acme.threshold == stored["min_similarity"]
    assert other.threshold == s.min_similarity
    # a global record applies to every scope; the tenant's own record still wins
    redis_client.hset(s.key("calibration"), "*", json.dumps({"min_similarity": 0.77}))
    assert cache.lookup("anything at all", {"tenant": "other"}).threshold == 0.77
    assert cache.lookup("anything at all", {"tenant": "acme"}).threshold == stored["min_similarity"]


def test_cli_calibrate_errors(redis_url, tmp_path):
    data = write_stream_csv(tmp_path / "s.csv")
    env = {"SEMCACHE_REDIS_URL": redis_url, "SEMCACHE_DATA_DIR": str(tmp_path / "d")}
    runner = CliRunner()
    missing = runner.invoke(cli, ["calibrate", "--target-wrong-rate", "0.01"], env=env)
    assert missing.exit_code != 0 and "--data" in missing.output
    for rate in ("0", "1", "-0.1", "abc"):
        bad = runner.invoke(cli, ["calibrate", "--data", str(data), "--target-wrong-rate", rate], env=env)
        assert bad.exit_code != 0 and "--target-wrong-rate" in bad.output, rate
    empty = runner.invoke(cli, ["calibrate", "--data", str(data), "--tenant", ""], env=env)
    assert empty.exit_code != 0 and "--tenant" in empty.output
