"""GuardMiddleware around real ASGI apps, served by uvicorn on loopback.

A Starlette tool server and the ``mcp`` SDK's streamable-HTTP app are wrapped; the
clients are httpx, the ``websockets`` client and the SDK's own ``ClientSession``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from typing import Any

import httpx
import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.server.transport_security import TransportSecuritySettings
from mcp_servers import TrackingServer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from servers import run_server
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from guard import GuardMiddleware
from guard.engine.config import Config
from guard.engine.core import Engine
from guard.telemetry import Telemetry

SESSION = {"x-loopguard-session": "agent-1"}
TOOL_ROUTE = {"prefix": "/tools", "upstream": "http://app", "adapter": "http-tool"}


class Observed:
    """An engine whose spans and durable records the test can read."""

    def __init__(self, routes: list[dict[str, Any]], **sections: Any) -> None:
        data: dict[str, Any] = {"routes": routes, **sections}
        data.setdefault("telemetry", {"records": ""})
        self.config = Config.from_mapping(data)
        self.spans = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.records: list[dict[str, Any]] = []
        telemetry = Telemetry(
            self.config.telemetry,
            scrub_policy=self.config.redaction.policy_id,
            tracer_provider=provider,
            record_sink=self.records.append,
        )
        self.engine = Engine(self.config, telemetry=telemetry)

    def finished(self, name: str) -> list[Any]:
        return [s for s in self.spans.get_finished_spans() if s.name == name]


def tool_server(calls: Counter[str], seen: list[dict[str, str]] | None = None) -> Starlette:
    """A FastShip-style tool server: POST /tools/{name}, plus routes outside /tools."""

    async def tool(request: Request) -> JSONResponse:
        name = request.path_params["name"]
        calls[name] += 1
        if seen is not None:
            seen.append(dict(request.headers))
        args = await request.json()
        if name == "lookup_tracking":
            return JSONResponse({"order": args["order_id"], "status": "in transit"})
        return JSONResponse({"echo": args, "n": calls[name]})

    async def stream(request: Request) -> StreamingResponse:
        calls["stream"] += 1

        async def tokens():
            for i in range(4):
                if i:
                    await asyncio.sleep(0.2)
                yield f"chunk-{i}\n".encode()

        return StreamingResponse(tokens(), media_type="text/plain")

    async def health(request: Request) -> PlainTextResponse:
        calls["health"] += 1
        return PlainTextResponse("ok", headers={"x-app": "1"})

    async def other(request: Request) -> JSONResponse:
        calls["other"] += 1
        return JSONResponse({"same": True})

    async def echo(ws: WebSocket) -> None:
        await ws.accept()
        text = await ws.receive_text()
        await ws.send_text(f"echo: {text}")
        await ws.close()

    return Starlette(
        routes=[
            Route("/tools/stream", stream, methods=["GET"]),
            Route("/tools/{name}", tool, methods=["POST"]),
            Route("/health", health),
            Route("/other", other, methods=["POST"]),
            WebSocketRoute("/tools/ws", echo),
        ]
    )


# -- HTTP tools --------------------------------------------------------------------------


async def test_looping_call_gets_422_and_never_reaches_the_app():
    calls: Counter[str] = Counter()
    seen: list[dict[str, str]] = []
    obs = Observed([TOOL_ROUTE])
    app = GuardMiddleware(tool_server(calls, seen), engine=obs.engine)
    agent_trace = "0af7651916cd43dd8448eb211c80319c"
    headers = {**SESSION, "traceparent": f"00-{agent_trace}-b7ad6b7169203331-01"}
    with run_server(app) as base:
        async with httpx.AsyncClient(base_url=base) as client:
            answers = [
                await client.post(
                    "/tools/lookup_tracking", json={"order_id": "A1"}, headers=headers
                )
                for _ in range(4)
            ]

    assert [r.status_code for r in answers] == [200, 200, 200, 422]
    assert calls["lookup_tracking"] == 3  # the stopped call never ran
    assert [r.headers["x-loopguard-route"] for r in answers] == ["serve"] * 3 + ["stop_and_review"]
    stop = answers[3]
    assert stop.headers["content-type"] == "application/problem+json"
    problem = stop.json()
    assert problem["status"] == 422
    assert problem["rule"] == "stalled_repeat"
    assert problem["repeats"] == 3
    assert problem["tool"] == "lookup_tracking"
    assert problem["session"] == "agent-1"
    assert "loopguard stopped this call" in problem["detail"]

    # The same spans and records as the proxy: one per call, the agent's trace continued.
    spans = obs.finished("execute_tool lookup_tracking")
    assert len(spans) == 4
    assert {format(s.context.trace_id, "032x") for s in spans} == {agent_trace}
    assert [s.attributes["loopguard.failure.stage"] for s in spans] == ["passed"] * 3 + [
        "loop_guard"
    ]
    assert spans[3].attributes["loopguard.stall.rule"] == "stalled_repeat"
    assert spans[0].attributes["gen_ai.tool.name"] == "lookup_tracking"
    assert spans[0].attributes["server.port"] == int(base.rsplit(":", 1)[1])
    # The app was called with loopguard's span as its parent.
    parents = [h["traceparent"].split("-")[2] for h in seen]
    assert parents == [format(s.context.span_id, "016x") for s in spans[:3]]
    assert [r["route"] for r in obs.records] == ["serve"] * 3 + ["stop_and_review"]


async def test_fastapi_add_middleware_as_in_the_readme(tmp_path):
    from fastapi import FastAPI

    ran = 0
    app = FastAPI()

    @app.post("/tools/lookup_tracking")
    async def lookup_tracking(body: dict) -> dict:
        nonlocal ran
        ran += 1
        return {"order": body["order_id"], "status": "in transit"}

    config = {
        "routes": [{"prefix": "/tools", "upstream": "http://app", "adapter": "http-tool"}],
        "telemetry": {"records": str(tmp_path / "records.jsonl")},
    }
    app.add_middleware(GuardMiddleware, config=Config.from_mapping(config))

    with run_server(app, lifespan="on") as base:
        async with httpx.AsyncClient(base_url=base, headers=SESSION) as client:
            statuses = [
                (await client.post("/tools/lookup_tracking", json={"order_id": "A1"})).status_code
                for _ in range(4)
            ]
    assert statuses == [200, 200, 200, 422]
    assert ran == 3
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert [json.loads(line)["route"] for line in lines] == ["serve"] * 3 + ["stop_and_review"]


async def test_progress_is_not_a_loop_and_untracked_calls_are_never_stopped():
    calls: Counter[str] = Counter()
    app = GuardMiddleware(tool_server(calls), engine=Observed([TOOL_ROUTE]).engine)
    with run_server(app) as base:
        async with httpx.AsyncClient(base_url=base) as client:
            # "poll" answers something new every time (n counts up): never a stall.
            polls = [
                await client.post("/tools/poll", json={"job": 1}, headers=SESSION) for _ in range(6)
            ]
            # Without a session header the call cannot be tracked: served every time.
            bare = [
                await client.post("/tools/lookup_tracking", json={"order_id": "B"})
                for _ in range(5)
            ]
    assert [r.status_code for r in polls] == [200] * 6
    assert [r.status_code for r in bare] == [200] * 5
    assert calls["poll"] == 6 and calls["lookup_tracking"] == 5


async def test_paths_without_a_route_pass_untouched():
    calls: Counter[str] = Counter()
    obs = Observed([TOOL_ROUTE])
    app = GuardMiddleware(tool_server(calls), engine=obs.engine)
    with run_server(app) as base:
        async with httpx.AsyncClient(base_url=base) as client:
            health = await client.get("/health")
            others = [await client.post("/other", json={"x": 1}, headers=SESSION) for _ in range(5)]
    assert health.text == "ok" and health.headers["x-app"] == "1"
    assert "x-loopguard-route" not in health.headers
    assert [r.status_code for r in others] == [200] * 5
    assert all("x-loopguard-route" not in r.headers for r in others)
    assert calls["other"] == 5
    assert obs.spans.get_finished_spans() == ()


async def test_streaming_response_passes_chunk_by_chunk():
    calls: Counter[str] = Counter()
    obs = Observed([TOOL_ROUTE])
    app = GuardMiddleware(tool_server(calls), engine=obs.engine)
    arrivals: list[tuple[float, bytes]] = []
    with run_server(app) as base:
        async with httpx.AsyncClient(base_url=base) as client:
            start = time.perf_counter()
            async with client.stream("GET", "/tools/stream", headers=SESSION) as response:
                assert response.headers["x-loopguard-route"] == "serve"
                async for chunk in response.aiter_raw():
                    arrivals.append((time.perf_counter() - start, chunk))
    body = b"".join(c for _, c in arrivals)
    assert body == b"chunk-0\nchunk-1\nchunk-2\nchunk-3\n"
    # The app sleeps 0.2 s between chunks: a buffered response would arrive at once.
    assert len(arrivals) == 4
    first, last = arrivals[0][0], arrivals[-1][0]
    assert first < 0.3, arrivals
    assert last - first > 0.4, arrivals
    (span,) = obs.finished("execute_tool stream")
    assert span.attributes["loopguard.failure.stage"] == "passed"


async def test_body_over_the_limit_is_refused_with_413():
    calls: Counter[str] = Counter()
    app = GuardMiddleware(
        tool_server(calls),
        engine=Observed([TOOL_ROUTE], server={"max_body_bytes": 64}).engine,
    )
    big = {"order_id": "x" * 200}

    async def chunked():
        data = json.dumps(big).encode()
        for i in range(0, len(data), 50):
            yield data[i : i + 50]

    with run_server(app) as base:
        async with httpx.AsyncClient(base_url=base) as client:
            declared = await client.post("/tools/lookup_tracking", json=big, headers=SESSION)
            streamed = await client.post(
                "/tools/lookup_tracking", content=chunked(), headers=SESSION
            )
            small = await client.post(
                "/tools/lookup_tracking", json={"order_id": "A"}, headers=SESSION
            )
    for refused in (declared, streamed):
        assert refused.status_code == 413
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["title"] == "Request body too large"
    assert small.status_code == 200
    assert calls["lookup_tracking"] == 1


async def test_the_record_is_stored_before_the_client_has_the_whole_body():
    """An app that declares its length and ends the response late: the agent has the
    whole answer before the app's last ASGI message, and must already be on record."""
    pending: list[asyncio.Event] = []
    calls = 0

    async def app(scope, receive, send):
        nonlocal calls
        if scope["type"] != "http":
            return
        for event in pending:
            event.set()
        if scope["path"] == "/release":
            await PlainTextResponse("released")(scope, receive, send)
            return
        calls += 1
        await receive()
        body = b'{"status": "in transit"}'
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": True})
        done = asyncio.Event()
        pending.append(done)
        await done.wait()  # until the next request arrives
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    guarded = GuardMiddleware(app, engine=Observed([TOOL_ROUTE]).engine)
    with run_server(guarded, lifespan="off") as base:
        async with contextlib.AsyncExitStack() as stack:
            statuses = []
            for _ in range(4):
                # A connection per call: the previous response is still open on its own.
                client = await stack.enter_async_context(httpx.AsyncClient(base_url=base))
                response = await client.post("/tools/lookup", json={"a": 1}, headers=SESSION)
                statuses.append(response.status_code)
            async with httpx.AsyncClient(base_url=base) as client:
                assert (await client.get("/release")).text == "released"
    assert statuses == [200, 200, 200, 422]
    assert calls == 3


