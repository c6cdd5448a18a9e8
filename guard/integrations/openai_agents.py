"""loopguard for the OpenAI Agents SDK (``pip install 'loopguard[openai-agents]'``).

    from guard import Guard
    from guard.integrations.openai_agents import guarded_function_tool

    guard = Guard()

    def lookup_tracking(order_id: str) -> str: ...

    agent = Agent(name="support", tools=[guarded_function_tool(guard, lookup_tracking)])

Each call of the tool goes through the Guard: the real function runs while the call
brings something new; a stalled repeat is stopped before it runs, and the model gets the
stop text as the tool's result (the SDK's ``failure_error_function``: its default would
replace it with "An error occurred while running the tool. Please try again.", which
invites the repeat). A model that reads the stop answers; one that keeps repeating gets
the same stop, without the tool running, until the SDK's ``max_turns`` ends the run.

Session: ``session=`` a string or a callable given the SDK's ``ToolContext`` (e.g.
``lambda ctx: ctx.context.conversation_id``); else the one ``guard.session(...)`` set
around ``Runner.run``; else the run's trace id (one per ``Runner.run``), or with
tracing off an id of the run's own.
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from agents import FunctionTool, RunContextWrapper, function_tool
from agents.tool import ToolErrorFunction, default_tool_error_function
from agents.tool_context import ToolContext
from agents.tracing import get_current_trace

from guard.doors.inprocess import DEFAULT_SESSION, Guard, StalledRepeatError
from guard.integrations._common import FrameworkSession, resolve_session

__all__ = ["guarded_function_tool", "loopguard_tool_error"]


def loopguard_tool_error(ctx: RunContextWrapper[Any], error: Exception) -> str:
    """A ``failure_error_function`` that gives the model loopguard's stop text; other
    errors get the SDK's default message."""
    if isinstance(error, StalledRepeatError):
        return str(error)
    return default_tool_error_function(ctx, error)


def guarded_function_tool(
    guard: Guard,
    func: Callable[..., Any],
    *,
    name: str | None = None,
    session: FrameworkSession = None,
    failure_error_function: ToolErrorFunction = loopguard_tool_error,
    **function_tool_kwargs: Any,
) -> FunctionTool:
    """``function_tool(func)`` with every call guarded. ``name``: the tool's name as the
    model sees it and loopguard records it (default: the function's name). Other keyword
    arguments go to ``agents.function_tool``. A first parameter taking the SDK's run
    context (``RunContextWrapper`` / ``ToolContext``) is not part of the call's params."""
    tool_name = name or func.__name__

    def call_session() -> str:
        ctx = _TOOL_CONTEXT.get()
        return resolve_session(session, ctx, _trace_id() or _run_tag(ctx)) or DEFAULT_SESSION

    guarded = guard.tool(tool_name, session=call_session, exclude=_context_parameter(func))(func)
    tool = function_tool(
        guarded,
        name_override=tool_name,
        failure_error_function=failure_error_function,
        **function_tool_kwargs,
    )
    invoke = tool.on_invoke_tool

    async def on_invoke_tool(ctx: ToolContext[Any], arguments: str) -> Any:
        # The SDK's context for this call, where the session callable reads it (a context
        # variable: a sync tool runs in a worker thread, which copies it).
        token = _TOOL_CONTEXT.set(ctx)
        try:
            return await invoke(ctx, arguments)
        finally:
            _TOOL_CONTEXT.reset(token)

    tool.on_invoke_tool = on_invoke_tool
    return tool


_TOOL_CONTEXT: ContextVar[ToolContext[Any] | None] = ContextVar(
    "loopguard_agents_tool_context", default=None
)


def _trace_id() -> str | None:
    """The current run's trace id (one per ``Runner.run``), when tracing gave it one."""
    trace = get_current_trace()
    trace_id = getattr(trace, "trace_id", None)
    return trace_id if isinstance(trace_id, str) and trace_id.startswith("trace_") else None


def _run_tag(ctx: ToolContext[Any] | None) -> str | None:
    """A per-run id when tracing is off (no trace id): a tag on the run's usage object,
    which every tool context of one run shares and no other run does."""
    usage = getattr(ctx, "usage", None)
    if usage is None:
        return None
    tag = getattr(usage, "_loopguard_run", None)
    if tag is None:
        tag = "run_" + uuid.uuid4().hex
        try:
            usage._loopguard_run = tag
        except AttributeError:  # a usage object that takes no attributes: no tag
            return None
    return str(tag)


def _context_parameter(func: Callable[..., Any]) -> tuple[str, ...]:
    """The name of ``func``'s run-context parameter, if it takes one (the SDK passes it
    first, by its annotation)."""
    parameters = list(inspect.signature(func).parameters.values())
    if not parameters:
        return ()
    annotation = parameters[0].annotation
    text = annotation if isinstance(annotation, str) else repr(annotation)
    if "RunContextWrapper" in text or "ToolContext" in text:
        return (parameters[0].name,)
    return ()
