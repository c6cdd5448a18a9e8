"""A loopguard reverse proxy and a small tool server, both real, for the proxy tests.

``ToolServer`` is a Starlette app (plus a few raw-ASGI endpoints for what Starlette
will not do on purpose: dying mid-stream, noticing a disconnect) that counts every
hit, so a test can prove a stopped call never reached it. ``guarded_proxy`` builds
loopguard from a config mapping with a record sink, serves it on uvicorn, and yields
(base_url, records).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from servers import run_server
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route

from guard.doors.proxy import ProxyApp
from guard.engine.config import Config
from guard.engine.core import Engine
from guard.telemetry import Telemetry


class ToolServer:
    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.bodies: list[bytes] = []
        self.sent_at: list[float] = []  # perf_counter when each SSE event was sent
        self.disconnected = threading.Event()
        self.flood_sent = 0  # bytes /raw/flood got through its send() so far

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/lookup_tracking", self.lookup_tracking, methods=["POST"]),
                Route("/search", self.search, methods=["GET", "DELETE"]),
                Route("/poll", self.poll, methods=["POST"]),
                Route("/echo", self.echo, methods=["GET", "POST"]),
                Route("/status/{code:int}", self.status, methods=["GET", "POST"]),
                Route("/slow", self.slow, methods=["GET", "POST"]),
                Route("/sse", self.sse, methods=["GET", "POST"]),
                Route("/hop", self.hop, methods=["GET"]),
                Route("/fixed/{rest:path}", self.fixed, methods=["GET", "POST"]),
                Mount("/raw", app=self.raw),
            ]
        )

    async def lookup_tracking(self, request: Request) -> Response:
        self.hits["lookup_tracking"] += 1
        body = await request.json()
        return JSONResponse(
            {
                "order_id": body.get("order_id"),
                "status": "in transit",
                "last_scan": "Memphis TN hub",
                "request_id": f"req-{self.hits['lookup_tracking']}",
            }
        )

    async def search(self, request: Request) -> Response:
        self.hits["search"] += 1
        return JSONResponse({"results": [], "q": request.query_params.get("q")})

    async def poll(self, request: Request) -> Response:
        self.hits["poll"] += 1
        return JSONResponse({"step": self.hits["poll"]})

    async def echo(self, request: Request) -> Response:
        self.hits["echo"] += 1
        body = await request.body()
        self.bodies.append(body)
        return JSONResponse({"headers": request.headers.items(), "body": body.decode("latin-1")})

    async def status(self, request: Request) -> Response:
        self.hits["status"] += 1
        code = request.path_params["code"]
        return JSONResponse(
            {"error": f"status {code}"}, status_code=code, headers={"retry-after": "7"}
        )

    async def slow(self, request: Request) -> Response:
        self.hits["slow"] += 1
        await asyncio.sleep(1.0)
        return JSONResponse({"late": True})

    async def sse(self, request: Request) -> Response:
        self.hits["sse"] += 1
        count = int(request.query_params.get("n", "50"))
        gap = float(request.query_params.get("gap", "0.02"))

        async def events() -> Any:
            for i in range(count):
                self.sent_at.append(time.perf_counter())
                yield f"data: {json.dumps({'i': i})}\n\n".encode()
                await asyncio.sleep(gap)

        return StreamingResponse(events(), media_type="text/event-stream")

    async def fixed(self, request: Request) -> Response:
        """The same answer to any path and body (a tool that has nothing new to say)."""
        self.hits["fixed"] += 1
        await request.body()
        return JSONResponse({"answer": "the same"})

    async def hop(self, request: Request) -> Response:
        self.hits["hop"] += 1
        return Response(
            b"{}",
            media_type="application/json",
            headers={
                "connection": "x-hop-named",
                "x-hop-named": "1",
                "keep-alive": "timeout=99",
                "proxy-authenticate": "Basic",
                "x-end-to-end": "kept",
            },
        )

    async def raw(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """``/raw/die[?length=1]``: three chunks then a dead connection.
        ``/raw/flood``: 256 MiB as fast as the connection takes them.
        ``/raw/hang``: no answer at all, until the client goes away.
        ``/raw/forever``: a chunk every 20 ms until the client goes away."""
        path = "/" + scope["path"].rsplit("/", 1)[-1]  # Starlette 1.x keeps the mount prefix
        self.hits[f"raw{path}"] += 1
        if path == "/die":
            headers = [(b"content-type", b"text/plain")]
            if scope.get("query_string") == b"length=1":
                headers.append((b"content-length", b"1000"))
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            for i in range(3):
                await send(
                    {"type": "http.response.body", "body": b"chunk%d\n" % i, "more_body": True}
                )
                await asyncio.sleep(0.01)
            return  # without completing: uvicorn closes the connection
        if path == "/hang":
            # Never answers; notices when the caller goes away.
            while (await receive())["type"] != "http.disconnect":
                pass
            self.disconnected.set()
            return
        if path == "/flood":
            # As fast as the connection takes it: 256 chunks of 1 MiB.
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream")],
                }
            )
            chunk = b"z" * (1024 * 1024)
            for _ in range(256):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                self.flood_sent += len(chunk)
            await send({"type": "http.response.body", "body": b""})
            return
        if path == "/forever":
            await receive()  # the (empty) request body

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                self.disconnected.set()

            watcher = asyncio.ensure_future(watch())
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )
            try:
                while not self.disconnected.is_set():
                    await send(
                        {"type": "http.response.body", "body": b"data: tick\n\n", "more_body": True}
                    )
                    await asyncio.sleep(0.02)
            finally:
                watcher.cancel()
            return
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def proxy_config(upstream: str, **sections: Any) -> Config:
    """A config with one http-tool route ``/tools`` -> upstream; sections override."""
    data: dict[str, Any] = {
        "routes": [{"prefix": "/tools", "upstream": upstream, "adapter": "http-tool"}],
        "telemetry": {"records": ""},
    }
    for key, value in sections.items():
        if key == "routes":
            data["routes"] = value
        else:
            data.setdefault(key, {}).update(value)
    return Config.from_mapping(data)


@contextlib.contextmanager
def guarded_proxy(config: Config, **uvicorn_options: Any) -> Iterator[tuple[str, list[dict]]]:
    """loopguard on uvicorn; yields its base URL and the durable records as they land."""
    records: list[dict[str, Any]] = []
    telemetry = Telemetry(
        config.telemetry,
        scrub_policy=config.redaction.policy_id,
        record_sink=records.append,
    )
    engine = Engine(config, telemetry=telemetry)
    app = ProxyApp(config, engine=engine)
    options = {"server_header": False, "date_header": False, **uvicorn_options}
    with run_server(app, **options) as url:
        yield url, records


def wait_for(predicate: Any, timeout: float = 5.0) -> bool:
    """Poll ``predicate`` until true or ``timeout`` (for effects in another thread)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


@contextlib.contextmanager
def loopguard_serve(
    config: Path,
    port: int,
    *,
    timeout: float = 20.0,
    ready: Callable[[subprocess.Popen[bytes]], bool] | None = None,
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``loopguard serve --config FILE`` in its own process (output piped), yielded with
    its base URL once ``/healthz`` answers and ``ready(proc)`` holds; killed on the way
    out if the test left it running."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "guard.cli", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not (_healthy(url) and (ready is None or ready(proc))):
            assert proc.poll() is None, proc.communicate()[1].decode()
            assert time.monotonic() < deadline, "loopguard serve did not come up"
            time.sleep(0.05)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def read_json_answer(sock: socket.socket) -> bytes:
    """An HTTP answer read off a raw socket: until its head and a JSON body ending in
    "}" have arrived, or the server closes the connection."""
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        piece = sock.recv(65536)
        if not piece:
            break
        data += piece
    return data
