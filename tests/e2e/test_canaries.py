"""Canaries (issue 5): what loopguard redacts must never come out of it.

An API key, a bearer token, an email, an order id (a user redaction rule) and a plain
argument string (no secret shape at all, just raw tool-argument content) are planted
in request headers, tool arguments, tool results, model messages and model responses.
Calls of every kind then run through the real proxy on real sockets (HTTP tool served,
stopped, failing, malformed and unreachable; MCP served and stopped with the official
SDK client; OpenAI chat streamed, non-streamed, nudged and stopped; Responses;
Anthropic), through the embedded middleware, and through the in-process ``Guard``.

Everything emitted is captured: every span (``to_json``: name, attributes, events,
links, resource, status), every metric data point, every structlog line (rendered,
tracebacks included), stdlib log records, the process's stdout/stderr, the durable
records (sink dicts and the JSONL files), and in a separate pass the raw OTLP/protobuf
bytes a collector receives. No canary may appear in any of it.

With ``capture_content = true`` the span carries the (redacted) content: secrets are
still never there, the plain argument is (capture on means content is captured), and
it still never reaches a record, a metric or a log line.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest
import structlog
from canary_calls import mcp_call_with_canaries
from fake_models import FakeModels, Reply
from google.protobuf.json_format import MessageToJson
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from otlp_receiver import OtlpReceiver
from servers import dead_port, run_server
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from guard.doors.inprocess import Guard, StalledRepeatError
from guard.doors.middleware import GuardMiddleware
from guard.doors.proxy import ProxyApp
from guard.engine.config import Config
from guard.engine.core import Engine
from guard.telemetry import Telemetry

# -- the canaries ---------------------------------------------------------------------------

API_KEY = "sk-canary0123456789abcdefABCDEF"
BEARER_TOKEN = "canary-bearer-tok-98765"
BEARER = f"Bearer {BEARER_TOKEN}"
EMAIL = "canary.person@example.org"
ORDER = "#A10234"
PLAIN = "canary-plain-argument-zebra"

# What is searched for: the distinctive core of each canary, so that a partial leak
# (the key without its "sk-", the token without "Bearer ", the email's local part, the
# order without "#", a URL-encoded email) is still found. Case-sensitive: the order's
# capital "A" cannot occur in the lowercase hex of ids and hashes.
NEEDLES: dict[str, tuple[str, ...]] = {
    "api_key": ("canary0123456789abcdef",),
    "bearer": ("canary-bearer-tok",),
    "email": ("canary.person",),
    "order": ("A10234",),
    "plain": ("plain-argument-zebra",),
}
SECRETS = frozenset({"api_key", "bearer", "email", "order"})
ALL = frozenset(NEEDLES)

# Tool arguments carrying every canary, under keys no secret-key rule names (so the
# value detectors and the user rule must find them), plus one under a secret key.
ARGS: dict[str, Any] = {
    "order_id": ORDER,
    "contact": EMAIL,
    "credential": API_KEY,
    "header": BEARER,
    "note": PLAIN,
}
BLOB = f"order {ORDER} for {EMAIL}, key {API_KEY}, {BEARER}, note {PLAIN}"
RESULT: dict[str, Any] = {"status": "in transit", "detail": BLOB, "api_key": API_KEY}
# Request headers an agent sends: credentials, a cookie, and content in a custom header.
HEADERS = {
    "authorization": BEARER,
    "x-api-key": API_KEY,
    "cookie": f"sid={API_KEY}; email={EMAIL}; order={ORDER}; note={PLAIN}",
    "x-agent-note": PLAIN,
    "x-loopguard-session": "canary-run-1",
}
MAX_REPEATS = 3
ORDER_RULE = {"name": "order", "pattern": r"#A\d{5}", "mode": "pseudonymize"}


def found(blob: str | bytes) -> set[str]:
    """The canaries present in ``blob`` (text or raw bytes)."""
    hits: set[str] = set()
    for name, needles in NEEDLES.items():
        for needle in needles:
            if (needle.encode() if isinstance(blob, bytes) else needle) in blob:
                hits.add(name)
    return hits


def test_the_search_finds_every_canary_where_it_is() -> None:
    # The search itself can fail: each canary is found in what carries it, in any shape
    # it could leak in (as is, JSON in JSON, bytes, URL-encoded, without its prefix).
    assert found(BLOB) == ALL
    assert found(json.dumps({"x": json.dumps(ARGS)})) == ALL
    assert found(json.dumps(HEADERS).encode()) == ALL
    assert found("canary.person%40example.org") == {"email"}
    assert found("0123 sk-canary0123456789abcdef") == {"api_key"}
    assert found("canary-bearer-tok-98765") == {"bearer"}
    assert found("[ORDER:0123456789abcdef] A10234") == {"order"}
    assert found("[API_KEY] [BEARER] [EMAIL] [ORDER:0123456789abcdef] a10234") == set()


# -- upstreams ------------------------------------------------------------------------------


@dataclass
class Seen:
    """What the upstreams received: proof the canaries really were in the traffic."""

    blobs: list[bytes] = field(default_factory=list)

    def add(self, headers: Any, body: bytes) -> None:
        self.blobs.append(json.dumps(sorted(headers.items())).encode() + body)

    def canaries(self) -> set[str]:
        return found(b"\n".join(self.blobs))


def tool_app(seen: Seen, prefix: str = "") -> Starlette:
    """A plain HTTP tool server answering with canaries (in the body and a cookie)."""

    async def lookup(request: Request) -> Response:
        seen.add(request.headers, await request.body())
        return JSONResponse(RESULT, headers={"set-cookie": f"sid={API_KEY}"})

    async def search(request: Request) -> Response:
        seen.add(request.headers, request.url.query.encode())
        return JSONResponse({"results": [BLOB]})

    async def fail(request: Request) -> Response:
        seen.add(request.headers, await request.body())
        return JSONResponse({"error": f"backend refused {BLOB}"}, status_code=500)

    return Starlette(
        routes=[
            Route(f"{prefix}/lookup_order", lookup, methods=["POST"]),
            Route(f"{prefix}/search", search, methods=["GET"]),
            Route(f"{prefix}/fail", fail, methods=["POST"]),
        ]
    )


def mcp_app() -> Any:
    server = MCPServer("canary-tools", log_level="WARNING")

    @server.tool()
    def lookup_order(order_id: str, contact: str, credential: str, header: str, note: str) -> str:
        """Look up an order."""
        return f"order {order_id} for {contact}: {credential} {header} {note}"

    security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
    return server.streamable_http_app(json_response=False, transport_security=security)


class _Recording:
    """Pure ASGI wrapper noting each request's headers and body (the fake models)."""

    def __init__(self, app: Any, seen: Seen) -> None:
        self.app, self.seen = app, seen

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks: list[bytes] = []

        async def noting() -> Any:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                headers = {k.decode(): v.decode() for k, v in scope["headers"]}
                self.seen.add(headers, b"".join(chunks))
            return message

        await self.app(scope, noting, send)


