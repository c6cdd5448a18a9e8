"""MemoryStore: what an idle session costs, and the per-call index against its window."""

from __future__ import annotations

import gc
import tracemalloc
from collections import Counter

from guard.engine.calls import Step
from guard.engine.store import INDEX_FROM, TOOL_ERRORS, MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_an_idle_session_costs_well_under_a_kilobyte() -> None:
    """Bytes allocated, not time: 2,000 sessions each holding one settled call, the
    session id, params hash and marker strings included. The store was ~1.65 KB a
    session with a deque, a reservations dict and an index dict per session."""
    store = MemoryStore()
    sessions = 2000
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(sessions):
            session, params_hash = f"session-{n:08d}", f"{n:032x}"
            _, token = await store.reserve(session, "lookup_tracking", params_hash, 64, 630.0)
            step = Step("lookup_tracking", params_hash, f"ptr:{n:012x}")
            await store.settle(session, token, step, 64)
        gc.collect()
        per_session = (tracemalloc.get_traced_memory()[0] - before) / sessions
    finally:
        tracemalloc.stop()
    assert len(store) == sessions
    assert per_session < 700, per_session


def _recount(steps: list[Step]) -> dict[tuple[str, str], int]:
    counts: Counter[tuple[str, str]] = Counter()
    for step in steps:
        counts[(step.tool, step.params_hash)] += 1
        if step.error:
            counts[(step.tool, TOOL_ERRORS)] += 1
    return dict(counts)


async def test_the_index_once_built_follows_the_window_through_every_change() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    window = INDEX_FROM + 4

    def check() -> None:
        entry = store._sessions["s"]
        assert entry.calls is not None  # past INDEX_FROM steps: indexed
        assert entry.calls == _recount(entry.steps())

    for i in range(INDEX_FROM + 1):
        await store.append("s", Step("t", f"h{i % 3}", "m", i % 2 == 0), window)
    check()
    _, settled = await store.reserve("s", "t", "h0", window, 60)
    _, released = await store.reserve("s", "u", "new", window, 60)
    _, expiring = await store.reserve("s", "t", "h1", window, 1)
    check()
    await store.settle("s", settled, Step("t", "h0", "m2", True), window)
    await store.release("s", released)
    check()
    clock.now += 2  # past the 1 s hold: the next reserve expires it
    await store.reserve("s", "v", "x", window, 60)
    check()
    await store.release("s", expiring)  # already gone: nothing else leaves
    check()
    for i in range(window):  # the window moves on: old steps leave the index
        await store.append("s", Step("w", f"k{i}", "m"), window)
    check()
    assert store._sessions["s"].calls == {("w", f"k{i}"): 1 for i in range(window)}
    await store.append("s", Step("w", "last", "m"), 4)  # a smaller window: trimmed
    check()
    assert len(store._sessions["s"]) == 4


async def test_a_small_session_without_an_index_answers_as_an_indexed_one() -> None:
    store = MemoryStore()
    await store.append("s", Step("deploy", "h1", "denied", True), 64)
    await store.append("s", Step("read", "h2", "ok"), 64)
    assert store._sessions["s"].calls is None
    # The call itself, and a new call of a tool that failed, get the window.
    assert len(await store.history_for_call("s", "read", "h2")) == 2
    assert len(await store.history_for_call("s", "deploy", "other")) == 2
    # A new call of a tool with no failure does not (same verdict, no copy).
    assert await store.history_for_call("s", "read", "other") == []
    assert store._sessions["s"].counts() == _recount(await store.history("s"))


async def test_sessions_share_one_copy_of_each_tool_name() -> None:
    # Every request parses its own copy of the name; the store keeps one for all the
    # steps of all its sessions (reserved, settled or appended).
    store = MemoryStore()
    names = ["".join(["lookup", "_tracking"]) for _ in range(3)]
    assert names[0] is not names[1]
    _, token = await store.reserve("a", names[0], "h1", 64, 10.0)
    await store.settle("a", token, Step(names[1], "h1", "m1"), 64)
    await store.append("b", Step(names[2], "h2", "m2"), 64)
    await store.reserve("c", names[1], "h3", 64, 10.0)
    held = [step for session in ("a", "b", "c") for step in store._sessions[session]]
    assert len(held) == 3 and all(step[0] is held[0][0] for step in held)
