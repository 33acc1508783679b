"""``semcache eval``: both protocols through the real stack (embedded Redis, real index and read path, MiniLM),
checked against an independent brute-force implementation of each protocol; CSV validation; the CLI contract."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cache_core.errors import InvalidInput
from cache_core.evaluation import best_at, embed_rows, evaluate, read_dataset
from cache_core.policy import make_policy
from semcache.cli import cli
from tests.test_quality_helpers import (
    PAIRS,
    read_stream,
    simulate_pairs,
    simulate_stream,
    write_pairs_csv,
    write_stream_csv,
)

KNOBS = (0.55, 0.7, 0.85)


@pytest.fixture
def stream_csv(tmp_path):
    return write_stream_csv(tmp_path / "intents.csv")


@pytest.fixture
def pairs_csv(tmp_path):
    return write_pairs_csv(tmp_path / "pairs.csv")


def test_stream_protocol_matches_a_brute_force_implementation(settings, redis_url, embedder, stream_csv):
    report = evaluate(settings, stream_csv, knobs=KNOBS, baseline_knobs=KNOBS, embedder=embedder,
                      redis_url=redis_url, workers=2, progress=False, cache_vectors=False)
    rows = read_stream(stream_csv)
    vectors = embed_rows(embedder, [t for t, _ in rows], progress=False)
    assert report.protocol == "stream" and report.rows == len(rows) and report.policy == "consensus"
    assert [p.knob for p in report.curve] == list(KNOBS) == [p.knob for p in report.baseline_curve]
    for point in report.curve:
        expected = simulate_stream(rows, vectors, make_policy("consensus", settings), point.knob, settings.knn_k)
        assert (point.hits, point.wrong) == expected, point
    for point in report.baseline_curve:
        expected = simulate_stream(rows, vectors, make_policy("threshold"), point.knob, 1)
        assert (point.hits, point.wrong) == expected, point
    for point in report.curve + report.baseline_curve:
        assert point.queries == len(rows)
        assert point.hit_rate == pytest.approx(point.hits / len(rows))
        assert point.wrong_rate == pytest.approx(point.wrong / point.hits if point.hits else 0.0)
    loose = report.baseline_curve[0]
    assert loose.hits > 0 and loose.wrong > 0  # the oos rows make wrong hits: the measure can see them
    assert set(report.lookup_ms) == {"policy", "baseline"}
    # nothing of the lanes is left behind on the shared server
    import redis as redislib

    client = redislib.Redis.from_url(redis_url)
    assert not [k for k in client.scan_iter(match="eval*", count=1000)]
    client.close()


def test_pairs_protocol_matches_a_brute_force_implementation(settings, redis_url, embedder, pairs_csv):
    report = evaluate(settings, pairs_csv, knobs=KNOBS, baseline_knobs=KNOBS, embedder=embedder,
                      redis_url=redis_url, progress=False, cache_vectors=False)
    vectors = embed_rows(embedder, [t for a, b, _ in PAIRS for t in (a, b)], progress=False)
    assert report.protocol == "pairs" and report.rows == len(PAIRS)
    for curve, policy in ((report.curve, make_policy("consensus", settings)),
                          (report.baseline_curve, make_policy("threshold"))):
        for point in curve:
            hits, correct, positives = simulate_pairs(vectors, policy, point.knob, settings.knn_k)
            assert (point.hits, point.hits - point.wrong) == (hits, correct)
            assert point.recall == pytest.approx(correct / positives)
            assert point.precision == pytest.approx(correct / hits if hits else 1.0)
            assert point.f1 == pytest.approx(2 * point.precision * point.recall / (point.precision + point.recall)
                                             if point.precision + point.recall else 0.0)
    assert "best_f1_policy" in report.summary and "best_f1_baseline" in report.summary
    # the identical pair (q1 == q2) is found by the exact path at any knob
    assert all(p.hits >= 1 for p in report.curve)


def test_best_at_picks_the_most_hits_within_the_target(settings, redis_url, embedder, stream_csv):
    report = evaluate(settings, stream_csv, knobs=(0.5, 0.95), baseline_knobs=None, embedder=embedder,
                      redis_url=redis_url, progress=False, cache_vectors=False)
    assert report.baseline_curve == []
    target = max(p.wrong_rate for p in report.curve)
    assert best_at(report.curve, target).hit_rate == max(p.hit_rate for p in report.curve)
    assert best_at(report.curve, -1.0) is None


BAD_FILES = [
    (b"", "is empty"),
    (b"question,answer\nhi,there\n", "neither text,intent"),
    (b"text,intent,split\n", "no data rows"),
    (b"text,intent,split\nhello,greet,train,extra\n", ":2: 4 fields, the header has 3"),
    (b"text,intent,split\n,greet,train\n", ":2: empty text"),
    (b"text,intent,split\nhello,,train\n", ":2: empty intent"),
    (b"q1,q2,is_duplicate\na,b,maybe\n", ":2: is_duplicate must be 0 or 1"),
    (b"q1,q2,is_duplicate\na,,1\n", ":2: empty q2"),
    (b"text,intent\n\"unclosed,greet\n", "malformed CSV"),
    (b"text,intent\n\xff\xfe,greet\n", "is not UTF-8"),
    (b"text,intent,text\na,b,c\n", "repeats a column"),
    (b"text,intent\na\x00b,greet\n", "NUL"),
]


@pytest.mark.parametrize("content,message", BAD_FILES)
def test_malformed_csvs_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(")):
        read_dataset(path)


def test_protocol_detection_splits_and_mismatch(tmp_path, stream_csv, pairs_csv):
    assert read_dataset(stream_csv).protocol == "stream"
    assert read_dataset(pairs_csv).protocol == "pairs"
    assert len(read_dataset(stream_csv, splits=["train"]).rows) == 5 * 4
    with pytest.raises(InvalidInput, match="--protocol pairs needs a header q1,q2,is_duplicate"):
        read_dataset(stream_csv, "pairs")
    with pytest.raises(InvalidInput, match="no data rows in split"):
        read_dataset(stream_csv, splits=["nope"])
    with pytest.raises(InvalidInput, match="cannot read"):
        read_dataset(tmp_path / "missing.csv")
    # any CSV in the formats works: extra columns, other column order, upper-case header, no split column
    other = tmp_path / "other.csv"
    other.write_text("ID,Intent,Text\n1,a,hello there\n2,b,good bye\n", encoding="utf-8")
    data = read_dataset(other)
    assert data.protocol == "stream" and data.rows[1].text == "good bye" and data.rows[1].intent == "b"
    long = tmp_path / "long.csv"
    long.write_text("text,intent\n" + "x" * 50 + ",a\n", encoding="utf-8")
    with pytest.raises(InvalidInput, match="longer than 10 characters"):
        read_dataset(long, max_chars=10)


# --- the command line --------------------------------------------------------------------------------------------
def _env(redis_url, tmp_path, **extra):
    return {"SEMCACHE_REDIS_URL": redis_url, "SEMCACHE_DATA_DIR": str(tmp_path / "data"), **extra}


def test_cli_eval_json_and_plot(redis_url, tmp_path, stream_csv):
    out = tmp_path / "curve.png"
    result = CliRunner().invoke(cli, [
        "eval", "--data", str(stream_csv), "--json", "--plot", str(out), "--knobs", "0.7,0.85",
        "--baseline-knobs", "0.7,0.85,0.99", "--redis-url", redis_url, "-q", "--output", str(tmp_path / "r.json"),
    ], env=_env(redis_url, tmp_path), catch_exceptions=False)  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert {"protocol", "rows", "policy", "curve", "baseline_curve"} <= set(doc)
    assert doc["protocol"] == "stream" and doc["policy"] == "consensus" and doc["rows"] == 37
    assert [p["knob"] for p in doc["curve"]] == [0.7, 0.85]
    assert [p["knob"] for p in doc["baseline_curve"]] == [0.7, 0.85, 0.99]
    for point in doc["curve"] + doc["baseline_curve"]:
        assert {"knob", "hit_rate", "wrong_rate"} <= set(point)
        assert 0.0 <= point["hit_rate"] <= 1.0 and 0.0 <= point["wrong_rate"] <= 1.0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert json.loads((tmp_path / "r.json").read_text()) == doc


def test_cli_eval_defaults_to_the_shipped_clinc150_on_a_private_redis(redis_url, tmp_path):
    result = CliRunner().invoke(cli, ["eval", "--limit", "30", "--json", "-q", "--knobs", "0.9",
                                      "--baseline-knobs", "0.9", "--seed", "7"],
                                env={"SEMCACHE_DATA_DIR": str(tmp_path / "data")}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["data"].endswith("semcache/data/clinc150.csv") and doc["rows"] == 30 and doc["seed"] == 7
    assert doc["protocol"] == "stream" and doc["model"] == "all-MiniLM-L6-v2"


def test_cli_eval_pairs_text_output_and_errors(redis_url, tmp_path, pairs_csv, stream_csv):
    runner = CliRunner()
    ok = runner.invoke(cli, ["eval", "--data", str(pairs_csv), "--knobs", "0.8", "--baseline-knobs", "0.8",
                             "--redis-url", redis_url, "-q"], env=_env(redis_url, tmp_path))
    assert ok.exit_code == 0, ok.output
    assert "pairs protocol" in ok.output and "best F1 policy" in ok.output
    bad = tmp_path / "bad.csv"
    bad.write_text("text,intent\nhello\n", encoding="utf-8")
    for args, message in (
        (["--data", str(bad)], "bad.csv:2: 1 fields, the header has 2"),
        (["--data", str(stream_csv), "--protocol", "pairs"], "needs a header q1,q2,is_duplicate"),
        (["--data", str(stream_csv), "--knobs", "0.5,high"], "comma-separated numbers"),
        (["--data", str(stream_csv), "--knobs", "1.5"], "in [-1, 1]"),
        (["--data", str(tmp_path / "none.csv")], "cannot read"),
    ):
        result = runner.invoke(cli, ["eval", *args, "-q", "--redis-url", redis_url], env=_env(redis_url, tmp_path))
        assert result.exit_code != 0 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output