# -- what loopguard emits -------------------------------------------------------------------


class Emitted:
    """Every telemetry sink of every front door, in memory or over OTLP."""

    def __init__(self, tmp: Path, *, capture: bool, otlp: OtlpReceiver | None = None) -> None:
        self.tmp = tmp
        self.capture = capture
        self.otlp = otlp
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider(resource=Resource.create({"service.name": "canary"}))
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.records: list[dict[str, Any]] = []
        self.files: list[Path] = []
        self.telemetries: list[Telemetry] = []

    def config(self, routes: list[dict[str, Any]]) -> Config:
        path = self.tmp / f"records-{len(self.files)}.jsonl"
        self.files.append(path)
        telemetry: dict[str, Any] = {"records": str(path), "capture_content": self.capture}
        if self.otlp is not None:
            telemetry.update(exporter="otlp", otlp_endpoint=self.otlp.traces_url)
        return Config.from_mapping(
            {
                "loop": {"max_repeats": MAX_REPEATS},
                "redaction": {"rules": [ORDER_RULE]},
                "telemetry": telemetry,
                "routes": routes,
            }
        )

    def engine(self, config: Config) -> Engine:
        providers: dict[str, Any] = {}
        if self.otlp is None:
            providers = {
                "tracer_provider": self.tracer_provider,
                "meter_provider": self.meter_provider,
            }
        telemetry = Telemetry(
            config.telemetry,
            config.redaction.policy_id,
            record_sink=self.records.append,
            **providers,
        )
        self.telemetries.append(telemetry)
        return Engine(config, telemetry=telemetry)

    def shutdown(self) -> None:
        for telemetry in self.telemetries:
            telemetry.shutdown()  # idempotent; flushes OTLP, closes record files

    # What was emitted, by sink, as text (or bytes for the OTLP wire).

    def span_blobs(self) -> list[str]:
        return [span.to_json() for span in self.spans.get_finished_spans()]

    def metric_blob(self) -> str:
        data = self.reader.get_metrics_data()
        return data.to_json() if data is not None else ""

    def record_blobs(self) -> list[str]:
        return [json.dumps(r) for r in self.records] + [
            p.read_text(encoding="utf-8") for p in self.files if p.exists()
        ]


