"""``--html FILE``: one self-contained page, readable offline, charts drawn by plotly.

plotly.js is inlined once (no CDN, no external font or script), each chart is a plotly
figure. The page draws the report dict only: findings with their exemplars at the
top, then route mix and unsafe serves, TTFT p50/p95 against the policy line, stops by
tool, and cost per window (with the rate card's version).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import plotly.graph_objects as go  # type: ignore[import-untyped]
from plotly.offline import get_plotlyjs  # type: ignore[import-untyped]

from guard.monitor.findings import group_findings

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px;
       color: #1d2330; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.meta { color: #555; font-size: 13px; margin-bottom: 16px; }
.finding { border-left: 6px solid #c62828; background: #fdecea; padding: 10px 14px;
           margin: 10px 0; border-radius: 4px; }
.finding.WARN { border-color: #ef8f00; background: #fff4e0; }
.finding h3 { margin: 0 0 6px; font-size: 16px; }
table { border-collapse: collapse; font-size: 13px; }
td, th { padding: 3px 10px 3px 0; text-align: left; vertical-align: top; }
th { color: #555; font-weight: 600; }
.ok { color: #2e7d32; font-weight: 600; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
code { font-size: 12px; }
"""


_ROUTE_COLOURS = {
    "serve": "#90a4ae",
    "nudge": "#ffb300",
    "stop_and_review": "#3949ab",
    "observe": "#ef9a9a",
}


def _e(value: Any) -> str:
    return html.escape("-" if value is None else str(value))


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.3g}%"


def _usd(value: float | None) -> str:
    return "unpriced" if value is None else f"{value:.6f} USD"


def _layout(fig: go.Figure, title: str, ytitle: str) -> go.Figure:
    fig.update_layout(
        title={"text": title, "font": {"size": 15}},
        height=340,
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
        legend={"orientation": "h", "y": -0.2},
        yaxis_title=ytitle,
        template="plotly_white",
        font={"family": "system-ui, sans-serif"},
    )
    # Windows as categories: one bar per window, labels as the table shows them.
    fig.update_xaxes(type="category")
    return fig


def _figures(report: dict[str, Any]) -> list[go.Figure]:
    windows = report["windows"]
    x = [w["start"][5:16].replace("T", " ") for w in windows]
    routes = sorted({r for w in windows for r in w["routes"]})
    mix = go.Figure()
    for route in routes:
        mix.add_bar(
            x=x,
            y=[w["routes"].get(route, 0) for w in windows],
            name=f"route {route}",
            marker_color=_ROUTE_COLOURS.get(route, "#9e9e9e"),
        )
    # Unsafe serves are few beside the calls: their own axis, on the right.
    mix.add_scatter(
        x=x,
        y=[w["unsafe_serves"] for w in windows],
        name="unsafe serves (right axis)",
        mode="lines+markers",
        line={"color": "#c62828", "width": 3},
        yaxis="y2",
    )
    mix.update_layout(
        barmode="stack",
        yaxis2={"overlaying": "y", "side": "right", "rangemode": "tozero", "showgrid": False},
    )
    _layout(mix, "Route mix and unsafe serves per window", "calls")

    ttft = go.Figure()
    for key, color in (("p50", "#1565c0"), ("p95", "#ef6c00")):
        ttft.add_scatter(
            x=x,
            y=[w["ttft_ms"][key] for w in windows],
            name=f"TTFT {key}",
            mode="lines+markers",
            line={"color": color},
        )
    limit = report.get("policy", {}).get("max_p95_ttft_ms")
    if limit is not None:
        ttft.add_hline(
            y=limit,
            line={"color": "#c62828", "dash": "dash"},
            annotation_text=f"policy p95 {limit:g} ms",
        )
    _layout(ttft, "TTFT per window (nearest rank, streamed calls)", "ms")

    tools = report["totals"]["stops_by_tool"]
    stops = go.Figure()
    stops.add_bar(x=list(tools), y=list(tools.values()), name="stops", marker_color="#455a64")
    if not tools:
        stops.add_annotation(text="no stops", showarrow=False, font={"size": 16})
        stops.update_xaxes(visible=False)
        stops.update_yaxes(visible=False)
    _layout(
        stops,
        f"Stops by tool ({report['totals']['stops']} stops, {report['totals']['nudges']} nudges)",
        "stops",
    )

    card = report["rate_card"]
    cost = go.Figure()
    cost.add_bar(
        x=x,
        y=[w["cost_usd"] for w in windows],
        name=f"cost USD ({card})" if card else "unpriced",
        marker_color="#2e7d32",
    )
    budget = report.get("policy", {}).get("max_window_cost_usd")
    if budget is not None:
        cost.add_hline(
            y=budget,
            line={"color": "#c62828", "dash": "dash"},
            annotation_text=f"budget {budget:g} USD",
        )
    title = f"Cost per window, rate card {card}" if card else "Cost: unpriced (no rate card)"
    _layout(cost, title, "USD")
    return [mix, ttft, stops, cost]


