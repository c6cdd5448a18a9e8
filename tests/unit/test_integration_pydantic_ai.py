"""pydantic-ai with a guarded toolset, driven by a scripted ``FunctionModel``."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic_ai import Agent, FunctionToolset
from pydantic_ai.exceptions import UnexpectedModelBehavior
from pydantic_ai.messages import (
    ModelMessage,
    ModelResponse,
    RetryPromptPart,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel

from guard import Guard
from guard.engine.config import Config
from guard.engine.problem import STOP_SIGNATURE
from guard.integrations.pydantic_ai import LoopGuardToolset


def scripted(*, reads_stop: bool = False, finish_after: int | None = None, seen: list[str]):
    """Calls ``lookup_tracking(A1)`` each turn; ``reads_stop``: answers once loopguard's
    stop comes back; ``finish_after``: after that many tool results."""

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        parts = [p for m in messages for p in getattr(m, "parts", [])]
        results = [p for p in parts if isinstance(p, (ToolReturnPart, RetryPromptPart))]
        seen[:] = [str(p.content) for p in results]
        last = seen[-1] if seen else ""
        if (reads_stop and STOP_SIGNATURE in last) or (
            finish_after is not None and len(results) >= finish_after
        ):
            return ModelResponse(parts=[TextPart("final: " + last)])
        call = ToolCallPart("lookup_tracking", {"order_id": "A1"}, tool_call_id=f"c{len(seen)}")
        return ModelResponse(parts=[call])

    return FunctionModel(model)


@pytest.fixture
def guard():
    with Guard(Config.from_mapping({"telemetry": {"records": ""}})) as g:
        yield g


def agent_for(guard: Guard, model: FunctionModel, runs: list[str], **kwargs: Any) -> Agent:
    def lookup_tracking(order_id: str) -> str:
        """Look up an order's tracking status."""
        runs.append(order_id)
        return f"order {order_id}: in transit"

    toolset = LoopGuardToolset(FunctionToolset([lookup_tracking]), guard=guard, **kwargs)
    return Agent(model, toolsets=[toolset])


def test_stuck_agent_reads_the_stop_and_answers(guard: Guard) -> None:
    runs: list[str] = []
    seen: list[str] = []
    agent = agent_for(guard, scripted(reads_stop=True, seen=seen), runs)
    result = asyncio.run(agent.run("where is A1?"))
    assert len(runs) == 3
    assert STOP_SIGNATURE in result.output and "3 times" in result.output


def test_agent_ignoring_the_stop_ends_at_the_tool_retry_limit(guard: Guard) -> None:
    runs: list[str] = []
    seen: list[str] = []
    agent = agent_for(guard, scripted(seen=seen), runs)
    with pytest.raises(UnexpectedModelBehavior) as ended:
        agent.run_sync("where is A1?")
    assert len(runs) == 3
    assert STOP_SIGNATURE in str(ended.value.__cause__)  # the error says why
    assert STOP_SIGNATURE in seen[-1]  # and the model was told before


def test_finishing_agent_is_untouched(guard: Guard) -> None:
    runs: list[str] = []
    seen: list[str] = []
    agent = agent_for(guard, scripted(finish_after=2, seen=seen), runs)
    result = agent.run_sync("where is A1?")
    assert runs == ["A1", "A1"]
    assert result.output == "final: order A1: in transit"


def test_each_run_is_a_session(guard: Guard) -> None:
    runs: list[str] = []
    seen: list[str] = []
    agent = agent_for(guard, scripted(finish_after=2, seen=seen), runs)
    agent.run_sync("where is A1?")
    agent.run_sync("where is A1?")  # one shared session would stop this run's 2nd call
    assert len(runs) == 4


def test_guard_session_wins_over_the_run_id(guard: Guard) -> None:
    runs: list[str] = []
    seen: list[str] = []
    agent = agent_for(guard, scripted(finish_after=2, seen=seen), runs)
    with guard.session("customer-9"):
        agent.run_sync("where is A1?")
        agent.run_sync("where is A1?")  # the same session: 3rd call runs, 4th stopped
    assert len(runs) == 3
    assert STOP_SIGNATURE in seen[-1]
