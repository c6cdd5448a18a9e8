"""What a model response can make loopguard keep is bounded, and the CPU work on a
large one runs off the event loop.

Tool calls a response asks for (kept to pair the next request's results with them),
finish reasons (span and record attributes): upstream input, so capped. A Responses
request continuing server-side state, or a response to remember, over the offload size:
its marking, hashing and judging run in a worker thread.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from adapters.model_common import (
    MAX_FINISH_REASONS,
    MAX_JSON_OBSERVE_BYTES,
    MAX_TOOL_CALLS,
    ToolCallAssembler,
)
from adapters.openai import OpenAIObserver
from guard.doors import chain
from guard.engine.config import Config
from guard.engine.contract import Observation, ParsedRequest, ToolInvocation
from guard.engine.core import Engine


def test_tool_calls_kept_up_to_the_bound_then_none() -> None:
    calls = ToolCallAssembler()
    for n in range(MAX_TOOL_CALLS):
        calls.start(n, "lookup", f"call_{n}", f'{{"n": {n}}}')
    assert len(calls.result()) == MAX_TOOL_CALLS and not calls.overflowed
    calls.start(MAX_TOOL_CALLS, "lookup", "one_more", "{}")
    assert calls.overflowed and calls.result() == []
    calls.start(0, "lookup", "call_0", "{}")  # nothing is kept after giving up
    assert calls.result() == []


def test_tool_arguments_kept_up_to_the_bound_then_none() -> None:
    calls = ToolCallAssembler()
    calls.start(0, "write_file", "call_0")
    piece = "x" * (1024 * 1024)
    for _ in range(MAX_JSON_OBSERVE_BYTES // len(piece)):
        calls.add(0, piece)
    assert not calls.overflowed and len(calls.result()) == 1
    calls.add(0, "x")
    assert calls.overflowed and calls.result() == []


def test_replaced_arguments_count_once() -> None:
    # The API repeating a call's whole arguments at its end replaces the fragments.
    calls = ToolCallAssembler()
    half = "x" * (MAX_JSON_OBSERVE_BYTES // 2)
    calls.start(0, "t", "c0", half)
    calls.replace(0, half)
    calls.replace(0, half)
    assert not calls.overflowed
    assert calls.result() == [ToolInvocation("t", half, "c0")]


def test_finish_reasons_are_short_strings_and_bounded() -> None:
    observer = OpenAIObserver(200, {"content-type": "application/json"}, hide_usage=False)
    for reason in ["stop", {"not": "a string"}, 7, "x" * 1000]:
        observer.finished(reason)
    assert observer.finish_reasons == ["stop", "x" * 64]
    for _ in range(2 * MAX_FINISH_REASONS):
        observer.finished("length")
    assert len(observer.finish_reasons) == MAX_FINISH_REASONS


def _engine_spying_threads() -> tuple[Engine, set[str]]:
    engine = Engine(Config.from_mapping({"telemetry": {"records": ""}}))
    threads: set[str] = set()
    fingerprint, marker = engine.fingerprint, engine.marker

    def spy_fingerprint(params: Any) -> str:
        threads.add(threading.current_thread().name)
        return fingerprint(params)

    def spy_marker(*args: Any) -> str:
        threads.add(threading.current_thread().name)
        return marker(*args)

    engine.fingerprint = spy_fingerprint  # type: ignore[method-assign]
    engine.marker = spy_marker  # type: ignore[method-assign]
    return engine, threads


def test_remember_and_rebuild_offloaded_give_what_inline_gives() -> None:
    async def run(offload: bool) -> tuple[list[Any], set[str]]:
        engine, threads = _engine_spying_threads()
        first = chain.Chain([], True)
        observation = Observation(
            response_id="resp_1",
            requested_tools=[ToolInvocation("lookup", {"order": "A1"}, "call_1")],
        )
        await chain.remember(engine, first, observation, offload=offload)
        later = ParsedRequest(
            "chat", history=[], continues="resp_1", open_results={"call_1": ("in transit", False)}
        )
        rebuilt = await chain.rebuild(engine, later, offload=offload)
        return rebuilt.steps, threads - {threading.current_thread().name}

    inline_steps, inline_threads = asyncio.run(run(False))
    offloaded_steps, offloaded_threads = asyncio.run(run(True))
    assert offloaded_steps == inline_steps and len(inline_steps) == 1
    assert inline_threads == set()  # on the event loop's thread
    assert offloaded_threads  # in a worker thread
