"""``loopguard alerts``: a monitoring policy as Prometheus alerting rules.

promtool and a real Prometheus check the rules in tests/e2e/test_live_monitoring.py;
here, what the rules say.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from guard.cli import main
from guard.monitor.alerts import alert_rules, prom_duration, render
from guard.monitor.policy import policy_from_mapping

ISSUE_POLICY = {
    "monitor": {
        "policy_id": "delivery-grounding-slo-v1",
        "window": "5m",
        "max_unsafe_serves": 0,
        "max_p95_ttft_ms": 500,
        "max_window_cost_usd": 0.002,
        "first_check": "Compare serving-gate template with tracking-answerer-v1.",
    },
    "rate_cards": [
        {
            "version": "internal-fixture-2026-05-27",
            "models": ["*"],
            "input_per_million": 1.0,
            "cached_input_per_million": 0.1,
            "output_per_million": 5.0,
        }
    ],
}


def _policy(**monitor: object):
    return policy_from_mapping({**ISSUE_POLICY, "monitor": {**ISSUE_POLICY["monitor"], **monitor}})


def test_the_issue_policy_pages_on_unsafe_serves_and_warns_on_p95_ttft() -> None:
    [group] = alert_rules(_policy())["groups"]
    page, warn = group["rules"]
    assert page["alert"] == "LoopguardUnsafeServes"
    assert page["expr"] == "round(sum(increase(loopguard_unsafe_serves_total[5m]))) > 0"
    assert page["labels"] == {"severity": "page", "policy_id": "delivery-grounding-slo-v1"}
    assert page["for"] == "0s"
    for rule in (page, warn):
        notes = rule["annotations"]
        assert notes["policy_id"] == "delivery-grounding-slo-v1"
        assert notes["first_check"] == "Compare serving-gate template with tracking-answerer-v1."
        assert notes["window"] == "5m" and "/status" in notes["exemplar"]
    assert warn["labels"]["severity"] == "warn"
    assert warn["expr"] == (
        "histogram_quantile(0.95, sum by (le) (rate("
        "gen_ai_client_operation_time_to_first_chunk_seconds_bucket[5m]))) * 1000 > 500"
    )
    assert (page["annotations"]["metric"], warn["annotations"]["metric"]) == (
        "unsafe_claim_served",
        "p95_ttft_ms",
    )


def test_cost_has_no_rule_and_the_file_says_why() -> None:
    text = render(_policy())
    rules = yaml.safe_load(text)["groups"][0]["rules"]
    assert not [r for r in rules if "cost" in r["expr"]]
    assert "max_window_cost_usd = 0.002: NO rule. Cost is not a" in text
    assert "cost" not in render(_policy(max_window_cost_usd=None)).split("groups:")[0]


def test_thresholds_the_policy_leaves_out_have_no_rule() -> None:
    rules = alert_rules(_policy(max_p95_ttft_ms=None, max_unsafe_serves=3))["groups"][0]["rules"]
    assert [r["alert"] for r in rules] == ["LoopguardUnsafeServes"]
    assert rules[0]["expr"].endswith("> 3")
    none = alert_rules(_policy(max_p95_ttft_ms=None, max_unsafe_serves=None))
    assert none["groups"][0]["rules"] == []


def test_window_hold_and_selector() -> None:
    rules = alert_rules(_policy(window="90s"), hold="2m", selector='job="lg", env=~"prod.*"')
    page, warn = rules["groups"][0]["rules"]
    assert 'loopguard_unsafe_serves_total{job="lg", env=~"prod.*"}[90s]' in page["expr"]
    assert '_bucket{job="lg", env=~"prod.*"}[90s]' in warn["expr"]
    assert page["for"] == warn["for"] == "2m"
    with pytest.raises(ValueError, match="selector"):
        alert_rules(_policy(), selector="job=lg")
    with pytest.raises(ValueError, match="selector"):
        alert_rules(_policy(), selector='job="lg"} or vector(1) #')


def test_prom_durations_are_whole_units() -> None:
    assert prom_duration(timedelta(minutes=5)) == "5m"
    assert prom_duration(timedelta(hours=1.5)) == "90m"
    assert prom_duration(timedelta(days=1)) == "1d"
    assert prom_duration(timedelta(milliseconds=1500)) == "1500ms"


def test_user_text_cannot_break_the_alert_templates() -> None:
    policy = _policy(first_check="Check {{ $labels.instance }} and }} then {{")
    notes = alert_rules(policy)["groups"][0]["rules"][0]["annotations"]
    assert notes["first_check"] == (
        'Check {{ "{{" }} $labels.instance {{ "}}" }} and {{ "}}" }} then {{ "{{" }}'
    )


def test_cli_writes_the_rules_file(tmp_path: Path, capsys) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[monitor]\npolicy_id = "p1"\nwindow = "10m"\nmax_unsafe_serves = 0\n'
        'first_check = "Look."\n'
    )
    out = tmp_path / "rules.yml"
    assert main(["alerts", "--policy", str(policy), "-o", str(out), "--for", "1m"]) == 0
    rules = yaml.safe_load(out.read_text())["groups"][0]["rules"]
    assert rules[0]["for"] == "1m" and "[10m]" in rules[0]["expr"]
    assert main(["alerts", "--policy", str(policy)]) == 0
    assert "LoopguardUnsafeServes" in capsys.readouterr().out
    assert main(["alerts", "--policy", str(tmp_path / "missing.toml")]) == 1
    assert "cannot read" in capsys.readouterr().err
    assert main(["alerts", "--policy", str(policy), "--selector", "x"]) == 1