@contextmanager
def structlog_output() -> Iterator[io.StringIO]:
    """structlog rendered to a buffer (JSON, tracebacks formatted), whatever the thread."""
    buffer = io.StringIO()
    old = structlog.get_config()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(default=str),
        ],
        logger_factory=structlog.PrintLoggerFactory(buffer),
        cache_logger_on_first_use=False,
    )
    try:
        yield buffer
    finally:
        structlog.configure(**old)


# Stdlib loggers of the test's own clients and of the upstreams stand-ins: what they log
# is not loopguard's output (an httpx client logs its request URL, query and all).
FOREIGN_LOGGERS = ("httpx", "httpx2", "httpcore", "openai", "anthropic", "mcp")


def stdlib_log_text(caplog: pytest.LogCaptureFixture) -> str:
    lines = []
    for rec in caplog.records:
        if rec.name.startswith(FOREIGN_LOGGERS):
            continue
        lines.append(f"{rec.name} {rec.levelname} {rec.getMessage()} {rec.exc_text or ''}")
    return "\n".join(lines)


# -- the traffic ----------------------------------------------------------------------------


def chat_messages(loops: int) -> list[dict[str, Any]]:
    """A Chat Completions conversation: canaries in system, user, tool calls and results."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": f"Support agent. Escalations: {EMAIL}."},
        {"role": "user", "content": f"Where is {ORDER}? My key is {API_KEY}. {PLAIN}"},
    ]
    for n in range(loops):
        call = {"id": f"call_{n}", "type": "function"}
        call["function"] = {"name": "lookup_order", "arguments": json.dumps(ARGS)}
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        messages.append({"role": "tool", "tool_call_id": f"call_{n}", "content": BLOB})
    return messages


def responses_input(loops: int) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = [{"role": "user", "content": f"Find {ORDER} for {EMAIL}"}]
    for n in range(loops):
        items.append(
            {
                "type": "function_call",
                "call_id": f"call_{n}",
                "name": "lookup_order",
                "arguments": json.dumps(ARGS),
            }
        )
        items.append({"type": "function_call_output", "call_id": f"call_{n}", "output": BLOB})
    return items


def anthropic_messages(loops: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": f"Where is {ORDER}? {API_KEY} {PLAIN}"}
    ]
    for n in range(loops):
        use = {"type": "tool_use", "id": f"toolu_{n}", "name": "lookup_order", "input": ARGS}
        messages.append({"role": "assistant", "content": [use]})
        result = {"type": "tool_result", "tool_use_id": f"toolu_{n}", "content": BLOB}
        messages.append({"role": "user", "content": [result]})
    return messages


def run_proxy_traffic(emitted: Emitted, stack: ExitStack, seen: Seen) -> dict[str, list[str]]:
    """Every kind of call through the real proxy; returns the x-loopguard-route seen per kind."""
    fake = FakeModels()
    tools = stack.enter_context(run_server(tool_app(seen)))
    models = stack.enter_context(run_server(_Recording(fake.app(), seen)))
    mcp_upstream = stack.enter_context(run_server(_Recording(mcp_app(), seen)))
    dead = f"http://127.0.0.1:{dead_port()}"
    config = emitted.config(
        [
            {"prefix": "/tools", "upstream": tools, "adapter": "http-tool"},
            {"prefix": "/down", "upstream": dead, "adapter": "http-tool"},
            {"prefix": "/mcp", "upstream": f"{mcp_upstream}/mcp", "adapter": "mcp"},
            {"prefix": "/openai", "upstream": models, "adapter": "openai"},
            {"prefix": "/anthropic", "upstream": models, "adapter": "anthropic"},
        ]
    )
    proxy = stack.enter_context(run_server(ProxyApp(config, engine=emitted.engine(config))))
    routes: dict[str, list[str]] = {}

    def note(kind: str, response: httpx.Response) -> httpx.Response:
        routes.setdefault(kind, []).append(response.headers["x-loopguard-route"])
        return response

    with httpx.Client(base_url=proxy, headers=HEADERS, timeout=30) as http:
        # HTTP tool: served until the stall, then stopped.
        for _ in range(MAX_REPEATS + 1):
            note("tool", http.post("/tools/lookup_order", json=ARGS))
        # Arguments in the query string; a failing tool; malformed JSON; a dead upstream.
        note("tool_query", http.get("/tools/search", params=ARGS))
        note("tool_fail", http.post("/tools/fail", json=ARGS))
        broken = ("{" + json.dumps(ARGS)[1:-1]).encode()  # no closing brace
        note(
            "tool_malformed",
            http.post(
                "/tools/lookup_order", content=broken, headers={"content-type": "application/json"}
            ),
        )
        down = note("tool_down", http.post("/down/lookup_order", json=ARGS))
        assert down.status_code == 502, down.text  # refused: nothing took the dead port

        # OpenAI Chat Completions: text and tool-call replies, streamed and not.
        fake.reply = Reply(text=f"Your order {ORDER} ships to {EMAIL}. {API_KEY} {PLAIN}")
        body = {"model": "gpt-canary", "messages": chat_messages(1)}
        note("chat", http.post("/openai/v1/chat/completions", json=body))
        fake.reply = Reply(tool=("lookup_order", ARGS))
        with http.stream(
            "POST", "/openai/v1/chat/completions", json={**body, "stream": True}
        ) as streamed:
            streamed.read()
            note("chat_stream", streamed)
        # Nudged (the loop just became a stall), then stopped (it went on).
        nudged = {"model": "gpt-canary", "messages": chat_messages(MAX_REPEATS)}
        note("chat_nudge", http.post("/openai/v1/chat/completions", json=nudged))
        stopped = {"model": "gpt-canary", "messages": chat_messages(MAX_REPEATS + 1)}
        note("chat_stop", http.post("/openai/v1/chat/completions", json=stopped))
        with http.stream(
            "POST", "/openai/v1/chat/completions", json={**stopped, "stream": True}
        ) as streamed:
            streamed.read()
            note("chat_stop_stream", streamed)

        # Responses: tool call and text, streamed and not, then a stop.
        resp = {"model": "gpt-canary", "input": responses_input(1)}
        note("responses", http.post("/openai/v1/responses", json=resp))
        fake.reply = Reply(text=BLOB)
        with http.stream("POST", "/openai/v1/responses", json={**resp, "stream": True}) as s:
            s.read()
            note("responses_stream", s)
        resp_stop = {"model": "gpt-canary", "input": responses_input(MAX_REPEATS + 1)}
        note("responses_stop", http.post("/openai/v1/responses", json=resp_stop))

        # Anthropic Messages: streamed and not, a tool_use reply, a nudge and a stop.
        msg = {"model": "claude-canary", "max_tokens": 50, "messages": anthropic_messages(1)}
        msg["system"] = f"Escalate to {EMAIL}."
        note("anthropic", http.post("/anthropic/v1/messages", json=msg))
        fake.reply = Reply(tool=("lookup_order", ARGS))
        with http.stream("POST", "/anthropic/v1/messages", json={**msg, "stream": True}) as s:
            s.read()
            note("anthropic_stream", s)
        for loops, kind in ((MAX_REPEATS, "anthropic_nudge"), (MAX_REPEATS + 1, "anthropic_stop")):
            body = {**msg, "messages": anthropic_messages(loops)}
            note(kind, http.post("/anthropic/v1/messages", json=body))

    # The official SDKs, with the canaries as their credentials.
    fake.reply = Reply(text=BLOB)
    client = openai.OpenAI(
        base_url=f"{proxy}/openai/v1",
        api_key=API_KEY,
        max_retries=0,
        default_headers={"cookie": HEADERS["cookie"]},
    )
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-canary", messages=chat_messages(1), stream=True
    )
    list(raw.parse())
    routes["sdk_openai"] = [raw.headers["x-loopguard-route"]]
    claude = anthropic.Anthropic(
        base_url=f"{proxy}/anthropic",
        auth_token=BEARER_TOKEN,
        max_retries=0,
        default_headers={"x-api-key": API_KEY},
    )
    raw_msg = claude.messages.with_raw_response.create(
        model="claude-canary", max_tokens=50, messages=anthropic_messages(1)
    )
    raw_msg.parse()
    routes["sdk_anthropic"] = [raw_msg.headers["x-loopguard-route"]]

    routes["mcp"] = asyncio.run(_mcp_calls(f"{proxy}/mcp"))
    return routes


async def _mcp_calls(url: str) -> list[str]:
    """The official MCP client: the same call until loopguard stops it."""
    outcomes = []
    headers = {k: v for k, v in HEADERS.items() if k != "x-loopguard-session"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=30) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        for _ in range(MAX_REPEATS + 1):
            result = await session.call_tool("lookup_order", ARGS)
            outcomes.append("stop_and_review" if result.is_error else "serve")
    return outcomes


def run_middleware_traffic(emitted: Emitted, stack: ExitStack, seen: Seen) -> list[int]:
    config = emitted.config(
        [{"prefix": "/tools", "upstream": "http://app", "adapter": "http-tool"}]
    )
    app = GuardMiddleware(tool_app(seen, "/tools"), engine=emitted.engine(config))
    base = stack.enter_context(run_server(app))
    with httpx.Client(base_url=base, headers=HEADERS, timeout=30) as http:
        return [
            http.post("/tools/lookup_order", json=ARGS).status_code for _ in range(MAX_REPEATS + 1)
        ]


def run_inprocess_calls(emitted: Emitted) -> list[str]:
    config = emitted.config([])
    guard = Guard(engine=emitted.engine(config))

    @guard.tool(session="canary-run-2")
    def lookup_order(order_id: str, contact: str, credential: str, header: str, note: str) -> Any:
        return RESULT

    @guard.tool(session="canary-run-3")
    def print_label(order_id: str, note: str) -> Any:
        raise RuntimeError(f"printer jammed on {order_id} {note} {EMAIL} {API_KEY}")

    outcomes = []
    try:
        for _ in range(MAX_REPEATS + 1):
            try:
                lookup_order(**ARGS)
                outcomes.append("ran")
            except StalledRepeatError:
                outcomes.append("stopped")
        with pytest.raises(RuntimeError):
            print_label(ORDER, PLAIN)
        with guard.call("lookup_order", {**ARGS, "extra": BEARER}, session="canary-run-4") as c:
            c.outcome = BLOB
    finally:
        guard.close()
    return outcomes


@dataclass
class Run:
    emitted: Emitted
    routes: dict[str, list[str]]
    middleware: list[int]
    inprocess: list[str]
    seen: Seen
    structlog: str
    stdlib: str
    out: str
    err: str


def run_everything(
    tmp: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    *,
    capture: bool,
    otlp: OtlpReceiver | None = None,
) -> Run:
    caplog.set_level(logging.INFO)
    emitted = Emitted(tmp, capture=capture, otlp=otlp)
    seen = Seen()
    with structlog_output() as logs:
        with ExitStack() as stack:
            routes = run_proxy_traffic(emitted, stack, seen)
            middleware = run_middleware_traffic(emitted, stack, seen)
            inprocess = run_inprocess_calls(emitted)
        # The servers are down (lifespan shutdown closed their engines); close the rest.
        emitted.shutdown()
    out, err = capfd.readouterr()
    return Run(
        emitted,
        routes,
        middleware,
        inprocess,
        seen,
        logs.getvalue(),
        stdlib_log_text(caplog),
        out,
        err,
    )


def assert_traffic_was_real(run: Run) -> None:
    """The canaries were really in the traffic, and every kind of call really happened."""
    assert run.seen.canaries() == ALL
    r = run.routes
    stop, serve = "stop_and_review", "serve"
    assert r["tool"] == [serve] * MAX_REPEATS + [stop]
    assert r["mcp"] == [serve] * MAX_REPEATS + [stop]
    assert r["chat_nudge"] == ["nudge"] and r["anthropic_nudge"] == ["nudge"]
    for kind in ("chat_stop", "chat_stop_stream", "responses_stop", "anthropic_stop"):
        assert r[kind] == [stop], kind
    for kind in ("chat", "chat_stream", "responses", "responses_stream", "anthropic"):
        assert r[kind] == [serve], kind
    assert r["sdk_openai"] == [serve] and r["sdk_anthropic"] == [serve]
    assert run.middleware == [200] * MAX_REPEATS + [422]
    assert run.inprocess == ["ran"] * MAX_REPEATS + ["stopped"]
    # A log line was emitted (the dead upstream): the log capture is live, not empty.
    assert "upstream_failed" in run.structlog


def span_names(run: Run) -> set[str]:
    return {s.name for s in run.emitted.spans.get_finished_spans()}


def test_no_canary_anywhere(tmp_path: Path, caplog, capfd) -> None:
    run = run_everything(tmp_path, caplog, capfd, capture=False)
    assert_traffic_was_real(run)
    emitted = run.emitted
    spans = emitted.span_blobs()
    # Every kind of call produced its span and its record.
    assert {
        "execute_tool lookup_order",
        "execute_tool search",
        "execute_tool fail",
        "tools/call lookup_order",
        "chat gpt-canary",
        "chat claude-canary",
    } <= span_names(run)
    assert len(emitted.records) == len(spans) >= 30
    assert sum(len(p.read_text().splitlines()) for p in emitted.files) == len(emitted.records)

    leaks = {
        "spans": found("\n".join(spans)),
        "metrics": found(emitted.metric_blob()),
        "records": found("\n".join(emitted.record_blobs())),
        "structlog": found(run.structlog),
        "stdlib logging": found(run.stdlib),
        "stdout": found(run.out),
        "stderr": found(run.err),
    }
    assert leaks == {sink: set() for sink in leaks}
    # Content is off: no content attribute on any span.
    for span in emitted.spans.get_finished_spans():
        assert not any(
            k.startswith(("gen_ai.tool.call.", "gen_ai.input.")) for k in span.attributes
        )


def test_capture_on_puts_content_on_spans_redacted(tmp_path: Path, caplog, capfd) -> None:
    run = run_everything(tmp_path, caplog, capfd, capture=True)
    assert_traffic_was_real(run)
    emitted = run.emitted
    spans = emitted.spans.get_finished_spans()
    # Capture on: the plain argument is content and is on the spans (positive control:
    # the span search finds content when it is there) -- but no secret is.
    assert found("\n".join(emitted.span_blobs())) == {"plain"}
    # Content never leaves through records, metrics or logs, capture or not.
    others = "\n".join(
        [emitted.metric_blob(), *emitted.record_blobs(), run.structlog, run.stdlib, run.out]
    )
    assert found(others) == set()
    assert found(run.err) == set()

    arguments = [
        s.attributes["gen_ai.tool.call.arguments"]
        for s in spans
        if s.name == "execute_tool lookup_order" and "gen_ai.tool.call.arguments" in s.attributes
    ]
    # Proxy (served, stopped, malformed), middleware and in-process calls all captured.
    assert len(arguments) >= 3 * MAX_REPEATS
    for text in arguments:
        assert PLAIN in text
        assert "[EMAIL]" in text and "[API_KEY]" in text and "[BEARER]" in text
        assert "[ORDER:" in text
    results = [
        s.attributes["gen_ai.tool.call.result"]
        for s in spans
        if "gen_ai.tool.call.result" in s.attributes
    ]
    assert results and all("[REDACTED]" in r or "[API_KEY]" in r for r in results)
    mcp = [s for s in spans if s.name == "tools/call lookup_order"]
    assert any("gen_ai.tool.call.result" in s.attributes for s in mcp)
    assert all(PLAIN in s.attributes["gen_ai.tool.call.arguments"] for s in mcp)


def test_no_canary_on_the_otlp_wire(tmp_path: Path, caplog, capfd) -> None:
    with OtlpReceiver() as receiver:
        run = run_everything(tmp_path, caplog, capfd, capture=False, otlp=receiver)
        traces = list(receiver.trace_requests)
        metrics = list(receiver.metric_requests)
    assert_traffic_was_real(run)
    names = {s.name for s in receiver.spans()}
    assert {"execute_tool lookup_order", "tools/call lookup_order", "chat gpt-canary"} <= names
    assert traces and metrics
    wire = b"".join(m.SerializeToString() for m in [*traces, *metrics])
    decoded = "\n".join(MessageToJson(m) for m in [*traces, *metrics])
    assert found(wire) == set()
    assert found(decoded) == set()
    assert found(run.structlog + run.stdlib + run.out + run.err) == set()


# -- a guard bug, logged the way `loopguard serve` logs it -----------------------------------


class _Bug(ValueError):
    pass


def _raise(*_args: Any, **_kwargs: Any) -> Any:
    # A bug whose message quotes what it was working on, as real bugs do.
    raise _Bug(f"cannot handle {BLOB}")


@contextmanager
def structlog_defaults() -> Iterator[None]:
    """structlog as loopguard runs it (it never configures it): the default console
    renderer, whose exception formatter prints every frame's local variables."""
    old = structlog.get_config()
    structlog.reset_defaults()
    try:
        yield
    finally:
        structlog.configure(**old)


