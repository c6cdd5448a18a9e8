"""Issue 12 rows 4, 6 and 8 over real sockets: what a client may hold, and what leaks.

Row 8: request body bytes in flight are bounded whether the length is declared or the
body is chunked, and held until the forwarded copy is done with; a ``loopguard serve``
process under many concurrent large chunked uploads stays within a memory bound and
forwards every admitted body intact. Row 4: overload answers (the concurrency cap) are
503 problem+json with ``Retry-After``; a request head past ``max_header_bytes`` gets
431; thousands of idle connections are closed by the head deadline while ``/healthz``
is served. Row 6: a WebSocket upgrade carrying canaries in its path, query and headers
leaves no trace in a ``loopguard serve`` process's output or records.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import resource
import select
import signal
import socket
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from canary_calls import mcp_call_with_canaries
from proxy_harness import loopguard_serve, proxy_config, wait_for
from servers import free_port, run_server

from guard.doors.proxy import ProxyApp
from guard.doors.serve import client_limits
from guard.doors.upstream import Upstream

MB = 1024 * 1024


class Sink:
    """An upstream that hashes each body it receives whole (and answers small)."""

    def __init__(self) -> None:
        self.received: list[tuple[int, str]] = []  # (length, sha256) per request
        self.heads: list[dict[bytes, bytes]] = []  # the headers of each request

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        digest, size = hashlib.sha256(), 0
        self.heads.append(dict(scope["headers"]))
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            digest.update(chunk)
            size += len(chunk)
            if not message.get("more_body", False):
                break
        if scope["path"].endswith("/slow"):
            await asyncio.sleep(0.5)
        self.received.append((size, digest.hexdigest()))
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b'{"ok": true}'})


def _payload(i: int, size: int) -> bytes:
    return b'{"blob": "' + (b"%04d" % i) * ((size - 12) // 4) + b'"}'


async def _chunked(data: bytes, piece: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), piece):
        yield data[start : start + piece]


# -- row 8: bytes in flight -----------------------------------------------------------------


@pytest.fixture
def sink() -> Iterator[tuple[Sink, str]]:
    upstream = Sink()
    with run_server(upstream) as url:
        yield upstream, url


def test_a_chunked_body_is_charged_and_held_until_forwarded(sink: tuple[Sink, str]) -> None:
    upstream, url = sink
    config = proxy_config(url, server={"max_bytes_in_flight": 1000})
    app = ProxyApp(config)
    budget = app.router.body_budget

    async def run(proxy: str) -> tuple[int, int, int, int]:
        async with httpx.AsyncClient(base_url=proxy, timeout=30) as client:
            # A chunked 800-byte body to a slow upstream: charged while it is forwarded.
            held = asyncio.ensure_future(client.post("/tools/slow", content=_chunked(b"a" * 800)))
            for _ in range(500):  # ordering: the first body is in (charged, if it is)
                if budget.used:
                    break
                await asyncio.sleep(0.01)
            during = await client.post("/tools/echo", content=_chunked(b"b" * 500))
            first = await held
            after = await client.post("/tools/echo", content=_chunked(b"b" * 500))
            too_big = await client.post("/tools/echo", content=_chunked(b"c" * 1500))
            return first.status_code, during.status_code, after.status_code, too_big.status_code

    with run_server(app, **client_limits(config)) as proxy:
        statuses = asyncio.run(run(proxy))
    # The second chunked body found the first's 800 bytes still charged (503); once the
    # first's upstream request completed, the charge was given back.
    assert statuses == (200, 503, 200, 503)
    assert budget.used == 0
    assert upstream.received == [
        (800, hashlib.sha256(b"a" * 800).hexdigest()),
        (500, hashlib.sha256(b"b" * 500).hexdigest()),
    ]


def test_a_chunked_body_over_max_body_bytes_is_413_not_503(sink: tuple[Sink, str]) -> None:
    upstream, url = sink
    config = proxy_config(url, server={"max_bytes_in_flight": 10_000, "max_body_bytes": 1000})
    app = ProxyApp(config)

    async def run(proxy: str) -> httpx.Response:
        async with httpx.AsyncClient(base_url=proxy, timeout=30) as client:
            return await client.post("/tools/echo", content=_chunked(b"a" * 2000, 100))

    with run_server(app, **client_limits(config)) as proxy:
        refused = asyncio.run(run(proxy))
    assert refused.status_code == 413
    assert "retry-after" not in refused.headers  # not overload: retrying will not help
    assert app.router.body_budget.used == 0
    assert upstream.received == []


def test_a_large_forwarded_body_goes_in_slices_and_is_never_copied_whole(
    sink: tuple[Sink, str],
) -> None:
    """aiohttp, given bytes, writes them in one call joined to the request head: a
    second copy of every large upload, and the transport buffering what the socket did
    not take. loopguard hands it the body in slices: what the forwarding allocates
    stays far below the body's size, and the upstream gets the same bytes and head."""
    upstream, url = sink
    body = _payload(7, 8 * MB)

    async def forward() -> tuple[int, int]:
        client = Upstream()
        headers = [("x-trace", "1")]
        tracemalloc.start()
        try:
            await client.open("POST", f"{url}/put", headers, b"{}")  # the pool is warm
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            response = await client.open("POST", f"{url}/put", headers, body)
            allocated = tracemalloc.get_traced_memory()[1] - before
            status = response.status
            response.release()
        finally:
            tracemalloc.stop()
            await client.aclose()
        return status, allocated

    status, allocated = asyncio.run(forward())
    assert status == 200
    assert upstream.received[-1] == (len(body), hashlib.sha256(body).hexdigest())
    head = upstream.heads[-1]
    assert head[b"content-length"] == str(len(body)).encode()
    assert b"transfer-encoding" not in head
    assert b"content-type" not in head  # none added to the client's
    assert allocated < 2 * MB, allocated  # the body is 8 MB


