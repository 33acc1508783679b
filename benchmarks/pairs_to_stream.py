"""Turn a duplicate-pairs CSV into a stream-protocol CSV: one answer per connected group of duplicate questions.

The pairs protocol of ``semcache eval`` stores each ``q1`` with its own text as its answer, so every entry is alone
in its answer group and no policy that looks at answer groups (the consensus policy) can differ from the plain
threshold there. Real cache traffic repeats answers: many differently worded questions get the same response. This
converter builds such traffic from pairs data. It keeps the ``is_duplicate == 1`` rows, links ``q1`` and ``q2`` of
each, and takes the connected components (union-find) as answer groups: every question of a component gets the
same ``intent`` (``g00000``, ``g00001``, ... numbered by first appearance in the input), split ``test``. Run the
result with the stream protocol::

    python -m benchmarks.pairs_to_stream --data gptcache_similar_qqp_positives.csv --out /tmp/qqp_clusters.csv
    semcache eval --data /tmp/qqp_clusters.csv --seed 42 --json --plot quality_qqp_clusters.png

Texts are whitespace-normalized (runs of spaces collapsed, ends stripped) and each distinct text is one question
(one row), however many pairs it appears in. Two texts that the cache treats as the same request (equal under
:func:`cache_core.schema.normalize_prompt`: case-folded, trailing punctuation dropped) are linked as well, so the
cache's exact-match path never counts as a wrong hit. ``--min-group N`` keeps only groups of at least N questions.

Caveats, to be stated with any figure measured on the output:

- **A hit on another group counts as wrong, although some are unlabeled duplicates.** Duplicate-question sets label
  only the pairs someone looked at; two questions in different components may still ask the same thing. That label
  noise counts against every policy on the same stream, the baseline and the policy alike, and raises both curves'
  wrong rates. It need not fall on them equally (a rule that serves farther or denser neighbourhoods meets other
  unlabeled duplicates than one that does not), so read a sample of each curve's wrong hits before comparing them
  at a wrong-hit budget. On QQP most "wrong" hits are the same question asked twice.
- Pairs sets of positives only have no negatives and no out-of-scope rows: the wrong hits are all cross-group hits.
- Components can chain (A~B, B~C puts A and C together though nobody compared them); a group is "linked by
  duplicate labels", not "the same question" for sure.
- Research-only data (for example Quora Question Pairs: non-commercial terms) is read from the path given and
  written to the path given; neither the input nor the output belongs in the repository.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cache_core.schema import normalize_prompt

__all__ = ["Grouping", "group_pairs", "read_duplicate_edges", "write_stream_csv", "summary", "main"]

_WS = re.compile(r"\s+")
_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no"}


def clean(text: str) -> str:
    """Whitespace-normalize one question (the row's text); empty stays empty."""
    return _WS.sub(" ", text).strip()


@dataclass
class Grouping:
    """Distinct questions in first-appearance order, and each one's group id."""

    texts: list[str]
    groups: list[str]

    def sizes(self) -> Counter:
        """Group id -> number of questions."""
        return Counter(self.groups)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression: the chains stay short on 30k edges
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the earlier question is the root: ids follow first appearance


def read_duplicate_edges(path: str | Path) -> tuple[list[tuple[str, str]], int]:
    """The ``(q1, q2)`` of every ``is_duplicate`` row (whitespace-normalized), and how many rows were skipped as
    non-duplicates. A malformed file raises ``ValueError`` naming the file and line."""
    path = Path(path)
    edges: list[tuple[str, str]] = []
    skipped = 0
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, strict=True)
        try:
            header = [h.strip().lower() for h in next(reader)]
        except StopIteration:
            raise ValueError(f"{path} is empty: expected a header q1,q2,is_duplicate") from None
        missing = {"q1", "q2", "is_duplicate"} - set(header)
        if missing:
            raise ValueError(f"{path}:1: the header lacks {', '.join(sorted(missing))} (need q1,q2,is_duplicate)")
        col = {name: i for i, name in enumerate(header)}
        line = 1
        try:
            for line, values in enumerate(reader, start=2):
                if not values or all(not v.strip() for v in values):
                    continue
                if len(values) != len(header):
                    raise ValueError(f"{path}:{line}: {len(values)} fields, the header has {len(header)}")
                label = values[col["is_duplicate"]].strip().lower()
                if label not in _TRUE | _FALSE:
                    raise ValueError(f"{path}:{line}: is_duplicate must be 0 or 1, not {label[:20]!r}")
                q1, q2 = clean(values[col["q1"]]), clean(values[col["q2"]])
                if label in _FALSE or not q1 or not q2:
                    skipped += 1
                    continue
                edges.append((q1, q2))
        except csv.Error as exc:
            raise ValueError(f"{path}:{line}: malformed CSV: {exc}") from exc
    return edges, skipped


