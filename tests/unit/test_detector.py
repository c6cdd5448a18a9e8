"""The stall rules, on trajectories shaped like real agent behaviour."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from guard.engine.calls import StallRule, Step, Verdict
from guard.engine.config import Config
from guard.engine.core import Engine
from guard.engine.detector import Detector


class _NoTelemetry:
    def shutdown(self) -> None:
        pass


def engine(**loop: Any) -> Engine:
    return Engine(Config.from_mapping({"loop": loop}), telemetry=_NoTelemetry())


class Agent:
    """Drives an engine the way the guard sees a session: verdict, then (if allowed) run."""

    def __init__(self, eng: Engine) -> None:
        self.eng = eng
        self.history: list[Step] = []

    def call(
        self,
        tool: str,
        params: Any,
        outcome: Any,
        *,
        error: bool = False,
        marker: str | None = None,
    ) -> Verdict:
        h = self.eng.fingerprint(params)
        verdict = self.eng.evaluate(self.history, tool, h)
        if not verdict.blocked:
            self.history.append(Step(tool, h, self.eng.marker(tool, outcome, marker), error))
        return verdict


def test_seed_case_scan_v17() -> None:
    # Two identical lookup_tracking calls with marker scan:v17 are a stall at max_repeats=2.
    agent = Agent(engine(max_repeats=2))
    params = {"order": "#A10234"}
    assert agent.call("lookup_tracking", params, {"x": 1}, marker="scan:v17").action == "allow"
    assert agent.call("lookup_tracking", params, {"x": 1}, marker="scan:v17").action == "allow"
    verdict = agent.call("lookup_tracking", params, {"x": 1}, marker="scan:v17")
    assert verdict.blocked
    assert (verdict.rule, verdict.repeats, verdict.steps) == (StallRule.STALLED_REPEAT, 2, (0, 1))


def test_identical_calls_identical_results_blocked_at_max_repeats() -> None:
    agent = Agent(engine(max_repeats=3))
    verdicts = [agent.call("search", {"q": "refund policy"}, {"hits": []}) for _ in range(4)]
    assert [v.action for v in verdicts] == ["allow", "allow", "allow", "block"]
    assert verdicts[-1].rule is StallRule.STALLED_REPEAT and verdicts[-1].repeats == 3


def test_polling_that_progresses_is_never_blocked() -> None:
    # A polling tool raises its hard cap (realistic per-tool override); 50 polls, each
    # with a new progress value, are never a stall.
    agent = Agent(engine(tools={"job_status": {"max_identical_calls": 1000}}))
    for i in range(50):
        outcome = {"status": "running", "progress": i, "updated_at": f"2026-11-27T10:{i:02d}:00Z"}
        assert agent.call("job_status", {"job": "build-7"}, outcome).action == "allow"


def test_polling_with_only_volatile_changes_is_a_stall() -> None:
    agent = Agent(engine())
    verdicts = [
        agent.call("job_status", {"job": "b"}, {"status": "running", "updated_at": f"t{i}"})
        for i in range(4)
    ]
    assert verdicts[-1].blocked


def test_a_b_a_b_with_stable_results_is_blocked() -> None:
    agent = Agent(engine(max_repeats=3))
    verdicts = []
    for _ in range(6):
        verdicts.append(agent.call("read_file", {"path": "a.py"}, "print('a')"))
        verdicts.append(agent.call("read_file", {"path": "b.py"}, "print('b')"))
    blocked = [i for i, v in enumerate(verdicts) if v.blocked]
    assert blocked, "an A-B-A-B cycle must be stopped"
    first = verdicts[blocked[0]]
    assert first.rule is StallRule.STALLED_REPEAT and first.repeats == 3
    assert blocked[0] <= 8


def test_loop_padded_with_think_filler_is_blocked() -> None:
    agent = Agent(engine(max_repeats=3))
    verdicts = []
    for i in range(4):
        verdicts.append(agent.call("think", {"thought": f"maybe try again ({i})"}, "ok"))
        verdicts.append(agent.call("lookup_tracking", {"order": "#A10234"}, {"status": "late"}))
    assert [v.blocked for v in verdicts] == [False] * 7 + [True]
    assert verdicts[-1].rule is StallRule.STALLED_REPEAT


def test_identical_errors_with_different_text_blocked() -> None:
    agent = Agent(engine(max_identical_errors=3, max_repeats=3))
    verdicts = [
        agent.call("run_tests", {"target": "tests/"}, f"Error: timeout after {i}s", error=True)
        for i in range(4)
    ]
    assert [v.action for v in verdicts] == ["allow"] * 3 + ["block"]
    assert verdicts[-1].rule is StallRule.IDENTICAL_ERRORS and verdicts[-1].repeats == 3


def test_rerunning_failing_tests_between_edits_is_not_a_loop() -> None:
    agent = Agent(engine())
    for i in range(6):
        assert not agent.call("run_tests", {"t": "x"}, f"Error: {i} failures", error=True).blocked
        assert not agent.call("edit_file", {"patch": f"fix attempt {i}"}, f"applied {i}").blocked


def test_reordered_argument_keys_are_the_same_call() -> None:
    eng = engine(max_repeats=2)
    agent = Agent(eng)
    agent.call("read_file", {"path": "a.py", "offset": 0, "limit": 100}, "x")
    agent.call("read_file", '{"limit": 100, "offset": 0, "path": "a.py"}', "x")
    assert agent.call("read_file", {"offset": 0, "limit": 100, "path": "a.py"}, "x").blocked


def test_different_slice_of_same_file_is_a_different_call() -> None:
    agent = Agent(engine(max_repeats=2))
    for offset in (0, 100, 200, 300):
        verdict = agent.call("read_file", {"path": "big.log", "offset": offset}, "same text")
        assert not verdict.blocked
    # Same slice again (twice already? no: once) is still fine; a third identical is not.
    assert not agent.call("read_file", {"path": "big.log", "offset": 0}, "same text").blocked
    assert agent.call("read_file", {"path": "big.log", "offset": 0}, "same text").blocked


def test_new_outcome_in_between_resets() -> None:
    agent = Agent(engine(max_repeats=3))
    run = ("run_tests", {"t": "all"}, "2 failed")
    for _ in range(2):
        assert not agent.call(*run).blocked
    assert not agent.call("edit_file", {"patch": "p1"}, "applied: 3 lines").blocked
    for _ in range(3):
        assert not agent.call(*run).blocked  # counting starts again after the edit
    verdict = agent.call(*run)
    assert verdict.blocked and verdict.steps == (3, 4, 5)


def test_repeating_filler_does_not_reset() -> None:
    # An edit that returns what an earlier step already returned brings nothing new.
    agent = Agent(engine(max_repeats=3))
    agent.call("edit_file", {"patch": "p"}, "applied")
    for _ in range(3):
        agent.call("run_tests", {"t": "all"}, "2 failed")
        agent.call("edit_file", {"patch": "p"}, "applied")
    assert agent.call("run_tests", {"t": "all"}, "2 failed").blocked


def test_hard_cap_with_changing_outcomes() -> None:
    agent = Agent(engine(max_identical_calls=5))
    verdicts = [agent.call("job_status", {"job": 1}, {"progress": i}) for i in range(6)]
    assert [v.blocked for v in verdicts] == [False] * 5 + [True]
    assert verdicts[-1].rule is StallRule.HARD_CAP and verdicts[-1].repeats == 5
    assert verdicts[-1].steps == (0, 1, 2, 3, 4)


def test_precedence_hard_cap_then_errors_then_repeat() -> None:
    history = [Step("t", "h", "m", True)] * 3
    d = Detector(
        Config.from_mapping(
            {"loop": {"max_repeats": 3, "max_identical_errors": 3, "max_identical_calls": 3}}
        ).loop
    )
    assert d.evaluate(history, "t", "h").rule is StallRule.HARD_CAP
    d = Detector(Config.from_mapping({"loop": {"max_repeats": 3, "max_identical_errors": 3}}).loop)
    assert d.evaluate(history, "t", "h").rule is StallRule.IDENTICAL_ERRORS


def test_observe_mode_blocks_unenforced() -> None:
    agent = Agent(engine(mode="observe", max_repeats=2))
    verdicts = [agent.call("search", {"q": 1}, "none") for _ in range(4)]
    assert [v.action for v in verdicts] == ["allow", "allow", "block", "block"]
    assert not any(v.blocked for v in verdicts)
    assert verdicts[2].route == "observe" and verdicts[3].repeats == 3


def test_per_tool_override() -> None:
    eng = engine(
        max_repeats=2,
        tools={"poll": {"max_repeats": 5}, "free": {"mode": "off"}, "watch": {"mode": "observe"}},
    )
    agent = Agent(eng)
    assert [agent.call("poll", {}, "same").blocked for _ in range(6)] == [False] * 5 + [True]
    assert not any(agent.call("free", {}, "same").blocked for _ in range(10))
    assert eng.detector.disabled_for("free") and not eng.detector.disabled_for("poll")
    watch = [agent.call("watch", {}, "same") for _ in range(3)]
    assert watch[2].action == "block" and not watch[2].enforced
    assert [agent.call("other", {}, "same").blocked for _ in range(3)] == [False, False, True]


def test_mode_off_globally() -> None:
    agent = Agent(engine(mode="off"))
    assert not any(agent.call("x", {}, "same").action == "block" for _ in range(40))


def test_window_bound() -> None:
    d = Detector(Config.from_mapping({"loop": {"window": 4, "max_identical_calls": 3}}).loop)
    calls = [Step("t", "h", "a"), Step("t", "h", "b"), Step("t", "h", "c")]
    verdict = d.evaluate([*calls, Step("o", "x", "z")], "t", "h")
    assert verdict.rule is StallRule.HARD_CAP and verdict.steps == (0, 1, 2)
    # One more step pushes the first call out of the last 4: forgotten.
    assert d.evaluate([*calls, Step("o", "x", "z"), Step("o", "y", "z")], "t", "h").action == (
        "allow"
    )


@pytest.mark.parametrize("n", [0, 1])
def test_short_histories_allow(n: int) -> None:
    d = Detector()
    assert d.evaluate([Step("t", "h", "m")] * n, "t", "h").action == "allow"


STEPS = st.lists(
    st.builds(
        Step,
        st.sampled_from(["read_file", "think", "search"]),
        st.sampled_from(["h1", "h2", "h3"]),
        st.sampled_from(["m1", "m2", "m3", "m4"]),
        st.booleans(),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(STEPS, st.sampled_from(["read_file", "think"]), st.sampled_from(["h1", "h2"]))
@example([*[Step("read_file", "h2", "m1", True)] * 5], "read_file", "h1")
def test_verdict_properties(history: list[Step], tool: str, params_hash: str) -> None:
    loop = Config.from_mapping(
        {
            "loop": {
                "window": 8,
                "max_repeats": 3,
                "max_identical_errors": 2,
                "max_identical_calls": 5,
            }
        }
    ).loop
    d = Detector(loop)
    verdict = d.evaluate(history, tool, params_hash)
    # Only the last window counts: the same verdict from the window alone.
    cut = max(0, len(history) - 8)
    alone = d.evaluate(history[cut:], tool, params_hash)
    assert (alone.action, alone.rule, alone.repeats) == (
        verdict.action,
        verdict.rule,
        verdict.repeats,
    )
    assert tuple(i + cut for i in alone.steps) == verdict.steps
    if verdict.action == "allow":
        return
    counted = [history[i] for i in verdict.steps]
    assert all(s.tool == tool for s in counted)
    assert all(i >= cut for i in verdict.steps) and len(counted) == verdict.repeats
    if verdict.rule is StallRule.ERROR_STREAK:
        # Tool-wide: the same error whatever the arguments.
        assert all(s.error for s in counted) and len({s.marker for s in counted}) == 1
        assert verdict.repeats >= loop.max_error_streak
        return
    assert all(s.params_hash == params_hash for s in counted)
    if verdict.rule is StallRule.STALLED_REPEAT:
        assert len({s.marker for s in counted}) == 1 and verdict.repeats >= 3
    elif verdict.rule is StallRule.IDENTICAL_ERRORS:
        assert all(s.error for s in counted) and verdict.repeats >= 2
    else:
        assert verdict.repeats >= 5