def _kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(key)


def test_many_large_chunked_uploads_stay_within_memory_and_lose_nothing(
    sink: tuple[Sink, str], tmp_path: Path
) -> None:
    """Sixteen concurrent 8 MB chunked uploads against a 24 MB budget: some are shed
    with 503 (overload), every admitted body reaches the upstream intact, and the
    process's peak RSS stays below baseline + 3 x budget (without the chunked charge
    all sixteen are read at once: ~2 x 128 MB)."""
    upstream, url = sink
    budget = 24 * MB
    port = free_port()
    config = tmp_path / "loopguard.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\nmax_bytes_in_flight = {budget}\n'
        f'[telemetry]\nrecords = "{tmp_path / "records.jsonl"}"\n'
        f'[[routes]]\nprefix = "/tools"\nupstream = "{url}"\nadapter = "http-tool"\n'
    )
    bodies = [_payload(i, 8 * MB) for i in range(16)]

    async def upload(client: httpx.AsyncClient, data: bytes) -> httpx.Response:
        return await client.post("/tools/put", content=_chunked(data))

    async def run(proxy: str) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=proxy, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(upload(client, data) for data in bodies))

    async def warm(proxy: str) -> None:  # one body through first: its arenas exist
        async with httpx.AsyncClient(base_url=proxy, timeout=120) as client:
            await upload(client, _payload(98, 8 * MB))

    with loopguard_serve(config, port) as (proc, proxy):
        asyncio.run(warm(proxy))
        baseline = _kib(proc.pid, "VmRSS")
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # peak RSS from here
        answers = asyncio.run(run(proxy))
        peak = _kib(proc.pid, "VmHWM")
    statuses = [a.status_code for a in answers]
    assert set(statuses) == {200, 503}, statuses
    for answer in answers:
        if answer.status_code == 503:
            assert answer.headers["retry-after"] == "1"
            assert answer.headers["content-type"] == "application/problem+json"
    admitted = {
        hashlib.sha256(data).hexdigest()
        for data, answer in zip(bodies, answers, strict=True)
        if answer.status_code == 200
    }
    forwarded = upstream.received[1:]  # after the warm-up body
    assert len(forwarded) == len(admitted)  # nothing refused was forwarded, even in part
    assert {digest for _, digest in forwarded} == admitted
    assert all(size == len(bodies[0]) for size, _ in forwarded)
    assert peak < baseline + 3 * budget // 1024, (baseline, peak)
    print(f"bytes in flight: baseline {baseline // 1024} MB, peak {peak // 1024} MB, {statuses}")


