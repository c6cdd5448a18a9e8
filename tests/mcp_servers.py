"""MCP servers for the tests, built with the official ``mcp`` SDK (``MCPServer``).

``TrackingServer`` is the FastShip-style tool server an agent loops on:

- ``lookup_tracking(order_id)`` keeps returning the same scan (the loop);
- ``poll_status(job_id)`` returns something new on every call (polling that progresses);
- ``flaky_label(order_id)`` always fails the same way (a tool error, ``isError: true``).

Every tool counts its invocations, so a test can prove that a stopped call never
reached the server. ``lookup_tracking`` logs to the client before answering, so in
SSE mode the response to a ``tools/call`` comes after notifications on the stream.

``RawJsonRpcServer`` is a hand-written endpoint for what the SDK server does not do:
JSON-RPC batches, and SSE answers left open after the response.
"""

from __future__ import annotations

import asyncio
import json
import warnings
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPDeprecationWarning
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

SCAN = "Order {order_id}: in transit, last scan Memphis TN hub (arrival scan)."


class TrackingServer:
    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        # (method, Host) of every request that reached the server, and the Mcp-Session-Id
        # values it answered with.
        self.hosts: list[tuple[str, str]] = []
        self.session_ids: list[str] = []
        # DNS-rebinding protection on, and no Host allowed until ``allow_host`` names one.
        self.security = TransportSecuritySettings(
            enable_dns_rebinding_protection=True, allowed_hosts=[], allowed_origins=[]
        )
        self.mcp = MCPServer("fastship-tracking", log_level="WARNING")
        self._register()

    def _register(self) -> None:
        mcp = self.mcp

        @mcp.tool()
        async def lookup_tracking(order_id: str, ctx: Context) -> str:
            """Look up the tracking status of an order."""
            self.calls["lookup_tracking"] += 1
            # A log notification ahead of the response on an SSE stream. (Logging is
            # deprecated from protocol 2026-07-28 on; it still works on 2025-11-25.)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MCPDeprecationWarning)
                await ctx.info(f"looking up {order_id}")
            return SCAN.format(order_id=order_id)

        @mcp.tool()
        def poll_status(job_id: str) -> str:
            """The status of a job; it moves on with every poll."""
            self.calls["poll_status"] += 1
            return f"job {job_id}: step {self.calls['poll_status']} of 100"

        @mcp.tool()
        def flaky_label(order_id: str) -> str:
            """Print a shipping label (the printer is always jammed)."""
            self.calls["flaky_label"] += 1
            raise RuntimeError(f"printer jammed while printing the label for {order_id}")

    def app(self, *, json_response: bool) -> Starlette:
        """The streamable-HTTP ASGI app (JSON answers, or SSE streams)."""
        app = self.mcp.streamable_http_app(
            json_response=json_response, transport_security=self.security
        )
        return _HostRecorder(app, self)  # type: ignore[return-value]

    def allow_host(self, base_url: str) -> None:
        """Accept exactly this server's own ``host:port`` (known once it is bound).

        A request that arrives with any other Host (loopguard's, say) gets 421.
        """
        host = base_url.split("://", 1)[1]
        self.security.allowed_hosts[:] = [host]
        self.security.allowed_origins[:] = [base_url]


class _HostRecorder:
    """Pure ASGI wrapper noting each request's (method, Host) and the session ids issued."""

    def __init__(self, app: Starlette, server: TrackingServer) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        self.server.hosts.append((scope["method"], host))

        async def noting_send(message) -> None:  # type: ignore[no-untyped-def]
            if message["type"] == "http.response.start":
                for name, value in message.get("headers", []):
                    if name.lower() == b"mcp-session-id":
                        self.server.session_ids.append(value.decode("latin-1"))
            await send(message)

        await self.app(scope, receive, noting_send)


class RawJsonRpcServer:
    """A hand-written streamable-HTTP endpoint for what the SDK server does not do.

    The SDK 2.3 server refuses JSON-RPC batches (protocol 2025-03-26 had them) and always
    closes an SSE answer right after the response. This one answers ``tools/call``
    (single or batched) with the same text every time, as JSON, or as an SSE stream
    that stays open ``linger`` seconds after the last response.
    """

    def __init__(self, *, sse: bool = False, linger: float = 0.0) -> None:
        self.sse = sse
        self.linger = linger
        self.calls: list[Any] = []

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/mcp", self._endpoint, methods=["POST"])])

    async def _endpoint(self, request: Request) -> Response:
        decoded = json.loads(await request.body())
        messages = decoded if isinstance(decoded, list) else [decoded]
        replies = []
        for message in messages:
            if message.get("method") == "tools/call":
                self.calls.append(message["id"])
                text = f"{message['params']['name']}: same as before"
                result = {"content": [{"type": "text", "text": text}], "isError": False}
                replies.append({"jsonrpc": "2.0", "id": message["id"], "result": result})
        if not replies:
            return Response(status_code=202)
        if not self.sse:
            body = replies if isinstance(decoded, list) else replies[0]
            return JSONResponse(body)

        async def stream() -> AsyncIterator[bytes]:
            for reply in replies:
                yield f"event: message\ndata: {json.dumps(reply)}\n\n".encode()
            await asyncio.sleep(self.linger)

        return StreamingResponse(stream(), media_type="text/event-stream")
