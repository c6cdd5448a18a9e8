"""Replay readers for other agents' recorded runs (issue 14, class 8): SWE-agent .traj
files and OpenHands event logs, over the small corpus in tests/data/trajectories (see
its README for where each format comes from and what was measured on real runs)."""

from __future__ import annotations

import io
from pathlib import Path

from guard.doors.replay import HUMAN_TOOL, load_steps, replay, summary
from guard.engine.calls import StallRule
from guard.engine.config import Config

CORPUS = Path(__file__).resolve().parent.parent / "data" / "trajectories"


def verdicts(name: str) -> list[tuple[str, str | None]]:
    steps = load_steps(str(CORPUS / name))
    return [(s.tool, v.rule if v.action == "block" else None) for s, v in replay(steps, Config())]


def test_swe_agent_traj_is_read_as_shell_commands() -> None:
    steps = load_steps(str(CORPUS / "swe_agent_fix.traj"))
    assert [s.tool for s in steps] == [
        "find_file",
        "open",
        "edit",
        "python",
        "edit",
        "python",
        "submit",
    ]
    assert steps[3].params == {"command": "python tests/missing_colon.py"}
    assert steps[3].error and not steps[5].error  # a traceback is an error, no output is not
    assert all(rule is None for _, rule in verdicts("swe_agent_fix.traj"))


def test_the_same_wrong_submission_is_stopped_and_a_new_one_is_not() -> None:
    results = verdicts("swe_agent_resubmit.traj")
    # Three identical "Wrong flag!" answers, then the fourth identical submit is stopped;
    # the differently quoted submit that solved the task is served.
    assert [rule for _, rule in results] == [None] * 5 + [StallRule.STALLED_REPEAT, None]


def test_openhands_events_pair_actions_with_observations_and_human_turns() -> None:
    steps = load_steps(str(CORPUS / "openhands_fix.json"))
    assert [s.tool for s in steps] == [
        HUMAN_TOOL, "execute_bash", "str_replace_editor", "execute_bash",
        "str_replace_editor", "execute_bash", HUMAN_TOOL, "str_replace_editor", "execute_bash",
    ]  # fmt: skip
    assert steps[0].user and steps[6].user
    assert "thought" not in steps[1].params  # the model's prose is not the call
    assert steps[1].error and not steps[8].error  # exit code 1, then 0
    # Edits between failing test runs are attempts at progress: no stop.
    assert all(rule is None for _, rule in verdicts("openhands_fix.json"))


def test_openhands_jsonl_log_with_the_same_permission_error_is_an_error_streak() -> None:
    results = verdicts("openhands_permission_loop.jsonl")
    assert [rule for _, rule in results] == [None] * 6 + [StallRule.ERROR_STREAK]


def test_summary_over_the_corpus() -> None:
    out = io.StringIO()
    assert summary(str(CORPUS), Config(), out) == 0
    assert (
        out.getvalue()
        .rstrip()
        .endswith("files: 2 with a block (error_streak 1, stalled_repeat 1), 2 without")
    )
