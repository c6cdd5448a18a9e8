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
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from proxy_harness import loopguard_serve, proxy_config
from servers import free_port, run_server

from guard.doors.proxy import ProxyApp
from guard.doors.serve import client_limits

MB = 1024 * 1024


class Sink:
    """An upstream that hashes each body it receives whole (and answers small)."""

    def __init__(self) -> None:
        self.received: list[tuple[int, str]] = []  # (length, sha256) per request

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        digest, size = hashlib.sha256(), 0
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