def test_a_guard_bug_is_logged_without_canaries(tmp_path: Path, capfd) -> None:
    emitted = Emitted(tmp_path, capture=False)
    seen = Seen()
    with structlog_defaults(), ExitStack() as stack:
        tools = stack.enter_context(run_server(tool_app(seen)))
        config = emitted.config(
            [
                {"prefix": "/parse", "upstream": tools, "adapter": "http-tool"},
                {"prefix": "/observe", "upstream": tools, "adapter": "http-tool"},
            ]
        )
        proxy_app = ProxyApp(config, engine=emitted.engine(config))
        proxy_app.adapters["/parse"].parse = _raise  # type: ignore[method-assign]
        proxy_app.adapters["/observe"].observer = _raise  # type: ignore[method-assign]
        proxy = stack.enter_context(run_server(proxy_app))
        mw_config = emitted.config(
            [{"prefix": "/tools", "upstream": "http://app", "adapter": "http-tool"}]
        )
        middleware = GuardMiddleware(tool_app(seen, "/tools"), engine=emitted.engine(mw_config))
        middleware.adapters["/tools"].parse = _raise  # type: ignore[method-assign]
        app = stack.enter_context(run_server(middleware))
        with httpx.Client(headers=HEADERS, timeout=30) as http:
            # The parse bug: the call is served unguarded; the observer bug: a 502.
            assert http.post(f"{proxy}/parse/lookup_order", json=ARGS).status_code == 200
            assert http.post(f"{proxy}/observe/lookup_order", json=ARGS).status_code == 502
            assert http.post(f"{app}/tools/lookup_order", json=ARGS).status_code == 200
    emitted.shutdown()
    out, err = capfd.readouterr()
    assert seen.canaries() == ALL
    # The bugs were logged (to stdout, structlog's default), naming where they happened...
    assert out.count("guard_error") >= 2 and "proxy_error" in out
    assert "_Bug" in out and "_raise" in out
    # ...and nothing of the request or of the exception's message.
    assert found(out) == set()
    assert found(err) == set()
    assert found("\n".join(emitted.record_blobs())) == set()


