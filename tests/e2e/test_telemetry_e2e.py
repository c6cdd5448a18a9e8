"""Telemetry end to end: an agent -> the real proxy on uvicorn -> real upstreams, all on
loopback.

- the agent's ``traceparent`` is continued (loopguard's span is the child of the agent's
  span) and the upstream gets one naming loopguard's span as its parent: for an HTTP tool
  call, an MCP ``tools/call``, a streamed model call and a stopped call;
- OTLP for real: ``exporter = "otlp"`` to a receiver on loopback, spans there after the
  proxy's shutdown flush; with nothing listening, calls still succeed;
- the app's decision headers (``x-loopguard-app-*``) land on the span under ``app.`` and
  never reach the agent;
- metrics: duration, token usage and time to first chunk for a streamed call, with the
  convention's buckets; ``loopguard.stops`` by rule and tool on a stop.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fake_models import Behaviour, FakeModels, Reply
from mcp_servers import RawJsonRpcServer
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from otlp_receiver import OtlpReceiver
from servers import dead_port, run_server
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from guard.doors.proxy import ProxyApp
from guard.engine.config import Config
from guard.engine.core import Engine
from guard.telemetry import Telemetry

MAX_REPEATS = 3
MODEL = "gpt-e2e"
APP_HEADERS = {
    "x-loopguard-app-route": "refund_flow",
    "x-loopguard-app-failure-stage": "retrieval",
    "x-loopguard-app-evidence-version": "ev-7",
    "x-loopguard-app-prompt-template": "support-v3",
    "x-loopguard-app-unsafe-claim-served": "false",
}
# The GenAI metrics conventions' ExplicitBucketBoundaries (spelled out here, not taken
# from guard.telemetry, so a wrong bucket there cannot pass).
SECONDS_BUCKETS = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
TOKEN_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip


class Agent:
    """A fresh agent span per call: its trace id and span id, as a traceparent."""

    def __init__(self) -> None:
        self.trace_id = secrets.token_hex(16)
        self.span_id = secrets.token_hex(8)

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-01"


# -- upstreams --------------------------------------------------------------------------------


@dataclass
class Heard:
    """Request headers every upstream received, in order."""

    requests: list[dict[str, str]] = field(default_factory=list)

    def with_trace(self, trace_id: str) -> list[dict[str, str]]:
        return [h for h in self.requests if trace_id in h.get("traceparent", "")]


class Recording:
    """Pure ASGI wrapper noting each request's headers before the app sees it."""

    def __init__(self, app: Any, heard: Heard) -> None:
        self.app, self.heard = app, heard

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.heard.requests.append({k.decode(): v.decode() for k, v in scope["headers"]})
        await self.app(scope, receive, send)


def tool_app() -> Starlette:
    async def lookup(request: Request) -> Response:
        body = await request.json()
        return JSONResponse(
            {"order_id": body.get("order_id"), "status": "in transit"}, headers=APP_HEADERS
        )

    return Starlette(routes=[Route("/lookup_order", lookup, methods=["POST"])])


@dataclass
class Stack:
    proxy: str
    heard: Heard
    fake: FakeModels
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader
    records: list[dict[str, Any]]

    def span_of(self, agent: Agent) -> ReadableSpan:
        """loopguard's span in the agent's trace (waiting for it, off the request path)."""
        deadline = time.monotonic() + 5
        while True:
            found = [
                s
                for s in self.spans.get_finished_spans()
                if format(s.context.trace_id, "032x") == agent.trace_id
            ]
            if found or time.monotonic() > deadline:
                break
            time.sleep(0.005)
        assert len(found) == 1, [s.name for s in found]
        return found[0]

    def metrics(self) -> dict[str, Any]:
        data = self.reader.get_metrics_data()
        return {
            m.name: m
            for rm in (data.resource_metrics if data else ())
            for sm in rm.scope_metrics
            for m in sm.metrics
        }


def routes(tools: str, mcp: str, models: str) -> list[dict[str, Any]]:
    return [
        {"prefix": "/tools", "upstream": tools, "adapter": "http-tool"},
        {"prefix": "/mcp", "upstream": f"{mcp}/mcp", "adapter": "mcp"},
        {"prefix": "/openai", "upstream": models, "adapter": "openai"},
    ]


@contextlib.contextmanager
def upstreams() -> Iterator[tuple[Heard, FakeModels, list[dict[str, Any]]]]:
    heard, fake = Heard(), FakeModels()
    with (
        run_server(Recording(tool_app(), heard)) as tools,
        run_server(Recording(RawJsonRpcServer().app(), heard)) as mcp,
        run_server(Recording(fake.app(), heard)) as models,
    ):
        yield heard, fake, routes(tools, mcp, models)


