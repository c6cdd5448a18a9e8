"""A monitoring policy as Prometheus alerting rules, for ``loopguard alerts``.

The live monitor (``/status``) sees one process; a deployment of many replicas pages
through its own Prometheus and Alertmanager instead. These rules say the same policy in
PromQL over what each replica's admin listener exposes on ``/metrics``, with the names
as the OpenTelemetry Prometheus exporter renders them (dots to underscores, ``_total``
on counters, the unit ``s`` as ``_seconds``; the counters' ``{call}`` unit adds
nothing):

- PAGE (invariant): unsafe serves over the policy window, summed over every replica,
  above ``max_unsafe_serves``. ``increase()`` extrapolates to the window's edges, so the
  count is rounded: never below the increments Prometheus saw, one unsafe serve is
  enough against the default 0. The exporter starts every route's series at 0, so a
  replica's first unsafe serve is an increase like any other.
- WARN (budget): p95 time to first chunk over the window, ``histogram_quantile`` over
  ``gen_ai.client.operation.time_to_first_chunk``, above ``max_p95_ttft_ms``. This is an
  estimate inside the histogram's buckets (the GenAI conventions' doubling bounds,
  0.32 s, 0.64 s, ...), not the exact nearest-rank p95 of ``/status`` and ``loopguard
  report``.
- ``max_window_cost_usd`` has no rule: cost is not a metric. The token histogram does
  not split cached input (priced apart on the rate card), and the rate card lives in
  the policy, not in the proxy. The file says so in a comment; ``/status`` and
  ``loopguard report`` price each call with the versioned rate card.

Every rule carries the policy id and ``first_check`` in its annotations; the exemplar
(request id, trace id, template ...) is on each replica's ``/status`` and in ``loopguard
report`` over the records, since a Prometheus alert cannot name one call.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from guard.monitor.definitions import METRIC_TTFT, METRIC_UNSAFE
from guard.monitor.policy import Policy, parse_duration

# The admin listener's /metrics names, as rendered (checked against a real scrape by
# tests/e2e/test_live_monitoring.py).
PROM_UNSAFE_SERVES = "loopguard_unsafe_serves_total"
PROM_CALLS = "loopguard_calls_total"
PROM_STOPS = "loopguard_stops_total"
PROM_TTFT_BUCKET = "gen_ai_client_operation_time_to_first_chunk_seconds_bucket"

ALERT_UNSAFE = "LoopguardUnsafeServes"
ALERT_TTFT = "LoopguardP95TimeToFirstChunk"
SEVERITY_PAGE = "page"
SEVERITY_WARN = "warn"

_UNITS = (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1))
_TEMPLATE_DELIMS = re.compile(r"\{\{|\}\}")
_SELECTOR = re.compile(r'^\s*([a-zA-Z_][a-zA-Z0-9_]*\s*(=|!=|=~|!~)\s*"([^"\\]|\\.)*"\s*,?\s*)*$')


def prom_duration(delta: timedelta) -> str:
    """A timedelta as a Prometheus duration (``5m``, ``90s``, ``1500ms``): whole units only."""
    ms = round(delta.total_seconds() * 1000)
    if ms <= 0:
        raise ValueError(f"not a positive duration: {delta}")
    for unit, size in _UNITS:
        if ms % size == 0:
            return f"{ms // size}{unit}"
    raise AssertionError("unreachable: 1 ms divides every whole millisecond")


def _literal(text: str) -> str:
    """User text (policy id, first check) made safe for Prometheus' Go templates."""
    return _TEMPLATE_DELIMS.sub(lambda m: '{{ "' + m.group(0) + '" }}', text)


def _matchers(selector: str) -> str:
    if not _SELECTOR.match(selector):
        raise ValueError(
            f'not a PromQL label selector: {selector!r} (e.g. job="loopguard", env=~"prod.*")'
        )
    return "{" + selector.strip().rstrip(",") + "}" if selector.strip() else ""


def _annotations(policy: Policy, metric: str, threshold: str, window: str, summary: str) -> dict:
    return {
        "summary": summary,
        "policy_id": _literal(policy.policy_id),
        "metric": metric,
        "threshold": threshold,
        "window": window,
        "first_check": _literal(policy.first_check),
        "exemplar": (
            "GET /status on each replica's admin listener names the first violating "
            "call (request_id, trace_id, session, template, evidence version, stage); "
            "loopguard report over the records gives the incident card."
        ),
    }


