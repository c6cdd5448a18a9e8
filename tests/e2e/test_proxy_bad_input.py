"""Every bad input and upstream failure: a clear answer, a recorded stage, no hang.

loopguard and the tool server run on uvicorn over real sockets; each case is its own
test. A problem answer never carries a traceback and never a status the SDKs retry
on by themselves, except 502/504 for real upstream failures.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from proxy_harness import ToolServer, guarded_proxy, proxy_config, read_json_answer, wait_for
from servers import dead_port, run_server


@pytest.fixture
def tools() -> Iterator[tuple[ToolServer, str]]:
    server = ToolServer()
    with run_server(server.app()) as url:
        yield server, url


def assert_problem(response: httpx.Response, status: int, slug: str) -> dict:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    assert "x-loopguard-route" in response.headers
    body = response.json()
    assert body["type"] == f"https://loopguard.dev/problems/{slug}"
    assert body["status"] == status
    assert body["title"] and body["detail"]
    assert "Traceback" not in response.text
    return body


# -- request admission -----------------------------------------------------------------


def test_malformed_json_is_forwarded_unchanged_and_marked(tools: tuple[ToolServer, str]) -> None:
    server, upstream = tools
    with guarded_proxy(proxy_config(upstream)) as (url, records):
        response = httpx.post(
            f"{url}/tools/echo",
            content=b'{"order_id": "A1",',
            headers={"content-type": "application/json", "x-loopguard-session": "m"},
        )
    assert response.status_code == 200
    assert server.bodies == [b'{"order_id": "A1",']
    assert records[0]["failure_stage"] == "request_admission"
    assert records[0]["error_type"] == "malformed_request"


def test_malformed_json_is_rejected_with_400_when_configured(
    tools: tuple[ToolServer, str],
) -> None:
    server, upstream = tools
    config = proxy_config(upstream, server={"reject_malformed_json": True})
    with guarded_proxy(config) as (url, records):
        response = httpx.post(
            f"{url}/tools/echo",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
    assert_problem(response, 400, "malformed-request")
    assert server.hits["echo"] == 0
    assert records[0]["failure_stage"] == "request_admission"


def test_body_over_the_limit_is_413(tools: tuple[ToolServer, str]) -> None:
    server, upstream = tools
    config = proxy_config(upstream, server={"max_body_bytes": 1024})
    with guarded_proxy(config) as (url, _), httpx.Client(base_url=url, timeout=5) as client:
        too_big = client.post("/tools/echo", content=b"x" * 4096)
        # Large enough that the client is still writing when the answer comes.
        much_too_big = client.post("/tools/echo", content=b"x" * (4 * 1024 * 1024))
        at_limit = client.post("/tools/echo", content=b"x" * 1024)
    assert_problem(too_big, 413, "body-too-large")
    assert_problem(much_too_big, 413, "body-too-large")
    assert at_limit.status_code == 200
    assert server.hits["echo"] == 1


def test_chunked_body_over_the_limit_is_413(tools: tuple[ToolServer, str]) -> None:
    server, upstream = tools
    config = proxy_config(upstream, server={"max_body_bytes": 1024})

    def chunks() -> Iterator[bytes]:  # no content-length: counted as it arrives
        for _ in range(8):
            yield b"y" * 512

    with guarded_proxy(config) as (url, _):
        response = httpx.post(f"{url}/tools/echo", content=chunks(), timeout=5)
    assert_problem(response, 413, "body-too-large")
    assert server.hits["echo"] == 0


def test_unknown_route_is_404(tools: tuple[ToolServer, str]) -> None:
    server, upstream = tools
    with guarded_proxy(proxy_config(upstream)) as (url, _):
        response = httpx.get(f"{url}/nowhere/lookup")
        prefix_lookalike = httpx.get(f"{url}/toolsmith/lookup")
    assert_problem(response, 404, "no-route")
    assert_problem(prefix_lookalike, 404, "no-route")
    assert sum(server.hits.values()) == 0


def test_healthz_answers_without_touching_upstreams() -> None:
    dead = f"http://127.0.0.1:{dead_port()}"
    with guarded_proxy(proxy_config(dead)) as (url, records):
        response = httpx.get(f"{url}/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert records == []


def raw_request(url: str, request: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request)
        return read_json_answer(sock)


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_absolute_form_target_never_reaches_the_named_host(
    tools: tuple[ToolServer, str], http: str
) -> None:
    from guard.doors.client_limits import HeadTimeoutProtocol

    server, upstream = tools
    elsewhere = ToolServer()
    # loopguard serve runs httptools through its own protocol class (client limits),
    # which hands the app the absolute target that httptools alone would drop.
    protocol: Any = HeadTimeoutProtocol if http == "httptools" else http
    with (
        run_server(elsewhere.app()) as evil,
        guarded_proxy(proxy_config(upstream), http=protocol) as (url, _),
    ):
        target = f"{evil}/tools/echo".encode()
        answer = raw_request(url, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sum(elsewhere.hits.values()) == 0
    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line == b"HTTP/1.1 400 Bad Request"
    assert b"absolute-form-target" in answer
    assert server.hits["echo"] == 0


def test_dot_segments_are_refused(tools: tuple[ToolServer, str]) -> None:
    server, upstream = tools
    with guarded_proxy(proxy_config(upstream)) as (url, _):
        answer = raw_request(url, b"GET /tools/../echo HTTP/1.1\r\nHost: x\r\n\r\n")
        encoded = raw_request(url, b"GET /tools/%2e%2e/echo HTTP/1.1\r\nHost: x\r\n\r\n")
        # A backslash as a separator, and dots encoded twice (one decode leaves %2e).
        backslash = raw_request(url, b"GET /tools/..\\..\\echo HTTP/1.1\r\nHost: x\r\n\r\n")
        twice = raw_request(url, b"GET /tools/%252e%252e/echo HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400")
    assert encoded.startswith(b"HTTP/1.1 400")
    assert backslash.startswith(b"HTTP/1.1 400")
    assert twice.startswith(b"HTTP/1.1 400")
    assert server.hits["echo"] == 0


# -- upstream failures -------------------------------------------------------------------


def test_upstream_refused_is_502() -> None:
    dead = f"http://127.0.0.1:{dead_port()}"
    with guarded_proxy(proxy_config(dead)) as (url, records):
        response = httpx.post(f"{url}/tools/lookup", json={}, timeout=5)
    assert_problem(response, 502, "upstream-unavailable")
    assert records[0]["failure_stage"] == "upstream_connect"
    assert records[0]["error_type"] == "ConnectError"


def test_upstream_timeout_is_504(tools: tuple[ToolServer, str]) -> None:
    _, upstream = tools
    config = proxy_config(upstream, server={"read_timeout": 0.3})
    with guarded_proxy(config) as (url, records):
        started = time.monotonic()
        response = httpx.post(f"{url}/tools/slow", json={}, timeout=5)
        elapsed = time.monotonic() - started
    assert_problem(response, 504, "upstream-timeout")
    assert elapsed < 0.9  # the upstream would answer after 1 s
    assert records[0]["failure_stage"] == "upstream_timeout"


def test_total_timeout_is_504(tools: tuple[ToolServer, str]) -> None:
    _, upstream = tools
    config = proxy_config(upstream, server={"total_timeout": 0.3})
    with guarded_proxy(config) as (url, records):
        response = httpx.post(f"{url}/tools/slow", json={}, timeout=5)
    assert_problem(response, 504, "upstream-timeout")
    assert records[0]["failure_stage"] == "upstream_timeout"


def test_upstream_5xx_passes_through_unchanged(tools: tuple[ToolServer, str]) -> None:
    _, upstream = tools
    with guarded_proxy(proxy_config(upstream)) as (url, records):
        response = httpx.post(f"{url}/tools/status/503", json={})
    assert response.status_code == 503
    assert response.json() == {"error": "status 503"}
    assert response.headers["retry-after"] == "7"
    assert response.headers["x-loopguard-route"] == "serve"
    assert records[0]["failure_stage"] == "upstream_status"


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_upstream_dying_mid_stream_cuts_the_client_stream(
    tools: tuple[ToolServer, str], framing: str
) -> None:
    _, upstream = tools
    path = "/tools/raw/die" + ("?length=1" if framing == "content-length" else "")
    received = b""
    with guarded_proxy(proxy_config(upstream)) as (url, records):
        with (
            pytest.raises(httpx.RemoteProtocolError),
            httpx.stream("GET", url + path, timeout=5) as response,
        ):
            assert response.status_code == 200
            for chunk in response.iter_raw():
                received += chunk
        assert wait_for(lambda: len(records) == 1)
    assert received.startswith(b"chunk0\n")
    assert records[0]["failure_stage"] == "stream"


async def test_client_disconnect_closes_the_upstream_promptly(
    tools: tuple[ToolServer, str],
) -> None:
    server, upstream = tools
    with guarded_proxy(proxy_config(upstream)) as (url, records):
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            async with client.stream("GET", "/tools/raw/forever") as response:
                async for _ in response.aiter_raw():
                    break  # one chunk, then the agent goes away
            left_at = time.monotonic()
        await asyncio.to_thread(server.disconnected.wait, 3)
        noticed = time.monotonic() - left_at
        assert server.disconnected.is_set()
        assert noticed < 1.0
        assert await asyncio.to_thread(wait_for, lambda: len(records) == 1)
    assert records[0]["failure_stage"] == "stream"
    assert records[0]["error_type"] == "client_disconnected"


async def test_client_giving_up_before_the_answer_cancels_the_upstream_call(
    tools: tuple[ToolServer, str],
) -> None:
    server, upstream = tools
    with guarded_proxy(proxy_config(upstream)) as (url, records):
        async with httpx.AsyncClient(base_url=url, timeout=0.3) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/tools/raw/hang", json={})
        left_at = time.monotonic()
        await asyncio.to_thread(server.disconnected.wait, 3)
        assert server.disconnected.is_set()
        assert time.monotonic() - left_at < 1.0
        assert await asyncio.to_thread(wait_for, lambda: len(records) == 1)
    assert records[0]["error_type"] == "client_disconnected"


# -- headers -----------------------------------------------------------------------------


def test_hop_by_hop_headers_are_dropped_both_ways(tools: tuple[ToolServer, str]) -> None:
    _, upstream = tools
    with guarded_proxy(proxy_config(upstream)) as (url, _):
        sent = httpx.get(
            f"{url}/tools/echo",
            headers={
                "connection": "keep-alive, x-named-hop",
                "x-named-hop": "1",
                "keep-alive": "timeout=5",
                "te": "trailers",
                "proxy-authorization": "Basic Zm9vOmJhcg==",
                "x-end-to-end": "kept",
            },
        )
        back = httpx.get(f"{url}/tools/hop")
    seen = {name for name, _ in sent.json()["headers"]}
    for name in ("x-named-hop", "keep-alive", "te", "proxy-authorization"):
        assert name not in seen
    assert "x-end-to-end" in seen
    assert dict(sent.json()["headers"])["accept-encoding"] == "identity"
    for name in ("x-hop-named", "keep-alive", "proxy-authenticate"):
        assert name not in back.headers
    assert back.headers["x-end-to-end"] == "kept"
    assert back.headers.get("connection", "keep-alive") == "keep-alive"


def test_traceparent_is_continued_upstream(tools: tuple[ToolServer, str]) -> None:
    _, upstream = tools
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    incoming = f"00-{trace_id}-00f067aa0ba902b7-01"
    with guarded_proxy(proxy_config(upstream)) as (url, records):
        response = httpx.post(f"{url}/tools/echo", json={}, headers={"traceparent": incoming})
    forwarded = dict(response.json()["headers"])["traceparent"]
    version, forwarded_trace, parent, _ = forwarded.split("-")
    assert (version, forwarded_trace) == ("00", trace_id)
    # The upstream's parent is loopguard's own span, a child of the agent's.
    assert parent == records[0]["span_id"] != "00f067aa0ba902b7"


def test_upstream_sees_the_agents_headers_and_none_added_by_the_client_library(
    tools: tuple[ToolServer, str],
) -> None:
    """aiohttp would add Accept, Accept-Encoding, User-Agent and a Content-Type of its
    own; a transparent proxy forwards what the agent sent and nothing in their place."""
    _, upstream = tools
    raw = (
        b"POST /tools/echo HTTP/1.1\r\nHost: x\r\nx-agent: 1\r\n"
        b"content-length: 2\r\nconnection: close\r\n\r\n{}"
    )
    with guarded_proxy(proxy_config(upstream)) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(raw)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        own = httpx.post(
            f"{url}/tools/echo",
            content=b"{}",
            headers={"user-agent": "agent/1.0", "accept": "application/json"},
        )
    bare = dict(json.loads(answer.split(b"\r\n\r\n", 1)[1])["headers"])
    for added in ("user-agent", "accept", "content-type"):
        assert added not in bare
    assert bare["x-agent"] == "1"
    assert bare["accept-encoding"] == "identity"  # asked of every upstream, for the observers
    forwarded = dict(own.json()["headers"])
    assert (forwarded["user-agent"], forwarded["accept"]) == ("agent/1.0", "application/json")


def test_upstream_sees_its_own_host(tools: tuple[ToolServer, str]) -> None:
    _, upstream = tools
    with guarded_proxy(proxy_config(upstream)) as (url, _):
        response = httpx.post(
            f"{url}/tools/echo", json={}, headers={"host": "loopguard.example:8787"}
        )
    hosts = [value for name, value in response.json()["headers"] if name == "host"]
    assert hosts == [upstream.removeprefix("http://")]


def test_start_up_names_the_routes_without_credentials(capsys) -> None:
    import asyncio

    from guard.doors.proxy import ProxyApp

    config = proxy_config("http://svc-user:hunter2-secret@127.0.0.1:9/base")
    app = ProxyApp(config)
    sent: list[dict] = []
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    async def receive() -> dict:
        return next(messages)

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app({"type": "lifespan"}, receive, send))
    out = capsys.readouterr().out
    assert "prefix=/tools" in out and "127.0.0.1:9/base" in out
    assert "hunter2" not in out and "svc-user" not in out
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