# -- row 4: request heads, idle connections, the concurrency cap ---------------------------


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def test_an_endless_header_gets_431_and_the_connection_closed(sink: tuple[Sink, str]) -> None:
    upstream, url = sink
    config = proxy_config(url, server={"max_header_bytes": 4096})
    with run_server(ProxyApp(config), **client_limits(config)) as proxy:
        with socket.create_connection(_host_port(proxy)) as sock:
            sock.settimeout(20)  # a safety net only: the server must answer and close
            sock.sendall(b"GET /tools/echo HTTP/1.1\r\nHost: x\r\nX-Endless: ")
            sent, answer = 0, b""
            # An endless header value, a piece at a time, until the server answers.
            while sent < 64 * MB and not select.select([sock], [], [], 0)[0]:
                sock.sendall(b"a" * 1024)
                sent += 1024
            answer = _read_until_closed(sock)
        # A head just under the limit is served as before.
        ok = httpx.get(f"{proxy}/tools/echo", headers={"x-filler": "a" * 3000})
    # Stopped near the limit: what was sent past it sat in the sockets' buffers.
    assert sent < 16 * MB
    assert answer.startswith(b"HTTP/1.1 431 ")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/problem+json" in head
    assert b"connection: close" in head
    assert json.loads(body)["status"] == 431
    assert ok.status_code == 200
    assert len(upstream.received) == 1


