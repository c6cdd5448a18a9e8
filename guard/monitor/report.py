"""``loopguard report``: the batch report as one JSON-able dict, from records to findings.

``build_report`` reads the inputs (``sources``), runs the engine (``windows``), applies
the policy's rules (``findings``), opens an incident card per PAGE and, when asked, an
experiment handoff (``incident``). Renderers (terminal, HTML) only draw this dict, so
every number shown anywhere is computed once.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, BinaryIO

from guard.monitor import incident, sources, windows
from guard.monitor.findings import PAGE, findings, iso, window_dict
from guard.monitor.policy import NO_POLICY, Policy, parse_duration

EXIT_OK, EXIT_BAD_INPUT, EXIT_PAGE = 0, 1, 2


class ReportError(ValueError):
    """Bad input for a report: the message is for the user (exit code 1)."""


@dataclass(frozen=True)
class Options:
    inputs: list[str]
    policy: Policy | None = None
    window: str | None = None  # "5m", "all"; default: the policy's, else "all"
    since: datetime | None = None
    until: datetime | None = None
    candidate: str | None = None


def window_of(options: Options) -> tuple[str, timedelta | None]:
    """The window as given (``--window``), else the policy's, else one for everything."""
    text = options.window or (options.policy.window if options.policy else "all")
    if text == "all":
        return text, None
    try:
        return text, parse_duration(text)
    except ValueError as exc:
        raise ReportError(f"--window: {exc}") from None


def build_report(options: Options, stdin: BinaryIO | None = None) -> dict[str, Any]:
    """The whole report. Raises ``ReportError`` (or ``SourceError``) on bad input."""
    policy = options.policy or NO_POLICY
    if options.since and options.until and options.since >= options.until:
        raise ReportError("--since must be before --until")
    window_text, width = window_of(options)
    with sources.resolved(options.inputs, stdin) as (paths, shown_paths):
        try:
            scan = windows.scan(paths, policy, width, options.since, options.until)
        except windows.EngineError as exc:
            raise ReportError(f"cannot read the records: {exc}") from None
        # Only when the engine counted some: a clean input is not read twice.
        examples = sources.locate_malformed(paths) if scan.malformed else []
        shown = dict(zip(paths, shown_paths, strict=True))  # a spooled stdin shows as "-"
        examples = [sources.Malformed(shown[m.path], m.line, m.reason) for m in examples]
    window_dicts = [window_dict(w, policy) for w in scan.windows]
    all_findings = [f for w in scan.windows for f in findings(policy, w)]
    all_findings.sort(key=lambda f: (f.severity != PAGE, f.window_start))
    has_policy = options.policy is not None
    incidents = [
        incident.card(f, policy) for f in all_findings if f.severity == PAGE and has_policy
    ]
    report: dict[str, Any] = {
        "policy_id": policy.policy_id if has_policy else None,
        "rate_card": policy.rate_card_version,
        "policy": policy.model_dump(exclude={"rate_cards"}) if has_policy else {},
        "window": window_text,
        "since": iso(options.since) if options.since else None,
        "until": iso(options.until) if options.until else None,
        "inputs": shown_paths,
        "records": scan.records,
        "malformed_records": {
            "count": scan.malformed,
            "examples": [m.as_dict() for m in examples],
        },
        "notes": [scan.memory_note] if scan.memory_note else [],
        "first_window_start": iso(scan.windows[0].start) if scan.windows else None,
        "last_window_end": iso(scan.windows[-1].end) if scan.windows else None,
        "totals": _totals(window_dicts, policy),
        "findings": [f.as_dict() for f in all_findings],
        "windows": window_dicts,
        "incidents": incidents,
    }
    if options.candidate is not None:
        report["handoff"] = (
            incident.handoff(incidents[0], options.candidate, policy) if incidents else None
        )
    report["exit_code"] = EXIT_PAGE if any(f.severity == PAGE for f in all_findings) else EXIT_OK
    return report


def _totals(window_dicts: list[dict[str, Any]], policy: Policy) -> dict[str, Any]:
    """Sums over all windows (percentiles are per window only: they do not add up)."""
    requests = sum(w["requests"] for w in window_dicts)
    unsafe = sum(w["unsafe_serves"] for w in window_dicts)
    abstain = sum(w["abstentions"] for w in window_dicts)
    costs = [w["cost_usd"] for w in window_dicts if w["cost_usd"] is not None]
    return {
        "requests": requests,
        "unsafe_serves": unsafe,
        "unsafe_serve_rate": unsafe / requests if requests else None,
        "abstentions": abstain,
        "malformed_timings": sum(w["output_tps"]["malformed_timings"] for w in window_dicts),
        "cost_usd": round(sum(costs), 9) if costs else None,
        "rate_card": policy.rate_card_version,
        "unpriced_calls": sum(w["unpriced_calls"] for w in window_dicts),
        "failure_stages": _add(w["failure_stages"] for w in window_dicts),
        "stops": sum(w["loops"]["stops"] for w in window_dicts),
        "stops_by_rule": _add(w["loops"]["stops_by_rule"] for w in window_dicts),
        "stops_by_tool": _add(w["loops"]["stops_by_tool"] for w in window_dicts),
        "streak_calls": sum(w["loops"]["streak_calls"] for w in window_dicts),
        "streak_output_tokens": sum(w["loops"]["streak_output_tokens"] for w in window_dicts),
        "nudges": sum(w["loops"]["nudges"] for w in window_dicts),
    }


def evaluate(handoff_path: str, inputs: list[str], stdin: BinaryIO | None = None) -> dict[str, Any]:
    """``loopguard evaluate``: the handoff's required metric on the candidate's records."""
    try:
        with open(handoff_path, "rb") as f:
            data = json.loads(f.read())
    except OSError as exc:
        raise ReportError(f"{handoff_path}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ReportError(f"{handoff_path}: not JSON ({exc})") from None
    try:
        h = incident.check_handoff(data, handoff_path)
        width = parse_duration(h.get("window") or "5m")
    except ValueError as exc:
        raise ReportError(str(exc)) from None
    with sources.resolved(inputs, stdin) as (paths, _shown):
        try:
            scan = windows.scan(paths, NO_POLICY, width, template=h["candidate_template"])
        except windows.EngineError as exc:
            raise ReportError(f"cannot read the records: {exc}") from None
    result = incident.evaluate_windows(h, [window_dict(w, NO_POLICY) for w in scan.windows])
    result["evaluation"]["malformed_records"] = scan.malformed
    return result


def _add(mappings: Iterable[dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for m in mappings:
        total.update(m)
    return dict(total.most_common())
