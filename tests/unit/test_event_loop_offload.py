"""Issue 12 row 1: CPU-heavy work on a large body never runs on the event loop."""

from __future__ import annotations

import json
import re
import threading
from typing import Any

import pytest

from adapters.http_tool import HttpToolAdapter
from guard.doors import asgi
from guard.doors.exchange import OFFLOAD_BYTES, Exchange
from guard.engine.config import Config
from guard.engine.contract import RequestView
from guard.engine.core import Engine


def _setup(body: bytes) -> tuple[Exchange, list[int]]:
    config = Config.from_mapping(
        {"routes": [{"prefix": "/tools", "upstream": "http://tool", "adapter": "http-tool"}]}
    )
    engine = Engine(config)
    adapter = HttpToolAdapter(config.routes[0])
    threads: list[int] = []
    parse, marker = adapter.parse, engine.marker

    def watched_parse(request: RequestView) -> Any:
        threads.append(threading.get_ident())
        return parse(request)

    def watched_marker(*args: Any) -> str:
        threads.append(threading.get_ident())
        return marker(*args)

    adapter.parse = watched_parse  # type: ignore[method-assign]
    engine.marker = watched_marker  # type: ignore[method-assign]
    headers = {"content-type": "application/json"}
    request = RequestView("POST", "/lookup", "", headers, body, "s")
    return Exchange(engine, config.routes[0], adapter, request), threads


def _watch_observer(
    exchange: Exchange, threads: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Note the thread the response's observer finishes on (where it parses the body)."""
    kind = type(exchange._observer)
    finish = kind.finish

    def watched_finish(self: Any) -> Any:
        threads.append(threading.get_ident())
        return finish(self)

    monkeypatch.setattr(kind, "finish", watched_finish)


async def test_a_large_body_is_parsed_and_marked_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    body = json.dumps({"q": "1 " * OFFLOAD_BYTES}).encode()
    exchange, threads = _setup(body)
    assert await exchange.admit() == body
    exchange.response_start(200, [(b"content-type", b"application/json")])
    _watch_observer(exchange, threads, monkeypatch)
    await exchange.response_chunk(body, last=True)
    loop_thread = threading.get_ident()
    # The request's parse, the response's parse (the observer's finish), its marking.
    assert len(threads) == 3 and loop_thread not in threads


async def test_a_small_body_stays_on_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    exchange, threads = _setup(b'{"q": "a"}')
    assert await exchange.admit() == b'{"q": "a"}'
    exchange.response_start(200, [(b"content-type", b"application/json")])
    _watch_observer(exchange, threads, monkeypatch)
    await exchange.response_chunk(b"{}", last=True)
    assert threads == [threading.get_ident()] * 3


def test_the_one_pass_card_scan_agrees_with_checking_every_span() -> None:
    """The scan's Luhn sums come from prefix sums (one pass over the run, not one per
    candidate span); it must find the same cards as checking each span plainly."""
    import random

    from guard.engine.redact import _cards_in, luhn_ok

    def reference(run: str) -> str:
        groups = re.findall(r"\d+", run)
        for i in range(len(groups)):
            digits = ""
            for group in groups[i:]:
                digits += group
                if len(digits) > 19:
                    break
                if len(digits) >= 13 and luhn_ok(digits):
                    return f"[CARD:{digits}]"
        return run

    rng = random.Random(12)
    for _ in range(20_000):
        groups = ["".join(rng.choices("0123456789", k=rng.randint(1, 5))) for _ in range(8)]
        run = "".join(g + rng.choice([" ", "-", ""]) for g in groups).strip(" -")
        assert _cards_in(run, lambda d: f"[CARD:{d}]", lambda d: d) == reference(run)


async def test_a_large_mcp_sse_event_is_parsed_off_the_event_loop_and_settles_early(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An MCP answer streamed as SSE, held open after the response (as a server may): the
    # large response event is parsed in a worker thread, and the step is still recorded
    # as soon as it is seen, before the stream ends.
    from adapters.mcp import McpAdapter, McpObserver

    config = Config.from_mapping(
        {"routes": [{"prefix": "/mcp", "upstream": "http://mcp", "adapter": "mcp"}]}
    )
    engine = Engine(config)
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "read"}}
    headers = {"content-type": "application/json", "mcp-session-id": "m1"}
    request = RequestView("POST", "", "", headers, json.dumps(call).encode(), "m1")
    exchange = Exchange(engine, config.routes[0], McpAdapter(config.routes[0]), request)
    assert await exchange.admit() == request.body
    exchange.mark_sent()
    exchange.response_start(200, [(b"content-type", b"text/event-stream")])
    threads: list[int] = []
    take = McpObserver._take_text

    def watched_take(self: McpObserver, text: Any) -> None:
        threads.append(threading.get_ident())
        take(self, text)

    monkeypatch.setattr(McpObserver, "_take_text", watched_take)
    loop_thread = threading.get_ident()
    small = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {}}
    await exchange.response_chunk(b"data: " + json.dumps(small).encode() + b"\n\n")
    assert threads == [loop_thread]  # a small event: read as it passes
    text = "x" * OFFLOAD_BYTES
    answer = {"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": text}]}}
    await exchange.response_chunk(b"data: " + json.dumps(answer).encode() + b"\n\n")
    assert len(threads) == 2 and threads[1] != loop_thread
    assert exchange.settled and not exchange.done  # recorded; the stream is still open
    (flow,) = exchange.flows
    assert flow.outcome is not None and flow.outcome.value["content"][0]["text"] == text
    await exchange.finish()
    await engine.aclose()


async def test_a_large_chunked_body_is_joined_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A chunked body arrives in parts; joining a large one is a copy of the whole body,
    so it runs in a worker thread (a small one's stays on the loop: a thread hop costs
    more than its copy). The charge for the body stays with the caller either way."""
    threads: list[int] = []
    join = asgi.join_parts

    def watched_join(parts: list[bytes]) -> bytes:
        threads.append(threading.get_ident())
        return join(parts)

    monkeypatch.setattr(asgi, "join_parts", watched_join)

    async def read(body: bytes, piece: int) -> tuple[bytes, int]:
        messages = [
            {"type": "http.request", "body": body[i : i + piece], "more_body": True}
            for i in range(0, len(body), piece)
        ]
        messages.append({"type": "http.request", "body": b"", "more_body": False})
        pending = iter(messages)

        async def receive() -> dict[str, Any]:
            return next(pending)

        budget = asgi.BodyBudget(10 * len(body))
        got = await asgi.read_body(receive, 10 * len(body), budget=budget)
        return got, budget.used

    loop_thread = threading.get_ident()
    large = bytes(range(256)) * (OFFLOAD_BYTES // 128)
    assert await read(large, 64 * 1024) == (large, len(large))  # charged, the caller's
    assert len(threads) == 1 and threads[0] != loop_thread
    small = b"x" * 10_000
    assert await read(small, 1000) == (small, len(small))
    assert threads[1] == loop_thread
