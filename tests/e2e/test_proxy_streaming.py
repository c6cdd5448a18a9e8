"""Streamed responses pass through loopguard as they arrive, never buffered whole."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
from proxy_harness import ToolServer, guarded_proxy, proxy_config
from servers import run_server


async def test_sse_chunks_reach_the_client_as_the_upstream_sends_them() -> None:
    server = ToolServer()
    with (
        run_server(server.app()) as upstream,
        guarded_proxy(proxy_config(upstream)) as (url, records),
    ):
        arrivals: list[tuple[float, int]] = []
        async with (
            httpx.AsyncClient(base_url=url, timeout=10) as client,
            client.stream(
                "POST", "/tools/sse?n=50", json={}, headers={"x-loopguard-session": "s"}
            ) as response,
        ):
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["x-loopguard-route"] == "serve"
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    arrivals.append((time.perf_counter(), json.loads(line[6:])["i"]))

    assert [i for _, i in arrivals] == list(range(50))
    sent = server.sent_at
    assert len(sent) == 50
    # The upstream takes ~1 s for 50 events; a buffering proxy would deliver them all
    # after the last one was sent. Generous margins: the first event is at the client
    # before the upstream has sent its 25th (~500 ms later) ...
    assert arrivals[0][0] < sent[24]
    # ... and a typical event arrives within 150 ms of being sent.
    lags = sorted(arrived - sent[i] for arrived, i in arrivals)
    assert lags[len(lags) // 2] < 0.15, lags
    # Arrivals are spread out like the sends, not bunched at the end.
    assert arrivals[-1][0] - arrivals[0][0] > 0.5 * (sent[-1] - sent[0])
    assert records[0]["failure_stage"] == "passed"


async def test_large_response_is_relayed_in_pieces_with_its_length() -> None:
    """A 5 MiB tool answer: streamed through with its content-length, outcome capped."""
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    payload = b"x" * (5 * 1024 * 1024)

    async def big(request: object) -> Response:
        return Response(payload, media_type="application/octet-stream")

    app = Starlette(routes=[Route("/big", big, methods=["POST"])])
    with run_server(app) as upstream, guarded_proxy(proxy_config(upstream)) as (url, records):
        pieces = 0
        total = 0
        async with (
            httpx.AsyncClient(base_url=url, timeout=10) as client,
            client.stream("POST", "/tools/big", json={}) as response,
        ):
            assert int(response.headers["content-length"]) == len(payload)
            async for chunk in response.aiter_raw():
                pieces += 1
                total += len(chunk)
    assert total == len(payload)
    assert pieces > 1
    assert records[0]["failure_stage"] == "passed"


async def test_a_client_that_stops_reading_holds_the_upstream_back() -> None:
    """Backpressure end to end: loopguard buffers no more than the sockets do."""
    server = ToolServer()
    mib = 1024 * 1024
    with run_server(server.app()) as upstream, guarded_proxy(proxy_config(upstream)) as (url, _):
        async with (
            httpx.AsyncClient(base_url=url, timeout=10) as client,
            client.stream("GET", "/tools/raw/flood") as response,
        ):
            # Keep the iterator: leaving an ``async for`` would close the response.
            chunks = response.aiter_raw()
            total = len(await chunks.__anext__())
            await asyncio.sleep(1.0)  # the agent stops reading
            stalled_at = server.flood_sent
            await asyncio.sleep(0.3)
            # Unbounded buffering would have let all 256 MiB through (loopback moves
            # that in well under a second); with flow control the upstream is held back
            # once the socket and parser buffers on the way are full (~9 MiB here).
            assert stalled_at < 48 * mib, stalled_at
            assert server.flood_sent == stalled_at
            async for chunk in chunks:  # the agent reads on: everything arrives
                total += len(chunk)
        assert total == server.flood_sent == 256 * mib


async def test_an_oversized_stream_event_passes_unread_and_the_rest_is_read() -> None:
    """A 9 MiB SSE event (over the parser's 8 MiB bound) in a model stream: every byte
    reaches the client, loopguard keeps none of it, reads on after it (the usage chunk
    it asked for is still cut out), and the record says what it could not read."""
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    def chunk(text: str | None, **extra: object) -> bytes:
        delta = {"content": text} if text else {}
        body = {"id": "c1", "model": "m", "choices": [{"index": 0, "delta": delta}], **extra}
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    usage = {"id": "c1", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}
    usage_event = b"data: " + json.dumps(usage).encode() + b"\n\n"
    piece = b"x" * (64 * 1024)
    big = [b'data: {"huge": "', *([piece] * 144), b'"}\n\n']  # 9 MiB, in 64 KiB writes
    events = [chunk("Hel"), *big, chunk("lo"), usage_event, b"data: [DONE]\n\n"]

    async def chat(request: object) -> StreamingResponse:
        async def body():  # type: ignore[no-untyped-def]
            for event in events:
                yield event

        return StreamingResponse(body(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    route = {"prefix": "/openai", "upstream": "", "adapter": "openai", "inject_stream_usage": True}
    with run_server(app) as upstream:
        config = proxy_config(upstream, routes=[{**route, "upstream": upstream}])
        with guarded_proxy(config) as (url, records):
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                request = {
                    "model": "m",
                    "stream": True,
                    "messages": [{"role": "user", "content": "hi"}],
                }
                response = await client.post("/openai/v1/chat/completions", json=request)
    assert response.status_code == 200
    assert response.content == b"".join(events).replace(usage_event, b"")
    (record,) = records
    assert (record["failure_stage"], record["error_type"]) == ("stream", "sse_event_too_large")
    assert (record["input_tokens"], record["output_tokens"]) == (7, 3)  # read after the skip
