"""Server-side charts of the overview page, as PNG bytes (matplotlib's Agg backend, no pyplot state).

The per-minute statistics of :func:`cache_core.stats.read_stats` are folded into bins (1 minute over the last hour,
30 minutes over the last day); latency percentiles of a bin are read from its merged histogram, so they are the
upper edges of histogram buckets, as in the summary figures.
"""

from __future__ import annotations

import datetime as dt
import io
from collections import Counter
from typing import Any

from cache_core.stats import LATENCY_BUCKETS_MS

__all__ = ["bins", "lookups_png", "latency_png", "status_png", "WINDOWS"]

WINDOWS = {"hour": (60, 1), "day": (24 * 60, 30)}  # minutes shown, minutes per bin

_INK = "#1f2937"
_MUTED = "#6b7280"
_GRID = "#e5e7eb"
_COLORS = {"exact": "#2563eb", "semantic": "#7c3aed", "miss": "#d1d5db", "p50": "#059669", "p95": "#d97706",
           "p99": "#dc2626", "approved": "#16a34a", "pending_review": "#d97706", "rejected": "#dc2626"}


def bins(series: list[dict[str, Any]], per_bin: int) -> list[tuple[float, Counter]]:
    """``[(bin start, summed counters)]`` of a per-minute series."""
    out: list[tuple[float, Counter]] = []
    for i in range(0, len(series), per_bin):
        chunk = series[i : i + per_bin]
        total: Counter = Counter()
        for row in chunk:
            total.update({k: v for k, v in row.items() if k != "minute"})
        out.append((chunk[0]["minute"], total))
    return out


def _percentile(counter: Counter, q: float) -> float | None:
    edges = [*LATENCY_BUCKETS_MS, float("inf")]
    counts = [counter.get(f"lat_le_{e:g}" if e != float("inf") else "lat_le_inf", 0) for e in edges]
    total = sum(counts)
    if not total:
        return None
    seen = 0.0
    for edge, count in zip(edges, counts):
        seen += count
        if seen >= q * total:
            return edge if edge != float("inf") else LATENCY_BUCKETS_MS[-1] * 2
    return None


def _figure(width: float = 5.6, height: float = 2.3):
    """A figure about as wide in inches as the page shows it in 100 px, drawn at 160 dpi (crisp on hi-dpi)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=160)
    fig.patch.set_facecolor("white")
    ax = fig.add_subplot(1, 1, 1)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color(_GRID)
    ax.tick_params(colors=_MUTED, labelsize=8.5)
    ax.grid(axis="y", color=_GRID, linewidth=0.8)
    ax.set_axisbelow(True)
    return fig, ax


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", facecolor="white")
    return buffer.getvalue()


def _times(binned: list[tuple[float, Counter]]) -> list[dt.datetime]:
    return [dt.datetime.fromtimestamp(start, dt.timezone.utc) for start, _ in binned]


def _time_axis(ax, per_bin: int) -> None:
    import matplotlib.dates as mdates

    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M", tz=dt.timezone.utc))
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=4, maxticks=8))


def lookups_png(series: list[dict[str, Any]], per_bin: int) -> bytes:
    """Stacked bars of exact hits, semantic hits and misses per bin."""
    binned = bins(series, per_bin)
    times = _times(binned)
    exact = [c.get("hit_exact", 0) for _, c in binned]
    semantic = [c.get("hit_semantic", 0) for _, c in binned]
    misses = [c.get("lookups", 0) - c.get("hit", 0) for _, c in binned]
    fig, ax = _figure()
    width = per_bin / (24 * 60) * 0.85
    ax.bar(times, exact, width=width, color=_COLORS["exact"], label="exact hits")
    ax.bar(times, semantic, width=width, bottom=exact, color=_COLORS["semantic"], label="semantic hits")
    ax.bar(times, misses, width=width, bottom=[a + b for a, b in zip(exact, semantic)], color=_COLORS["miss"],
           label="misses")
    ax.set_ylabel(f"lookups / {per_bin} min" if per_bin > 1 else "lookups / min", color=_MUTED, fontsize=8.5)
    _time_axis(ax, per_bin)
    ax.legend(frameon=False, fontsize=8.5, loc="upper left", ncols=3)
    ax.set_ylim(bottom=0, top=max(1, max((a + b + c for a, b, c in zip(exact, semantic, misses)), default=1)) * 1.25)
    return _png(fig)


def latency_png(series: list[dict[str, Any]], per_bin: int) -> bytes:
    """p50, p95 and p99 of the lookup latency per bin (ms, log scale)."""
    binned = bins(series, per_bin)
    times = _times(binned)
    fig, ax = _figure()
    drawn = False
    for name, q in (("p99", 0.99), ("p95", 0.95), ("p50", 0.5)):  # the lower percentiles drawn on top
        values = [_percentile(c, q) for _, c in binned]
        points = [(t, v) for t, v in zip(times, values) if v is not None]
        if points:
            drawn = True
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=2.5, linewidth=1.6,
                    color=_COLORS[name], label=name)
    ax.set_ylabel("lookup latency, ms", color=_MUTED, fontsize=8.5)
    if drawn:
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

        ax.set_yscale("log")
        ax.yaxis.set_major_locator(FixedLocator([0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000]))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        values = [v for _, c in binned for q in (0.5, 0.99) if (v := _percentile(c, q)) is not None]
        ax.set_ylim(min(values) / 1.6, max(values) * 1.8)
        handles, labels = ax.get_legend_handles_labels()
        ax.legend(handles[::-1], labels[::-1], frameon=False, fontsize=8.5, loc="upper left", ncols=3)
    else:
        ax.text(0.5, 0.5, "no lookups in this window", transform=ax.transAxes, ha="center", va="center",
                color=_MUTED, fontsize=9)
        ax.set_yticks([])
    if times:
        ax.set_xlim(times[0] - dt.timedelta(minutes=per_bin / 2), times[-1] + dt.timedelta(minutes=per_bin / 2))
    _time_axis(ax, per_bin)
    return _png(fig)


def status_png(counts: dict[str, int]) -> bytes:
    """Horizontal bars: entries by status."""
    fig, ax = _figure(width=3.6, height=1.6)
    names = ["approved", "pending_review", "rejected"]
    values = [counts.get(n, 0) for n in names]
    bars = ax.barh(["approved", "pending review", "rejected"], values, color=[_COLORS[n] for n in names],
                   height=0.6)
    ax.invert_yaxis()
    ax.grid(axis="x", color=_GRID, linewidth=0.8)
    ax.grid(axis="y", visible=False)
    top = max(values) if any(values) else 1
    ax.set_xlim(0, top * 1.18)
    for bar, value in zip(bars, values):
        ax.text(bar.get_width() + top * 0.01, bar.get_y() + bar.get_height() / 2, f"{value:,}", va="center",
                fontsize=8.5, color=_INK)
    return _png(fig)
