"""The overview page: hit rate, lookups, entries by status, tokens and money saved, latency percentiles and the
write decisions, over the last hour or day, with server-rendered PNG charts."""

from __future__ import annotations

from flask import Blueprint, Response, abort, render_template, request

from cache_core import browse
from cache_core.index import index_info
from cache_core.stats import read_stats

from . import charts
from .auth import guard
from .state import state

__all__ = ["bp"]

bp = Blueprint("overview", __name__)
guard(bp)


def _window() -> str:
    window = request.args.get("window", "hour")
    return window if window in charts.WINDOWS else "hour"


@bp.get("/")
def index():
    st = state()
    window = _window()
    minutes, _ = charts.WINDOWS[window]
    data = read_stats(st.redis, st.settings, minutes=minutes)
    data.pop("series", None)
    counts = browse.count_by_status(st.redis, st.settings)
    try:
        info = index_info(st.redis, st.settings)
    except Exception:  # noqa: BLE001 - the page must render without the index facts
        info = {"exists": False}
    tenants = browse.tenant_summary(st.redis, st.settings, limit=10) if info.get("exists") else []
    return render_template("overview.html", stats=data, counts=counts, window=window, info=info, tenants=tenants,
                           settings=st.settings)


@bp.get("/overview/chart/<name>.png")
def chart(name: str):
    st = state()
    window = _window()
    minutes, per_bin = charts.WINDOWS[window]
    if name == "status":
        png = charts.status_png(browse.count_by_status(st.redis, st.settings))
    elif name in ("lookups", "latency"):
        series = read_stats(st.redis, st.settings, minutes=minutes)["series"]
        png = charts.lookups_png(series, per_bin) if name == "lookups" else charts.latency_png(series, per_bin)
    else:
        abort(404)
    return Response(png, mimetype="image/png", headers={"Cache-Control": "private, max-age=15"})
