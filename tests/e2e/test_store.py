"""Session stores: MemoryStore bounds and expiry; RedisStore against a real redis-server."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from servers import free_port

from guard.engine.calls import Step
from guard.engine.store import MemoryStore, RedisStore, StoreError, decode_step, encode_step


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def step(i: int, error: bool = False) -> Step:
    return Step("tool", f"h{i}", f"m{i}", error)


async def test_memory_window_and_copy() -> None:
    store = MemoryStore()
    for i in range(10):
        await store.append("s", step(i), window=4)
    history = await store.history("s")
    assert history == [step(i) for i in range(6, 10)]
    history.clear()  # a copy: the store is untouched
    assert len(await store.history("s")) == 4
    assert await store.history("unknown") == []


async def test_memory_lru_eviction() -> None:
    clock = Clock()
    store = MemoryStore(max_sessions=2, ttl_seconds=60, clock=clock)
    await store.append("a", step(1), 8)
    await store.append("b", step(2), 8)
    await store.history("a")  # touch a: b is now least recently used
    await store.append("c", step(3), 8)
    assert len(store) == 2
    assert await store.history("b") == []
    assert await store.history("a") == [step(1)]
    assert await store.history("c") == [step(3)]


async def test_memory_idle_expiry() -> None:
    clock = Clock()
    store = MemoryStore(max_sessions=10, ttl_seconds=60, clock=clock)
    await store.append("old", step(1), 8)
    clock.now += 30
    await store.append("fresh", step(2), 8)
    clock.now += 31  # old idle 61 s, fresh 31 s
    assert await store.history("old") == []
    assert await store.history("fresh") == [step(2)]
    clock.now += 61
    await store.append("new", step(3), 8)  # appending sweeps expired sessions
    assert len(store) == 1
    # An expired session starts afresh rather than resuming its old steps.
    await store.append("fresh", step(4), 8)
    assert await store.history("fresh") == [step(4)]


async def test_memory_window_change() -> None:
    store = MemoryStore()
    for i in range(6):
        await store.append("s", step(i), window=6)
    await store.append("s", step(6), window=3)
    assert await store.history("s") == [step(4), step(5), step(6)]


def test_step_encoding_roundtrip() -> None:
    s = Step("lookup_tracking", "ab" * 16, "ptr:in transit ✓", True)
    raw = encode_step(s)
    assert decode_step(raw) == s and decode_step(raw.encode()) == s
    assert " " not in raw.replace("in transit ✓", "")


# -- Redis -----------------------------------------------------------------------------


@pytest.fixture
async def redis_store(redis_url: str) -> AsyncIterator[RedisStore]:
    store = RedisStore(redis_url, key_prefix=f"t{time.monotonic_ns()}:", ttl_seconds=30)
    yield store
    await store.aclose()


async def test_redis_append_history_window(redis_store: RedisStore) -> None:
    for i in range(7):
        await redis_store.append("s1", step(i, error=i % 2 == 0), window=5)
    assert await redis_store.history("s1") == [step(i, error=i % 2 == 0) for i in range(2, 7)]
    assert await redis_store.history("nobody") == []


async def test_redis_shared_between_replicas_and_expiry(redis_url: str) -> None:
    import redis.asyncio as aioredis

    prefix = f"r{time.monotonic_ns()}:"
    one = RedisStore(redis_url, key_prefix=prefix, ttl_seconds=30)
    two = RedisStore(redis_url, key_prefix=prefix, ttl_seconds=30)
    try:
        await one.append("s", step(1), 8)
        await two.append("s", step(2), 8)
        assert await one.history("s") == [step(1), step(2)]
        client = aioredis.from_url(redis_url)
        ttls = [await client.ttl(key) for key in one._keys("s")]
        await client.aclose()
        assert all(0 < ttl <= 30 for ttl in ttls)
    finally:
        await one.aclose()
        await two.aclose()


async def test_redis_call_index_follows_the_window(redis_store: RedisStore) -> None:
    """The per-call counts move with the window: a call that left it is answered without
    the window; one inside it gets the whole window (in order), from any replica."""
    import redis.asyncio as aioredis

    calls = [Step("lookup", f"h{i % 3}", f"m{i}", i == 4) for i in range(8)]
    for s in calls:
        await redis_store.append("s", s, window=4)
    window = calls[4:]
    assert await redis_store.history("s") == window
    assert await redis_store.history_for_call("s", "lookup", "h1") == window  # steps 4 and 7
    assert await redis_store.history_for_call("s", "other", "h1") == []
    assert await redis_store.history_for_call("nobody", "lookup", "h1") == []
    client = aioredis.from_url(redis_store.url)
    counts = await client.hgetall(redis_store._keys("s")[1])
    await client.aclose()
    expected: dict[bytes, bytes] = {}
    for s in window:
        fields = [f"{s.tool}\x1f{s.params_hash}"] + ([f"{s.tool}\x1f"] if s.error else [])
        for field in (f.encode() for f in fields):
            expected[field] = str(int(expected.get(field, b"0")) + 1).encode()
    assert counts == expected


async def test_redis_tool_failures_are_indexed_and_leave_with_the_window(
    redis_store: RedisStore,
) -> None:
    """A failure of a tool brings the window back for the tool's calls with any params
    (the error streak reads them), and only while the failure is in the window."""
    failing = Step("deploy", "h1", "m-denied", True)
    await redis_store.append("s", failing, window=3)
    assert await redis_store.history_for_call("s", "deploy", "h-new") == [failing]
    assert await redis_store.history_for_call("s", "other", "h-new") == []
    for i in range(3):
        await redis_store.append("s", Step("other", f"o{i}", "m"), window=3)
    assert await redis_store.history_for_call("s", "deploy", "h-new") == []


async def test_redis_dead_port_raises_store_error() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", connect_timeout=1.0)
    try:
        with pytest.raises(StoreError, match="redis store"):
            await store.history("s")
        with pytest.raises(StoreError, match="cannot append"):
            await store.append("s", step(1), 8)
    finally:
        await store.aclose()


async def test_engine_check_and_record_through_redis(redis_url: str) -> None:
    from guard.engine.config import Config
    from guard.engine.core import Engine

    class NoTelemetry:
        def shutdown(self) -> None:
            pass

    store = RedisStore(redis_url, key_prefix=f"e{time.monotonic_ns()}:", ttl_seconds=30)
    eng = Engine(
        Config.from_mapping({"loop": {"max_repeats": 2}}), store=store, telemetry=NoTelemetry()
    )
    h = eng.fingerprint({"order": "#A10234"})
    for _ in range(2):
        assert (await eng.check("sess", "lookup", h)).action == "allow"
        await eng.record("sess", Step("lookup", h, "scan:v17"))
    assert (await eng.check("sess", "lookup", h)).blocked
    await eng.aclose()


async def _counts(store: MemoryStore | RedisStore, session: str) -> dict[str, int]:
    """The store's per-call index as {"tool\\x1fparams": n} (the tool-wide failures
    field has an empty params hash)."""
    if isinstance(store, MemoryStore):
        counts = store._call_counts(session).items()
        return {f"{tool}\x1f{h}": n for (tool, h), n in counts}
    import redis.asyncio as aioredis

    client = aioredis.from_url(store.url)
    raw = await client.hgetall(store._keys(session)[1])
    await client.aclose()
    return {k.decode(): int(v) for k, v in raw.items()}


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_the_index_stays_in_step_through_reserve_settle_and_release(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """Admission's in-flight steps and the tool-wide failures index agree: a reserved
    call counts once, settling it with a failure adds the tool's failure, a released or
    expired reservation leaves nothing behind -- in both stores."""
    store: MemoryStore | RedisStore
    if backend == "memory":
        store = MemoryStore()
    else:
        store = RedisStore(
            request.getfixturevalue("redis_url"), key_prefix=f"x{time.monotonic_ns()}:"
        )
    try:
        _, token = await store.reserve("s", "deploy", "h1", 8, 30.0)
        assert await _counts(store, "s") == {"deploy\x1fh1": 1}
        await store.settle("s", token, Step("deploy", "h1", "m-denied", True), 8)
        assert await _counts(store, "s") == {"deploy\x1fh1": 1, "deploy\x1f": 1}
        # Another params of the failing tool now gets the window (the error streak).
        before, held = await store.reserve("s", "deploy", "h2", 8, 30.0)
        assert [s.params_hash for s in before] == ["h1"]
        await store.release("s", held)
        assert await _counts(store, "s") == {"deploy\x1fh1": 1, "deploy\x1f": 1}
        # A repeat of the failed call is held with its last outcome (an error), then
        # settled with a success: the tool's failure count follows.
        _, again = await store.reserve("s", "deploy", "h1", 8, 30.0)
        assert await _counts(store, "s") == {"deploy\x1fh1": 2, "deploy\x1f": 2}
        await store.settle("s", again, Step("deploy", "h1", "m-ok", False), 8)
        assert await _counts(store, "s") == {"deploy\x1fh1": 2, "deploy\x1f": 1}
        # The window moves on: everything leaves the index with its step.
        for i in range(8):
            await store.append("s", Step("other", f"o{i}", "m"), 8)
        assert await _counts(store, "s") == {f"other\x1fo{i}": 1 for i in range(8)}
    finally:
        await store.aclose()
