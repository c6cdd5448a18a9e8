"""``loopguard demo``: the README's first command, run as a user runs it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

LOOPGUARD = shutil.which("loopguard")


def run_demo(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [LOOPGUARD] if LOOPGUARD else [sys.executable, "-m", "guard.cli"]
    return subprocess.run(
        [*command, "demo", *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def test_demo_json_shows_the_nudge_then_the_stop(tmp_path: Path) -> None:
    records = tmp_path / "records.jsonl"
    done = run_demo("--json", "--records", str(records), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    result = json.loads(done.stdout)
    routes = [(e["kind"], e["route"]) for e in result["events"]]
    assert routes == [
        ("model", "serve"),
        ("tool", "serve"),
        ("model", "serve"),
        ("tool", "serve"),
        ("model", "serve"),
        ("tool", "serve"),
        ("model", "nudge"),
        ("tool", "stop_and_review"),
        ("model", "stop_and_review"),
    ]
    assert result["tool_server_hits"] == 3
    assert "loopguard stopped this call" in result["final_answer"]
    # Every model call that reached the model has its first-token time and throughput.
    served = [
        e for e in result["events"] if e["kind"] == "model" and e["route"] != "stop_and_review"
    ]
    assert all(e["ttft_ms"] and e["ttft_ms"] > 50 for e in served)
    assert all(e["tokens_per_s"] and e["tokens_per_s"] > 0 for e in served)
    # Spans: every loopguard span is a child of the agent's span.
    spans = result["spans"]
    root = [s for s in spans if s["parent_id"] is None]
    assert [s["name"] for s in root] == ["invoke_agent fastship-support"]
    assert all(s["parent_id"] == root[0]["span_id"] for s in spans if s is not root[0])
    lines = records.read_text().splitlines()
    assert len(lines) == result["records"] == 9
    served_chats = [
        r
        for r in map(json.loads, lines)
        if r["operation"] == "chat" and r["route"] != "stop_and_review"
    ]
    assert len(served_chats) == 4
    for record in served_chats:
        assert record["response_id"] and record["output_chunks"] > 0
        # Derived from the conversation's content: present only as a keyed pseudonym.
        assert record["conversation_id"].startswith("conv_")
    assert len({r["conversation_id"] for r in served_chats}) == 1
    assert "#A10234" not in records.read_text()


def test_demo_plain_output_is_readable_and_writes_no_records_in_the_cwd(tmp_path: Path) -> None:
    done = run_demo(cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for expected in ("nudge", "stop_and_review", "tool server hits: 3", "stopped the loop"):
        assert expected in done.stdout
    assert list(tmp_path.iterdir()) == []
