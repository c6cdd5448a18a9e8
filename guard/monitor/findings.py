"""A window's figures and the policy's rules over them: one implementation for both paths.

``WindowStats`` is what the batch report (DuckDB) and the live monitor (counters) both
produce; ``findings()`` turns it into findings. Invariants page (``max_unsafe_serves``);
budgets warn (``max_p95_ttft_ms``, ``max_window_cost_usd``). Each finding carries an
exemplar, a call to open first:

- unsafe serves: the first unsafe call (by ``ts``);
- p95 TTFT: the first streamed call (by ``ts``) slower than the budget;
- window cost: the window's most expensive priced call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from guard.monitor.definitions import METRIC_COST, METRIC_TTFT, METRIC_UNSAFE
from guard.monitor.policy import Policy

PAGE = "PAGE"
WARN = "WARN"
# How each metric's exemplar is chosen (both engines pick it this way).
EXEMPLAR_RULES = {
    METRIC_UNSAFE: "the first unsafe call",
    METRIC_TTFT: "the first streamed call slower than the budget",
    METRIC_COST: "the most expensive priced call",
}


@dataclass
class LoopStats:
    nudges: int = 0
    stops: int = 0
    stops_by_rule: dict[str, int] = field(default_factory=dict)
    stops_by_tool: dict[str, int] = field(default_factory=dict)
    sessions_stopped: int = 0
    streak_calls: int = 0
    streak_input_tokens: int = 0
    streak_output_tokens: int = 0
    streak_cost_usd: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "nudges": self.nudges,
            "stops": self.stops,
            "stops_by_rule": self.stops_by_rule,
            "stops_by_tool": self.stops_by_tool,
            "sessions_stopped": self.sessions_stopped,
            "streak_calls": self.streak_calls,
            "streak_input_tokens": self.streak_input_tokens,
            "streak_output_tokens": self.streak_output_tokens,
            "streak_cost_usd": _round_usd(self.streak_cost_usd),
        }


@dataclass
class WindowStats:
    """Every figure of one window; ``exemplars`` maps a metric to its exemplar call."""

    start: datetime
    end: datetime
    requests: int = 0
    routes: dict[str, int] = field(default_factory=dict)
    app_routes: dict[str, int] = field(default_factory=dict)
    unsafe_serves: int = 0
    abstentions: int = 0
    failure_stages: dict[str, int] = field(default_factory=dict)
    streamed: int = 0
    ttft_p50: float | None = None
    ttft_p95: float | None = None
    ttft_p99: float | None = None
    tps_p5: float | None = None
    tps_p50: float | None = None
    tps_p95: float | None = None
    tps_calls: int = 0
    malformed_timings: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = None
    priced_calls: int = 0
    unpriced_calls: int = 0
    unpriced_models: list[str] = field(default_factory=list)
    loops: LoopStats = field(default_factory=LoopStats)
    exemplars: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def unsafe_serve_rate(self) -> float | None:
        return self.unsafe_serves / self.requests if self.requests else None

    @property
    def abstention_rate(self) -> float | None:
        return self.abstentions / self.requests if self.requests else None


@dataclass(frozen=True)
class Finding:
    severity: str
    metric: str
    value: float
    threshold: float
    window_start: datetime
    window_end: datetime
    requests: int
    exemplar: dict[str, Any] | None
    first_check: str
    rate_card: str | None = None

    @property
    def headline(self) -> str:
        """``PAGE unsafe_claim_served=2/6``: what a pager or a CI log shows."""
        if self.metric == METRIC_UNSAFE:
            shown = f"{int(self.value)}/{self.requests}"
        elif self.metric == METRIC_COST:
            shown = f"{self.value:.6f} USD ({self.rate_card})"
        else:
            shown = f"{self.value:g}"
        return f"{self.severity} {self.metric}={shown}"

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "severity": self.severity,
            "metric": self.metric,
            "value": _round_usd(self.value) if self.metric == METRIC_COST else self.value,
            "threshold": self.threshold,
            "requests": self.requests,
            "window": {"start": iso(self.window_start), "end": iso(self.window_end)},
            "headline": self.headline,
            "exemplar": self.exemplar,
            "exemplar_rule": EXEMPLAR_RULES[self.metric],
            "first_check": self.first_check,
        }
        if self.metric == METRIC_COST:
            out["rate_card"] = self.rate_card
        return out


def findings(policy: Policy, stats: WindowStats) -> list[Finding]:
    """The policy's rules over one window: PAGE invariants first, then WARN budgets."""
    out: list[Finding] = []

    def add(severity: str, metric: str, value: float, threshold: float) -> None:
        out.append(
            Finding(
                severity,
                metric,
                value,
                threshold,
                stats.start,
                stats.end,
                stats.requests,
                stats.exemplars.get(metric),
                policy.first_check,
                policy.rate_card_version,
            )
        )

    if policy.max_unsafe_serves is not None and stats.unsafe_serves > policy.max_unsafe_serves:
        add(PAGE, METRIC_UNSAFE, stats.unsafe_serves, policy.max_unsafe_serves)
    if (
        policy.max_p95_ttft_ms is not None
        and stats.ttft_p95 is not None
        and stats.ttft_p95 > policy.max_p95_ttft_ms
    ):
        add(WARN, METRIC_TTFT, stats.ttft_p95, policy.max_p95_ttft_ms)
    if (
        policy.max_window_cost_usd is not None
        and stats.cost_usd is not None
        and stats.cost_usd > policy.max_window_cost_usd
    ):
        add(WARN, METRIC_COST, stats.cost_usd, policy.max_window_cost_usd)
    return out


