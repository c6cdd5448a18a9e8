"""The in-process Guard around plain Python tool functions (sync and async)."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from servers import free_port

from guard import Guard, StalledRepeatError
from guard.engine.calls import StallRule
from guard.engine.config import Config
from guard.engine.core import Engine
from guard.engine.problem import stop_text
from guard.engine.store import RedisStore
from guard.telemetry import Telemetry


class Traced:
    """A Guard whose spans and records the test reads."""

    def __init__(self, **sections: Any) -> None:
        sections.setdefault("telemetry", {"records": ""})
        config = Config.from_mapping(sections)
        self.spans = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.records: list[dict[str, Any]] = []
        self.telemetry = Telemetry(
            config.telemetry,
            scrub_policy=config.redaction.policy_id,
            tracer_provider=self.provider,
            record_sink=self.records.append,
        )
        self.config = config

    def guard(self, store: Any = None) -> Guard:
        return Guard(engine=Engine(self.config, store=store, telemetry=self.telemetry))

    def named(self, name: str) -> list[Any]:
        return [s for s in self.spans.get_finished_spans() if s.name == name]


@pytest.fixture
def traced() -> Traced:
    return Traced()


@pytest.fixture
def guard(traced: Traced):
    guard = traced.guard()
    yield guard
    guard.close()


def test_sync_tool_stops_a_stalled_repeat(guard: Guard):
    ran: list[str] = []

    @guard.tool(session="run-1")
    def lookup_tracking(order_id: str, verbose: bool = False) -> dict:
        ran.append(order_id)
        return {"order": order_id, "status": "in transit"}

    for _ in range(3):
        assert lookup_tracking("A1") == {"order": "A1", "status": "in transit"}
    with pytest.raises(StalledRepeatError) as stopped:
        lookup_tracking(order_id="A1")  # keyword or positional: the same call
    err = stopped.value
    assert ran == ["A1"] * 3  # the stopped call did not run
    assert err.rule is StallRule.STALLED_REPEAT
    assert err.repeats == 3
    assert err.tool == "lookup_tracking"
    assert err.session == "run-1"
    assert err.params_hash == guard.engine.fingerprint({"order_id": "A1", "verbose": False})
    assert str(err) == stop_text(err.verdict)
    # Other arguments are another call.
    assert lookup_tracking("B2")["order"] == "B2"
    assert lookup_tracking.__name__ == "lookup_tracking"


async def test_async_tool_stops_a_stalled_repeat(guard: Guard):
    ran = 0

    @guard.tool("tracking", session="run-2")
    async def lookup(order_id: str) -> str:
        nonlocal ran
        ran += 1
        await asyncio.sleep(0)
        return f"{order_id}: last scan Memphis"

    for _ in range(3):
        await lookup("A1")
    with pytest.raises(StalledRepeatError) as stopped:
        await lookup("A1")
    assert ran == 3
    assert (stopped.value.tool, stopped.value.repeats) == ("tracking", 3)


async def test_tool_exceptions_are_error_outcomes_then_identical_errors(guard: Guard):
    attempts = 0

    @guard.tool(session="run-3")
    async def print_label(order_id: str) -> str:
        nonlocal attempts
        attempts += 1
        raise ValueError(f"printer jammed (attempt {attempts})")  # a different text each time

    for _ in range(3):
        with pytest.raises(ValueError, match="printer jammed"):
            await print_label("A1")
    with pytest.raises(StalledRepeatError) as stopped:
        await print_label("A1")
    assert attempts == 3
    assert stopped.value.rule is StallRule.IDENTICAL_ERRORS
    assert stopped.value.repeats == 3


def test_every_call_emits_its_span_under_the_callers_span(traced: Traced, guard: Guard):
    tracer = traced.provider.get_tracer("agent")

    @guard.tool(session="run-4")
    def lookup(order_id: str) -> dict:
        with tracer.start_as_current_span("inside the tool"):
            return {"status": "in transit"}

    @guard.tool(session="run-4")
    def broken(order_id: str) -> dict:
        raise KeyError(order_id)

    with tracer.start_as_current_span("agent turn") as turn:
        for _ in range(3):
            lookup("A1")
        with pytest.raises(StalledRepeatError):
            lookup("A1")
        with pytest.raises(KeyError):
            broken("A1")

    spans = traced.named("execute_tool lookup")
    assert len(spans) == 4
    parent = turn.get_span_context().span_id
    assert all(s.parent.span_id == parent for s in spans)
    attrs = spans[0].attributes
    assert attrs["gen_ai.operation.name"] == "execute_tool"
    assert attrs["gen_ai.tool.name"] == "lookup"
    assert attrs["loopguard.params.hash"] == guard.engine.fingerprint({"order_id": "A1"})
    assert attrs["loopguard.progress.marker"].startswith("h:")
    assert attrs["loopguard.route"] == "serve"
    assert "gen_ai.tool.call.arguments" not in attrs  # content capture is off
    stopped = spans[3].attributes
    assert stopped["loopguard.route"] == "stop_and_review"
    assert stopped["loopguard.failure.stage"] == "loop_guard"
    assert stopped["loopguard.stall.rule"] == "stalled_repeat"
    assert stopped["loopguard.repeat.count"] == 3
    # Spans the tool makes are children of its execute_tool span.
    inner = traced.named("inside the tool")
    assert [s.parent.span_id for s in inner] == [s.context.span_id for s in spans[:3]]
    (failed,) = traced.named("execute_tool broken")
    assert failed.attributes["error.type"] == "KeyError"
    assert failed.status.status_code is StatusCode.ERROR
    assert [r["route"] for r in traced.records[:4]] == ["serve"] * 3 + ["stop_and_review"]


async def test_check_and_record(guard: Guard):
    params = {"order_id": "A1"}
    assert (await guard.check("s", "lookup", params)).action == "allow"
    for _ in range(3):
        await guard.record("s", "lookup", params, {"status": "in transit"})
    verdict = await guard.check("s", "lookup", params)
    assert verdict.blocked and verdict.rule is StallRule.STALLED_REPEAT
    # Something new from another call resets the stall; a filler call would not.
    guard.record_sync("s", "edit_address", {"to": "x"}, {"ok": True})
    assert guard.check_sync("s", "lookup", params).action == "allow"
    # Outcomes that change (an explicit progress marker here) are progress, not a loop.
    for step in range(5):
        await guard.record("p", "poll", {"job": 1}, None, explicit_marker=f"step-{step}")
    assert (await guard.check("p", "poll", {"job": 1})).action == "allow"


def test_sync_api_from_inside_a_running_loop_and_across_loops(guard: Guard):
    @guard.tool(session="run-5")
    def lookup(order_id: str) -> str:
        return "same"

    async def agent_turn() -> str:
        return lookup("A1")  # a sync tool called from async code

    # Three event loops come and go; the session lives on in the Guard.
    for _ in range(3):
        assert asyncio.run(agent_turn()) == "same"
    with pytest.raises(StalledRepeatError):
        asyncio.run(agent_turn())


def test_session_per_call_and_context_manager(guard: Guard):
    current: contextvars.ContextVar[str] = contextvars.ContextVar("session")

    @guard.tool(session=current.get)
    def lookup(order_id: str) -> str:
        return "same"

    current.set("agent-a")
    for _ in range(3):
        lookup("A1")
    current.set("agent-b")
    assert lookup("A1") == "same"  # another session: no stall there

    for _ in range(3):
        with guard.call("search", {"q": "x"}, session="agent-c") as call:
            call.outcome = ["no results"]
    with pytest.raises(StalledRepeatError), guard.call("search", {"q": "x"}, session="agent-c"):
        pytest.fail("a stopped call's block must not run")


async def test_async_context_manager_records_progress(traced: Traced, guard: Guard):
    for step in range(5):  # five calls, no stop: each one brought something new
        async with guard.call("poll", {"job": 1}, session="jobs") as call:
            call.outcome = {"state": "running"}
            call.progress = f"step {step}"  # the tool said something new each time
    markers = [s.attributes["loopguard.progress.marker"] for s in traced.named("execute_tool poll")]
    assert markers == [f"step {n}" for n in range(5)]


def test_methods_are_guarded_without_self(guard: Guard):
    class Tools:
        @guard.tool(session="run-6")
        def lookup(self, order_id: str) -> str:
            return "same"

    for _ in range(3):
        Tools().lookup("A1")  # a new instance each time: still the same call
    with pytest.raises(StalledRepeatError):
        Tools().lookup("A1")


def test_observe_mode_serves_and_says_what_it_would_have_done():
    traced = Traced(loop={"mode": "observe"})
    guard = traced.guard()

    @guard.tool(session="run-7")
    def lookup(order_id: str) -> str:
        return "same"

    try:
        for _ in range(5):
            assert lookup("A1") == "same"
    finally:
        guard.close()
    routes = [s.attributes["loopguard.route"] for s in traced.named("execute_tool lookup")]
    assert routes == ["serve"] * 3 + ["observe"] * 2


def test_store_down_fails_open_and_says_so(traced: Traced):
    guard = traced.guard(store=RedisStore(f"redis://127.0.0.1:{free_port()}/0"))
    ran = 0

    @guard.tool(session="run-8")
    def lookup(order_id: str) -> str:
        nonlocal ran
        ran += 1
        return "same"

    try:
        for _ in range(4):
            lookup("A1")
    finally:
        guard.close()
    assert ran == 4
    stages = {s.attributes["loopguard.failure.stage"] for s in traced.named("execute_tool lookup")}
    assert stages == {"store"}


def test_close_stops_the_guards_loop(traced: Traced):
    guard = traced.guard()
    guard.check_sync("s", "t", {})
    thread = guard._loop._thread
    assert thread is not None and thread.is_alive()
    guard.close()
    assert not thread.is_alive()


def test_generators_are_refused(guard: Guard):
    with pytest.raises(TypeError):

        @guard.tool()
        def pages():
            yield 1


def test_package_exports_are_lazy():
    import subprocess
    import sys

    code = (
        "import sys, guard\n"
        "assert 'guard.doors.inprocess' not in sys.modules\n"
        "assert 'guard.doors.middleware' not in sys.modules\n"
        "from guard import Guard, GuardMiddleware, StalledRepeatError\n"
        "assert Guard.__module__ == 'guard.doors.inprocess'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
