"""Incident cards (one per PAGE), the experiment handoff, and its evaluation.

The monitor never promotes a fix: a handoff starts ``BLOCKED_PENDING_EVALUATION`` and
``evaluate`` only measures the candidate's records against the required metric,
moving the status to ``PASSED`` or ``BLOCKED`` with the figures. No candidate records
is ``BLOCKED``: nothing measured is not a pass.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from guard.monitor.definitions import METRIC_UNSAFE
from guard.monitor.findings import Finding
from guard.monitor.policy import Policy

HANDOFF_KIND = "loopguard.experiment_handoff/v1"
REQUIRED_METRIC = "unsafe_claim_served == 0 on regression and holdout windows"
PENDING = "BLOCKED_PENDING_EVALUATION"
PASSED = "PASSED"
BLOCKED = "BLOCKED"


def incident_id(f: Finding, policy: Policy) -> str:
    return f"{policy.policy_id}:{f.metric}:{f.window_start.strftime('%Y%m%dT%H%M%SZ')}"


def card(f: Finding, policy: Policy) -> dict[str, Any]:
    """An incident card for one PAGE finding: what broke, where, what to open first."""
    ex = f.exemplar or {}
    return {
        "incident_id": incident_id(f, policy),
        "severity": f.severity,
        "policy_id": policy.policy_id,
        "headline": f.headline,
        "metric": f.metric,
        "value": f.value,
        "threshold": f.threshold,
        "requests": f.requests,
        "window": {"start": _iso(f.window_start), "end": _iso(f.window_end)},
        "exemplar": f.exemplar,
        "failing_template": ex.get("template"),
        "evidence_version": ex.get("evidence_version"),
        "failure_stage": ex.get("failure_stage"),
        "first_check": f.first_check,
        "rate_card": policy.rate_card_version,
    }


def markdown(c: dict[str, Any]) -> str:
    """The card for a ticket or a chat: headline, window, exemplar, first check."""
    ex = c.get("exemplar") or {}
    lines = [
        f"# {c['headline']}",
        "",
        f"- **Incident**: `{c['incident_id']}`",
        f"- **Policy**: `{c['policy_id']}`: {c['metric']} = {c['value']}"
        f" (threshold {c['threshold']}) over {c['requests']} requests",
        f"- **Window**: {c['window']['start']} .. {c['window']['end']}",
        f"- **Failing template**: `{c.get('failing_template')}`",
        f"- **Evidence version**: `{c.get('evidence_version')}`",
        f"- **First failed stage**: `{c.get('failure_stage')}`",
        "",
        "## Exemplar (the first unsafe call)" if c["metric"] == METRIC_UNSAFE else "## Exemplar",
        "",
        "| field | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | `{v}` |" for k, v in ex.items()]
    lines += ["", "## First check", "", c.get("first_check") or "(the policy names none)", ""]
    return "\n".join(lines)


def handoff(c: dict[str, Any], candidate: str, policy: Policy) -> dict[str, Any]:
    """The record a controlled run starts from: blocked until ``evaluate`` measures it."""
    return {
        "kind": HANDOFF_KIND,
        "incident_id": c["incident_id"],
        "incident_policy": c["policy_id"],
        "failing_template": c.get("failing_template"),
        "exemplar": c.get("exemplar"),
        "evidence_version": c.get("evidence_version"),
        "candidate_template": candidate,
        "required_metric": REQUIRED_METRIC,
        "metric": METRIC_UNSAFE,
        "max_unsafe_serves": 0,
        "window": policy.window,
        "promotion_status": PENDING,
    }


def evaluate_windows(h: dict[str, Any], window_dicts: list[dict[str, Any]]) -> dict[str, Any]:
    """The handoff with its status decided from the candidate's windows.

    PASSED only when the candidate has records and every window of them has
    ``unsafe_serves <= max_unsafe_serves`` (0).
    """
    limit = int(h.get("max_unsafe_serves", 0))
    requests = sum(w["requests"] for w in window_dicts)
    unsafe = sum(w["unsafe_serves"] for w in window_dicts)
    failing = [w for w in window_dicts if w["unsafe_serves"] > limit]
    if requests == 0:
        status, reason = BLOCKED, f"no records with template {h['candidate_template']!r}"
    elif failing:
        status = BLOCKED
        reason = f"unsafe_claim_served={unsafe}/{requests} in {len(failing)} window(s)"
    else:
        status = PASSED
        reason = f"unsafe_claim_served=0/{requests} over {len(window_dicts)} window(s)"
    return {
        **h,
        "promotion_status": status,
        "evaluation": {
            "status": status,
            "reason": reason,
            "candidate_template": h["candidate_template"],
            "requests": requests,
            "unsafe_serves": unsafe,
            "windows": [
                {
                    "start": w["start"],
                    "end": w["end"],
                    "requests": w["requests"],
                    "unsafe_serves": w["unsafe_serves"],
                    "abstentions": w["abstentions"],
                    "passed": w["unsafe_serves"] <= limit,
                }
                for w in window_dicts
            ],
        },
    }


def check_handoff(data: Any, source: str) -> dict[str, Any]:
    """A handoff read from a file: the fields ``evaluate`` needs, or a clear error."""
    if not isinstance(data, dict) or data.get("kind") != HANDOFF_KIND:
        raise ValueError(f"{source}: not a loopguard experiment handoff (kind {HANDOFF_KIND})")
    for key in ("candidate_template", "incident_policy"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise ValueError(f"{source}: handoff field {key!r} is missing")
    return data


def _iso(ts: datetime) -> str:
    return ts.isoformat().replace("+00:00", "Z")
