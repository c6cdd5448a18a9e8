"""The in-process Guard: tool names, sessions from a context variable, excluded params."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from guard import Guard, StalledRepeatError
from guard.engine.config import Config


@pytest.fixture
def guard():
    with Guard(Config.from_mapping({"telemetry": {"records": ""}})) as g:
        yield g


def test_tool_name_is_the_one_given(guard: Guard) -> None:
    @guard.tool(name="lookup_tracking")
    def lookup(order_id: str) -> str:
        return "in transit"

    for _ in range(3):
        lookup("A1")
    with pytest.raises(StalledRepeatError) as stop:
        lookup("A1")
    assert stop.value.tool == "lookup_tracking"
    assert guard.check_sync("default", "lookup_tracking", {"order_id": "A1"}).blocked


def test_guard_session_names_the_session_of_calls_inside(guard: Guard) -> None:
    @guard.tool()
    def lookup(order_id: str) -> str:
        return "in transit"

    with guard.session("run-1"):
        for _ in range(3):
            lookup("A1")
    with guard.session("run-2"):
        lookup("A1")  # another run: not stopped
    with guard.session("run-1"), pytest.raises(StalledRepeatError) as stop:
        lookup("A1")
    assert stop.value.session == "run-1"


def test_concurrent_tasks_keep_their_own_session(guard: Guard) -> None:
    runs: list[str] = []

    @guard.tool()
    async def lookup(order_id: str) -> str:
        runs.append(order_id)
        await asyncio.sleep(0)
        return "in transit"

    async def run(session: str) -> None:
        with guard.session(session):
            for _ in range(3):
                await lookup("A1")

    async def main() -> None:
        await asyncio.gather(*(run(f"run-{i}") for i in range(4)))

    asyncio.run(main())
    assert len(runs) == 12  # one shared session would have stopped the 4th call


def test_excluded_parameters_are_not_part_of_the_call(guard: Guard) -> None:
    @guard.tool(exclude=("ctx",))
    def lookup(ctx: Any, order_id: str) -> str:
        return "in transit"

    for _ in range(3):
        lookup(object(), "A1")  # a new context object every call, the same call
    with pytest.raises(StalledRepeatError):
        lookup(object(), "A1")


def test_an_outcome_marked_as_error_counts_as_one(guard: Guard) -> None:
    for attempt in range(3):
        with guard.call("fetch", {"url": "x"}, session="s") as call:
            call.outcome = f"failed {attempt}"  # different texts: only the error rule sees a stall
            call.error = True
    verdict = guard.check_sync("s", "fetch", {"url": "x"})
    assert verdict.blocked and verdict.rule == "identical_errors"
