"""Replay (issue 14, class 8): a human turn in JSONL, and ``--summary`` over a folder."""

from __future__ import annotations

import io
import json
from pathlib import Path

from guard.doors.replay import load_steps, replay, run, summary
from guard.engine.config import Config

STATUS = {"tool": "ci_status", "params": {"pr": 7}, "result": {"state": "failing"}}


def _write(path: Path, lines: list[dict[str, object]]) -> str:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def test_a_human_turn_is_something_new(tmp_path: Path) -> None:
    # Three identical checks, a human answers ("I re-ran the job"), the agent checks
    # again: not a stall, a human turn brings something new.
    answered = _write(tmp_path / "a.jsonl", [STATUS] * 3 + [{"user": "re-ran CI"}, STATUS])
    verdicts = [v.action for _, v in replay(load_steps(answered), Config())]
    assert verdicts == ["allow"] * 5
    # Hard negative: without the human turn the fourth check is stopped.
    alone = _write(tmp_path / "b.jsonl", [STATUS] * 4)
    assert [v.action for _, v in replay(load_steps(alone), Config())][-1] == "block"


def test_human_turns_are_shown_and_only_in_their_session(tmp_path: Path) -> None:
    other = {**STATUS, "session": "s2"}
    lines = [other] * 3 + [{"user": "hi", "session": "s1"}, other]
    path = _write(tmp_path / "c.jsonl", lines)
    assert [v.action for _, v in replay(load_steps(path), Config())][-1] == "block"
    out = io.StringIO()
    run(path, Config(), as_json=False, out=out)
    assert "(human turn)" in out.getvalue()
    out = io.StringIO()
    run(path, Config(), as_json=True, out=out)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert rows[3] == {"index": 3, "session": "s1", "human": True}
    assert rows[4]["action"] == "block"


def test_summary_over_a_folder(tmp_path: Path) -> None:
    _write(tmp_path / "stuck.jsonl", [STATUS] * 5)
    _write(tmp_path / "fine.jsonl", [STATUS, {"user": "ok"}, STATUS])
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    out = io.StringIO()
    assert summary(str(tmp_path), Config(), out) == 0
    text = out.getvalue()
    lines = text.splitlines()
    assert lines[0].startswith("broken.jsonl") and "cannot replay" in lines[0]
    assert lines[1].startswith("fine.jsonl") and lines[1].endswith("2 calls  no block")
    assert "first block at step 3 ci_status (stalled_repeat, 3 repeats)" in lines[2]
    assert lines[-1] == "3 files: 1 with a block (stalled_repeat 1), 1 without, 1 unreadable"
    assert summary(str(tmp_path / "stuck.jsonl"), Config(), io.StringIO()) == 2


def test_the_cli_takes_summary(tmp_path: Path, capsys: object) -> None:
    from guard.cli import main

    _write(tmp_path / "stuck.jsonl", [STATUS] * 4)
    assert main(["replay", "--summary", str(tmp_path)]) == 0
    printed = capsys.readouterr().out  # type: ignore[attr-defined]
    assert printed.endswith("1 files: 1 with a block (stalled_repeat 1), 0 without\n")