@pytest.fixture(scope="module")
def running() -> Iterator[Stack]:
    with upstreams() as (heard, fake, route_list):
        config = Config.from_mapping(
            {
                "loop": {"max_repeats": MAX_REPEATS},
                "telemetry": {"records": ""},
                "routes": route_list,
            }
        )
        spans = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
        reader = InMemoryMetricReader()
        records: list[dict[str, Any]] = []
        telemetry = Telemetry(
            config.telemetry,
            config.redaction.policy_id,
            tracer_provider=tracer_provider,
            meter_provider=MeterProvider(metric_readers=[reader]),
            record_sink=records.append,
        )
        app = ProxyApp(config, engine=Engine(config, telemetry=telemetry))
        with run_server(app) as proxy:
            yield Stack(proxy, heard, fake, spans, reader, records)


@pytest.fixture
def stack(running: Stack) -> Stack:
    """The module's servers with spans, records and upstream requests cleared (metrics are
    cumulative: metric tests compare before and after)."""
    running.spans.clear()
    running.records.clear()
    running.heard.requests.clear()
    running.fake.reply, running.fake.behaviour = Reply(), Behaviour()
    return running


# -- the calls --------------------------------------------------------------------------------


def tool_call(proxy: str, agent: Agent, session: str = "e2e-tool") -> httpx.Response:
    return httpx.post(
        f"{proxy}/tools/lookup_order",
        json={"order_id": "FS-1001"},
        headers={"traceparent": agent.traceparent, "x-loopguard-session": session},
    )


def mcp_call(proxy: str, agent: Agent, n: int = 1, session: str = "e2e-mcp") -> httpx.Response:
    message = {
        "jsonrpc": "2.0",
        "id": n,
        "method": "tools/call",
        "params": {"name": "lookup_tracking", "arguments": {"order_id": "FS-1001"}},
    }
    return httpx.post(
        f"{proxy}/mcp",
        json=message,
        headers={
            "traceparent": agent.traceparent,
            "x-loopguard-session": session,
            "accept": "application/json, text/event-stream",
        },
    )


def streamed_chat(proxy: str, agent: Agent, model: str = MODEL) -> str:
    body = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "Where is my order?"}],
    }
    with httpx.stream(
        "POST",
        f"{proxy}/openai/v1/chat/completions",
        json=body,
        headers={"traceparent": agent.traceparent, "authorization": "Bearer sk-test"},
    ) as response:
        assert response.status_code == 200
        return response.read().decode()


def assert_continued(stack: Stack, agent: Agent, name: str, *, upstream: bool = True) -> Any:
    span = stack.span_of(agent)
    assert span.name == name
    assert span.kind is SpanKind.CLIENT
    assert span.parent is not None and span.parent.is_remote
    assert format(span.parent.span_id, "016x") == agent.span_id
    ours = format(span.context.span_id, "016x")
    heard = stack.heard.with_trace(agent.trace_id)
    if upstream:
        # The upstream got loopguard's span as its parent, not the agent's.
        (headers,) = heard
        assert headers["traceparent"] == f"00-{agent.trace_id}-{ours}-01"
    else:
        assert heard == []  # a stopped call never reaches the upstream
    return span.attributes


# -- (a) traceparent in, traceparent out ----------------------------------------------------------


def test_tool_call_continues_the_agents_trace(stack: Stack) -> None:
    agent = Agent()
    assert tool_call(stack.proxy, agent).status_code == 200
    a = assert_continued(stack, agent, "execute_tool lookup_order")
    assert a["gen_ai.operation.name"] == "execute_tool"
    assert a["gen_ai.tool.name"] == "lookup_order"
    assert a["loopguard.route"] == "serve" and a["loopguard.failure.stage"] == "passed"


def test_mcp_call_continues_the_agents_trace(stack: Stack) -> None:
    agent = Agent()
    response = mcp_call(stack.proxy, agent, n=7)
    assert response.status_code == 200
    assert response.json()["result"]["isError"] is False
    a = assert_continued(stack, agent, "tools/call lookup_tracking")
    assert a["mcp.method.name"] == "tools/call"
    # The JSON-RPC id leaves as a keyed pseudonym (issue 12: ids can carry content).
    assert a["jsonrpc.request.id"].startswith("rpc_") and a["jsonrpc.request.id"] != "7"
    assert a["gen_ai.tool.name"] == "lookup_tracking"


def test_streamed_model_call_continues_the_agents_trace(stack: Stack) -> None:
    stack.fake.behaviour = Behaviour(chunks=4)
    agent = Agent()
    text = streamed_chat(stack.proxy, agent)
    assert "data: [DONE]" in text
    a = assert_continued(stack, agent, f"chat {MODEL}")
    assert a["gen_ai.request.model"] == MODEL and a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.stream"] is True
    assert type(a["gen_ai.response.time_to_first_chunk"]) is float


