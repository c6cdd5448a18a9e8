"""Issue 12 over real sockets: nothing served unguarded silently, atomic admission,
big bodies off the event loop, a hung or dead store, client limits, leaks.

loopguard and a tool server on uvicorn; each case counts what reached the tool.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from proxy_harness import ToolServer, guarded_proxy, proxy_config, read_json_answer
from servers import redis_server, run_server

from guard.engine.breaker import BreakerStore, CircuitOpen
from guard.engine.config import Config
from guard.engine.core import Engine
from guard.engine.store import RedisStore, StoreError


@pytest.fixture
def tools() -> Iterator[tuple[ToolServer, str]]:
    server = ToolServer()
    with run_server(server.app()) as url:
        yield server, url


def _send_same(url: str, path: str, body: bytes, headers: dict[str, str], n: int) -> list[int]:
    statuses = []
    with httpx.Client(base_url=url, timeout=10) as client:
        for _ in range(n):
            statuses.append(client.post(path, content=body, headers=headers).status_code)
    return statuses


# -- rows 2 and 5: a body the guard cannot parse is still a call ------------------------

UNPARSEABLE = {
    "invalid_utf8": (b'{"q": "\xff\xfe caf\xe9"}', {}),
    "trailing_garbage": (b'{"q": "a"} trailing', {}),
    "huge_integer": (b'{"q": ' + b"7" * 5000 + b"}", {}),
    "nested_5000_deep": (b'{"q": ' + b"[" * 5000 + b"]" * 5000 + b"}", {}),
}


@pytest.mark.parametrize("case", sorted(UNPARSEABLE))
def test_an_unparseable_body_repeated_is_stopped(tools: tuple[ToolServer, str], case: str) -> None:
    server, upstream = tools
    body, extra = UNPARSEABLE[case]
    headers = {"content-type": "application/json", "x-loopguard-session": case, **extra}
    with guarded_proxy(proxy_config(upstream)) as (url, records):
        statuses = _send_same(url, "/tools/status/200", body, headers, 6)
    # max_repeats = 3: three identical answers, then the raw-hashed call is stopped.
    assert statuses == [200, 200, 200, 422, 422, 422]
    assert server.hits["status"] == 3
    assert [r["failure_stage"] for r in records] == ["request_admission"] * 3 + ["loop_guard"] * 3
    assert records[0]["error_type"] in ("malformed_request", "nested_too_deep")
    assert len({r["params_hash"] for r in records}) == 1


def test_gzip_json_is_decoded_and_judged_on_its_parameters(
    tools: tuple[ToolServer, str],
) -> None:
    server, upstream = tools
    headers = {
        "content-type": "application/json",
        "content-encoding": "gzip",
        "x-loopguard-session": "gz",
    }
    with guarded_proxy(proxy_config(upstream)) as (url, records):
        statuses = _send_same(url, "/tools/status/200", gzip.compress(b'{"q": "a"}'), headers, 5)
        # The same parameters sent plain are the same call (already stopped).
        plain = httpx.post(
            f"{url}/tools/status/200",
            content=b'{"q":"a"}',
            headers={"content-type": "application/json", "x-loopguard-session": "gz"},
        )
    assert statuses == [200, 200, 200, 422, 422]
    assert plain.status_code == 422
    assert server.hits["status"] == 3
    assert records[0]["failure_stage"] == "passed"


def _route(prefix: str, upstream: str, adapter: str) -> dict[str, Any]:
    return {"prefix": prefix, "upstream": upstream, "adapter": adapter}


def test_mcp_call_nested_too_deep_is_still_guarded(tools: tuple[ToolServer, str]) -> None:
    server, upstream = tools
    deep = "[" * 5000 + "]" * 5000
    body = (
        '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":'
        '{"x":' + deep + "}}}"
    ).encode()
    config = proxy_config(upstream, routes=[_route("/mcp", f"{upstream}/status/200", "mcp")])
    headers = {
        "content-type": "application/json",
        "accept": "application/json, text/event-stream",
        "mcp-session-id": "deep-mcp",
    }
    with guarded_proxy(config) as (url, records):
        statuses = _send_same(url, "/mcp", body, headers, 5)
    assert statuses == [200, 200, 200, 422, 422]
    assert server.hits["status"] == 3
    assert records[0]["failure_stage"] == "request_admission"
    assert records[-1]["failure_stage"] == "loop_guard"


def test_openai_history_nested_too_deep_is_still_guarded(tools: tuple[ToolServer, str]) -> None:
    server, upstream = tools
    deep = "[" * 5000 + "]" * 5000
    body = (
        '{"model":"gpt-4o","messages":[{"role":"user","content":"hi"},'
        '{"role":"tool","tool_call_id":"c1","content":' + deep + "}]}"
    ).encode()
    config = proxy_config(upstream, routes=[_route("/openai", f"{upstream}/fixed", "openai")])
    headers = {"content-type": "application/json", "x-loopguard-session": "deep-openai"}
    with guarded_proxy(config) as (url, records):
        statuses = _send_same(url, "/openai/v1/chat/completions", body, headers, 5)
    assert statuses == [200, 200, 200, 422, 422]
    assert server.hits["fixed"] == 3
    assert {r["failure_stage"] for r in records[:3]} == {"request_admission"}


def test_body_over_the_parse_cap_is_hashed_raw_and_recorded(
    tools: tuple[ToolServer, str],
) -> None:
    server, upstream = tools
    config = proxy_config(upstream, server={"max_parse_bytes": 1024})
    body = json.dumps({"q": "x" * 4096}).encode()
    headers = {"content-type": "application/json", "x-loopguard-session": "cap"}
    with guarded_proxy(config) as (url, records):
        statuses = _send_same(url, "/tools/status/200", body, headers, 5)
    assert statuses == [200, 200, 200, 422, 422]
    assert server.hits["status"] == 3
    assert records[0]["failure_stage"] == "request_admission"
    assert records[0]["error_type"] == "body_not_parsed"


# -- row 3: atomic admission --------------------------------------------------------------


def _concurrent_same(url: str, path: str, session: str, n: int) -> list[int]:
    async def run() -> list[int]:
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
            headers = {"content-type": "application/json", "x-loopguard-session": session}
            calls = [client.post(path, content=b'{"q":"same"}', headers=headers) for _ in range(n)]
            return [r.status_code for r in await asyncio.gather(*calls)]

    return asyncio.run(run())


@pytest.mark.parametrize("backend", ["memory", "redis"])
@pytest.mark.parametrize(
    ("loop", "allowed"),
    [
        ({}, 3),  # stalled_repeat: max_repeats = 3
        ({"max_repeats": 100, "max_identical_calls": 5}, 5),  # the hard cap
    ],
    ids=["max_repeats", "hard_cap"],
)
def test_concurrent_identical_calls_pass_no_more_than_the_rules_allow(
    request: pytest.FixtureRequest,
    tools: tuple[ToolServer, str],
    backend: str,
    loop: dict[str, Any],
    allowed: int,
) -> None:
    server, upstream = tools
    store: dict[str, Any] = {"backend": backend}
    if backend == "redis":
        store["url"] = request.getfixturevalue("redis_url")
        store["key_prefix"] = f"conc-{backend}-{allowed}:"
    config = proxy_config(upstream, store=store, loop=loop)
    with guarded_proxy(config) as (url, records):
        # /slow answers after a second: all 20 are in flight together.
        statuses = _concurrent_same(url, "/tools/slow", f"conc-{allowed}", 20)
    served = statuses.count(200)
    assert 1 <= served <= allowed
    assert server.hits["slow"] == served
    assert statuses.count(422) == 20 - served
    assert sum(r["failure_stage"] == "loop_guard" for r in records) == 20 - served


async def test_redis_reservations_settle_release_and_expire(redis_url: str) -> None:
    from guard.engine.calls import Step
    from guard.engine.store import IN_FLIGHT, RedisStore

    store = RedisStore(redis_url, key_prefix="resv:")
    try:
        before, token = await store.reserve("s", "t", "h", 8, 60)
        assert before == []
        seen, token2 = await store.reserve("s", "t", "h", 8, 60)
        assert seen == [Step("t", "h", IN_FLIGHT)]
        await store.settle("s", token, Step("t", "h", "m1"), 8)
        await store.release("s", token2)
        assert await store.history("s") == [Step("t", "h", "m1")]
        # A duplicate in flight repeats the outcome the call last had.
        seen, token3 = await store.reserve("s", "t", "h", 8, 0.001)
        assert seen == [Step("t", "h", "m1")]
        assert await store.history("s") == [Step("t", "h", "m1"), Step("t", "h", "m1")]
        await asyncio.sleep(0.05)  # past the 1 ms hold: the next reserve expires it
        seen, _ = await store.reserve("s", "t", "h", 8, 60)
        assert seen == [Step("t", "h", "m1")]  # token3's step is gone, counts with it
        await store.settle("s", token3, Step("t", "h", "late"), 8)  # late: appended
        assert (await store.history("s"))[-1] == Step("t", "h", "late")
    finally:
        await store.aclose()


# -- row 9: a hung or dead store ------------------------------------------------------------


@pytest.fixture
def own_redis() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A redis-server of this test's own, to stop (SIGSTOP) or kill."""
    with redis_server() as (proc, url):
        try:
            yield proc, url
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)  # a stopped server cannot terminate


