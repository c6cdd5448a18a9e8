"""loopguard for LangGraph (``pip install 'loopguard[langgraph]'``).

    from guard import Guard
    from guard.integrations.langgraph import guarded_tool_node
    from langgraph.prebuilt import create_react_agent

    guard = Guard()
    agent = create_react_agent(model, guarded_tool_node(guard, [lookup_tracking]))

A ``ToolNode`` whose tool-call wrapper (``wrap_tool_call`` / ``awrap_tool_call``) runs
each call through the Guard: the real tool runs while the call brings something new; a
stalled repeat is answered, without running the tool, by a ``ToolMessage`` with
``status="error"`` holding loopguard's stop text, so the graph goes on (no exception out
of the tool node) and the model reads why. A model that keeps repeating gets the same
answer until the graph's ``recursion_limit`` ends the run.

Session: ``session=`` a string or a callable given the ``ToolCallRequest``; else the one
``guard.session(...)`` set around the invocation; else the ``thread_id`` of the run's
config (``{"configurable": {"thread_id": ...}}``); else the run's ``run_id`` when the
config names one; else an id of the graph invocation itself, so two runs without a
thread id never share a session; else the Guard's default.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from langchain_core.messages import ToolMessage
from langgraph.prebuilt import ToolNode
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.types import Command

from guard.doors.inprocess import Guard, GuardedCall, StalledRepeatError
from guard.integrations._common import FrameworkSession, resolve_session

__all__ = ["guarded_tool_node", "loopguard_tool_wrappers"]

Result = ToolMessage | Command
Execute = Callable[[ToolCallRequest], Result]
AsyncExecute = Callable[[ToolCallRequest], Awaitable[Result]]


def loopguard_tool_wrappers(
    guard: Guard, *, session: FrameworkSession = None
) -> tuple[
    Callable[[ToolCallRequest, Execute], Result],
    Callable[[ToolCallRequest, AsyncExecute], Awaitable[Result]],
]:
    """The (sync, async) tool-call wrappers, for a ``ToolNode`` built elsewhere:
    ``ToolNode(tools, wrap_tool_call=sync, awrap_tool_call=async_)``."""

    def open_call(request: ToolCallRequest) -> GuardedCall:
        call = request.tool_call
        return guard.call(call["name"], call["args"], session=_session(session, request))

    def wrap(request: ToolCallRequest, execute: Execute) -> Result:
        try:
            with open_call(request) as guarded:
                result = execute(request)
                _observe(guarded, result)
        except StalledRepeatError as stop:
            return _stop_message(request, stop)
        return result

    async def awrap(request: ToolCallRequest, execute: AsyncExecute) -> Result:
        try:
            async with open_call(request) as guarded:
                result = await execute(request)
                _observe(guarded, result)
        except StalledRepeatError as stop:
            return _stop_message(request, stop)
        return result

    return wrap, awrap


def guarded_tool_node(
    guard: Guard,
    tools: Sequence[Any],
    *,
    session: FrameworkSession = None,
    **tool_node_kwargs: Any,
) -> ToolNode:
    """A ``ToolNode`` over ``tools`` with every call guarded (other keyword arguments go
    to ``ToolNode``, e.g. ``handle_tool_errors``)."""
    wrap, awrap = loopguard_tool_wrappers(guard, session=session)
    return ToolNode(tools, wrap_tool_call=wrap, awrap_tool_call=awrap, **tool_node_kwargs)


def _observe(guarded: GuardedCall, result: Result) -> None:
    """The tool's outcome as loopguard judges it: the message the model will read (a
    tool error the node turned into a message is an error outcome)."""
    if isinstance(result, ToolMessage):
        guarded.outcome = result.content
        guarded.error = result.status == "error"
    else:  # a Command: the state update it carries
        guarded.outcome = repr(result.update)


def _stop_message(request: ToolCallRequest, stop: StalledRepeatError) -> ToolMessage:
    call = request.tool_call
    return ToolMessage(
        content=str(stop), name=call["name"], tool_call_id=call["id"], status="error"
    )


def _session(spec: FrameworkSession, request: ToolCallRequest) -> str | None:
    runtime = getattr(request, "runtime", None)
    config = getattr(runtime, "config", None) or {}
    configurable = config.get("configurable") or {}
    thread = configurable.get("thread_id")
    if thread is None:
        fallback = _invocation_id(configurable.get("__pregel_runtime"))
    else:
        fallback = str(thread)
    return resolve_session(spec, request, fallback)


# One id per graph invocation without a thread id. LangGraph gives each invocation one
# RunControl object (shared by all its steps, not weak-referenceable): the registry holds
# it, so its id() cannot be reused by another run while the entry lives, and is bounded.
_RUNS: OrderedDict[int, tuple[object, str]] = OrderedDict()
_RUNS_LOCK = threading.Lock()
_MAX_RUNS = 4096


def _invocation_id(pregel_runtime: Any) -> str | None:
    info = getattr(pregel_runtime, "execution_info", None)
    run_id = getattr(info, "run_id", None)
    if run_id is not None:
        return f"langgraph-run-{run_id}"  # the run id the caller put in the config
    control = getattr(pregel_runtime, "control", None)
    if control is None:
        return None  # a LangGraph without a per-run object: the Guard's default
    key = id(control)
    with _RUNS_LOCK:
        entry = _RUNS.get(key)
        if entry is None or entry[0] is not control:
            entry = (control, f"langgraph-run-{uuid.uuid4().hex}")
            _RUNS[key] = entry
            if len(_RUNS) > _MAX_RUNS:
                _RUNS.popitem(last=False)
        else:
            _RUNS.move_to_end(key)
        return entry[1]
