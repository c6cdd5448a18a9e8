"""The one admission path of the HTTP doors, and the Exchange rules both doors share.

Driven in-process: the proxy and the middleware through ``httpx.ASGITransport`` (or
called as ASGI apps with a recording ``send``), the proxy's upstream answered in memory
(``MemoryUpstream``).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from adapters.mcp import McpAdapter
from guard.devtools.memory_upstream import MemoryUpstream
from guard.doors.admission import Forward, admit
from guard.doors.exchange import Exchange
from guard.doors.middleware import GuardMiddleware
from guard.doors.proxy import ProxyApp
from guard.doors.routing import Router
from guard.engine.calls import Step
from guard.engine.config import Config
from guard.engine.contract import Answer, PassthroughAdapter, RequestView
from guard.engine.core import Engine
from guard.engine.store import MemoryStore
from guard.telemetry import Telemetry

TOOL_BODY = b'{"status":"in transit"}'


def config(**sections: Any) -> Config:
    sections.setdefault("telemetry", {"records": ""})
    sections.setdefault(
        "routes", [{"prefix": "/tools", "upstream": "http://tools.test", "adapter": "http-tool"}]
    )
    return Config.from_mapping(sections)


class Events(MemoryStore):
    """A memory store that writes each step it records (appended, or settling a
    reservation) into a shared event log."""

    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    async def append(self, session: str, step: Step, window: int) -> None:
        self.log.append(f"append {step.tool}")
        await super().append(session, step, window)

    async def settle(self, session: str, token: str, step: Step, window: int) -> None:
        self.log.append(f"append {step.tool}")
        await super().settle(session, token, step, window)


def engine_for(cfg: Config, records: list[dict[str, Any]], store: Any = None) -> Engine:
    telemetry = Telemetry(
        cfg.telemetry, scrub_policy=cfg.redaction.policy_id, record_sink=records.append
    )
    return Engine(cfg, telemetry=telemetry, store=store)


def proxy_for(cfg: Config, engine: Engine) -> ProxyApp:
    upstream = MemoryUpstream(TOOL_BODY, headers=[(b"content-type", b"application/json")])
    return ProxyApp(cfg, engine=engine, upstream=upstream)


async def tool_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The app behind the middleware: the same answer as the proxy's upstream."""
    while (await receive()).get("more_body", False):
        pass
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": TOOL_BODY, "more_body": False})


def door(kind: str, cfg: Config, engine: Engine) -> Any:
    if kind == "proxy":
        return proxy_for(cfg, engine)
    return GuardMiddleware(tool_app, engine=engine)


# -- the session a stop answer names -----------------------------------------------------


@pytest.mark.parametrize("kind", ["proxy", "middleware"])
async def test_a_stopped_http_tool_call_names_the_session_of_the_configured_header(kind):
    cfg = config(session={"headers": ["x-run-id"]})
    records: list[dict[str, Any]] = []
    engine = engine_for(cfg, records)
    app = door(kind, cfg, engine)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://guard") as client:
        answers = [
            await client.post(
                "/tools/lookup_tracking", json={"order_id": "A1"}, headers={"x-run-id": "run-77"}
            )
            for _ in range(4)
        ]
    await engine.aclose()
    assert [a.status_code for a in answers] == [200, 200, 200, 422]
    stop = answers[3].json()
    assert stop["session"] == "run-77"
    assert stop["repeats"] == 3
    assert answers[3].headers["x-loopguard-route"] == "stop_and_review"
    assert records[-1]["route"] == "stop_and_review"


# -- the record comes before the body's last byte ----------------------------------------


async def run_asgi(app: Any, path: str, body: bytes, log: list[str]) -> list[dict[str, Any]]:
    """One POST through an ASGI app; every message sent is logged next to the appends."""
    sent: list[dict[str, Any]] = []
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            more = "more" if message.get("more_body", False) else "end"
            log.append(f"body {len(message['body'])} {more}")

    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-loopguard-session", b"s1"),
        ],
        "server": ("127.0.0.1", 8787),
        "client": ("127.0.0.1", 50000),
    }
    await app(scope, receive, send)
    return sent