class _Counting(RedisStore):
    """Counts the operations that reached Redis (the breaker lets through)."""

    asked = 0

    async def reserve(self, *args: Any) -> Any:
        _Counting.asked += 1
        return await super().reserve(*args)

    async def append(self, *args: Any) -> Any:
        _Counting.asked += 1
        return await super().append(*args)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("fault", ["hung", "dead"])
async def test_the_breaker_stops_asking_a_hung_or_dead_store_and_probes_again(
    own_redis: tuple[subprocess.Popen[bytes], str], fault: str
) -> None:
    proc, url = own_redis
    clock = _Clock()
    _Counting.asked = 0
    store = BreakerStore(
        _Counting(url, key_prefix="brk:"), timeout=0.2, failures=3, backoff=5, clock=clock
    )
    engine = Engine(Config(), store=store)
    try:
        _, token = await engine.admit_call("s", "t", "h")  # healthy
        assert token is not None and _Counting.asked == 1
        os.kill(proc.pid, signal.SIGSTOP if fault == "hung" else signal.SIGKILL)
        if fault == "dead":
            proc.wait()
        failures = []
        for _ in range(20):
            try:
                await engine.admit_call("s", "t", "h")
            except StoreError as exc:
                failures.append(type(exc).__name__)
        # Three timeouts (or refusals) reached the store; then it was not asked at all.
        assert _Counting.asked == 1 + 3
        assert failures == ["StoreError"] * 3 + ["CircuitOpen"] * 17
        assert store.is_open
        # Past the backoff one probe is let through; still failing: open again, longer.
        clock.now += 5
        with pytest.raises(StoreError):
            await engine.admit_call("s", "t", "h")
        assert _Counting.asked == 5
        clock.now += 5  # the backoff doubled: not yet
        with pytest.raises(CircuitOpen):
            await engine.admit_call("s", "t", "h")
        if fault == "hung":
            os.kill(proc.pid, signal.SIGCONT)
            clock.now += 5
            await engine.admit_call("s", "t", "h2")  # the probe succeeds: closed
            assert not store.is_open
            await engine.admit_call("s", "t", "h3")
            assert _Counting.asked == 7
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
        await engine.aclose()


