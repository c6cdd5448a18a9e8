"""``loopguard replay`` through the command line, as users run it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def replay(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "guard.cli", "replay", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


LOOKUP = {
    "tool": "lookup_tracking",
    "params": {"order": "#A10234"},
    "result": {"status": "in transit", "scan": "v17"},
}


@pytest.fixture
def steps_file(tmp_path: Path) -> Path:
    rows = [
        {"tool": "think", "params": {"thought": "look it up"}, "result": "ok"},
        LOOKUP,
        {"session": "other", "tool": "search", "params": {"q": "x"}, "result": "none"},
        LOOKUP,
        # Filler that brings nothing new does not reset the count.
        {"tool": "think", "params": {"thought": "try again"}, "result": "ok"},
        LOOKUP,
        LOOKUP,
    ]
    return write_jsonl(tmp_path / "steps.jsonl", rows)


def test_jsonl_json_output(steps_file: Path) -> None:
    result = replay(steps_file, "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["action"] for r in rows] == ["allow"] * 6 + ["block"]
    assert rows[6] == {
        "index": 6,
        "session": "default",
        "tool": "lookup_tracking",
        "action": "block",
        "rule": "stalled_repeat",
        "repeats": 3,
    }
    assert rows[2]["session"] == "other" and rows[0]["rule"] is None


def test_jsonl_plain_output_and_summary(steps_file: Path) -> None:
    result = replay(steps_file)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "7 steps, 2 sessions" in out
    assert "first block in default: step 6 lookup_tracking (stalled_repeat, 3 repeats)" in out
    assert "no block in other" in out
    assert "steps 1, 3, 5" in out  # the earlier steps the verdict refers to, by global index


def test_config_changes_thresholds(steps_file: Path, tmp_path: Path) -> None:
    config = tmp_path / "lg.toml"
    config.write_text("[loop]\nmax_repeats = 2\n", encoding="utf-8")
    result = replay(steps_file, "--config", config, "--json")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["action"] for r in rows] == ["allow"] * 5 + ["block", "block"]
    observe = tmp_path / "observe.toml"
    observe.write_text('[loop]\nmode = "observe"\nmax_repeats = 2\n', encoding="utf-8")
    assert "block (observe: served)" in replay(steps_file, "--config", observe).stdout


def test_openai_transcript(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "Where is order #A10234?"}]
    for i in range(4):
        call_id = f"call_{i}"
        messages.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {
                            "name": "lookup_tracking",
                            "arguments": '{"order":"#A10234"}' if i % 2 else '{"order": "#A10234"}',
                        },
                    }
                ],
            }
        )
        messages.append(
            {
                "role": "tool",
                "tool_call_id": call_id,
                "content": json.dumps({"status": "in transit", "request_id": f"r{i}"}),
            }
        )
    path = tmp_path / "chat.json"
    path.write_text(json.dumps({"model": "gpt-4o", "messages": messages}), encoding="utf-8")
    result = replay(path, "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["action"] for r in rows] == ["allow", "allow", "allow", "block"]
    assert rows[3]["rule"] == "stalled_repeat" and rows[3]["tool"] == "lookup_tracking"


def test_anthropic_transcript_errors(tmp_path: Path) -> None:
    messages = []
    for i in range(4):
        messages.append(
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": f"tu{i}", "name": "run_tests", "input": {"t": "all"}}
                ],
            }
        )
        messages.append(
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": f"tu{i}",
                        "is_error": True,
                        "content": f"timeout after {i + 30}s",
                    }
                ],
            }
        )
    path = tmp_path / "claude.json"
    path.write_text(json.dumps({"messages": messages}), encoding="utf-8")
    rows = [json.loads(line) for line in replay(path, "--json").stdout.splitlines()]
    assert rows[-1]["action"] == "block" and rows[-1]["rule"] == "identical_errors"


def test_responses_input(tmp_path: Path) -> None:
    items = []
    for i in range(3):
        items.append(
            {
                "type": "function_call",
                "call_id": f"c{i}",
                "name": "search",
                "arguments": '{"q": "refund"}',
            }
        )
        items.append({"type": "function_call_output", "call_id": f"c{i}", "output": "no hits"})
    path = tmp_path / "resp.json"
    path.write_text(json.dumps({"input": items}), encoding="utf-8")
    rows = [json.loads(line) for line in replay(path, "--json").stdout.splitlines()]
    assert len(rows) == 3 and all(r["action"] == "allow" for r in rows)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"tool": "a", "params": {}}\n\n{"tool": "b", params}\n', "steps.jsonl:3: not valid JSON"),
        ('{"tool": "a"}\n[1, 2]\n', "steps.jsonl:2: expected a JSON object"),
        ('{"params": {}}\n{"tool": "a"}\n', "steps.jsonl:1: 'tool' must be a non-empty string"),
        ('{"tool": "a", "error": "yes"}\n{"tool": "b"}\n', "steps.jsonl:1: 'error' must be"),
        ("", "empty file"),
    ],
)
def test_bad_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "steps.jsonl"
    path.write_text(content, encoding="utf-8")
    result = replay(path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_file_and_wrong_transcript(tmp_path: Path) -> None:
    result = replay(tmp_path / "nope.jsonl")
    assert result.returncode == 2 and "no such file" in result.stderr
    path = tmp_path / "t.json"
    path.write_text('{"conversation": []}', encoding="utf-8")
    result = replay(path)
    assert result.returncode == 2 and "'messages' list" in result.stderr