async def test_app_failing_before_its_response_is_recorded_and_gets_the_servers_500():
    async def broken(scope, receive, send):
        assert scope["type"] == "http"
        raise RuntimeError("tool crashed")

    obs = Observed([TOOL_ROUTE])
    app = GuardMiddleware(broken, engine=obs.engine)
    with run_server(app, lifespan="off") as base:
        async with httpx.AsyncClient(base_url=base) as client:
            response = await client.post("/tools/t", json={}, headers=SESSION)
    assert response.status_code == 500
    (record,) = obs.records
    assert record["failure_stage"] == "upstream_status"
    assert record["error_type"] == "RuntimeError"


# -- lifespan, websockets, configuration ---------------------------------------------------


async def test_lifespan_reaches_the_app_and_shutdown_closes_the_engine(tmp_path):
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app):
        events.append("startup")
        yield
        events.append("shutdown")

    config = tmp_path / "loopguard.toml"
    config.write_text(
        '[telemetry]\nrecords = ""\n\n'
        '[[routes]]\nprefix = "/tools"\nupstream = "http://app"\nadapter = "http-tool"\n'
    )
    app = GuardMiddleware(Starlette(lifespan=lifespan), config)
    assert app.engine.config.routes[0].prefix == "/tools"
    with run_server(app, lifespan="on"):
        assert events == ["startup"]
    assert events == ["startup", "shutdown"]
    assert app._closed


