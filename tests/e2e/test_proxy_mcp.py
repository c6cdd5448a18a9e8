"""End to end over real sockets: the official MCP SDK client -> loopguard -> an MCP server.

The server is an ``MCPServer`` from the ``mcp`` SDK on its streamable-HTTP app (JSON
answers and SSE streams both), served by uvicorn on loopback with DNS-rebinding
protection that accepts only its own ``host:port``; loopguard's proxy runs in front
of it on another port with an ``adapter = "mcp"`` route; the agent is the SDK's
``ClientSession`` over ``streamable_http_client`` pointed at loopguard.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp_servers import SCAN, RawJsonRpcServer, TrackingServer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from servers import run_server
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route as StarletteRoute

from guard.doors.proxy import ProxyApp
from guard.engine.config import Config
from guard.engine.core import Engine
from guard.telemetry import Telemetry

MAX_REPEATS = 3
PROTOCOL = "2025-11-25"


@dataclass
class Stack:
    tracking: TrackingServer
    upstream: str  # the MCP server's base URL
    url: str  # the MCP endpoint through loopguard
    spans: InMemorySpanExporter
    records: list[dict[str, Any]]


@pytest.fixture(params=["json", "sse"])
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    tracking = TrackingServer()
    app = tracking.app(json_response=request.param == "json")
    with run_server(app) as upstream:
        tracking.allow_host(upstream)
        config = Config.from_mapping(
            {
                "loop": {"max_repeats": MAX_REPEATS},
                "telemetry": {"records": ""},
                "routes": [{"prefix": "/mcp", "upstream": f"{upstream}/mcp", "adapter": "mcp"}],
            }
        )
        spans = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(spans))
        records: list[dict[str, Any]] = []
        telemetry = Telemetry(
            config.telemetry,
            scrub_policy=config.redaction.policy_id,
            tracer_provider=provider,
            record_sink=records.append,
        )
        engine = Engine(config, telemetry=telemetry)
        with run_server(ProxyApp(config, engine=engine)) as guard:
            yield Stack(tracking, upstream, f"{guard}/mcp", spans, records)


@asynccontextmanager
async def agent(url: str, headers: dict[str, str] | None = None) -> AsyncIterator[ClientSession]:
    """An initialized SDK client session (sessions are keyed by Mcp-Session-Id by default).

    Extra headers (``x-loopguard-session``) go on the SDK's HTTP client, as its docs say.
    """
    async with (
        httpx2.AsyncClient(headers=headers, timeout=30) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


def text_of(result) -> str:
    return "".join(block.text for block in result.content if block.type == "text")


async def test_looping_agent_is_stopped_before_the_tool_runs(stack: Stack) -> None:
    scan = SCAN.format(order_id="FS-1001")
    async with agent(stack.url) as session:
        for n in range(1, MAX_REPEATS + 1):
            result = await session.call_tool("lookup_tracking", {"order_id": "FS-1001"})
            assert not result.is_error
            assert text_of(result) == scan
            assert stack.tracking.calls["lookup_tracking"] == n

        stopped = await session.call_tool("lookup_tracking", {"order_id": "FS-1001"})
        assert stopped.is_error
        text = text_of(stopped)
        assert "loopguard stopped this call" in text
        assert "`lookup_tracking`" in text
        assert f"{MAX_REPEATS} times" in text
        assert "Do not repeat it" in text
        # The server never saw the stopped call.
        assert stack.tracking.calls["lookup_tracking"] == MAX_REPEATS

        # It stays stopped; a different order is a different call and is served.
        again = await session.call_tool("lookup_tracking", {"order_id": "FS-1001"})
        assert again.is_error
        other = await session.call_tool("lookup_tracking", {"order_id": "FS-2002"})
        assert not other.is_error
        assert stack.tracking.calls["lookup_tracking"] == MAX_REPEATS + 1

        # A second agent (its own MCP session) is unaffected by the first one's loop.
        async with agent(stack.url) as second:
            fresh = await second.call_tool("lookup_tracking", {"order_id": "FS-1001"})
            assert not fresh.is_error
            assert text_of(fresh) == scan
        assert stack.tracking.calls["lookup_tracking"] == MAX_REPEATS + 2


async def test_polling_that_progresses_is_never_stopped(stack: Stack) -> None:
    async with agent(stack.url) as session:
        for n in range(1, 4 * MAX_REPEATS + 1):
            result = await session.call_tool("poll_status", {"job_id": "J7"})
            assert not result.is_error
            assert text_of(result) == f"job J7: step {n} of 100"
    assert stack.tracking.calls["poll_status"] == 4 * MAX_REPEATS


async def test_identical_tool_errors_are_stopped(stack: Stack) -> None:
    async with agent(stack.url) as session:
        for _ in range(MAX_REPEATS):
            failed = await session.call_tool("flaky_label", {"order_id": "FS-1"})
            assert failed.is_error
            assert "loopguard" not in text_of(failed)  # the server's own error
        stopped = await session.call_tool("flaky_label", {"order_id": "FS-1"})
        assert stopped.is_error
        assert "loopguard stopped this call" in text_of(stopped)
        assert "failed 3 times" in text_of(stopped)
    assert stack.tracking.calls["flaky_label"] == MAX_REPEATS


async def test_initialize_and_tools_list_pass_untouched(stack: Stack) -> None:
    async with (
        httpx2.AsyncClient(timeout=30) as http,
        streamable_http_client(stack.url, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        init = await session.initialize()
        assert init.server_info.name == "fastship-tracking"
        assert init.protocol_version == PROTOCOL
        tools = await session.list_tools()
        # The client opens its GET stream in the background after initializing.
        for _ in range(200):
            if any(method == "GET" for method, _ in stack.tracking.hosts):
                break
            await asyncio.sleep(0.01)
        assert sorted(t.name for t in tools.tools) == [
            "flaky_label",
            "lookup_tracking",
            "poll_status",
        ]
    assert sum(stack.tracking.calls.values()) == 0
    # The upstream saw its own Host on every request (its DNS-rebinding check accepts
    # nothing else), the POSTs, the client's GET stream and its closing DELETE included.
    upstream_host = stack.upstream.split("://", 1)[1]
    assert stack.tracking.hosts
    assert {host for _, host in stack.tracking.hosts} == {upstream_host}
    methods = {method for method, _ in stack.tracking.hosts}
    assert {"POST", "GET", "DELETE"} <= methods


async def test_stop_answer_on_the_wire(stack: Stack) -> None:
    """The raw HTTP answer: 200, JSON for a client that accepts it, session echoed."""
    async with agent(stack.url, headers={"x-loopguard-session": "wire-1"}) as session:
        for _ in range(MAX_REPEATS):
            await session.call_tool("lookup_tracking", {"order_id": "FS-9"})
        mcp_session = stack.tracking.session_ids[-1]
        headers = {
            "accept": "application/json, text/event-stream",
            "content-type": "application/json",
            "mcp-protocol-version": PROTOCOL,
            "mcp-session-id": mcp_session,
            "x-loopguard-session": "wire-1",
        }
        message = {
            "jsonrpc": "2.0",
            "id": "raw-7",
            "method": "tools/call",
            "params": {"name": "lookup_tracking", "arguments": {"order_id": "FS-9"}},
        }
        async with httpx.AsyncClient() as client:
            response = await client.post(stack.url, headers=headers, json=message)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-loopguard-route"] == "stop_and_review"
    assert response.headers["mcp-session-id"] == mcp_session
    body = response.json()
    assert body["id"] == "raw-7"
    assert body["result"]["isError"] is True
    assert body["result"]["_meta"]["loopguard/stop"]["rule"] == "stalled_repeat"
    assert stack.tracking.calls["lookup_tracking"] == MAX_REPEATS


async def test_spans_and_records_name_the_mcp_call(stack: Stack) -> None:
    async with agent(stack.url) as session:
        await session.list_tools()
        for _ in range(MAX_REPEATS + 1):
            await session.call_tool("lookup_tracking", {"order_id": "FS-SECRET-77"})
        mcp_session = stack.tracking.session_ids[-1]

    calls = [s for s in stack.spans.get_finished_spans() if s.name == "tools/call lookup_tracking"]
    assert len(calls) == MAX_REPEATS + 1
    served, stopped = calls[0].attributes, calls[-1].attributes
    assert served["mcp.method.name"] == "tools/call"
    # The MCP session id leaves pseudonymized like a session: one stable token, not the id.
    pseudonyms = {s.attributes["mcp.session.id"] for s in calls}
    assert len(pseudonyms) == 1 and served["mcp.session.id"].startswith("s_")
    assert mcp_session not in served["mcp.session.id"]
    assert served["gen_ai.operation.name"] == "execute_tool"
    assert served["gen_ai.tool.name"] == "lookup_tracking"
    assert served["loopguard.route"] == "serve"
    assert served["loopguard.progress.marker"]
    assert stopped["loopguard.route"] == "stop_and_review"
    assert stopped["loopguard.failure.stage"] == "loop_guard"
    assert stopped["loopguard.stall.rule"] == "stalled_repeat"
    assert stopped["loopguard.repeat.count"] == MAX_REPEATS
    # jsonrpc.request.id is the id the SDK gave each call: all different.
    assert len({s.attributes["jsonrpc.request.id"] for s in calls}) == len(calls)
    # Other methods are spans of their own, named by method.
    names = {s.name for s in stack.spans.get_finished_spans()}
    assert {"initialize", "notifications/initialized", "tools/list"} <= names
    # No raw argument on any span or record.
    for span in stack.spans.get_finished_spans():
        assert "FS-SECRET-77" not in json.dumps(dict(span.attributes or {}), default=str)
    assert stack.records
    assert "FS-SECRET-77" not in json.dumps(stack.records, default=str)


@asynccontextmanager
async def modern_agent(url: str, headers: dict[str, str] | None = None) -> AsyncIterator[Client]:
    """The SDK's high-level ``Client`` (mode "auto"): against an SDK 2.3 server it settles
    on protocol 2026-07-28, stateless: no ``initialize``, no ``Mcp-Session-Id``."""
    async with (
        httpx2.AsyncClient(headers=headers, timeout=30) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        yield client


async def test_stateless_protocol_is_keyed_by_the_loopguard_session_header(stack: Stack) -> None:
    async with modern_agent(stack.url, {"x-loopguard-session": "agent-7"}) as client:
        assert client.session.protocol_version == "2026-07-28"
        for _ in range(MAX_REPEATS):
            result = await client.call_tool("lookup_tracking", {"order_id": "FS-5"})
            assert not result.is_error
        # The 2026-07-28 result shape (resultType) is what this client validates.
        stopped = await client.call_tool("lookup_tracking", {"order_id": "FS-5"})
        assert stopped.is_error
        assert "loopguard stopped this call" in text_of(stopped)
    assert stack.tracking.calls["lookup_tracking"] == MAX_REPEATS
    assert stack.tracking.session_ids == []  # the server never made a session


async def test_stateless_protocol_without_a_session_header_is_served_untracked(
    stack: Stack,
) -> None:
    async with modern_agent(stack.url) as client:
        for _ in range(MAX_REPEATS + 2):
            result = await client.call_tool("lookup_tracking", {"order_id": "FS-6"})
            assert not result.is_error
    assert stack.tracking.calls["lookup_tracking"] == MAX_REPEATS + 2
    calls = [s for s in stack.spans.get_finished_spans() if s.name == "tools/call lookup_tracking"]
    assert len(calls) == MAX_REPEATS + 2
    assert all(s.attributes["loopguard.session.tracked"] is False for s in calls)


# -- a hand-written upstream: batches, and SSE streams left open after the response --------

ACCEPT = {"accept": "application/json, text/event-stream"}


@contextmanager
def raw_stack(raw: RawJsonRpcServer) -> Iterator[tuple[str, InMemorySpanExporter]]:
    with run_server(raw.app()) as upstream:
        config = Config.from_mapping(
            {
                "loop": {"max_repeats": MAX_REPEATS},
                "telemetry": {"records": ""},
                "routes": [{"prefix": "/mcp", "upstream": f"{upstream}/mcp", "adapter": "mcp"}],
            }
        )
        spans = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(spans))
        telemetry = Telemetry(
            config.telemetry, scrub_policy=config.redaction.policy_id, tracer_provider=provider
        )
        engine = Engine(config, telemetry=telemetry)
        with run_server(ProxyApp(config, engine=engine)) as guard:
            yield f"{guard}/mcp", spans


def rpc(id_: int, name: str = "lookup_tracking", **arguments: Any) -> dict[str, Any]:
    params = {"name": name, "arguments": arguments}
    return {"jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": params}


async def test_batches_stop_only_when_every_call_is_blocked() -> None:
    raw = RawJsonRpcServer()
    headers = {**ACCEPT, "x-loopguard-session": "batch-1", "mcp-protocol-version": "2025-03-26"}
    with raw_stack(raw) as (url, _), httpx.Client(headers=headers) as client:
        for i in range(MAX_REPEATS):
            assert client.post(url, json=[rpc(i, order_id="A")]).json()[0]["result"]
        assert len(raw.calls) == MAX_REPEATS

        # Every call of the batch is a stalled repeat: answered here, for each id.
        stopped = client.post(url, json=[rpc(10, order_id="A"), rpc(11, order_id="A")])
        assert stopped.status_code == 200
        assert stopped.headers["x-loopguard-route"] == "stop_and_review"
        replies = stopped.json()
        assert [r["id"] for r in replies] == [10, 11]
        assert all(r["result"]["isError"] for r in replies)
        assert len(raw.calls) == MAX_REPEATS

        # One call of the batch is new: the batch goes to the server whole, and the
        # would-be stop is recorded as observe.
        mixed = client.post(url, json=[rpc(20, order_id="A"), rpc(21, "poll_status", job="J")])
        assert mixed.headers["x-loopguard-route"] == "observe"
        assert [r["result"]["isError"] for r in mixed.json()] == [False, False]
        assert raw.calls[-2:] == [20, 21]


async def read_until_response(response: httpx.Response, id_: int) -> dict:
    """Read an answer up to the response for ``id_`` (JSON, or SSE events)."""
    if not response.headers["content-type"].startswith("text/event-stream"):
        return json.loads(await response.aread())
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            reply = json.loads(line[5:])
            if reply.get("id") == id_:
                return reply
    raise AssertionError("no response")


async def test_a_call_is_recorded_once_its_response_is_seen() -> None:
    raw = RawJsonRpcServer(sse=True, linger=1.0)
    headers = {**ACCEPT, "x-loopguard-session": "linger-1"}
    with raw_stack(raw) as (url, _):
        async with httpx.AsyncClient(headers=headers) as client, AsyncExitStack() as streams:
            for i in range(MAX_REPEATS + 1):
                # The agent reads its response and moves on; the stream is still open.
                response = await streams.enter_async_context(
                    client.stream("POST", url, json=rpc(i, order_id="L"))
                )
                await read_until_response(response, i)
            assert len(raw.calls) == MAX_REPEATS


async def test_hanging_up_after_the_response_is_not_a_stream_failure() -> None:
    raw = RawJsonRpcServer(sse=True, linger=1.0)
    with raw_stack(raw) as (url, spans):
        async with httpx.AsyncClient(headers=ACCEPT) as client:
            async with client.stream("POST", url, json=rpc(1, order_id="H")) as response:
                reply = await read_until_response(response, 1)
            assert reply["result"]["isError"] is False
        # The span ends when loopguard notices the hang-up (well before the 1 s linger).
        for _ in range(100):
            if spans.get_finished_spans():
                break
            await asyncio.sleep(0.01)
        stages = [s.attributes["loopguard.failure.stage"] for s in spans.get_finished_spans()]
    assert stages == ["passed"]


def test_the_server_stream_outlives_the_read_and_total_timeouts() -> None:
    """GET is the MCP server's own stream: idle for long stretches, open for the session."""

    async def slow_sse(request: Request) -> StreamingResponse:
        async def events():
            await asyncio.sleep(0.8)  # longer than read_timeout and total_timeout below
            yield b'data: {"jsonrpc":"2.0","method":"notifications/ping"}\n\n'

        return StreamingResponse(events(), media_type="text/event-stream")

    async def slow_post(request: Request) -> JSONResponse:
        await asyncio.sleep(0.8)
        return JSONResponse({"jsonrpc": "2.0", "id": 1, "result": {}})

    upstream_app = Starlette(
        routes=[
            StarletteRoute("/mcp", slow_sse, methods=["GET"]),
            StarletteRoute("/mcp", slow_post, methods=["POST"]),
        ]
    )
    with run_server(upstream_app) as upstream:
        config = Config.from_mapping(
            {
                "server": {"read_timeout": 0.3, "total_timeout": 0.5},
                "telemetry": {"records": ""},
                "routes": [{"prefix": "/mcp", "upstream": upstream + "/mcp", "adapter": "mcp"}],
            }
        )
        with run_server(ProxyApp(config)) as proxy:
            stream = httpx.get(f"{proxy}/mcp", headers={"accept": "text/event-stream"}, timeout=5)
            # The same wait on a POST is a real timeout: the control that the limits are live.
            post = httpx.post(f"{proxy}/mcp", json={"jsonrpc": "2.0", "id": 1}, timeout=5)
    assert stream.status_code == 200
    assert b"notifications/ping" in stream.content
    assert post.status_code == 504
