"""Atomic admission in the memory store: reserve, settle, release, expiry."""

from __future__ import annotations

from guard.engine.calls import Step
from guard.engine.config import Config
from guard.engine.core import Engine
from guard.engine.store import IN_FLIGHT, MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_reservation_is_seen_by_the_next_check_and_settled_in_place() -> None:
    store = MemoryStore()
    before, token = await store.reserve("s", "t", "h", 8, 60)
    assert before == []
    seen, token2 = await store.reserve("s", "t", "h", 8, 60)
    assert seen == [Step("t", "h", IN_FLIGHT)]
    await store.settle("s", token, Step("t", "h", "m1"), 8)
    assert await store.history("s") == [Step("t", "h", "m1"), Step("t", "h", IN_FLIGHT)]
    await store.release("s", token2)
    assert await store.history("s") == [Step("t", "h", "m1")]
    # A duplicate while the call is in flight repeats the outcome it last had.
    _, token3 = await store.reserve("s", "t", "h", 8, 60)
    assert await store.history("s") == [Step("t", "h", "m1"), Step("t", "h", "m1")]
    await store.release("s", token3)
    assert await store.history_for_call("s", "x", "y") == []


async def test_a_reservation_nobody_settles_expires() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    _, token = await store.reserve("s", "t", "h", 8, 30)
    clock.now += 31
    seen, _ = await store.reserve("s", "t", "h", 8, 30)
    assert seen == []  # the first stopped counting
    # Its late settle is still recorded, as an ordinary step.
    await store.settle("s", token, Step("t", "h", "late"), 8)
    assert Step("t", "h", "late") in await store.history("s")


async def test_a_reservation_pushed_out_of_the_window_settles_as_an_append() -> None:
    store = MemoryStore()
    _, token = await store.reserve("s", "t", "h", 2, 60)
    await store.append("s", Step("a", "1", "x"), 2)
    await store.append("s", Step("b", "2", "y"), 2)
    await store.settle("s", token, Step("t", "h", "m"), 2)
    assert await store.history("s") == [Step("b", "2", "y"), Step("t", "h", "m")]


async def test_engine_releases_the_reservation_of_a_stopped_call() -> None:
    engine = Engine(Config.from_mapping({"loop": {"max_repeats": 1}}))
    verdict, token = await engine.admit_call("s", "t", "h")
    assert verdict.action == "allow" and token is not None
    stopped, none = await engine.admit_call("s", "t", "h")
    assert stopped.blocked and none is None
    # Only the first call's in-flight step is in the window.
    assert await engine.store.history("s") == [Step("t", "h", IN_FLIGHT)]
    await engine.settle("s", token, Step("t", "h", "m"))
    assert await engine.store.history("s") == [Step("t", "h", "m")]
    await engine.aclose()
