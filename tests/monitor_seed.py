"""The seed case of issue 11: six calls, four safe and two unsafe serves, one window.

Shared by the unit tests (records written directly) and the end-to-end test (the same
decisions sent as ``x-loopguard-app-*`` headers by a fake model behind loopguard).
"""

from __future__ import annotations

from typing import Any

_POLICY_TEMPLATE = """\
[monitor]
policy_id = "delivery-grounding-slo-v1"
window = "{window}"
max_unsafe_serves = 0          # invariant: PAGE when exceeded
max_p95_ttft_ms = 500          # WARN
max_window_cost_usd = 0.002    # WARN
first_check = "Compare serving-gate template with tracking-answerer-v1."

[[rate_cards]]
version = "internal-fixture-2026-05-27"
models = ["*"]
input_per_million = 1.00
cached_input_per_million = 0.10
output_per_million = 5.00
"""


def policy_toml(window: str = "5m") -> str:
    """The seed policy with its windows ``window`` long."""
    return _POLICY_TEMPLATE.format(window=window)


POLICY_TOML = policy_toml()

GOOD = "tracking-answerer-v1"
BAD = "tracking-answerer-v1.1-regression"
EVIDENCE = "fastship@v17"

# The app's decision headers per call (header names as the app sends them).
APP_HEADERS: list[dict[str, str]] = [
    {"route": "serve", "unsafe-claim-served": "false", "template": GOOD,
     "evidence-version": EVIDENCE},
    {"route": "abstain", "unsafe-claim-served": "false", "template": GOOD,
     "evidence-version": EVIDENCE, "failure-stage": "claim_generation"},
    {"route": "abstain", "unsafe-claim-served": "false", "template": GOOD,
     "evidence-version": EVIDENCE, "failure-stage": "claim_generation"},
    {"route": "abstain", "unsafe-claim-served": "false", "template": GOOD,
     "failure-stage": "evidence_admission"},
    {"route": "serve", "unsafe-claim-served": "true", "template": BAD,
     "evidence-version": EVIDENCE, "failure-stage": "serving_gate"},
    {"route": "serve", "unsafe-claim-served": "true", "template": BAD,
     "evidence-version": EVIDENCE, "failure-stage": "serving_gate"},
]  # fmt: skip
# (input incl. cached, cached, output) tokens and (ttft, total) ms, from the issue.
TOKENS = [(188, 80, 27), (196, 80, 20), (192, 80, 21), (160, 64, 15), (198, 80, 29), (201, 80, 30)]
TIMES = [(172, 410), (181, 395), (188, 402), (205, 382), (218, 430), (240, 455)]
MODEL = "gpt-fixture-1"


def seed_records(day: str = "2026-05-27", hour: str = "09") -> list[dict[str, Any]]:
    """The six records as ``guard.records`` writes them (loopguard served all six)."""
    out = []
    for i, (headers, (inp, cached, outp), (ttft, total)) in enumerate(
        zip(APP_HEADERS, TOKENS, TIMES, strict=True), start=1
    ):
        out.append(
            {
                "ts": f"{day}T{hour}:00:0{i}.000000Z",
                "event": "call",
                "request_id": f"req-{i}",
                "trace_id": f"{i:032x}",
                "span_id": f"{i:016x}",
                "session": f"s_seed{i}",
                "route": "serve",
                "failure_stage": "passed",
                "tool": None,
                "model": MODEL,
                "params_hash": None,
                "repeat_count": None,
                "stall_rule": None,
                "stream": True,
                "input_tokens": inp,
                "output_tokens": outp,
                "cached_input_tokens": cached,
                "ttft_ms": float(ttft),
                "total_ms": float(total),
                "timing_malformed": False,
                "app": {k.replace("-", "_"): v for k, v in headers.items()},
            }
        )
    return out