def test_stopped_call_continues_the_agents_trace(stack: Stack) -> None:
    for _ in range(MAX_REPEATS):
        assert tool_call(stack.proxy, Agent(), session="e2e-stop").status_code == 200
    agent = Agent()
    stopped = tool_call(stack.proxy, agent, session="e2e-stop")
    assert stopped.status_code == 422
    assert stopped.headers["x-loopguard-route"] == "stop_and_review"
    a = assert_continued(stack, agent, "execute_tool lookup_order", upstream=False)
    assert a["loopguard.route"] == "stop_and_review"
    assert a["loopguard.failure.stage"] == "loop_guard"
    assert a["loopguard.stall.rule"] == "stalled_repeat"


def test_a_call_without_traceparent_starts_a_trace_the_upstream_continues(stack: Stack) -> None:
    response = httpx.post(f"{stack.proxy}/tools/lookup_order", json={"order_id": "X"})
    assert response.status_code == 200
    (span,) = stack.spans.get_finished_spans()
    assert span.parent is None
    (headers,) = stack.heard.requests
    trace_id, span_id = format(span.context.trace_id, "032x"), format(span.context.span_id, "016x")
    version, sent_trace, parent, flags = headers["traceparent"].split("-")
    assert (version, sent_trace, parent) == ("00", trace_id, span_id)
    assert int(flags, 16) & 1  # sampled


# -- (b) OTLP for real ------------------------------------------------------------------------


def otlp_config(endpoint: str, route_list: list[dict[str, Any]]) -> Config:
    return Config.from_mapping(
        {
            "telemetry": {"exporter": "otlp", "otlp_endpoint": endpoint, "records": ""},
            "routes": route_list,
        }
    )


def test_spans_reach_an_otlp_receiver_through_the_proxy() -> None:
    tool_agent, chat_agent = Agent(), Agent()
    with OtlpReceiver() as receiver, upstreams() as (_, _, route_list):
        # The production path: the engine builds its telemetry from the config.
        with run_server(ProxyApp(otlp_config(receiver.traces_url, route_list))) as proxy:
            assert tool_call(proxy, tool_agent).status_code == 200
            streamed_chat(proxy, chat_agent)
        # The server is down: its lifespan shutdown flushed both signals.
        spans = {s.trace_id: s for s in receiver.spans()}
        metric_names = receiver.metric_names()
    tool, chat = spans[tool_agent.trace_id], spans[chat_agent.trace_id]
    assert tool.name == "execute_tool lookup_order" and tool.parent_span_id == tool_agent.span_id
    assert chat.name == f"chat {MODEL}" and chat.parent_span_id == chat_agent.span_id
    for span in (tool, chat):
        assert span.kind == PbSpan.SPAN_KIND_CLIENT
        assert span.scope_name == "loopguard"
        assert span.resource["service.name"]
    assert chat.attributes["gen_ai.request.stream"] is True
    assert isinstance(chat.attributes["gen_ai.usage.output_tokens"], int)
    assert tool.attributes["app.route"] == "refund_flow"
    assert {
        "gen_ai.client.operation.duration",
        "gen_ai.client.token.usage",
        "gen_ai.client.operation.time_to_first_chunk",
    } <= metric_names


def test_calls_succeed_with_the_otlp_receiver_down(monkeypatch: pytest.MonkeyPatch) -> None:
    # A short export timeout keeps the (bounded) shutdown attempts short for the suite.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "0.5")
    dead = f"http://127.0.0.1:{dead_port()}/v1/traces"  # nothing listens there
    with upstreams() as (heard, _, route_list):
        with run_server(ProxyApp(otlp_config(dead, route_list))) as proxy:
            for n in range(5):
                assert tool_call(proxy, Agent(), session=f"down-{n}").status_code == 200
            assert "data: [DONE]" in streamed_chat(proxy, Agent())
            assert mcp_call(proxy, Agent()).status_code == 200
        # Every call reached its upstream, with loopguard's trace context.
        assert len(heard.requests) == 7
        assert all("traceparent" in h for h in heard.requests)


# -- (c) the app's decision headers ----------------------------------------------------------