def alert_rules(policy: Policy, *, hold: str = "0s", selector: str = "") -> dict[str, Any]:
    """The policy as one Prometheus rule group (the YAML document as a dict).

    ``hold``: the rules' ``for`` (how long the condition must hold before firing; ``0s``:
    at the first evaluation that sees it). ``selector``: label matchers added to every
    series (``job="loopguard"``) when one Prometheus scrapes more than this deployment.
    """
    window = prom_duration(policy.window_delta)
    hold = prom_duration(parse_duration(hold)) if hold.strip() not in ("0", "0s") else "0s"
    match = _matchers(selector)
    labels = {"policy_id": _literal(policy.policy_id)}
    rules: list[dict[str, Any]] = []
    if policy.max_unsafe_serves is not None:
        limit = policy.max_unsafe_serves
        rules.append(
            {
                "alert": ALERT_UNSAFE,
                "expr": f"round(sum(increase({PROM_UNSAFE_SERVES}{match}[{window}]))) > {limit}",
                "for": hold,
                "labels": {"severity": SEVERITY_PAGE, **labels},
                "annotations": _annotations(
                    policy,
                    METRIC_UNSAFE,
                    str(limit),
                    window,
                    f"PAGE {METRIC_UNSAFE}: {{{{ $value }}}} unsafe serves in the last "
                    f"{window} (max {limit})",
                ),
            }
        )
    if policy.max_p95_ttft_ms is not None:
        limit_ms = f"{policy.max_p95_ttft_ms:g}"
        p95 = (
            f"histogram_quantile(0.95, sum by (le) "
            f"(rate({PROM_TTFT_BUCKET}{match}[{window}]))) * 1000"
        )
        rules.append(
            {
                "alert": ALERT_TTFT,
                "expr": f"{p95} > {limit_ms}",
                "for": hold,
                "labels": {"severity": SEVERITY_WARN, **labels},
                "annotations": _annotations(
                    policy,
                    METRIC_TTFT,
                    limit_ms,
                    window,
                    f'WARN {METRIC_TTFT}: {{{{ $value | printf "%.0f" }}}} ms over the '
                    f"last {window} (budget {limit_ms} ms; bucket estimate)",
                ),
            }
        )
    return {"groups": [{"name": f"loopguard:{policy.policy_id}", "rules": rules}]}


def render(policy: Policy, *, hold: str = "0s", selector: str = "") -> str:
    """The rules file: a header saying what it covers, then the YAML."""
    import yaml  # only ``loopguard alerts`` needs it

    rules = alert_rules(policy, hold=hold, selector=selector)
    header = [
        f"# Prometheus alerting rules for loopguard policy {policy.policy_id!r},",
        "# written by `loopguard alerts`. Every replica's admin listener ([admin] listen)",
        "# serves /metrics; the rules sum over all of them.",
        f"# Window {policy.window}.",
    ]
    if policy.max_unsafe_serves is not None:
        header.append(f"# PAGE: unsafe serves > {policy.max_unsafe_serves}.")
    if policy.max_p95_ttft_ms is not None:
        header.append(
            f"# WARN: p95 time to first chunk > {policy.max_p95_ttft_ms:g} ms "
            "(histogram_quantile over the TTFT buckets: an estimate)."
        )
    if policy.max_window_cost_usd is not None:
        header += [
            f"# max_window_cost_usd = {policy.max_window_cost_usd:g}: NO rule. Cost is not a",
            "# metric: the token histogram does not split cached input, and the rate card",
            "# lives in the policy. GET /status on a replica, or `loopguard report` over the",
            "# records, prices each call with the policy's versioned rate card.",
        ]
    if policy.max_unsafe_serves is None and policy.max_p95_ttft_ms is None:
        header.append("# The policy sets no threshold a metric can carry: no rules.")
    # One line per value: a PromQL expression folded over lines reads badly.
    body = yaml.safe_dump(rules, sort_keys=False, allow_unicode=True, width=1 << 16)
    return "\n".join(header) + "\n" + body