def test_a_head_and_body_in_one_read_are_not_counted_as_head(sink: tuple[Sink, str]) -> None:
    # Bytes after a head completed in the same read are the body's: a 64 KiB body sent
    # with its head in one write is not refused as a large head.
    upstream, url = sink
    config = proxy_config(url, server={"max_header_bytes": 4096})
    body = b"b" * (64 * 1024)
    with (
        run_server(ProxyApp(config), **client_limits(config)) as proxy,
        socket.create_connection(_host_port(proxy)) as sock,
    ):
        sock.settimeout(20)
        sock.sendall(
            b"POST /tools/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert upstream.received == [(len(body), hashlib.sha256(body).hexdigest())]


def _raise_fd_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def test_thousands_of_idle_connections_are_closed_while_healthz_is_served(
    sink: tuple[Sink, str],
) -> None:
    _, url = sink
    wanted = 2000
    # The test process holds both ends of every connection (plus the usual few hundred).
    limit = _raise_fd_limit(2 * wanted + 1024)
    count = min(wanted, (limit - 1024) // 2)
    assert count >= 500, f"RLIMIT_NOFILE {limit} is too low for this test"
    config = proxy_config(url, server={"head_timeout": 2, "limit_concurrency": 2 * wanted + 100})
    with run_server(ProxyApp(config), **client_limits(config)) as proxy:
        address = _host_port(proxy)
        idle: list[socket.socket] = []
        try:
            for i in range(count):
                sock = socket.create_connection(address)
                if i % 2:
                    sock.sendall(b"GET /tools/echo HTTP/1.1\r\n")  # a head begun, never ended
                idle.append(sock)
            # Meanwhile the proxy serves: a fresh connection gets its health answer.
            health = httpx.get(f"{proxy}/healthz", timeout=10)
            for sock in idle:
                sock.settimeout(20)  # a safety net only: the server must close first
            closed = sum(1 for sock in idle if _read_until_closed(sock) == b"")
        finally:
            for sock in idle:
                sock.close()
    assert health.status_code == 200
    assert closed == count  # every one closed by the head deadline, none answered


def test_past_the_concurrency_cap_the_answer_is_503_problem_json(sink: tuple[Sink, str]) -> None:
    upstream, url = sink
    config = proxy_config(url, server={"limit_concurrency": 20, "head_timeout": 60})
    with run_server(ProxyApp(config), **client_limits(config)) as proxy:
        address = _host_port(proxy)
        idle = [socket.create_connection(address) for _ in range(20)]
        try:
            # The idle connections are counted (as uvicorn counts them): overload.
            assert wait_for(lambda: _status(proxy, "/tools/echo") == 503)
            refused = httpx.get(f"{proxy}/tools/echo")
        finally:
            for sock in idle:
                sock.close()
        assert wait_for(lambda: _status(proxy, "/tools/echo") == 200)
    assert refused.status_code == 503
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["connection"] == "close"
    assert refused.json()["type"].endswith("/overloaded")
    assert "limit_concurrency" in refused.json()["detail"]
    assert len(upstream.received) >= 1  # the last one, after the idle ones left


def _status(proxy: str, path: str) -> int:
    return httpx.get(f"{proxy}{path}", timeout=10).status_code


# -- row 6: a WebSocket upgrade (and the other fields the issue lists) leave no trace --------

API_KEY = "sk-canary0123456789abcdefABCDEF"
EMAIL = "canary.person@example.org"
NEEDLES = ("canary0123456789abcdef", "canary.person")


def _canaries(blob: str) -> list[str]:
    return [needle for needle in NEEDLES if needle in blob]


def test_the_search_finds_the_canaries() -> None:
    assert _canaries(f"x {API_KEY} y {EMAIL.replace('@', '%40')}") == list(NEEDLES)


def _decider() -> Any:
    """An upstream that answers everything, with app decision headers carrying canaries."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body", False):
            pass
        headers = [
            (b"content-type", b"application/json"),
            (b"x-loopguard-app-contact", EMAIL.encode()),
            (b"x-loopguard-app-key", API_KEY.encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b'{"id": "x", "choices": []}'})

    return app


def test_a_websocket_upgrade_with_canaries_leaves_no_trace_in_loopguard_serve(
    tmp_path: Path,
) -> None:
    """A real ``loopguard serve`` (its own process, log level info): a WebSocket upgrade
    with a key and an email in its path, query and headers, and the other fields issue 12
    row 6 names (MCP session id, JSON-RPC id, model name, app header values), all with
    canaries. Neither the process's stdout and stderr nor its records file holds one."""
    records = tmp_path / "records.jsonl"
    port = free_port()
    with run_server(_decider()) as upstream:
        config = tmp_path / "loopguard.toml"
        config.write_text(
            f'[server]\nlisten = "127.0.0.1:{port}"\n'
            f'[telemetry]\nrecords = "{records}"\n'
            + "".join(
                f'[[routes]]\nprefix = "{prefix}"\nupstream = "{upstream}"\nadapter = "{kind}"\n'
                for prefix, kind in (
                    ("/mcp", "mcp"),
                    ("/openai", "openai"),
                    ("/tools", "http-tool"),
                )
            )
        )
        with loopguard_serve(config, port) as (proc, url):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.settimeout(20)
                sock.sendall(
                    f"GET /tools/ws/{API_KEY}?token={API_KEY}&email={EMAIL} HTTP/1.1\r\n"
                    f"Host: 127.0.0.1:{port}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                    "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZQ==\r\n"
                    f"Sec-WebSocket-Protocol: {API_KEY}\r\nAuthorization: Bearer {API_KEY}\r\n"
                    f"X-Loopguard-Session: ws-{EMAIL}\r\n\r\n".encode()
                )
                upgrade_answer = sock.recv(65536)
            with httpx.Client(base_url=url, timeout=30) as http:
                call, mcp_headers = mcp_call_with_canaries(API_KEY, EMAIL)
                mcp = http.post("/mcp", json=call, headers=mcp_headers)
                chat = {
                    "model": f"gpt-4o-{API_KEY}",
                    "messages": [{"role": "user", "content": "hi"}],
                }
                model = http.post(
                    "/openai/v1/chat/completions",
                    json=chat,
                    headers={"x-loopguard-session": f"chat-{EMAIL}"},
                )
            assert wait_for(lambda: records.exists() and len(records.read_text().splitlines()) >= 2)
            proc.send_signal(signal.SIGTERM)  # a graceful stop: everything flushed
            out, err = proc.communicate(timeout=60)
    written = records.read_text()
    # The traffic was real: the upgrade was answered as plain HTTP, the calls recorded.
    assert upgrade_answer.startswith(b"HTTP/1.1 ")
    assert b" 101 " not in upgrade_answer.split(b"\r\n", 1)[0]
    assert mcp.status_code == 200 and model.status_code == 200
    assert len(written.splitlines()) >= 2
    assert "Started server process" in err.decode()  # the log was captured
    assert "upgrade" not in err.decode().lower()  # and not filled by upgrade warnings
    assert _canaries(out.decode()) == []
    assert _canaries(err.decode()) == []
    assert _canaries(written) == []