def test_app_decision_headers_go_on_the_span_and_not_to_the_agent(stack: Stack) -> None:
    agent = Agent()
    response = tool_call(stack.proxy, agent)
    assert response.status_code == 200
    assert not [name for name in response.headers if name.lower().startswith("x-loopguard-app")]
    assert response.headers["x-loopguard-route"] == "serve"
    assert response.json() == {"order_id": "FS-1001", "status": "in transit"}
    a = stack.span_of(agent).attributes
    assert a["app.route"] == "refund_flow"
    assert a["app.failure_stage"] == "retrieval"
    assert a["app.evidence_version"] == "ev-7"
    assert a["app.prompt_template"] == "support-v3"
    assert a["app.unsafe_claim_served"] == "false"
    # loopguard's own attributes are not overwritten by the app's.
    assert a["loopguard.route"] == "serve" and a["loopguard.failure.stage"] == "passed"
    (record,) = stack.records
    assert record["app"] == {
        "route": "refund_flow",
        "failure_stage": "retrieval",
        "evidence_version": "ev-7",
        "prompt_template": "support-v3",
        "unsafe_claim_served": "false",
    }


# -- (d) metrics ------------------------------------------------------------------------------


def points(stack: Stack, name: str, **attrs: Any) -> list[Any]:
    """The data points of a metric whose attributes include ``attrs``."""
    metric = stack.metrics().get(name)
    if metric is None:
        return []
    return [
        p
        for p in metric.data.data_points
        if all(p.attributes.get(k) == v for k, v in attrs.items())
    ]


def test_streamed_call_metrics_with_semconv_buckets(stack: Stack) -> None:
    model = "gpt-metrics"  # metrics are cumulative over the module: this call's own points
    stack.fake.behaviour = Behaviour(chunks=4, first_delay=0.02)
    stack.fake.reply = Reply(text="In transit, arriving Friday.")
    streamed_chat(stack.proxy, Agent(), model=model)
    expected = {
        "gen_ai.client.operation.duration": SECONDS_BUCKETS,
        "gen_ai.client.token.usage": TOKEN_BUCKETS,
        "gen_ai.client.operation.time_to_first_chunk": SECONDS_BUCKETS,
    }
    for name, buckets in expected.items():
        found = points(stack, name, **{"gen_ai.request.model": model})
        assert found, name
        for point in found:
            assert tuple(point.explicit_bounds) == buckets, name
            assert point.attributes["gen_ai.operation.name"] == "chat"
            assert point.attributes["gen_ai.provider.name"] == "openai"
            assert point.attributes["server.address"] == "127.0.0.1"
            assert type(point.attributes["server.port"]) is int
    metrics = stack.metrics()
    assert metrics["gen_ai.client.operation.duration"].unit == "s"
    assert metrics["gen_ai.client.operation.time_to_first_chunk"].unit == "s"
    assert metrics["gen_ai.client.token.usage"].unit == "{token}"
    only = {"gen_ai.request.model": model}
    (duration,) = points(stack, "gen_ai.client.operation.duration", **only)
    (ttfc,) = points(stack, "gen_ai.client.operation.time_to_first_chunk", **only)
    assert duration.count == ttfc.count == 1
    assert 0 < ttfc.sum <= duration.sum
    tokens = {
        p.attributes["gen_ai.token.type"]: p
        for p in points(stack, "gen_ai.client.token.usage", **only)
    }
    assert set(tokens) == {"input", "output"}
    assert tokens["input"].sum == 50 and tokens["output"].sum == 4  # what the fake reported
    assert not points(stack, "loopguard.stops", **{"gen_ai.tool.name": model})


def stop_counts(stack: Stack) -> dict[tuple[str, str, str], int]:
    return {
        (
            p.attributes["loopguard.stall.rule"],
            p.attributes["loopguard.route"],
            p.attributes["gen_ai.tool.name"],
        ): p.value
        for p in points(stack, "loopguard.stops")
    }


def tool_durations(stack: Stack) -> int:
    return sum(
        p.count
        for p in points(
            stack, "gen_ai.client.operation.duration", **{"gen_ai.operation.name": "execute_tool"}
        )
    )


def test_stops_are_counted_by_rule_and_tool(stack: Stack) -> None:
    before, durations_before = stop_counts(stack), tool_durations(stack)
    for _ in range(MAX_REPEATS + 2):
        tool_call(stack.proxy, Agent(), session="count-stops")
    for n in range(MAX_REPEATS + 1):
        response = mcp_call(stack.proxy, Agent(), n=n, session="count-mcp")
    assert response.json()["result"]["isError"] is True
    after = stop_counts(stack)
    added = {key: after[key] - before.get(key, 0) for key in after}
    assert {k: v for k, v in added.items() if v} == {
        ("stalled_repeat", "stop_and_review", "lookup_order"): 2,  # two stopped HTTP calls
        ("stalled_repeat", "stop_and_review", "lookup_tracking"): 1,
    }
    # Stops never ran: no duration for them (3 served HTTP calls + 3 served MCP calls).
    assert tool_durations(stack) - durations_before == 2 * MAX_REPEATS
    assert [r["route"] for r in stack.records].count("stop_and_review") == 3
