"""Tool profiles (issue 14, class 7): which tools change state decides whether a new
call of theirs is an attempt at progress. Each case beside its hard negative."""

from __future__ import annotations

from typing import Any

import pytest

from guard.engine.calls import StallRule, Step
from guard.engine.config import Config, ConfigError
from guard.engine.core import Engine
from guard.engine.profiles import DEFAULT_PROFILE_NAMES, PROFILES, name_words, profile_by_name
from guard.engine.store import MemoryStore
from guard.engine.telemetry_port import NullTelemetry

# A SWE-agent-style run: one `bash` tool; the test keeps failing the same way while
# the agent edits (sed prints nothing) -- a successful debugging cycle.
PYTEST_FAIL = (
    "============================= test session starts ==============================\n"
    "collected 12 items\n\ntests/test_parse.py ....F.......\n\n"
    "FAILED tests/test_parse.py::test_iso_week - AssertionError: assert 52 == 53\n"
    "========================= 1 failed, 11 passed in {t}s =========================\n"
)


def engine(loop: dict[str, Any] | None = None) -> Engine:
    config = Config.from_mapping({"loop": loop or {}, "telemetry": {"records": ""}})
    return Engine(config, store=MemoryStore(), telemetry=NullTelemetry())


def run(eng: Engine, calls: list[tuple[str, Any, Any, bool]]) -> list[str]:
    import asyncio

    async def go() -> list[str]:
        out = []
        for tool, params, outcome, error in calls:
            h = eng.fingerprint(params)
            verdict = await eng.check("s", tool, h)
            out.append(str(verdict.rule) if verdict.blocked else "served")
            if not verdict.blocked:
                await eng.record("s", Step(tool, h, eng.marker(tool, outcome), error))
        return out

    return asyncio.run(go())


def pytest_run(n: int) -> tuple[str, Any, Any, bool]:
    return ("bash", {"command": "python -m pytest tests/test_parse.py"},
            PYTEST_FAIL.format(t=f"0.{30 + n}"), True)  # fmt: skip


def test_edits_between_failing_test_runs_are_not_a_loop() -> None:
    calls = []
    for n in range(8):
        calls.append(pytest_run(n))
        sed = f"sed -i 's/week_{n}/week_{n + 1}/' src/parse.py"
        calls.append(("bash", {"command": sed}, "", False))
    results = run(engine(), calls)
    assert set(results) == {"served"}


def test_hard_negative_thinking_between_failing_test_runs_is_a_loop() -> None:
    # A think tool that echoes new text each time: new text is not progress.
    calls = []
    for n in range(5):
        calls.append(pytest_run(n))
        thought = f"Maybe the week number is off by one ({n})"
        calls.append(("think", {"thought": thought}, f"Thought recorded: {thought}", False))
    results = run(engine(), calls)
    assert results[6] == StallRule.IDENTICAL_ERRORS  # the 4th test run
    assert results[:6] == ["served"] * 6


def test_hard_negative_repeating_the_same_edit_is_not_an_attempt() -> None:
    sed = ("bash", {"command": "sed -i 's/a/b/' src/parse.py"}, "", False)
    calls = [c for n in range(5) for c in (pytest_run(n), sed)]
    results = run(engine(), calls)
    # Only the first sed was new: the test fails three more times after it.
    assert StallRule.IDENTICAL_ERRORS in results


def test_a_failed_edit_is_not_an_attempt() -> None:
    calls = []
    for n in range(5):
        calls.append(pytest_run(n))
        failed = "No replacement was performed, old_str did not appear verbatim"
        calls.append(("str_replace_editor", {"old": f"x{n}", "new": "y"}, failed, True))
    results = run(engine(), calls)
    assert StallRule.IDENTICAL_ERRORS in results


def test_opting_in_by_config_and_switching_name_matching_off() -> None:
    calls = []
    for n in range(6):
        calls.append(("ops", {"op": "test"}, "FAILED: 1 test", True))
        calls.append(("ops", {"op": f"patch {n}"}, "", False))
    # "ops" matches no profile word: the empty patches are filler and the test loop stops.
    assert StallRule.IDENTICAL_ERRORS in run(engine(), calls)
    # Opted in as exec: each new patch is an attempt.
    assert set(run(engine({"tools": {"ops": {"profile": "exec"}}}), calls)) == {"served"}
    # Name matching off: bash is an ordinary tool again.
    edits = [c for n in range(5) for c in (pytest_run(n), ("bash", {"c": f"sed {n}"}, "", False))]
    assert StallRule.IDENTICAL_ERRORS in run(engine({"profile_names": {}}), edits)
    assert set(run(engine(), edits)) == {"served"}


def test_send_profile_caps_the_same_message() -> None:
    # Each send reports a different delivery count: never a stalled repeat, but the same
    # message is not sent an 11th time.
    calls = [
        ("send_message", {"chat": "oc_1", "text": "Deploy done"}, {"delivered": n}, False)
        for n in range(12)
    ]
    results = run(engine(), calls)
    assert results.index(StallRule.HARD_CAP) == 10
    # Hard negative: a report tool with the same changing outcomes runs to the default 30.
    reports = [("report", c[1], c[2], False) for c in calls]
    assert set(run(engine(), reports)) == {"served"}


def test_poll_profile_lets_a_changing_status_run_past_the_default_cap() -> None:
    calls = [("get_job_status", {"job": "j1"}, {"progress": n}, False) for n in range(60)]
    assert set(run(engine(), calls)) == {"served"}
    # Without the profile the hard cap stops it at the 31st.
    assert run(engine({"profile_names": {}}), calls).index(StallRule.HARD_CAP) == 30


def test_limits_precedence_tool_over_profile_over_loop_default() -> None:
    eng = engine({"tools": {"get_job_status": {"max_identical_calls": 7}}})
    assert eng.detector.limits_for("get_job_status").max_identical_calls == 7
    assert engine().detector.limits_for("get_job_status").max_identical_calls == 120
    # A value written in [loop] holds for every tool, over a profile's preset.
    written = engine({"max_identical_calls": 50}).detector
    assert written.limits_for("get_job_status").max_identical_calls == 50
    assert written.limits_for("bash").progress == "attempt"


def test_profile_names() -> None:
    assert name_words("getJobStatus") == ["get", "job", "status"]
    cases = {
        "str_replace_editor": "edit",
        "bash": "exec",
        "execute_bash": "exec",
        "think": "think",
        "send_message": "send",
        "get_job_status": "poll",
        "search_code": "search",
        "read_file": "read",
        "finish": None,
    }
    for tool, profile in cases.items():
        assert profile_by_name(tool, DEFAULT_PROFILE_NAMES) == profile, tool
    assert set(PROFILES) == set(DEFAULT_PROFILE_NAMES)
    with pytest.raises(ConfigError, match=r"loop\.tools\.x\.profile"):
        Config.from_mapping({"loop": {"tools": {"x": {"profile": "shell"}}}})