def group_pairs(edges: Sequence[tuple[str, str]], *, min_group: int = 1) -> Grouping:
    """Connected components of the duplicate edges. Each distinct text is one node; texts equal under the cache's
    ``normalize_prompt`` are one request and are linked. Group ids ``g00000``... follow the first appearance of a
    group's first question; with ``min_group`` > 1 smaller groups are dropped (ids are assigned before, so they stay
    stable whatever ``min_group``)."""
    uf = _UnionFind()
    node: dict[str, int] = {}
    by_norm: dict[str, int] = {}
    texts: list[str] = []

    def add(text: str) -> int:
        i = node.get(text)
        if i is None:
            i = node[text] = uf.add()
            texts.append(text)
            key = normalize_prompt(text)
            same = by_norm.setdefault(key, i)
            if same != i:
                uf.union(same, i)
        return i

    for q1, q2 in edges:
        uf.union(add(q1), add(q2))
    ids: dict[int, str] = {}
    groups = []
    for i in range(len(texts)):
        root = uf.find(i)
        if root not in ids:
            ids[root] = f"g{len(ids):05d}"
        groups.append(ids[root])
    grouping = Grouping(texts, groups)
    if min_group > 1:
        sizes = grouping.sizes()
        keep = [i for i, g in enumerate(groups) if sizes[g] >= min_group]
        grouping = Grouping([texts[i] for i in keep], [groups[i] for i in keep])
    return grouping


def half(grouping: Grouping, which: str) -> Grouping:
    """The questions of half the groups: ``"A"`` the groups whose SHA-1 of the group id is even, ``"B"`` the others.

    A fixed split by group, so one half can be used to choose a policy's parameters and the other to check them
    (docs/quality.md, QQP duplicate clusters).
    """
    import hashlib

    if which not in ("A", "B"):
        raise ValueError(f"half must be 'A' or 'B', not {which!r}")
    parity = 0 if which == "A" else 1
    keep = [i for i, g in enumerate(grouping.groups) if int(hashlib.sha1(g.encode()).hexdigest(), 16) % 2 == parity]
    return Grouping([grouping.texts[i] for i in keep], [grouping.groups[i] for i in keep])


def write_stream_csv(grouping: Grouping, out: str | Path, split: str = "test") -> None:
    """Write ``text,intent,split`` rows, one per question, in first-appearance order."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "intent", "split"])
        for text, group in zip(grouping.texts, grouping.groups):
            writer.writerow([text, group, split])


def summary(grouping: Grouping, *, edges: int, skipped: int) -> str:
    """Questions, groups, and the histogram of group sizes, as printed by :func:`main`."""
    sizes = grouping.sizes()
    hist = Counter(sizes.values())
    multi = sum(n for n in sizes.values() if n >= 3)
    lines = [f"{edges:,} duplicate pairs ({skipped:,} other rows skipped) -> {len(grouping.texts):,} questions in "
             f"{len(sizes):,} groups ({sum(1 for n in sizes.values() if n >= 3):,} groups of 3+ holding "
             f"{multi:,} questions)", "group size: groups"]
    for size in sorted(hist):
        lines.append(f"{size:>10}: {hist[size]:,}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.pairs_to_stream --data IN.csv --out OUT.csv [--min-group N] [--half A|B]``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pairs_to_stream", description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="q1,q2,is_duplicate CSV (extra columns ignored)")
    parser.add_argument("--out", required=True, type=Path, help="text,intent,split CSV to write")
    parser.add_argument("--min-group", type=int, default=1, help="keep only groups of at least this many questions")
    parser.add_argument("--half", choices=("A", "B"), help="keep half the groups (A: SHA-1 of the group id even, "
                        "B: odd), e.g. one half to choose parameters on and the other to check them")
    args = parser.parse_args(argv)
    if args.min_group < 1:
        parser.error("--min-group must be at least 1")
    try:
        edges, skipped = read_duplicate_edges(args.data)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not edges:
        print(f"error: {args.data} has no is_duplicate=1 rows", file=sys.stderr)
        return 2
    grouping = group_pairs(edges, min_group=args.min_group)
    if args.half:
        grouping = half(grouping, args.half)
    if not grouping.texts:
        print(f"error: no group has {args.min_group} or more questions", file=sys.stderr)
        return 2
    write_stream_csv(grouping, args.out)
    print(summary(grouping, edges=len(edges), skipped=skipped))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
