"""``benchmarks.pairs_to_stream``: duplicate pairs grouped into answer groups (connected components), written as a
stream-protocol CSV that ``semcache eval`` reads; one small run of the converted file through the real stack."""

from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

from benchmarks.pairs_to_stream import group_pairs, half, main, read_duplicate_edges
from cache_core.evaluation import embed_rows, read_dataset
from cache_core.policy import make_policy
from semcache.cli import cli
from tests.test_quality_helpers import read_stream, simulate_stream

# A chain (a~b, b~c), a pair that joins the chain through a whitespace variant of c, a separate pair, a
# non-duplicate row that must not link anything, a case/punctuation variant of a question (the same request to the
# cache's exact path), and a self-pair.
TINY = [
    ("How do I learn Python quickly?", "What is the fastest way to learn Python?", "1"),
    ("What is the fastest way to learn Python?", "How can I learn Python fast?", "1"),
    ("How can  I learn   Python fast? ", "Best way to pick up Python in a week?", "1"),
    ("Why is the sky blue?", "What makes the sky look blue?", "1"),
    ("How do I learn Python quickly?", "Why is the sky blue?", "0"),
    ("What causes earthquakes?", "why do earthquakes happen", "1"),
    ("Why do earthquakes happen?", "What makes the ground shake in an earthquake?", "1"),
    ("Is coffee healthy?", "Is coffee healthy?", "1"),
]  # fmt: skip


def _write(path, rows, header=("q1", "q2", "is_duplicate")):
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _read(path):
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_grouping_is_the_connected_components_of_duplicate_edges(tmp_path):
    edges, skipped = read_duplicate_edges(_write(tmp_path / "pairs.csv", TINY))
    assert skipped == 1 and len(edges) == 7
    grouping = group_pairs(edges)
    by_text = dict(zip(grouping.texts, grouping.groups))
    # whitespace-normalized: the padded variant is the same question as its clean form, listed once
    assert "How can I learn Python fast?" in by_text and len(grouping.texts) == len(set(grouping.texts)) == 11
    python = {by_text[t] for t in ("How do I learn Python quickly?", "What is the fastest way to learn Python?",
                                   "How can I learn Python fast?", "Best way to pick up Python in a week?")}
    assert python == {"g00000"}  # the chain and the pair joined through the whitespace variant: one group
    assert by_text["Why is the sky blue?"] == by_text["What makes the sky look blue?"] == "g00001"
    # the non-duplicate row linked nothing; the case/punctuation variant joined its twin's group
    quake = {by_text[t] for t in ("What causes earthquakes?", "why do earthquakes happen",
                                  "Why do earthquakes happen?", "What makes the ground shake in an earthquake?")}
    assert quake == {"g00002"}
    assert by_text["Is coffee healthy?"] == "g00003" and grouping.sizes()["g00003"] == 1
    assert sorted(grouping.sizes().values()) == [1, 2, 4, 4]


def test_min_group_drops_small_groups_and_keeps_the_ids(tmp_path):
    edges, _ = read_duplicate_edges(_write(tmp_path / "pairs.csv", TINY))
    grouping = group_pairs(edges, min_group=3)
    assert set(grouping.groups) == {"g00000", "g00002"} and len(grouping.texts) == 8


def test_halves_split_by_group_and_together_are_the_whole(tmp_path, capsys):
    import hashlib

    grouping = group_pairs(read_duplicate_edges(_write(tmp_path / "pairs.csv", TINY))[0])
    a, b = half(grouping, "A"), half(grouping, "B")
    assert a.texts and b.texts and not set(a.groups) & set(b.groups)  # a group is never split between them
    assert sorted(a.texts + b.texts) == sorted(grouping.texts)
    assert all(int(hashlib.sha1(g.encode()).hexdigest(), 16) % 2 == 0 for g in a.groups)
    with pytest.raises(ValueError, match="'A' or 'B'"):
        half(grouping, "C")
    out = tmp_path / "half.csv"
    assert main(["--data", str(tmp_path / "pairs.csv"), "--out", str(out), "--half", "B"]) == 0
    assert [r["text"] for r in _read(out)] == b.texts


