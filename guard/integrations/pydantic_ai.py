"""loopguard for pydantic-ai (``pip install 'loopguard[pydantic-ai]'``).

    from guard import Guard
    from guard.integrations.pydantic_ai import LoopGuardToolset
    from pydantic_ai import Agent, FunctionToolset

    guard = Guard()
    tools = LoopGuardToolset(FunctionToolset([lookup_tracking]), guard=guard)
    agent = Agent(model, toolsets=[tools])

A wrapper toolset: each tool call goes through the Guard; the real tool runs while the
call brings something new. A stalled repeat is not run: it raises ``ModelRetry`` with
loopguard's stop text, pydantic-ai's own way to hand a tool error back to the model (a
retry prompt it reads). A model that repeats anyway meets the tool's retry limit
(``retries``, default 1): the run ends with pydantic-ai's ``UnexpectedModelBehavior``
("Tool ... exceeded max retries count"), whose ``__cause__`` is that ``ModelRetry``.

Session: ``session=`` a string or a callable given the ``RunContext``; else the one
``guard.session(...)`` set around the run; else the run's ``conversation_id``, then
its ``run_id`` (one per ``agent.run``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic_ai import ModelRetry, RunContext
from pydantic_ai.toolsets import WrapperToolset
from pydantic_ai.toolsets.abstract import ToolsetTool

from guard.doors.inprocess import Guard, StalledRepeatError
from guard.integrations._common import FrameworkSession, resolve_session

__all__ = ["LoopGuardToolset"]


@dataclass
class LoopGuardToolset(WrapperToolset[Any]):
    """``LoopGuardToolset(toolset, guard=guard, session=None)``."""

    guard: Guard | None = None
    session: FrameworkSession = None

    async def call_tool(
        self, name: str, tool_args: dict[str, Any], ctx: RunContext[Any], tool: ToolsetTool[Any]
    ) -> Any:
        if self.guard is None:
            raise TypeError("LoopGuardToolset needs guard=")
        run = ctx.conversation_id or ctx.run_id
        session = resolve_session(self.session, ctx, run)
        try:
            async with self.guard.call(name, tool_args, session=session) as guarded:
                guarded.outcome = await self.wrapped.call_tool(name, tool_args, ctx, tool)
        except StalledRepeatError as stop:
            raise ModelRetry(str(stop)) from stop
        return guarded.outcome