async def declared_length_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Declares its length, completes the body with more_body=True, then an empty end."""
    await receive()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"23")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": TOOL_BODY[:10], "more_body": True})
    await send({"type": "http.response.body", "body": TOOL_BODY[10:], "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def test_proxy_records_the_step_before_the_last_byte_goes_out():
    log: list[str] = []
    cfg = config()
    engine = engine_for(cfg, [], store=Events(log))
    app = proxy_for(cfg, engine)
    sent = await run_asgi(app, "/tools/lookup_tracking", b'{"order_id":"A1"}', log)
    await engine.aclose()
    # The body with its declared length goes out as one final message, after the step.
    assert log == ["append lookup_tracking", "body 23 end"]
    assert sent[-1]["body"] == TOOL_BODY


async def test_middleware_records_the_step_before_the_message_that_completes_the_length():
    log: list[str] = []
    cfg = config()
    engine = engine_for(cfg, [], store=Events(log))
    middleware = GuardMiddleware(declared_length_app, engine=engine)
    await run_asgi(middleware, "/tools/lookup_tracking", b'{"order_id":"A1"}', log)
    await engine.aclose()
    # The message that reaches the declared 23 bytes waits for the step; the app's
    # empty closing message follows as it came.
    assert log == ["body 10 more", "append lookup_tracking", "body 13 more", "body 0 end"]


# -- admission itself --------------------------------------------------------------------


def receive_of(body: bytes) -> Any:
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    return receive


async def admitted(cfg: Config, engine: Engine, body: bytes, **headers: str) -> Any:
    router = Router(cfg)
    route = cfg.routes[0]
    lowered = {k.replace("_", "-"): v for k, v in headers.items()}
    return await admit(
        engine, router, route, receive_of(body), "POST", "/lookup_tracking", "", lowered
    ), router


async def test_admit_reads_the_body_and_names_the_session_in_the_request_view():
    cfg = config(session={"headers": ["x-run-id"]})
    engine = engine_for(cfg, [])
    result, _ = await admitted(cfg, engine, b'{"order_id":"A1"}', x_run_id="run-9")
    assert isinstance(result, Forward)
    assert result.body == b'{"order_id":"A1"}'
    assert result.exchange.request.session == "run-9"
    assert result.exchange.record.session == "run-9"
    [flow] = result.exchange.flows
    assert (flow.invocation.tool, flow.verdict.action) == ("lookup_tracking", "allow")
    await engine.aclose()


async def test_admit_refuses_a_body_over_the_limit_and_answers_malformed_requests():
    cfg = config(server={"max_body_bytes": 8})
    engine = engine_for(cfg, [])
    refused, _ = await admitted(cfg, engine, b'{"order_id":"A1"}')
    assert isinstance(refused, Answer) and refused.status == 413
    cfg = config(server={"reject_malformed_json": True})
    records: list[dict[str, Any]] = []
    engine = engine_for(cfg, records)
    malformed, _ = await admitted(cfg, engine, b'{"order_id":', content_type="application/json")
    assert isinstance(malformed, Answer) and malformed.status == 400
    assert ("x-loopguard-route", "serve") in malformed.headers
    assert records[-1]["failure_stage"] == "request_admission"
    await engine.aclose()


async def test_admit_returns_none_when_the_client_left_before_its_body():
    cfg = config()
    engine = engine_for(cfg, [])

    async def gone() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    result = await admit(engine, Router(cfg), cfg.routes[0], gone, "POST", "/x", "", {})
    assert result is None
    await engine.aclose()


async def test_a_guard_bug_serves_the_call_unguarded_but_recorded():
    cfg = config()
    records: list[dict[str, Any]] = []
    engine = engine_for(cfg, records)
    router = Router(cfg)

    def broken(request: RequestView) -> Any:
        raise RuntimeError("bug")

    router.adapters["/tools"].parse = broken  # type: ignore[method-assign]
    result = await admit(
        engine, router, cfg.routes[0], receive_of(b"{}"), "POST", "/lookup", "", {}
    )
    assert isinstance(result, Forward) and result.body == b"{}"
    exchange = result.exchange
    assert isinstance(exchange.adapter, PassthroughAdapter)
    headers = exchange.response_start(200, [(b"content-length", b"2")])
    assert (b"x-loopguard-route", b"serve") in headers
    assert await exchange.response_chunk(b"ok") == b"ok"
    assert exchange.done
    # Served unguarded, never silently: one record naming stage "guard" and the error.
    assert [(r["failure_stage"], r["error_type"], r["route"]) for r in records] == [
        ("guard", "RuntimeError", "serve")
    ]
    await engine.aclose()


# -- one flow per guarded call -------------------------------------------------------------


async def test_each_call_of_an_mcp_batch_keeps_its_own_hash_verdict_and_outcome():
    cfg = config(
        routes=[{"prefix": "/mcp", "upstream": "http://mcp.test", "adapter": "mcp"}],
    )
    engine = engine_for(cfg, [])
    batch = [
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "a", "arguments": {}},
        },
        {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "b", "arguments": {}},
        },
    ]
    headers = {"content-type": "application/json", "mcp-session-id": "m1"}
    request = RequestView("POST", "", "", headers, json.dumps(batch).encode(), "m1")
    exchange = Exchange(engine, cfg.routes[0], McpAdapter(cfg.routes[0]), request)
    assert await exchange.admit() == request.body
    assert [f.invocation.tool for f in exchange.flows] == ["a", "b"]
    assert exchange.flows[0].params_hash == exchange.flows[1].params_hash  # both {}
    exchange.mark_sent()
    exchange.response_start(200, [(b"content-type", b"application/json")])
    replies = [
        {"jsonrpc": "2.0", "id": 2, "result": {"content": [{"type": "text", "text": "B"}]}},
        {"jsonrpc": "2.0", "id": 1, "result": {"content": [], "isError": True}},
    ]
    await exchange.response_chunk(json.dumps(replies).encode())
    await exchange.finish()
    a, b = exchange.flows
    assert a.outcome is not None and a.outcome.error is True
    assert b.outcome is not None and b.outcome.value == {"content": [{"type": "text", "text": "B"}]}
    history = await engine.store.history_for_call("m1", "a", a.params_hash)
    assert [s.tool for s in history] == ["a", "b"]
    await engine.aclose()