def test_a_tool_named_by_a_url_segment_is_scrubbed_before_it_leaves() -> None:
    from proxy_harness import ToolServer, guarded_proxy, proxy_config

    tools = ToolServer()
    with run_server(tools.app()) as upstream:
        config = proxy_config(upstream)
        with guarded_proxy(config) as (proxy, records):
            httpx.post(f"{proxy}/tools/{EMAIL}", json={}, headers={"x-loopguard-session": "s"})
    assert records and records[0]["tool"] == "[EMAIL]"
    assert EMAIL not in json.dumps(records)


def test_ids_model_names_app_values_and_websocket_upgrades_never_leave_raw(
    tmp_path: Path, capfd
) -> None:
    """Issue 12 row 6: the MCP session and JSON-RPC ids are pseudonymized, the model name
    and the app's decision headers go through the redactor (ordinary words pass as they
    are), and a WebSocket upgrade is not handled (so never logged with its query)."""
    from guard.doors.serve import client_limits

    async def app_decides(request: Request) -> Response:
        await request.body()
        return JSONResponse(
            {"id": "x", "choices": []},
            headers={
                "x-loopguard-app-contact": EMAIL,
                "x-loopguard-app-key": API_KEY,
                "x-loopguard-app-route": "abstain",
                "x-loopguard-app-unsafe-claim-served": "true",
                "x-loopguard-app-prompt-template": "summarize_v3",
                "x-loopguard-app-evidence-version": "2024-05-01",
            },
        )

    upstream_app = Starlette(routes=[Route("/{rest:path}", app_decides, methods=["GET", "POST"])])
    emitted = Emitted(tmp_path, capture=False)
    with ExitStack() as stack:
        upstream = stack.enter_context(run_server(upstream_app))
        config = emitted.config(
            [
                {"prefix": "/mcp", "upstream": upstream, "adapter": "mcp"},
                {"prefix": "/openai", "upstream": upstream, "adapter": "openai"},
                {"prefix": "/tools", "upstream": upstream, "adapter": "http-tool"},
            ]
        )
        app = ProxyApp(config, engine=emitted.engine(config))
        proxy = stack.enter_context(run_server(app, **client_limits(config)))
        with httpx.Client(base_url=proxy, timeout=30) as http:
            call, mcp_headers = mcp_call_with_canaries(API_KEY, EMAIL)
            assert http.post("/mcp", json=call, headers=mcp_headers).status_code == 200
            chat = {"model": f"gpt-4o-{API_KEY}", "messages": [{"role": "user", "content": "hi"}]}
            assert http.post("/openai/v1/chat/completions", json=chat).status_code == 200
            plain = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
            assert http.post("/openai/v1/chat/completions", json=plain).status_code == 200
            assert http.post("/tools/lookup", json={"q": 1}, headers=HEADERS).status_code == 200
            upgrade = {
                "connection": "Upgrade",
                "upgrade": "websocket",
                "sec-websocket-version": "13",
                "sec-websocket-key": "dGhlIHNhbXBsZQ==",
            }
            http.get(f"/tools/ws?token={API_KEY}&email={EMAIL}", headers=upgrade)
    emitted.shutdown()
    out, err = capfd.readouterr()
    spans = emitted.spans.get_finished_spans()
    assert any(s.attributes.get("mcp.session.id") for s in spans)  # there, pseudonymized
    assert any(s.attributes.get("jsonrpc.request.id") for s in spans)
    assert found("\n".join(emitted.span_blobs())) == set()
    assert found("\n".join(emitted.record_blobs())) == set()
    assert found(emitted.metric_blob()) == set()
    assert found(out) == set() and found(err) == set()
    # Ordinary words and names pass unchanged.
    models = {r["model"] for r in emitted.records if r.get("model")}
    assert "gpt-4o-mini" in models and any("[API_KEY]" in m for m in models)
    apps = [r["app"] for r in emitted.records if r.get("app")]
    assert apps and all(
        a["route"] == "abstain"
        and a["unsafe_claim_served"] == "true"
        and a["prompt_template"] == "summarize_v3"
        and a["evidence_version"] == "2024-05-01"
        and a["contact"] == "[EMAIL]"
        for a in apps
    )
