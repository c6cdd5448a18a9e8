"""openai-agents with guarded tools, driven by a scripted model (the SDK's ``Model``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from agents import (
    Agent,
    Model,
    ModelResponse,
    RunContextWrapper,
    Runner,
    Usage,
    set_tracing_disabled,
)
from agents.exceptions import MaxTurnsExceeded
from openai.types.responses import (
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseOutputText,
)

from guard import Guard
from guard.engine.config import Config
from guard.engine.problem import STOP_SIGNATURE
from guard.integrations.openai_agents import guarded_function_tool


class ScriptedModel(Model):
    """Calls ``lookup_tracking(A1)`` each turn. ``reads_stop``: answers once a tool result
    says loopguard stopped the call; ``finish_after``: answers after that many results."""

    def __init__(self, *, reads_stop: bool = False, finish_after: int | None = None) -> None:
        self.reads_stop = reads_stop
        self.finish_after = finish_after
        self.tool_results: list[str] = []

    async def get_response(self, system_instructions: Any, input: Any, *args: Any, **kw: Any):
        items = input if isinstance(input, list) else []
        self.tool_results = [
            str(item.get("output"))
            for item in items
            if isinstance(item, dict) and item.get("type") == "function_call_output"
        ]
        last = self.tool_results[-1] if self.tool_results else ""
        done = (self.reads_stop and STOP_SIGNATURE in last) or (
            self.finish_after is not None and len(self.tool_results) >= self.finish_after
        )
        turn = len(self.tool_results)
        if done:
            text = ResponseOutputText(type="output_text", text="final: " + last, annotations=[])
            message = ResponseOutputMessage(
                id=f"msg_{turn}", type="message", role="assistant", status="completed",
                content=[text],
            )  # fmt: skip
            return ModelResponse(output=[message], usage=Usage(), response_id=None)
        call = ResponseFunctionToolCall(
            type="function_call", call_id=f"call_{turn}", name="lookup_tracking",
            arguments=json.dumps({"order_id": "A1"}),
        )  # fmt: skip
        return ModelResponse(output=[call], usage=Usage(), response_id=None)

    def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        raise NotImplementedError


@pytest.fixture
def guard():
    with Guard(Config.from_mapping({"telemetry": {"records": ""}})) as g:
        yield g


def tracking_tool(guard: Guard, runs: list[str], **kwargs: Any):
    def lookup(ctx: RunContextWrapper[Any], order_id: str) -> str:
        """Look up an order's tracking status."""
        runs.append(order_id)
        return f"order {order_id}: in transit"

    return guarded_function_tool(guard, lookup, name="lookup_tracking", **kwargs)


def test_stuck_agent_reads_the_stop_and_answers(guard: Guard) -> None:
    runs: list[str] = []
    model = ScriptedModel(reads_stop=True)
    agent = Agent(name="support", model=model, tools=[tracking_tool(guard, runs)])
    result = asyncio.run(Runner.run(agent, "where is A1?", max_turns=10))
    assert len(runs) == 3  # the real tool ran 3 times, the 4th call was stopped
    assert STOP_SIGNATURE in result.final_output
    assert "3 times" in result.final_output
    assert "An error occurred" not in result.final_output


def test_agent_ignoring_the_stop_ends_at_max_turns_with_the_tool_not_rerun(guard: Guard) -> None:
    runs: list[str] = []
    model = ScriptedModel()
    agent = Agent(name="support", model=model, tools=[tracking_tool(guard, runs)])
    with pytest.raises(MaxTurnsExceeded):
        asyncio.run(Runner.run(agent, "where is A1?", max_turns=8))
    assert len(runs) == 3
    assert all(STOP_SIGNATURE in text for text in model.tool_results[3:])
    assert len(model.tool_results) == 7


def test_finishing_agent_is_untouched(guard: Guard) -> None:
    runs: list[str] = []
    model = ScriptedModel(finish_after=2)
    agent = Agent(name="support", model=model, tools=[tracking_tool(guard, runs)])
    result = asyncio.run(Runner.run(agent, "where is A1?", max_turns=10))
    assert runs == ["A1", "A1"]
    assert result.final_output == "final: order A1: in transit"


def test_sessions_come_from_the_run_so_runs_do_not_share_a_stall(guard: Guard) -> None:
    runs: list[str] = []
    tool = tracking_tool(guard, runs)

    async def two_runs() -> None:
        for _ in range(2):  # each run: 2 calls; one shared session would stop the 4th
            agent = Agent(name="s", model=ScriptedModel(finish_after=2), tools=[tool])
            await Runner.run(agent, "where is A1?", max_turns=10)

    asyncio.run(two_runs())
    assert len(runs) == 4


def test_session_callable_gets_the_tool_context(guard: Guard) -> None:
    runs: list[str] = []
    seen: list[str] = []

    def session(ctx: Any) -> str:
        seen.append(ctx.tool_name)
        return f"user-{ctx.context['user']}"

    tool = tracking_tool(guard, runs, session=session)
    agent = Agent(name="s", model=ScriptedModel(reads_stop=True), tools=[tool])
    asyncio.run(Runner.run(agent, "where is A1?", context={"user": 7}, max_turns=10))
    assert len(runs) == 3 and seen[0] == "lookup_tracking"
    verdict = guard.check_sync("user-7", "lookup_tracking", {"order_id": "A1"})
    assert verdict.blocked


def test_runs_are_sessions_with_tracing_off_too(guard: Guard) -> None:
    runs: list[str] = []
    tool = tracking_tool(guard, runs)
    set_tracing_disabled(True)
    try:
        for _ in range(2):  # each run: 2 calls; one shared session would stop the 4th
            agent = Agent(name="s", model=ScriptedModel(finish_after=2), tools=[tool])
            asyncio.run(Runner.run(agent, "where is A1?", max_turns=10))
    finally:
        set_tracing_disabled(False)
    assert len(runs) == 4