def test_a_hung_store_serves_calls_fast_with_stage_store_and_few_warnings(
    own_redis: tuple[subprocess.Popen[bytes], str], tools: tuple[ToolServer, str], capsys
) -> None:
    proc, url = own_redis
    server, upstream = tools
    config = proxy_config(upstream, store={"backend": "redis", "url": url, "timeout_seconds": 0.2})
    with guarded_proxy(config) as (proxy, records), httpx.Client(base_url=proxy, timeout=30) as c:
        headers = {"content-type": "application/json", "x-loopguard-session": "hung"}
        assert c.post("/tools/echo", content=b'{"n": 0}', headers=headers).status_code == 200
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            statuses = [
                c.post("/tools/echo", content=b'{"n": %d}' % i, headers=headers).status_code
                for i in range(1, 41)
            ]
        finally:
            os.kill(proc.pid, signal.SIGCONT)
    assert statuses == [200] * 40  # fail open
    assert server.hits["echo"] == 41
    assert all(r["failure_stage"] == "store" for r in records[1:])
    # One warning (with a count of those held back), not one per call.
    out = capsys.readouterr().out
    assert 1 <= out.count("session_store_unavailable") <= 2


# -- row 4: client limits (uvicorn's options, loopguard's own head and body timeouts) -------


def _limited(upstream: str, **server: Any) -> tuple[Any, dict[str, Any]]:
    from guard.doors.serve import client_limits

    config = proxy_config(upstream, server=server)
    return config, client_limits(config)


def _closed_by_server(sock: socket.socket) -> bool:
    """True when the server closes the connection (recv gives EOF) before the
    socket's own safety timeout."""
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("sent", [b"", b"POST /tools/echo HTTP/1.1\r\nHost: x\r\n"])
def test_a_connection_without_a_complete_head_is_closed(
    tools: tuple[ToolServer, str], sent: bytes
) -> None:
    _, upstream = tools
    config, options = _limited(upstream, head_timeout=0.3)
    with guarded_proxy(config, **options) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.settimeout(20)  # a safety net only: the server must close first
            sock.sendall(sent)
            assert _closed_by_server(sock)