def test_websocket_passes_through_even_under_a_route():
    from websockets.sync.client import connect

    calls: Counter[str] = Counter()
    app = GuardMiddleware(tool_server(calls), engine=Observed([TOOL_ROUTE]).engine)
    with run_server(app) as base, connect(base.replace("http", "ws") + "/tools/ws") as ws:
        ws.send("hello")
        assert ws.recv(timeout=5) == "echo: hello"


def test_config_and_engine_are_exclusive():
    with pytest.raises(TypeError):
        GuardMiddleware(tool_server(Counter()), Config(), engine=Engine(Config()))


# -- an MCP server -----------------------------------------------------------------------


@pytest.mark.parametrize("json_response", [True, False], ids=["json", "sse"])
async def test_mcp_server_wrapped_stops_the_looping_tools_call(json_response):
    server = TrackingServer()
    inner = server.mcp.streamable_http_app(
        json_response=json_response,
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    obs = Observed([{"prefix": "/mcp", "upstream": "http://app", "adapter": "mcp"}])
    app = GuardMiddleware(inner, engine=obs.engine)
    with run_server(app, lifespan="on") as base:
        async with (
            streamable_http_client(base + "/mcp") as streams,
            ClientSession(streams[0], streams[1]) as session,
        ):
            await session.initialize()
            results = [
                await session.call_tool("lookup_tracking", {"order_id": "A1"}) for _ in range(4)
            ]
            # The session goes on: another call is served.
            polled = await session.call_tool("poll_status", {"job_id": "7"})

    assert [r.is_error for r in results] == [False, False, False, True]
    assert server.calls["lookup_tracking"] == 3  # the stopped call never reached the tool
    stop_text = results[3].content[0].text
    assert stop_text.startswith("loopguard stopped this call: `lookup_tracking`")
    assert "3 times" in stop_text
    assert not polled.is_error and server.calls["poll_status"] == 1
    spans = obs.finished("tools/call lookup_tracking")
    assert [s.attributes["loopguard.route"] for s in spans] == ["serve"] * 3 + ["stop_and_review"]
