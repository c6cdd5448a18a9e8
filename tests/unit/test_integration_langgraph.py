"""LangGraph's ReAct agent with a guarded ToolNode, driven by a scripted chat model."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import tool
from langgraph.prebuilt import create_react_agent

from guard import Guard
from guard.engine.config import Config
from guard.engine.problem import STOP_SIGNATURE
from guard.integrations.langgraph import guarded_tool_node

# The ReAct agent users run today; langchain.agents.create_agent is its successor.
pytestmark = pytest.mark.filterwarnings("ignore:create_react_agent has been moved")


class ScriptedChat(BaseChatModel):
    """Calls ``lookup_tracking(A1)`` each turn; ``reads_stop``: answers once a tool
    message says loopguard stopped the call; ``finish_after``: after that many results."""

    reads_stop: bool = False
    finish_after: int | None = None

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools: Any, **kwargs: Any) -> ScriptedChat:
        return self

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        results = [m for m in messages if isinstance(m, ToolMessage)]
        last = str(results[-1].content) if results else ""
        done = (self.reads_stop and STOP_SIGNATURE in last) or (
            self.finish_after is not None and len(results) >= self.finish_after
        )
        if done:
            message = AIMessage(content="final: " + last)
        else:
            call = {"name": "lookup_tracking", "args": {"order_id": "A1"}, "id": f"c{len(results)}"}
            message = AIMessage(content="", tool_calls=[call])
        return ChatResult(generations=[ChatGeneration(message=message)])


@pytest.fixture
def guard():
    with Guard(Config.from_mapping({"telemetry": {"records": ""}})) as g:
        yield g


def agent_for(guard: Guard, model: ScriptedChat, runs: list[str], **kwargs: Any):
    @tool
    def lookup_tracking(order_id: str) -> str:
        """Look up an order's tracking status."""
        runs.append(order_id)
        return f"order {order_id}: in transit"

    return create_react_agent(model, guarded_tool_node(guard, [lookup_tracking], **kwargs))


def question(thread: str) -> tuple[dict[str, Any], dict[str, Any]]:
    return (
        {"messages": [("user", "where is A1?")]},
        {"configurable": {"thread_id": thread}, "recursion_limit": 20},
    )


def test_stuck_agent_reads_the_stop_and_answers(guard: Guard) -> None:
    runs: list[str] = []
    agent = agent_for(guard, ScriptedChat(reads_stop=True), runs)
    state = agent.invoke(*question("t1"))
    assert len(runs) == 3
    stop = state["messages"][-2]
    assert isinstance(stop, ToolMessage) and stop.status == "error"
    assert STOP_SIGNATURE in stop.content and "3 times" in stop.content
    assert state["messages"][-1].content.startswith("final: " + STOP_SIGNATURE)


def test_async_agent_ignoring_the_stop_ends_at_the_step_limit(guard: Guard) -> None:
    # The ReAct agent's own limit: near recursion_limit it answers "need more steps".
    runs: list[str] = []
    agent = agent_for(guard, ScriptedChat(), runs)
    state = asyncio.run(agent.ainvoke(*question("t2")))
    assert len(runs) == 3
    results = [m for m in state["messages"] if isinstance(m, ToolMessage)]
    assert len(results) > 4 and all(STOP_SIGNATURE in m.content for m in results[3:])
    assert "need more steps" in state["messages"][-1].content


def test_finishing_agent_is_untouched(guard: Guard) -> None:
    runs: list[str] = []
    agent = agent_for(guard, ScriptedChat(finish_after=2), runs)
    state = agent.invoke(*question("t3"))
    assert runs == ["A1", "A1"]
    assert state["messages"][-1].content == "final: order A1: in transit"


def test_threads_are_sessions(guard: Guard) -> None:
    runs: list[str] = []
    agent = agent_for(guard, ScriptedChat(finish_after=2), runs)
    agent.invoke(*question("a"))
    agent.invoke(*question("b"))  # one shared session would have stopped this 4th call
    assert len(runs) == 4
    agent.invoke(*question("a"))  # thread a's 3rd call runs, its 4th is stopped
    assert len(runs) == 5


def test_tool_errors_are_error_outcomes(guard: Guard) -> None:
    @tool
    def lookup_tracking(order_id: str) -> str:
        """Fails."""
        raise ValueError("tracking service down")

    model = ScriptedChat(reads_stop=True)
    node = guarded_tool_node(guard, [lookup_tracking], handle_tool_errors=True)
    state = create_react_agent(model, node).invoke(*question("e"))
    stop = state["messages"][-2].content
    assert STOP_SIGNATURE in stop and "failed" in stop  # the identical_errors rule


def test_runs_without_a_thread_id_each_get_their_own_session(guard: Guard) -> None:
    """No thread_id, no guard.session(): each graph invocation is its own session, the
    same across its steps (a stuck run is still stopped), never shared with another run
    (two concurrent runs of 3 identical calls each are left alone; one shared session
    would stop the 4th)."""
    no_thread = {"recursion_limit": 20}
    runs: list[str] = []
    agent = agent_for(guard, ScriptedChat(finish_after=3), runs)

    async def both() -> list[Any]:
        ask = {"messages": [("user", "where is A1?")]}
        return list(
            await asyncio.gather(agent.ainvoke(ask, no_thread), agent.ainvoke(ask, no_thread))
        )

    states = asyncio.run(both())
    assert len(runs) == 6
    for state in states:
        results = [m for m in state["messages"] if isinstance(m, ToolMessage)]
        assert len(results) == 3 and not any(STOP_SIGNATURE in str(m.content) for m in results)
    # One after the other, too (the Guard's "default" session would stop the second).
    again = agent.invoke({"messages": [("user", "where is A1?")]}, no_thread)
    assert len(runs) == 9 and STOP_SIGNATURE not in str(again["messages"][-1].content)
    # Within one run the session holds: a stuck run without a thread id is stopped.
    stuck: list[str] = []
    state = agent_for(guard, ScriptedChat(reads_stop=True), stuck).invoke(
        {"messages": [("user", "where is A1?")]}, no_thread
    )
    assert len(stuck) == 3 and STOP_SIGNATURE in str(state["messages"][-2].content)


def test_a_run_id_in_the_config_names_the_session(guard: Guard) -> None:
    """A caller's run_id is the session: two invocations with the same run_id share it."""
    import uuid

    runs: list[str] = []
    agent = agent_for(guard, ScriptedChat(finish_after=2), runs)
    config = {"run_id": uuid.uuid4(), "recursion_limit": 20}
    agent.invoke({"messages": [("user", "where is A1?")]}, config)
    state = agent.invoke({"messages": [("user", "where is A1?")]}, config)
    # 2 + 1 runs of the same call in one session: the 4th is stopped.
    assert len(runs) == 3
    assert STOP_SIGNATURE in str(state["messages"][-2].content)