def test_a_stalled_body_is_cut_with_408(tools: tuple[ToolServer, str]) -> None:
    server, upstream = tools
    config, options = _limited(upstream, body_read_timeout=0.3)
    with guarded_proxy(config, **options) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.settimeout(20)
            sock.sendall(
                b"POST /tools/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"q": '
            )
            answer = read_json_answer(sock)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"application/problem+json" in answer and b"body-timeout" in answer
    assert server.hits["echo"] == 0


def test_a_kept_alive_connection_still_answers_its_next_request(
    tools: tuple[ToolServer, str],
) -> None:
    # The head deadline is per request: a connection reused promptly works as before.
    _, upstream = tools
    config, options = _limited(upstream, head_timeout=5)
    with guarded_proxy(config, **options) as (url, _), httpx.Client(base_url=url) as client:
        assert [client.get("/tools/echo").status_code for _ in range(3)] == [200] * 3


def test_connections_past_the_concurrency_cap_get_503(tools: tuple[ToolServer, str]) -> None:
    server, upstream = tools
    server.hits.clear()
    # uvicorn answers 503 once the connections (this one included) reach the cap.
    config, options = _limited(upstream, limit_concurrency=3)

    async def run(url: str) -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            slow = [client.post("/tools/slow", json={"i": i}) for i in range(2)]
            held = [asyncio.ensure_future(call) for call in slow]
            await asyncio.sleep(0.3)  # both slow calls are in (ordering, not a timing check)
            extra = await client.get("/healthz")
            return [extra.status_code] + [(await h).status_code for h in held]

    with guarded_proxy(config, **options) as (url, _):
        statuses = asyncio.run(run(url))
    assert statuses[0] == 503
    assert statuses[1:] == [200, 200]
    assert server.hits["slow"] == 2


# -- row 7: distinct values stay distinct in the hash ---------------------------------------


def test_five_customers_are_five_calls_not_a_stalled_repeat(tools: tuple[ToolServer, str]) -> None:
    _, upstream = tools
    # Five 13+-digit order ids that pass Luhn (so the display masks each as a card).
    order_ids = [
        4111111111111111,
        4012888888881881,
        5555555555554444,
        5105105105105100,
        378282246310005,
    ]
    headers = {"content-type": "application/json", "x-loopguard-session": "customers"}
    with guarded_proxy(proxy_config(upstream)) as (url, records), httpx.Client(base_url=url) as c:
        distinct = [
            c.post("/tools/fixed/x", json={"email": f"customer{i}@example.org"}, headers=headers)
            for i in range(5)
        ]
        orders = [
            c.post("/tools/fixed/x", json={"order": order_id}, headers=headers)
            for order_id in order_ids
        ]
        same = [
            c.post("/tools/fixed/x", json={"email": "one@example.org"}, headers=headers)
            for _ in range(5)
        ]
    assert [r.status_code for r in distinct] == [200] * 5
    assert [r.status_code for r in orders] == [200] * 5
    assert [r.status_code for r in same] == [200, 200, 200, 422, 422]
    # The display stays masked: no address in any record.
    assert "example.org" not in json.dumps(records)


def test_the_path_after_the_tool_segment_is_part_of_the_call(
    tools: tuple[ToolServer, str],
) -> None:
    server, upstream = tools
    headers = {"x-loopguard-session": "paths"}
    with guarded_proxy(proxy_config(upstream)) as (url, _), httpx.Client(base_url=url) as c:
        distinct = [c.get(f"/tools/fixed/order-{i}", headers=headers).status_code for i in range(5)]
        same = [c.get("/tools/fixed/order-1", headers=headers).status_code for _ in range(3)]
    assert distinct == [200] * 5
    assert same == [200, 200, 422]  # order-1 was already asked once
    assert server.hits["fixed"] == 7


# -- row 8: request bytes in flight bounded -------------------------------------------------


def test_request_bytes_in_flight_past_the_cap_get_503_with_retry_after(
    tools: tuple[ToolServer, str],
) -> None:
    server, upstream = tools
    config, options = _limited(upstream, max_bytes_in_flight=1000)
    with guarded_proxy(config, **options) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as slow:
            # 800 bytes declared, 10 sent: the first request holds its share while read.
            slow.sendall(
                b"POST /tools/echo HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
                b"Content-Length: 800\r\n\r\n" + b"a" * 10
            )
            time.sleep(0.2)  # ordering only: the first request is being read
            refused = httpx.post(f"{url}/tools/echo", content=b"b" * 500)
            slow.sendall(b"a" * 790)
            slow.settimeout(20)
            first = slow.recv(4096)
        after = httpx.post(f"{url}/tools/echo", content=b"b" * 500)
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["content-type"] == "application/problem+json"
    assert first.startswith(b"HTTP/1.1 200 ")
    assert after.status_code == 200  # the share was given back
    assert server.hits["echo"] == 2
