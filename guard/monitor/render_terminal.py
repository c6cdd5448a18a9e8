"""The report for a terminal (rich): findings with their exemplars first, then windows.

Draws the report dict only; it computes nothing of its own.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from guard.monitor.findings import group_findings

MAX_ROWS = 60


def _pct(value: float | None) -> str:
    if value is None:
        return "-"
    # Small rates stay visible: 17 of 41,667 is 0.041%, not 0.0%.
    return f"{value * 100:.3f}%" if 0 < value < 0.001 else f"{value * 100:.1f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _usd(value: float | None, card: str | None) -> str:
    if card is None:
        return "unpriced (no rate card)"
    return "unpriced" if value is None else f"{value:.6f} USD"


def _counts(mapping: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(mapping.items(), key=lambda kv: -kv[1])) or "-"


def render(report: dict[str, Any], console: Console) -> None:
    card = report["rate_card"]
    head = Table.grid(padding=(0, 2))
    head.add_row("policy", str(report["policy_id"] or "none (figures only, no rules)"))
    head.add_row("rate card", card or "none: costs are unpriced")
    head.add_row("inputs", ", ".join(report["inputs"]))
    if not report["windows"]:
        span = "no records in range"
    elif report["window"] == "all":
        span = "one window for the whole input"
    else:
        span = f"{len(report['windows'])} window(s) of {report['window']}"
    if report["windows"]:
        span += f"  ({report['first_window_start']} .. {report['last_window_end']})"
    head.add_row("records", f"{report['records']:,}: {span}")
    bad = report["malformed_records"]
    if bad["count"]:
        where = "; ".join(f"{e['file']}:{e['line']} {e['reason']}" for e in bad["examples"][:5])
        head.add_row(Text("malformed lines", style="bold yellow"), f"{bad['count']:,}: {where}")
    t = report["totals"]
    head.add_row(
        "totals",
        f"unsafe serves {t['unsafe_serves']} ({_pct(t['unsafe_serve_rate'])}), "
        f"abstentions {t['abstentions']}, stops {t['stops']}, nudges {t['nudges']}, "
        f"cost {_usd(t['cost_usd'], card)}"
        + (f" (rate card {card})" if card else "")
        + (f", {t['unpriced_calls']:,} unpriced calls" if card and t["unpriced_calls"] else ""),
    )
    if t["failure_stages"]:
        head.add_row("failure stages", _counts(t["failure_stages"]))
    if t["stops"]:
        head.add_row(
            "loops",
            f"stops by rule: {_counts(t['stops_by_rule'])}; by tool: {_counts(t['stops_by_tool'])};"
            f" {t['streak_calls']} calls / {t['streak_output_tokens']} output tokens in streaks",
        )
    console.print(Panel(head, title="loopguard report", border_style="cyan"))

    if report["findings"]:
        for f, later in group_findings(report["findings"]):
            style = "red" if f["severity"] == "PAGE" else "yellow"
            ex = f["exemplar"] or {}
            body = Table.grid(padding=(0, 2))
            body.add_row(
                "window", f"{f['window']['start']} .. {f['window']['end']} ({f['requests']} req)"
            )
            body.add_row("value", f"{f['value']} (threshold {f['threshold']})")
            body.add_row("exemplar", f"{f['exemplar_rule']}:")
            for key in ("request_id", "trace_id", "session", "model", "tool", "template",
                        "evidence_version", "failure_stage", "ts"):  # fmt: skip
                if ex.get(key) is not None:
                    body.add_row(f"exemplar {key}", str(ex[key]))
            if f.get("first_check"):
                body.add_row(Text("first check", style="bold"), f["first_check"])
            if later:
                shown = ", ".join(g["window"]["start"][5:16] for g in later[:6])
                more = f" and {len(later) - 6} more" if len(later) > 6 else ""
                body.add_row("fired again", f"{len(later)} later window(s): {shown}{more}")
            console.print(
                Panel(body, title=Text(f["headline"], style=f"bold {style}"), border_style=style)
            )
    else:
        console.print(Text("no findings", style="green"))

    console.print(_windows_table(report))
    if report["incidents"]:
        first = report["incidents"][0]["incident_id"]
        n = len(report["incidents"])
        console.print(Text(f"{n} incident card(s), first {first}", style="red"))
    if report.get("handoff"):
        h = report["handoff"]
        console.print(
            Panel(
                Group(
                    Text(f"candidate {h['candidate_template']} for {h['incident_id']}"),
                    Text(f"required: {h['required_metric']}"),
                    Text(f"status: {h['promotion_status']}", style="bold yellow"),
                ),
                title="experiment handoff",
            )
        )
    elif "handoff" in report:
        console.print(Text("no PAGE incident: no experiment handoff", style="yellow"))


def _windows_table(report: dict[str, Any]) -> Table:
    card = report["rate_card"]
    windows = report["windows"]
    shown = windows
    if len(windows) > MAX_ROWS:
        flagged = {w["start"] for w in windows if w["findings"]}
        tail = {w["start"] for w in windows[-(MAX_ROWS // 2) :]}
        shown = [w for w in windows if w["start"] in flagged | tail]
    title = "windows" if shown is windows else f"windows ({len(shown)} of {len(windows)} shown)"
    title += f", cost by rate card {card}" if card else ", costs unpriced (no rate card)"
    table = Table(title=title, header_style="bold", title_justify="left")
    table.add_column("start (UTC)", no_wrap=True)
    table.add_column("req", justify="right")
    table.add_column("unsafe", justify="right", no_wrap=True)
    table.add_column("abstain", justify="right", no_wrap=True)
    table.add_column("TTFT ms p50/95/99", justify="right", no_wrap=True)
    table.add_column("tok/s p50", justify="right", no_wrap=True)
    table.add_column("cost USD", justify="right")
    table.add_column("nudge/stop", justify="right", no_wrap=True)
    for w in shown:
        loops = w["loops"]
        tps = w["output_tps"]
        speed = "-" if tps["p50"] is None else f"{tps['p50']:.1f}"
        if tps["malformed_timings"]:
            speed += f" ({tps['malformed_timings']} bad)"
        cost = "unpriced" if w["cost_usd"] is None else f"{w['cost_usd']:.6f}"
        if card and w["unpriced_calls"] and w["cost_usd"] is not None:
            cost += f" +{w['unpriced_calls']} unpriced"
        table.add_row(
            w["start"][5:16].replace("T", " "),
            str(w["requests"]),
            Text(
                f"{w['unsafe_serves']} {_pct(w['unsafe_serve_rate'])}",
                style="bold red" if w["unsafe_serves"] else "",
            ),
            f"{w['abstentions']} {_pct(w['abstention_rate'])}",
            "/".join(_ms(w["ttft_ms"][k]) for k in ("p50", "p95", "p99")),
            speed,
            cost,
            f"{loops['nudges']}/{loops['stops']}",
        )
    return table
