"""The hard cap on a call whose outcome changes every time (issue 14, class 3), per
vantage: a model route nudges first (the nudge rides on the model request), a tool
route stops at the cap (its stop answer is the only message a tool result can carry)."""

from __future__ import annotations

import asyncio

from guard.engine.calls import StallRule, Step
from guard.engine.config import Config
from guard.engine.contract import HistoryStep
from guard.engine.conversation import analyze
from guard.engine.core import Engine
from guard.engine.store import MemoryStore
from guard.engine.telemetry_port import NullTelemetry


def engine() -> Engine:
    config = Config.from_mapping({"telemetry": {"records": ""}})
    return Engine(config, store=MemoryStore(), telemetry=NullTelemetry())


def clock(n: int) -> str:
    # `date`-like: the output changes every call (and is not a volatile pattern: the
    # seconds count here is the whole result).
    return f"Mon Nov 30 10:{n // 60:02d}:{n % 60:02d} UTC 2026 uptime {n} ticks"


def test_model_route_nudges_at_the_cap_then_stops() -> None:
    eng = engine()
    steps = [HistoryStep("clock", {}, clock(n)) for n in range(29)]
    assert analyze(eng, steps).action == "serve"
    steps.append(HistoryStep("clock", {}, clock(29)))
    first = analyze(eng, steps)
    assert first.action == "nudge" and first.verdict is not None
    assert first.verdict.rule == StallRule.HARD_CAP
    steps.append(HistoryStep("clock", {}, clock(30)))
    assert analyze(eng, steps).action == "stop"


def test_tool_route_stops_at_the_31st_call_without_a_nudge() -> None:
    eng = engine()

    async def go() -> list[bool]:
        blocked = []
        for n in range(31):
            h = eng.fingerprint({})
            verdict = await eng.check("s", "clock", h)
            blocked.append(verdict.blocked)
            if not verdict.blocked:
                await eng.record("s", Step("clock", h, eng.marker("clock", clock(n))))
        return blocked

    assert asyncio.run(go()) == [False] * 30 + [True]
