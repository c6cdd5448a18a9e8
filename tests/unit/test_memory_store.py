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
        calls = store._index.get("s")
        assert calls is not None  # past INDEX_FROM steps: indexed
        assert calls == _recount([Step(*held) for held in store._sessions["s"]])

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
    assert store._index["s"] == {("w", f"k{i}"): 1 for i in range(window)}
    await store.append("s", Step("w", "last", "m"), 4)  # a smaller window: trimmed
    check()
    assert len(store._sessions["s"]) == 4


async def test_a_small_session_without_an_index_answers_as_an_indexed_one() -> None:
    store = MemoryStore()
    await store.append("s", Step("deploy", "h1", "denied", True), 64)
    await store.append("s", Step("read", "h2", "ok"), 64)
    assert "s" not in store._index
    # The call itself, and a new call of a tool that failed, get the window.
    assert len(await store.history_for_call("s", "read", "h2")) == 2
    assert len(await store.history_for_call("s", "deploy", "other")) == 2
    # A new call of a tool with no failure does not (same verdict, no copy).
    assert await store.history_for_call("s", "read", "other") == []
    assert store._call_counts("s") == _recount(await store.history("s"))


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


def _tracked_below(*roots: object) -> list[object]:
    """The objects the garbage collector tracks among those reachable from ``roots``
    (the roots themselves left out)."""
    found: list[object] = []
    seen: set[int] = set()
    todo = [child for root in roots for child in gc.get_referents(root)]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if gc.is_tracked(obj):
            found.append(obj)
        todo.extend(gc.get_referents(obj))
    return found


async def test_no_session_leaves_an_object_the_garbage_collector_tracks() -> None:
    """Every full collection walks every tracked object: a store of 100k sessions with
    one object each made each collection cost tens of ms. Whatever a session holds
    (settled and appended steps, an index, reservations in flight, one past its
    deadline, a released one, state), the collections of the young generations a new
    object goes through untrack its tuples (one level of nesting each), so none gets
    to the old generation tracked; a full collection untracks the dicts beside."""
    clock = Clock()
    store = MemoryStore(clock=clock)
    gc.collect()
    gc.disable()  # every object the store makes stays young until the collections below
    try:
        for n in range(50):
            session = f"s{n}"
            _, token = await store.reserve(session, "lookup", f"h{n}", 64, 60.0)
            step = Step("lookup", f"h{n}", f"m{n}", n % 2 == 0)
            await store.settle(session, token, step, 64)
            for i in range(INDEX_FROM + n % 3):  # some sessions indexed, some not
                await store.append(session, Step("read", f"r{i}", "ok", i == 0), 64)
            await store.reserve(session, "deploy", "d", 64, 60.0 if n % 5 else 1.0)
            _, released = await store.reserve(session, "read", "x", 64, 60.0)
            await store.release(session, released)
            await store.put_state(f"resp-{n}", "{}")
        clock.now += 2
        await store.reserve("s0", "lookup", "h0", 64, 60.0)  # expires the 1 s reservation
    finally:
        gc.enable()
    assert store._index and store._holds

    assert not gc.is_tracked(store._seen)  # str -> float: never tracked
    roots = (store._sessions, store._seen, store._holds, store._index, store._states)
    gc.collect(0)
    gc.collect(1)
    tracked = _tracked_below(*roots)
    assert [obj for obj in tracked if not isinstance(obj, dict)] == []
    gc.collect()
    assert _tracked_below(*roots) == []


async def test_a_session_leaves_with_what_is_kept_beside_it() -> None:
    clock = Clock()
    store = MemoryStore(max_sessions=2, ttl_seconds=60, clock=clock)
    for session in ("a", "b", "c"):
        for i in range(INDEX_FROM + 1):
            await store.append(session, Step("t", f"h{i}", "m"), 64)
        await store.reserve(session, "t", "new", 64, 600.0)
    assert len(store) == 2  # "a" evicted
    assert set(store._index) == set(store._holds) == set(store._seen) == {"b", "c"}
    clock.now += 61
    assert await store.history("b") == []  # expired
    assert set(store._index) == set(store._holds) == set(store._seen) == {"c"}
    await store.append("d", Step("t", "h", "m"), 64)  # evicts the expired "c" too
    assert list(store._sessions) == list(store._seen) == ["d"]
    assert store._index == store._holds == {}
