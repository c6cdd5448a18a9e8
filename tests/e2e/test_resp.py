"""The store's Redis client: its reply parser, and settles sent without waiting."""

from __future__ import annotations

import time
from typing import Any

import pytest

from guard.engine import resp
from guard.engine.breaker import BreakerStore
from guard.engine.calls import Step
from guard.engine.store import RedisStore, StoreError


def test_the_python_reply_parser_reads_every_reply_type_fed_byte_by_byte() -> None:
    wire = (
        b"+OK\r\n:42\r\n$-1\r\n$5\r\nhe\r\nl\r\n*2\r\n$1\r\na\r\n*2\r\n:1\r\n$0\r\n\r\n"
        b"-NOSCRIPT No matching script\r\n*-1\r\n"
    )
    reader = resp._PyReader()
    replies: list[Any] = []
    for byte in wire:  # replies split anywhere, even inside a bulk string's CRLF
        reader.feed(bytes([byte]))
        while (reply := reader.gets()) is not False:
            replies.append(reply)
    error = replies[5]
    assert replies[:5] == [b"OK", 42, None, b"he\r\nl", [b"a", [1, b""]]]
    assert isinstance(error, resp.RedisReplyError) and str(error).startswith("NOSCRIPT")
    assert replies[6:] == [None]


def test_commands_are_arrays_of_bulk_strings() -> None:
    assert resp.encode_command(("EVALSHA", "ab", 1, "k", b"\x00v")) == (
        b"*5\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n1\r\n$1\r\nk\r\n$2\r\n\x00v\r\n"
    )


@pytest.mark.parametrize("parser", ["hiredis", "python"])
async def test_the_store_works_with_either_parser(
    redis_url: str, parser: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if parser == "python":
        monkeypatch.setattr(resp, "_HiredisReader", None)
    elif resp._HiredisReader is None:
        pytest.skip("hiredis not installed")
    store = RedisStore(redis_url, key_prefix=f"p{parser}{time.monotonic_ns()}:")
    try:
        _, token = await store.reserve("s", "t", "h", 8, 60)
        await store.settle("s", token, Step("t", "h", "ptr:✓", True), 8)
        before, _ = await store.reserve("s", "t", "h", 8, 60)
        assert before == [Step("t", "h", "ptr:✓", True)]
        await store.put_state("k", "v")
        assert await store.get_state("k") == "v"
    finally:
        await store.aclose()


async def test_a_settle_sent_without_waiting_is_seen_by_the_next_call(redis_url: str) -> None:
    """The breaker does not wait for a settle's reply; the next command on the same
    connection runs after it, so the next admission sees the outcome."""
    store = BreakerStore(RedisStore(redis_url, key_prefix=f"nw{time.monotonic_ns()}:"))
    try:
        _, token = await store.reserve("s", "t", "h", 8, 60)
        await store.settle("s", token, Step("t", "h", "m1"), 8)
        before, token = await store.reserve("s", "t", "h", 8, 60)
        assert before == [Step("t", "h", "m1")]
        await store.release("s", token)
        assert await store.history("s") == [Step("t", "h", "m1")]
    finally:
        await store.aclose()


async def test_a_flushed_script_is_sent_again_for_a_settle_not_awaited(redis_url: str) -> None:
    store = RedisStore(redis_url, key_prefix=f"fl{time.monotonic_ns()}:")
    breaker = BreakerStore(store)
    try:
        _, token = await breaker.reserve("s", "t", "h", 8, 60)
        await store._client.call("SCRIPT", "FLUSH")
        await breaker.settle("s", token, Step("t", "h", "m1"), 8)
        await store._client.call("PING")  # the EVALSHA's NOSCRIPT reply, then the EVAL
        await store._client.call("PING")
        assert await breaker.history("s") == [Step("t", "h", "m1")]
        assert not breaker.is_open and breaker._failed == 0
    finally:
        await breaker.aclose()


class _Unanswered:
    """A store whose settles are sent without waiting and whose replies the test gives."""

    def __init__(self) -> None:
        self.replies: list[Any] = []

    def settle_nowait(self, session: str, token: str, step: Step, window: int, done: Any) -> bool:
        self.replies.append(done)
        return True

    async def aclose(self) -> None:
        pass


class _Warnings:
    def __init__(self) -> None:
        self.noted: list[str] = []

    def note(self, error: str) -> None:
        self.noted.append(error)


async def test_a_failed_settle_not_awaited_counts_towards_the_breaker_and_warns() -> None:
    inner = _Unanswered()
    breaker = BreakerStore(inner, failures=3)  # type: ignore[arg-type]
    warnings = _Warnings()
    breaker.warnings = warnings  # type: ignore[assignment]
    for n in range(3):
        await breaker.settle("s", f"r{n}", Step("t", "h", "m"), 8)
    assert len(inner.replies) == 3 and not breaker.is_open
    inner.replies[0](None)  # a success resets the count
    inner.replies[1](StoreError("lost"))
    inner.replies[2](StoreError("lost"))
    assert not breaker.is_open and warnings.noted == ["StoreError", "StoreError"]
    await breaker.settle("s", "r3", Step("t", "h", "m"), 8)
    inner.replies[3](StoreError("lost"))
    assert breaker.is_open  # three failures in a row
    assert warnings.noted == ["StoreError"] * 3


def test_urls_name_host_port_credentials_and_database() -> None:
    client = resp.RespClient("redis://user:p%40ss@cache.internal:6380/3")
    assert (client._host, client._port, client._db) == ("cache.internal", 6380, 3)
    assert (client._username, client._password) == ("user", "p@ss")
    assert resp.RespClient("unix:///run/redis.sock?db=2")._path == "/run/redis.sock"
    with pytest.raises(StoreError, match="unsupported redis URL scheme"):
        RedisStore("http://127.0.0.1:6379/0")


async def test_a_refused_password_is_a_store_error(redis_url: str) -> None:
    store = RedisStore(redis_url.replace("redis://", "redis://:wrong@"))
    try:
        with pytest.raises(StoreError, match=r"(?i)auth|password"):
            await store.reserve("s", "t", "h", 8, 60)
    finally:
        await store.aclose()
