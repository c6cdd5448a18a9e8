"""The session-wide no-progress breaker (issue 14, class 5): no call in the session's
last W brought anything new. Optional (off by default); each case beside its hard
negative: a session making steady progress with repeated filler in between."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from guard.engine.calls import StallRule
from guard.engine.config import Config, ConfigError
from guard.engine.contract import HistoryStep
from guard.engine.conversation import analyze
from guard.engine.core import Engine
from guard.engine.store import MemoryStore
from guard.engine.telemetry_port import NullTelemetry

W = 8
NOTHING = "No results found."


def engine(**loop: Any) -> Engine:
    config = Config.from_mapping({"loop": loop, "telemetry": {"records": ""}})
    return Engine(config, store=MemoryStore(), telemetry=NullTelemetry())


def drive(eng: Engine, calls: list[tuple[str, Any, Any]]) -> list[str]:
    """Each call as a front door does it (check, then record); the verdict rule or "allow"."""

    async def run() -> list[str]:
        out = []
        for tool, params, outcome in calls:
            h = eng.fingerprint(params)
            verdict = await eng.check("s", tool, h)
            out.append(verdict.rule or "allow" if verdict.action == "block" else "allow")
            from guard.engine.calls import Step

            await eng.record("s", Step(tool, h, eng.marker(tool, outcome)))
        return out

    return asyncio.run(run())


def wandering() -> list[tuple[str, Any, Any]]:
    """Three files read, then searches that each run once and find nothing, with a
    second read of each file among them: no call runs more than twice, so no per-call
    rule fires, and nothing new comes back after the first search."""
    files = {"a.py": "def a(): ...", "b.py": "def b(): ...", "c.py": "def c(): ..."}
    calls: list[tuple[str, Any, Any]] = [
        ("read_file", {"path": path}, text) for path, text in files.items()
    ]
    for n in range(14):
        calls.append(("search_code", {"query": f"parse_date variant {n}"}, NOTHING))
        if n % 4 == 3:
            path = list(files)[n // 4]
            calls.append(("read_file", {"path": path}, files[path]))
    return calls


def test_a_session_going_nowhere_is_stopped_after_w_calls() -> None:
    verdicts = drive(engine(no_progress_window=W), wandering())
    first = verdicts.index(StallRule.NO_PROGRESS)
    # The first search (step 3) was the last new outcome; W calls later, the breaker.
    assert first == 3 + 1 + W
    assert set(verdicts[:first]) == {"allow"}


def test_off_by_default_the_same_session_runs_on() -> None:
    assert set(drive(engine(), wandering())) == {"allow"}


def test_steady_progress_with_repeated_filler_is_not_stopped() -> None:
    calls: list[tuple[str, Any, Any]] = []
    for n in range(30):
        # Filler: the same thought, and a re-read of the same file, every time.
        calls.append(("think", {"thought": "let me look at the next file"}, "ok"))
        calls.append(("read_file", {"path": "README.md"}, "# project"))
        calls.append(("read_file", {"path": f"src/mod_{n}.py"}, f"def f{n}(): ..."))
    assert set(drive(engine(no_progress_window=W), calls)) == {"allow"}


def test_new_edits_count_as_progress_whatever_they_print() -> None:
    calls: list[tuple[str, Any, Any]] = []
    for n in range(20):
        calls.append(("str_replace_editor", {"path": "a.py", "new": f"x = {n}"}, ""))
        calls.append(("bash", {"command": "pytest -q"}, "1 failed"))
        calls.append(("think", {"thought": "hmm"}, "ok"))
    assert set(drive(engine(no_progress_window=W), calls)) == {"allow"}


def test_a_model_route_is_nudged_then_stopped() -> None:
    eng = engine(no_progress_window=W)
    steps = [HistoryStep(tool, params, outcome) for tool, params, outcome in wandering()]
    decisions = [analyze(eng, steps[: n + 1]).action for n in range(len(steps))]
    first = decisions.index("nudge")
    assert decisions[first + 1] == "stop"
    verdict = analyze(eng, steps[: first + 1]).verdict
    assert verdict is not None and verdict.rule == StallRule.NO_PROGRESS


def test_the_window_must_hold_w_calls() -> None:
    with pytest.raises(ConfigError):
        Config.from_mapping({"loop": {"window": 16, "no_progress_window": 16}})