def iso(ts: datetime) -> str:
    """UTC ISO 8601 with ``Z``, as records write it."""
    return ts.isoformat().replace("+00:00", "Z")


def _round_usd(value: float | None) -> float | None:
    return None if value is None else round(value, 9)


def window_dict(stats: WindowStats, policy: Policy) -> dict[str, Any]:
    """One window as JSON: the keys ``loopguard report --json`` promises, and more."""
    rate = stats.unsafe_serve_rate
    return {
        "start": iso(stats.start),
        "end": iso(stats.end),
        "requests": stats.requests,
        "routes": stats.routes,
        "app_routes": stats.app_routes,
        "unsafe_serves": stats.unsafe_serves,
        "unsafe_serve_rate": rate,
        "safe_route_rate": None if rate is None else 1 - rate,
        "abstentions": stats.abstentions,
        "abstention_rate": stats.abstention_rate,
        "failure_stages": stats.failure_stages,
        "ttft_ms": {
            "p50": stats.ttft_p50,
            "p95": stats.ttft_p95,
            "p99": stats.ttft_p99,
            "streamed_calls": stats.streamed,
        },
        "output_tps": {
            "p5": stats.tps_p5,
            "p50": stats.tps_p50,
            "p95": stats.tps_p95,
            "calls": stats.tps_calls,
            "malformed_timings": stats.malformed_timings,
        },
        "tokens": {
            "input": stats.input_tokens,
            "cached_input": stats.cached_input_tokens,
            "output": stats.output_tokens,
        },
        "cost_usd": _round_usd(stats.cost_usd),
        "rate_card": policy.rate_card_version,
        "priced_calls": stats.priced_calls,
        "unpriced_calls": stats.unpriced_calls,
        "unpriced_models": stats.unpriced_models,
        "loops": stats.loops.as_dict(),
        "findings": [f.as_dict() for f in findings(policy, stats)],
    }


def group_findings(
    found: list[dict[str, Any]],
) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Findings as JSON, grouped by (severity, metric): the earliest of each in full,
    the later windows after it (an on-call engineer opens the first one)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for f in found:
        groups.setdefault((f["severity"], f["metric"]), []).append(f)
    ordered = sorted(
        groups.values(), key=lambda g: (g[0]["severity"] != PAGE, g[0]["window"]["start"])
    )
    return [(g[0], g[1:]) for g in ordered]
