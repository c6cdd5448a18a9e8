"""Incident cards, the experiment handoff, and ``loopguard evaluate`` (PASSED / BLOCKED)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from monitor_seed import BAD, EVIDENCE, POLICY_TOML, seed_records

from guard.cli import main

CANDIDATE = "tracking-answerer-v1.2-candidate"


def write(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def handoff(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY_TOML)
    records = write(tmp_path / "seed.jsonl", seed_records())
    out = tmp_path / "incidents"
    code = main(["report", str(records), "--policy", str(policy), "--candidate", CANDIDATE,
                 "--incidents", str(out), "--json"])  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert code == 2
    h = report["handoff"]
    assert h["incident_policy"] == "delivery-grounding-slo-v1"
    assert h["failing_template"] == BAD
    assert h["exemplar"]["request_id"] == "req-5"
    assert h["evidence_version"] == EVIDENCE
    assert h["candidate_template"] == CANDIDATE
    assert h["required_metric"] == "unsafe_claim_served == 0 on regression and holdout windows"
    assert h["promotion_status"] == "BLOCKED_PENDING_EVALUATION"
    assert json.loads((out / "handoff.json").read_text()) == h
    [card_json] = [p for p in out.glob("*.json") if p.name != "handoff.json"]
    card = json.loads(card_json.read_text())
    assert card == report["incidents"][0]
    assert card["headline"] == "PAGE unsafe_claim_served=2/6"
    md = card_json.with_suffix(".md").read_text()
    assert md.startswith("# PAGE unsafe_claim_served=2/6")
    assert "req-5" in md and "Compare serving-gate template" in md and BAD in md
    return out / "handoff.json"


def candidate_records(unsafe: int, n: int = 4) -> list[dict[str, Any]]:
    out = []
    for i, r in enumerate(seed_records(hour="10")[:n]):
        r["app"] = {**r["app"], "template": CANDIDATE,
                    "unsafe_claim_served": "true" if i < unsafe else "false"}  # fmt: skip
        out.append(r)
    return out


def evaluate(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    code = main(["evaluate", *argv, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out) if out else {}


def test_evaluate_passes_a_clean_candidate(
    handoff: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the regression's own records are in the input too: only the candidate's count
    records = write(tmp_path / "c.jsonl", seed_records() + candidate_records(unsafe=0))
    code, result = evaluate(capsys, str(handoff), str(records))
    assert code == 0
    assert result["promotion_status"] == "PASSED"
    assert result["evaluation"]["requests"] == 4 and result["evaluation"]["unsafe_serves"] == 0


def test_evaluate_blocks_an_unsafe_candidate(
    handoff: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = write(tmp_path / "c.jsonl", candidate_records(unsafe=1))
    code, result = evaluate(capsys, str(handoff), str(records))
    assert code == 2
    assert result["promotion_status"] == "BLOCKED"
    assert result["evaluation"]["unsafe_serves"] == 1
    assert result["evaluation"]["reason"] == "unsafe_claim_served=1/4 in 1 window(s)"


def test_nothing_measured_is_not_a_pass(
    handoff: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = write(tmp_path / "c.jsonl", seed_records())  # no candidate records at all
    code, result = evaluate(capsys, str(handoff), str(records))
    assert code == 2
    assert result["promotion_status"] == "BLOCKED"
    assert result["evaluation"]["requests"] == 0


def test_evaluate_rejects_what_is_not_a_handoff(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bogus = tmp_path / "h.json"
    bogus.write_text('{"promotion_status": "PASSED"}')
    records = write(tmp_path / "c.jsonl", seed_records())
    assert main(["evaluate", str(bogus), str(records)]) == 1
    assert "not a loopguard experiment handoff" in capsys.readouterr().err


def test_no_page_no_handoff(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY_TOML)
    records = write(tmp_path / "safe.jsonl", seed_records()[:4])
    code = main(["report", str(records), "--policy", str(policy), "--candidate", "x", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["handoff"] is None and report["incidents"] == []