def test_main_writes_a_stream_csv_that_eval_reads(tmp_path, capsys):
    src = _write(tmp_path / "pairs.csv", [(a, b, d, "train") for a, b, d in TINY],
                 header=("q1", "q2", "is_duplicate", "split"))  # extra columns are ignored
    out = tmp_path / "out" / "stream.csv"
    assert main(["--data", str(src), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "7 duplicate pairs (1 other rows skipped) -> 11 questions in 4 groups" in printed
    assert "         4: 2" in printed and "         2: 1" in printed and "         1: 1" in printed
    rows = _read(out)
    assert list(rows[0]) == ["text", "intent", "split"] and {r["split"] for r in rows} == {"test"}
    assert rows[0] == {"text": "How do I learn Python quickly?", "intent": "g00000", "split": "test"}
    dataset = read_dataset(out)
    assert dataset.protocol == "stream" and len(dataset.rows) == 11
    # the same input gives the same file (stable ids)
    again = tmp_path / "again.csv"
    assert main(["--data", str(src), "--out", str(again), "--min-group", "1"]) == 0
    assert again.read_bytes() == out.read_bytes()


@pytest.mark.parametrize("content, message", [
    ("a,b,c\nx,y,1\n", "lacks is_duplicate, q1, q2"),
    ("q1,q2,is_duplicate\nx,y,maybe\n", ":2: is_duplicate must be 0 or 1"),
    ("q1,q2,is_duplicate\nx,y\n", ":2: 2 fields, the header has 3"),
    ("q1,q2,is_duplicate\nx,y,0\n", "has no is_duplicate=1 rows"),
    ("", "is empty"),
])  # fmt: skip
def test_bad_input_is_a_clear_error(tmp_path, capsys, content, message):
    src = tmp_path / "bad.csv"
    src.write_text(content, encoding="utf-8")
    assert main(["--data", str(src), "--out", str(tmp_path / "o.csv")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()


def test_min_group_too_large_writes_nothing(tmp_path, capsys):
    src = _write(tmp_path / "pairs.csv", TINY)
    assert main(["--data", str(src), "--out", str(tmp_path / "o.csv"), "--min-group", "5"]) == 2
    assert "no group has 5 or more questions" in capsys.readouterr().err


def test_converted_csv_through_semcache_eval_matches_brute_force(redis_url, tmp_path, embedder, settings):
    """The converted file runs through the real stack (embedded Redis, index, read path, MiniLM) and gives exactly
    the stream protocol's brute-force count for both policies."""
    out = tmp_path / "stream.csv"
    assert main(["--data", str(_write(tmp_path / "pairs.csv", TINY)), "--out", str(out)]) == 0
    result = CliRunner().invoke(cli, [
        "eval", "--data", str(out), "--json", "-q", "--knobs", "0.6,0.8", "--baseline-knobs", "0.6,0.8",
        "--redis-url", redis_url, "--seed", "42",
    ], env={"SEMCACHE_REDIS_URL": redis_url, "SEMCACHE_DATA_DIR": str(tmp_path / "data")},
        catch_exceptions=False)  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["protocol"] == "stream" and doc["rows"] == 11 and doc["policy"] == "consensus"
    rows = read_stream(out)
    vectors = embed_rows(embedder, [t for t, _ in rows], progress=False)
    for name, policy, kk in (("curve", make_policy("consensus", settings), settings.knn_k),
                             ("baseline_curve", make_policy("threshold"), 1)):
        for point in doc[name]:
            assert (point["hits"], point["wrong"]) == simulate_stream(rows, vectors, policy, point["knob"], kk)
    loose = doc["baseline_curve"][0]
    assert loose["hits"] > 0  # paraphrases of one group are served to each other: the measure sees hits
