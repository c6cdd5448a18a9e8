"""Replay over real recorded runs (issue 14): successful SWE-agent and OpenHands runs,
copied unchanged from the agents' public repositories into tests/data/trajectories/real
(its README cites each file's repository, path and commit, and the licenses).

Every run here succeeded, so every stop is a false stop: the test pins the ones there
are, each explained, and that there is no other."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from guard.doors.replay import load_steps, replay, summary
from guard.engine.calls import StallRule
from guard.engine.config import Config

REAL = Path(__file__).resolve().parent.parent / "data" / "trajectories" / "real"

# file -> (tool calls read, human turns read)
CALLS = {
    "openhands_basic.json": (1, 1),
    "openhands_basic_interactions.json": (0, 3),  # a chat: the agent calls no tool
    "openhands_wrong_initial_state.json": (3, 1),
    "swe_agent_6e44b9__sweagenttestrepo-1c2844.traj": (5, 0),
    "swe_agent_eps.traj": (14, 0),
    "swe_agent_function_calling_simple.traj": (5, 0),  # model history only
    "swe_agent_humanevalfix-python-0.traj": (5, 0),
    "swe_agent_networking_1.traj": (4, 0),
    "swe_agent_warmup.traj": (7, 0),
}

# file -> every block a default guard gives on it: (step index, tool, rule).
FALSE_STOPS = {
    # SWE-agent solving a CTF: step 8 submits `flat{...}` (a typo), steps 9, 10 and 11
    # the very same unquoted `submit flag{People always make the best exploits.}`, each
    # answered "Wrong flag!" (the shell splits the unquoted flag at its spaces). Step 12
    # is that command a 4th time, with nothing new from any other call since: a real
    # repeat, stopped by stalled_repeat (3 identical outcomes). It would have got
    # "Wrong flag!" again; the call that solved the task (step 13, the flag quoted) is
    # different arguments and is served. The run succeeded, so it counts as a false
    # stop, but the stop spares one wasted call and costs nothing.
    "swe_agent_eps.traj": [(12, "submit", StallRule.STALLED_REPEAT)],
}


def test_the_corpus_is_the_files_this_test_knows() -> None:
    names = {p.name for p in REAL.iterdir() if p.suffix != ".md"}
    assert names == set(CALLS)
    # Small enough to keep in the repository (issue 14: "keep them small").
    assert sum(p.stat().st_size for p in REAL.iterdir()) < 300_000


@pytest.mark.parametrize("name", sorted(CALLS))
def test_real_run_replays_with_only_the_explained_stops(name: str) -> None:
    steps = load_steps(str(REAL / name))
    calls = sum(1 for s in steps if not s.user)
    assert (calls, len(steps) - calls) == CALLS[name]
    blocks = [
        (index, step.tool, verdict.rule)
        for index, (step, verdict) in enumerate(replay(steps, Config()))
        if verdict.action == "block"
    ]
    assert blocks == FALSE_STOPS.get(name, [])


def test_the_eps_stop_is_a_real_repeat() -> None:
    steps = load_steps(str(REAL / "swe_agent_eps.traj"))
    stopped = steps[12]
    assert stopped.params == {"command": "submit flag{People always make the best exploits.}"}
    # The three calls before it are the same command with the same answer.
    assert [(s.params, s.result) for s in steps[9:12]] == [(stopped.params, "Wrong flag!")] * 3
    assert stopped.result == "Wrong flag!"  # and so would the stopped call have been
    # The solving call is a different call; the typo (flat{) one was too.
    assert steps[13].params != stopped.params and "Wrong" not in steps[13].result
    assert steps[8].params != stopped.params


def test_the_same_view_with_a_new_answer_is_not_a_repeat() -> None:
    # OpenHands lists /workspace, renames a file, lists it again: the same call twice,
    # its answer changed by the rename in between.
    steps = load_steps(str(REAL / "openhands_wrong_initial_state.json"))
    first, second = steps[1], steps[3]
    assert first.tool == second.tool == "str_replace_editor"
    assert first.params == second.params and first.result != second.result


def test_function_calling_traj_is_read_from_its_model_history() -> None:
    steps = load_steps(str(REAL / "swe_agent_function_calling_simple.traj"))
    # The function the model called and its arguments, paired with the tool message
    # that names the call in its tool_call_ids.
    assert [s.tool for s in steps] == ["find_file", "open", "edit", "bash", "submit"]
    assert steps[0].params == {"file_name": "missing_colon.py"}
    assert steps[3].params == {"command": "python tests/missing_colon.py"}
    assert steps[3].result.startswith("8.2\n")
    assert not any(s.error for s in steps)


def test_summary_over_the_real_corpus(capsys: pytest.CaptureFixture[str]) -> None:
    from guard.cli import main

    assert main(["replay", "--summary", str(REAL)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(
        line.startswith("swe_agent_eps.traj")
        and line.endswith("14 calls  first block at step 12 submit (stalled_repeat, 3 repeats)")
        for line in lines
    )
    assert sum("no block" in line for line in lines) == len(CALLS) - 1
    assert lines[-1] == "9 files: 1 with a block (stalled_repeat 1), 8 without"
    # The same through the function, the default config.
    out = io.StringIO()
    assert summary(str(REAL), Config(), out) == 0
    assert out.getvalue().splitlines() == lines
