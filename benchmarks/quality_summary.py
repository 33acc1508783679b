"""A markdown table of ``semcache eval --output`` reports side by side: the best hit rate within each wrong-hit
budget, for the policy and for the baseline of the same run, with the judge's questions per query.

    python -m benchmarks.quality_summary docs/results/quality_bitext_*.json

Every row names its answers protocol and its judge; a simulated judge is marked as such.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

TARGETS = ("wrong<=0.005", "wrong<=0.01", "wrong<=0.02")


def _cell(point: dict[str, Any] | None) -> str:
    if point is None:
        return "none"
    return f"{100 * point['hit_rate']:.1f}% ({100 * point['wrong_rate']:.2f}%, {point['knob']:.2f})"


def row(report: dict[str, Any]) -> list[str]:
    """One table row: data, answers, judge, then policy/baseline per budget and the judge's cost."""
    judge = report.get("judge", "off")
    if report.get("simulated_judge"):
        judge = f"{judge} (simulated)"
    cells = [Path(report["data"]).name, report.get("answers", "label"), judge]
    for target in TARGETS:
        point = report["summary"].get(target, {})
        cells.append(f"**{_cell(point.get('policy'))}** / {_cell(point.get('baseline'))}")
    calls = report.get("judge_calls_per_query")
    cells.append("-" if calls is None else f"{calls:.2f}")
    return cells


def table(reports: list[dict[str, Any]]) -> str:
    """The markdown table of several reports.

    >>> r = {"data": "x/d.csv", "answers": "response", "judge": "simulated:0.05,0.05", "simulated_judge": True,
    ...      "judge_calls_per_query": 0.3, "summary": {"wrong<=0.01": {"policy": {"hit_rate": 0.7,
    ...      "wrong_rate": 0.008, "knob": 0.8}, "baseline": None}}}
    >>> print(table([r]).splitlines()[2])
    | d.csv | response | simulated:0.05,0.05 (simulated) | **none** / none | **70.0% (0.80%, 0.80)** / none | **none** / none | 0.30 |
    """
    head = ["data", "answers", "judge", "<= 0.5% wrong: policy / baseline", "<= 1%", "<= 2%",
            "judge questions per query"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(row(r)) + " |" for r in reports]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, help="JSON files written by semcache eval --output")
    args = parser.parse_args(argv)
    print(table([json.loads(p.read_text()) for p in args.reports]))


if __name__ == "__main__":
    main()
