"""The human side of a benchmark result: the table printed at the end and the PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["comparison_table", "plot_comparison", "scaling_table", "plot_scaling", "memory_options_table"]

_ROWS = (
    ("lookup p50 (ms), mixed", "lookup_p50_ms", "{:.2f}"),
    ("lookup p95 (ms), mixed", "lookup_p95_ms", "{:.2f}"),
    ("lookup p99 (ms), mixed", "lookup_p99_ms", "{:.2f}"),
    ("lookups/s, 1 thread", "lookups_per_s", "{:,.0f}"),
    ("lookups/s, {threads} threads", "lookups_per_s_threads", "{:,.0f}"),
    ("semantic-only p50 (ms)", "semantic_p50_ms", "{:.2f}"),
    ("semantic-only p95 (ms)", "semantic_p95_ms", "{:.2f}"),
    ("store entries/s ({store_mode})", "store_per_s", "{:,.1f}"),
    ("bytes per entry", "bytes_per_entry", "{:,.0f}"),
    ("used_memory per entry", "used_memory_per_entry", "{:,.0f}"),
    ("hit rate (mixed)", "hit_rate", "{:.1%}"),
    ("wrong hits / hits", "wrong_hit_rate", "{:.2%}"),
)


def _fmt(value: Any, pattern: str) -> str:
    if value is None:
        return "-"
    try:
        return pattern.format(value)
    except (ValueError, TypeError):
        return str(value)


def comparison_table(result: dict[str, Any], *, markdown: bool = False) -> str:
    """The figures of both systems, their ratio and the goal (when there is one) as a text or Markdown table."""
    s, v, r = result["semcache"], result.get("redisvl") or {}, result.get("ratios") or {}
    goal_of = {g_key: g for g_key, g in (result.get("goals") or {}).items()}
    by_metric = {"lookup_p50_ms": "lookup_p50", "lookup_p95_ms": "lookup_p95", "lookups_per_s": "lookups_per_s",
                 "lookups_per_s_threads": "lookups_per_s_threads", "semantic_p50_ms": "semantic_p50",
                 "semantic_p95_ms": "semantic_p95", "store_per_s": "store_per_s", "bytes_per_entry": "bytes_per_entry"}
    rows = [("", "semcache", "RedisVL", "semcache / RedisVL", "goal")]
    for label, key, pattern in _ROWS:
        label = label.format(threads=s.get("threads", "T"), store_mode=s.get("store_mode", "?"))
        g = goal_of.get(by_metric.get(key, ""))
        goal = ""
        if g:
            op = "<=" if "<=" in g["what"] else ">="
            goal = f"{op} {g['target']:g}x {'met' if g['met'] else 'NOT met'}"
        ratio = f"{r[key]:.2f}x" if key in r else "-"
        rows.append((label, _fmt(s.get(key), pattern), _fmt(v.get(key), pattern), ratio, goal))
    degraded = sum(int(s.get(k) or 0) for k in ("degraded", "threads_degraded", "semantic_degraded",
                                                 "timings_degraded", "lookup_many_degraded"))
    rows.append(("degraded lookups (Redis timeouts)", str(degraded), "-", "", "0 expected"))
    extra = [("search p95 (ms), semcache", s.get("search_p95_ms"), "{:.3f}"),
             ("embedding p50 (ms), semcache", s.get("embed_p50_ms"), "{:.2f}"),
             ("lookup_many lookups/s (batches of 32)", s.get("lookup_many_per_s"), "{:,.0f}"),
             ("store entries/s, vectors supplied (read-through path)", s.get("store_with_vectors_per_s"),
              "{:,.1f}")]
    for label, value, pattern in extra:
        if value is not None:
            rows.append((label, _fmt(value, pattern), "", "", ""))
    return _render(rows, markdown)


def _render(rows: list[tuple], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join(" --- " for _ in rows[0]) + "|"]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows[1:]]
        return "\n".join(lines)
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    out = []
    for n, row in enumerate(rows):
        out.append("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def comparison_title(result: dict[str, Any]) -> str:
    """The plot's title: the workload, and whether semcache ran the model at another precision than RedisVL.

    >>> comparison_title({"workload": {"entries": 2, "lookups": 3, "repeat_fraction": 0.3, "threshold": 0.9},
    ...                   "semcache": {"config": {"embedding_precision": "int8"}}})
    'semcache vs RedisVL SemanticCache: 2 entries, 3 lookups (30% repeats), ..., same model (semcache at int8)'
    """
    w = result.get("workload", {})
    precision = (result.get("semcache", {}).get("config") or {}).get("embedding_precision", "fp32")
    model = "same Redis and model" if precision == "fp32" else f"same Redis, same model (semcache at {precision})"
    return (f"semcache vs RedisVL SemanticCache: {w.get('entries')} entries, {w.get('lookups')} lookups "
            f"({w.get('repeat_fraction', 0):.0%} repeats), similarity {w.get('threshold')}, {model}")


def plot_comparison(result: dict[str, Any], path: Path) -> Path:
    """Four panels: lookup latency, lookups/s, store entries/s, bytes per entry (semcache beside RedisVL)."""
    plt = _pyplot()
    s, v = result["semcache"], result.get("redisvl") or {}
    names = ["semcache"] + (["RedisVL"] if v else [])
    colors = ["#d1495b", "#00798c"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    ax = axes[0]
    keys = [("p50", "lookup_p50_ms"), ("p95", "lookup_p95_ms"), ("p99", "lookup_p99_ms"),
            ("sem.\np50", "semantic_p50_ms"), ("sem.\np95", "semantic_p95_ms")]
    width = 0.38
    for i, (name, data) in enumerate(zip(names, (s, v))):
        ax.bar([k + (i - 0.5) * width for k in range(len(keys))], [data.get(key, 0) for _, key in keys], width,
               label=name, color=colors[i])
    ax.set_xticks(range(len(keys)), [label for label, _ in keys])
    ax.set_ylabel("ms")
    ax.set_title("lookup latency (mixed workload)")
    ax.legend()
    panels = [
        (axes[1], [("1 thread", "lookups_per_s"), (f"{s.get('threads', 'T')} threads", "lookups_per_s_threads")],
         "lookups / s", "lookup throughput"),
        (axes[2], [("semcache: " + str(s.get("store_mode", "")) + "\nRedisVL: store()", "store_per_s")],
         "entries / s", "store throughput (embedding included)"),
        (axes[3], [("bytes/entry", "bytes_per_entry"), ("used_memory/entry", "used_memory_per_entry")], "bytes",
         "Redis memory per entry"),
    ]
    for ax, keys, ylabel, title in panels:
        for i, (name, data) in enumerate(zip(names, (s, v))):
            ax.bar([k + (i - 0.5) * width for k in range(len(keys))], [data.get(key, 0) or 0 for _, key in keys],
                   width, label=name, color=colors[i])
        ax.set_xticks(range(len(keys)), [label for label, _ in keys])
        ax.set_ylabel(ylabel)
        ax.set_title(title)
    fig.suptitle(comparison_title(result))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scaling_table(result: dict[str, Any], *, markdown: bool = False) -> str:
    rows = [("entries", "lookup p50 ms", "lookup p95 ms", "search p50 ms", "search p95 ms", "bytes/entry",
             "used_memory", f"recall@{result.get('k', 10)} (HNSW vs FLAT)", "recall@1", "load s")]
    for p in result["points"]:
        rows.append((f"{p['entries']:,}", f"{p['lookup_p50_ms']:.2f}", f"{p['lookup_p95_ms']:.2f}",
                     f"{p['search_p50_ms']:.3f}", f"{p['search_p95_ms']:.3f}", f"{p['bytes_per_entry']:,.0f}",
                     f"{p['used_memory_mb']:,.0f} MB", f"{p['recall']:.4f}", f"{p.get('recall_at_1', 0):.4f}",
                     f"{p['load_seconds']:.0f}"))
    text = _render(rows, markdown)
    sweeps = [p for p in result["points"] if p.get("ef_sweep")]
    if sweeps:
        efs = list(sweeps[0]["ef_sweep"])
        rows = [("entries", *(f"EF_RUNTIME {ef}: recall@1 / @{result.get('k', 10)} / KNN p95 ms" for ef in efs))]
        for p in sweeps:
            rows.append((f"{p['entries']:,}", *(
                f"{p['ef_sweep'][ef]['recall_at_1']:.3f} / {p['ef_sweep'][ef]['recall']:.3f} / "
                f"{p['ef_sweep'][ef]['knn_p95_ms']:.2f}" for ef in efs)))
        text += "\n\n" + _render(rows, markdown)
    limit = result.get("limit") or {}
    if limit.get("max_entries_estimate"):
        text += (f"\n\nlimit: {limit.get('reason')}; about {limit['max_entries_estimate']:,} entries fit "
                 f"({limit.get('estimate_basis', 'measured memory per entry')})")
    return text


def plot_scaling(result: dict[str, Any], path: Path) -> Path:
    """Latency, memory and recall against the number of entries (log x axis)."""
    plt = _pyplot()
    pts = result["points"]
    n = [p["entries"] for p in pts]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    for key, label, style in (("lookup_p50_ms", "lookup p50", "o-"), ("lookup_p95_ms", "lookup p95", "o--"),
                              ("search_p50_ms", "search p50", "s-"), ("search_p95_ms", "search p95", "s--")):
        ax.plot(n, [p[key] for p in pts], style, label=label)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("entries")
    ax.set_ylabel("ms")
    ax.set_title("latency (lookup = embed + search)")
    ax.legend()
    ax = axes[1]
    ax.plot(n, [p["used_memory_mb"] for p in pts], "o-", color="#00798c")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("entries")
    ax.set_ylabel("MB (used_memory)")
    ax.set_title("Redis memory")
    ax = axes[2]
    ef_default = str(result.get("config", {}).get("hnsw_ef_runtime", ""))
    lows = [p["recall"] for p in pts]
    for ef, style in (("200", ":"), ("100", "-."), ("50", "--")):
        if all(ef in p.get("ef_sweep", {}) for p in pts) and ef != ef_default:
            ys = [p["ef_sweep"][ef]["recall_at_1"] for p in pts]
            ax.plot(n, ys, "o" + style, color="#edae49", label=f"recall@1, EF_RUNTIME {ef}")
            lows += ys
    ax.plot(n, [p["recall_at_1"] for p in pts], "s-", color="#00798c", label=f"recall@1, EF_RUNTIME {ef_default}")
    ax.plot(n, [p["recall"] for p in pts], "o-", color="#d1495b",
            label=f"recall@{result.get('k', 10)}, EF_RUNTIME {ef_default}")
    lows += [p["recall_at_1"] for p in pts]
    ax.set_xscale("log")
    ax.set_ylim(min(0.9, min(lows) - 0.01), 1.005)
    ax.set_xlabel("entries")
    ax.set_ylabel("recall")
    ax.legend(fontsize=8)
    ax.set_title("HNSW recall against exact FLAT search")
    cfg = result.get("config", {})
    fig.suptitle(f"semcache scaling: {cfg.get('vector_type')} HNSW M={cfg.get('hnsw_m')} "
                 f"EF_RUNTIME={cfg.get('hnsw_ef_runtime')}, {cfg.get('embedding_backend')} MiniLM")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def memory_options_table(result: dict[str, Any], *, markdown: bool = False) -> str:
    rows = [("option", "bytes/entry", "used_memory/entry", "vs RedisVL", "hit rate @0.90", "wrong hits @0.90",
             "wrong hits at the baseline's hit rate")]
    peer = result.get("redisvl_bytes_per_entry")
    for o in result["options"]:
        rows.append((o["name"], f"{o['bytes_per_entry']:,.0f}", f"{o['used_memory_per_entry']:,.0f}",
                     f"{o['bytes_per_entry'] / peer:.2f}x" if peer else "-",
                     f"{o['hit_rate']:.1%}" if o.get("hit_rate") is not None else "-",
                     f"{o['wrong_hit_rate']:.2%}" if o.get("wrong_hit_rate") is not None else "-",
                     f"{o['wrong_at_baseline_hit_rate']:.2%}" if o.get("wrong_at_baseline_hit_rate") is not None
                     else "-"))
    if peer:
        rows.append(("RedisVL SemanticCache (HASH, FLOAT32)", f"{peer:,.0f}",
                     f"{result.get('redisvl_used_memory_per_entry', 0):,.0f}", "1.00x", "", "", ""))
    text = _render(rows, markdown)
    auc = result.get("pair_auc")
    if auc:
        dims = [k for k in next(iter(auc.values())) if k not in ("pairs",)]
        pairs = [("pair set (ROC AUC of cosine, duplicates vs others)", *dims, "pairs")]
        pairs += [(name, *(f"{v[d]:.4f}" for d in dims), str(v["pairs"])) for name, v in auc.items()]
        text += "\n\n" + _render(pairs, markdown)
    return text