def _findings_html(report: dict[str, Any]) -> str:
    if not report["findings"]:
        return '<p class="ok">No findings.</p>'
    parts = []
    for f, later in group_findings(report["findings"]):
        ex = f["exemplar"] or {}
        rows = "".join(
            f"<tr><th>{_e(k)}</th><td><code>{_e(v)}</code></td></tr>" for k, v in ex.items()
        )
        parts.append(
            f'<div class="finding {_e(f["severity"])}"><h3>{_e(f["headline"])}</h3>'
            f"<div>window {_e(f['window']['start'])} .. {_e(f['window']['end'])}: "
            f"value {_e(f['value'])}, threshold {_e(f['threshold'])}, "
            f"{_e(f['requests'])} requests</div>"
            f"<div><b>First check:</b> {_e(f['first_check'] or '(none in the policy)')}</div>"
            f"<h4>Exemplar: {_e(f['exemplar_rule'])}</h4><table>{rows}</table>"
            + _later_html(later)
            + "</div>"
        )
    return "".join(parts)


def _later_html(later: list[dict[str, Any]]) -> str:
    if not later:
        return ""
    rows = "".join(
        f"<tr><td>{_e(f['window']['start'])}</td><td>{_e(f['headline'])}</td>"
        f"<td><code>{_e((f['exemplar'] or {}).get('request_id'))}</code></td></tr>"
        for f in later
    )
    return (
        f"<details><summary>fired again in {len(later)} later window(s)</summary>"
        f"<table><tr><th>window</th><th>finding</th><th>exemplar request_id</th></tr>"
        f"{rows}</table></details>"
    )


def _windows_html(report: dict[str, Any]) -> str:
    head = (
        "<tr><th>start</th><th>requests</th><th>unsafe</th><th>abstentions</th>"
        "<th>failure stages</th><th>TTFT p50/p95/p99 ms</th><th>malformed timings</th>"
        f"<th>cost USD [{_e(report['rate_card'])}]</th><th>nudges/stops</th></tr>"
    )
    rows = []
    for w in report["windows"][-200:]:
        stages = ", ".join(f"{k} {v}" for k, v in w["failure_stages"].items())
        t = w["ttft_ms"]
        rows.append(
            f"<tr><td>{_e(w['start'])}</td><td>{w['requests']}</td>"
            f"<td>{w['unsafe_serves']} ({_e(_rate(w['unsafe_serve_rate']))})</td>"
            f"<td>{w['abstentions']} ({_e(_rate(w['abstention_rate']))})</td><td>{_e(stages)}</td>"
            f"<td>{_e(t['p50'])}/{_e(t['p95'])}/{_e(t['p99'])}</td>"
            f"<td>{w['output_tps']['malformed_timings']}</td>"
            f"<td>{_e(_usd(w['cost_usd']))}</td>"
            f"<td>{w['loops']['nudges']}/{w['loops']['stops']}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def render_html(report: dict[str, Any]) -> str:
    """The page as one string (plotly.js inline, about 5 MB)."""
    figures = _figures(report)
    config = {"displaylogo": False, "displayModeBar": False, "responsive": True}
    charts = "".join(
        f"<div>{fig.to_html(full_html=False, include_plotlyjs=False, config=config)}</div>"
        for fig in figures
    )
    t = report["totals"]
    bad = report["malformed_records"]["count"]
    meta = (
        f"policy <b>{_e(report['policy_id'] or 'none')}</b> · rate card "
        f"<b>{_e(report['rate_card'] or 'none (unpriced)')}</b> · {report['records']:,} records · "
        f"{len(report['windows'])} window(s) of {_e(report['window'])} · "
        f"{_e(report['first_window_start'])} .. {_e(report['last_window_end'])} · "
        f"unsafe serves {t['unsafe_serves']} · abstentions {t['abstentions']} · "
        f"cost {_e(_usd(t['cost_usd']))}" + (f" · <b>{bad} malformed line(s)</b>" if bad else "")
    )
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<title>loopguard report</title>"
        f"<style>{_CSS}</style><script>{get_plotlyjs()}</script></head><body>"
        f"<h1>loopguard report</h1><div class='meta'>{meta}</div>"
        f"<h2>Findings</h2>{_findings_html(report)}"
        f"<h2>Windows</h2><div class='grid'>{charts}</div>"
        f"<h2>Figures per window</h2>{_windows_html(report)}"
        "</body></html>"
    )


def write_html(report: dict[str, Any], path: Path) -> None:
    path.write_text(render_html(report), encoding="utf-8")
