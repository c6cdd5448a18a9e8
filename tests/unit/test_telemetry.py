"""Telemetry at its own level: CallRecords in, spans / metrics / records out.

The SDK's in-memory exporter and reader stand in for a backend; the OTLP wire
is tested in test_otlp_export.py. End-to-end telemetry through the proxy lives
with the proxy tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
import structlog
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.semconv._incubating.attributes import (
    error_attributes,
    gen_ai_attributes,
    jsonrpc_attributes,
    mcp_attributes,
    server_attributes,
)
from opentelemetry.semconv._incubating.metrics import gen_ai_metrics
from opentelemetry.semconv.attributes import http_attributes
from opentelemetry.semconv.schemas import Schemas
from opentelemetry.trace import SpanKind, StatusCode

from guard.engine.calls import CallRecord, FailureStage, Route, StallRule, Usage
from guard.engine.config import TelemetryConfig
from guard.engine.pseudonym import keyed_session_hasher
from guard.telemetry import Telemetry
from guard.telemetry import semconv as tm
from guard.telemetry.exporters import otlp_endpoints
from guard.telemetry.records import RECORD_FIELDS

AGENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
AGENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{AGENT_TRACE}-{AGENT_SPAN}-01"

EXPECTED_BUCKETS = {
    "gen_ai.client.operation.duration": (
        0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
    ),
    "gen_ai.client.token.usage": (
        1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216,
        67108864,
    ),
    "gen_ai.client.operation.time_to_first_chunk": (
        0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
    ),
    "gen_ai.client.operation.time_per_output_chunk": (
        0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
    ),
}  # fmt: skip


@dataclass
class Harness:
    telemetry: Telemetry
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader
    records: list[dict[str, Any]]

    def run(self, record: CallRecord, headers: dict[str, str] | None = None, **kw: Any):
        call = self.telemetry.start(record.span_name, headers or {"traceparent": TRACEPARENT})
        upstream: dict[str, str] = {}
        call.inject(upstream)
        self.telemetry.finish(call, record, **kw)
        return call, upstream

    def span(self, name: str) -> ReadableSpan:
        found = [s for s in self.spans.get_finished_spans() if s.name == name]
        assert len(found) == 1, [s.name for s in self.spans.get_finished_spans()]
        return found[0]

    def metrics(self) -> dict[str, Any]:
        data = self.reader.get_metrics_data()
        out: dict[str, Any] = {}
        if data is None:
            return out
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    out[metric.name] = metric
        return out


def make_harness(**cfg: Any) -> Harness:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    records: list[dict[str, Any]] = []
    telemetry = Telemetry(
        TelemetryConfig(**{"records": "", **cfg}),
        "default-v1",
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        record_sink=records.append,
    )
    return Harness(telemetry, exporter, reader, records)


@pytest.fixture
def harness():
    h = make_harness()
    yield h
    h.telemetry.shutdown()


# -- records of each kind -----------------------------------------------------------------


def tool_record() -> CallRecord:
    return CallRecord(
        operation="execute_tool",
        span_name="execute_tool lookup_order",
        tool="lookup_order",
        server_address="tools.internal",
        server_port=8080,
        session="agent-session-1",
        session_tracked=True,
        params_hash="3f2a" * 8,
        progress_marker="9c1d" * 4,
        repeat_count=1,
        status_code=200,
        total_s=0.05,
    )


def mcp_record() -> CallRecord:
    return CallRecord(
        operation="mcp",
        span_name="tools/call search_docs",
        tool="search_docs",
        mcp_method="tools/call",
        mcp_session_id="mcp-sess-42",
        jsonrpc_request_id="7",
        server_address="127.0.0.1",
        server_port=9000,
        session="mcp-sess-42",
        session_tracked=True,
        params_hash="ab" * 16,
        progress_marker="cd" * 8,
        repeat_count=2,
        status_code=200,
        total_s=0.12,
    )


def streamed_chat_record() -> CallRecord:
    return CallRecord(
        operation="chat",
        span_name="chat gpt-4o",
        provider="openai",
        model="gpt-4o",
        response_model="gpt-4o-2024-08-06",
        response_id="chatcmpl-123",
        finish_reasons=("tool_calls",),
        server_address="api.openai.com",
        server_port=443,
        session="agent-session-1",
        session_tracked=True,
        conversation_id="conv-1",
        stream=True,
        ttft_s=0.25,
        total_s=1.25,
        output_tps=49.0,
        output_chunks=11,
        usage=Usage(input_tokens=120, output_tokens=50, cached_input_tokens=64, source="response"),
        status_code=200,
    )


def stopped_record() -> CallRecord:
    return CallRecord(
        operation="execute_tool",
        span_name="execute_tool lookup_order",
        tool="lookup_order",
        route=Route.STOP_AND_REVIEW,
        failure_stage=FailureStage.LOOP_GUARD,
        session="agent-session-1",
        session_tracked=True,
        params_hash="3f2a" * 8,
        progress_marker="9c1d" * 4,
        repeat_count=3,
        stall_rule=StallRule.STALLED_REPEAT,
        status_code=422,
        total_s=0.001,
    )


def all_records() -> list[CallRecord]:
    return [tool_record(), mcp_record(), streamed_chat_record(), stopped_record()]


# -- spans --------------------------------------------------------------------------------


def assert_child_of_agent(span: ReadableSpan, upstream: dict[str, str]) -> None:
    assert span.kind is SpanKind.CLIENT
    assert format(span.context.trace_id, "032x") == AGENT_TRACE
    assert span.parent is not None and format(span.parent.span_id, "016x") == AGENT_SPAN
    # The upstream request names loopguard's span as its parent.
    version, trace_id, parent_id, flags = upstream["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", AGENT_TRACE, "01")
    assert parent_id == format(span.context.span_id, "016x") != AGENT_SPAN


def test_tool_call_span(harness: Harness) -> None:
    _, upstream = harness.run(tool_record())
    span = harness.span("execute_tool lookup_order")
    assert_child_of_agent(span, upstream)
    a = span.attributes
    assert a["gen_ai.operation.name"] == "execute_tool"
    assert a["gen_ai.tool.name"] == "lookup_order"
    assert a["server.address"] == "tools.internal"
    assert type(a["server.port"]) is int and a["server.port"] == 8080
    assert a["loopguard.route"] == "serve"
    assert a["loopguard.failure.stage"] == "passed"
    assert a["loopguard.params.hash"] == "3f2a" * 8
    assert a["loopguard.progress.marker"] == "9c1d" * 4
    assert type(a["loopguard.repeat.count"]) is int and a["loopguard.repeat.count"] == 1
    assert a["loopguard.scrub.policy"] == "default-v1"
    assert a["loopguard.session.tracked"] is True
    assert type(a["http.response.status_code"]) is int and a["http.response.status_code"] == 200
    # Not a model call: nothing model-shaped, and no session id on the span.
    assert "gen_ai.provider.name" not in a and "gen_ai.request.model" not in a
    assert "error.type" not in a
    assert not any("agent-session-1" in str(v) for v in a.values())
    assert span.status.status_code is StatusCode.UNSET
    assert span.instrumentation_scope.schema_url == Schemas.V1_41_1.value == tm.SCHEMA_URL


def test_mcp_call_span(harness: Harness) -> None:
    _, upstream = harness.run(mcp_record())
    span = harness.span("tools/call search_docs")
    assert_child_of_agent(span, upstream)
    a = span.attributes
    assert a["gen_ai.operation.name"] == "execute_tool"
    assert a["gen_ai.tool.name"] == "search_docs"
    assert a["mcp.method.name"] == "tools/call"
    assert a["mcp.session.id"] == "mcp-sess-42"
    assert a["jsonrpc.request.id"] == "7" and isinstance(a["jsonrpc.request.id"], str)
    assert type(a["loopguard.repeat.count"]) is int


def test_mcp_method_other_than_tools_call_is_not_a_gen_ai_operation(harness: Harness) -> None:
    record = CallRecord(operation="mcp", span_name="tools/list", mcp_method="tools/list")
    harness.run(record)
    a = harness.span("tools/list").attributes
    assert a["mcp.method.name"] == "tools/list"
    assert "gen_ai.operation.name" not in a
    assert "gen_ai.client.operation.duration" not in harness.metrics()


def test_streamed_model_call_span(harness: Harness) -> None:
    _, upstream = harness.run(streamed_chat_record())
    span = harness.span("chat gpt-4o")
    assert_child_of_agent(span, upstream)
    a = span.attributes
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-4o"
    assert a["gen_ai.response.model"] == "gpt-4o-2024-08-06"
    assert a["gen_ai.response.id"] == "chatcmpl-123"
    reasons = a["gen_ai.response.finish_reasons"]
    assert isinstance(reasons, tuple | list) and list(reasons) == ["tool_calls"]
    assert all(isinstance(r, str) for r in reasons)
    for key, value in (
        ("gen_ai.usage.input_tokens", 120),
        ("gen_ai.usage.output_tokens", 50),
        ("gen_ai.usage.cache_read.input_tokens", 64),
    ):
        assert type(a[key]) is int and a[key] == value
    assert a["gen_ai.request.stream"] is True
    ttft = a["gen_ai.response.time_to_first_chunk"]
    assert type(ttft) is float and ttft == pytest.approx(0.25)
    assert type(a["loopguard.output.throughput"]) is float
    assert a["loopguard.usage.source"] == "response"
    assert a["gen_ai.conversation.id"] == "conv-1"
    assert "loopguard.timing.malformed" not in a
    assert span.status.status_code is StatusCode.UNSET


def test_stopped_call_span_is_not_an_error(harness: Harness) -> None:
    _, upstream = harness.run(stopped_record())
    span = harness.span("execute_tool lookup_order")
    assert_child_of_agent(span, upstream)
    a = span.attributes
    assert a["loopguard.route"] == "stop_and_review"
    assert a["loopguard.failure.stage"] == "loop_guard"
    assert a["loopguard.stall.rule"] == "stalled_repeat"
    assert a["loopguard.repeat.count"] == 3
    assert "error.type" not in a
    assert span.status.status_code is StatusCode.UNSET


def test_failed_call_is_an_error_with_error_type(harness: Harness) -> None:
    record = streamed_chat_record()
    record.failure_stage = FailureStage.UPSTREAM_TIMEOUT
    harness.run(record)
    span = harness.span("chat gpt-4o")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "upstream_timeout"
    record = tool_record()
    record.failure_stage, record.error_type = FailureStage.UPSTREAM_STATUS, "503"
    harness.run(record)
    assert harness.span("execute_tool lookup_order").attributes["error.type"] == "503"
    points = harness.metrics()["gen_ai.client.operation.duration"].data.data_points
    assert {p.attributes.get("error.type") for p in points} == {"upstream_timeout", "503"}


def test_timing_malformed_is_flagged(harness: Harness) -> None:
    record = streamed_chat_record()
    record.timing_malformed, record.output_tps, record.total_s = True, None, 0.2
    harness.run(record)
    a = harness.span("chat gpt-4o").attributes
    assert a["loopguard.timing.malformed"] is True
    assert "loopguard.output.throughput" not in a
    # A malformed stream gives no per-chunk figure.
    assert "gen_ai.client.operation.time_per_output_chunk" not in harness.metrics()


def test_app_decision_fields_under_namespace() -> None:
    h = make_harness(app_namespace="shop.")
    record = tool_record()
    record.app = {"route": "refund_flow", "evidence_version": "v7", "unsafe-claim-served": "false"}
    h.run(record)
    a = h.span("execute_tool lookup_order").attributes
    assert a["shop.route"] == "refund_flow"
    assert a["shop.evidence_version"] == "v7"
    assert a["shop.unsafe_claim_served"] == "false"
    assert h.records[0]["app"] == record.app
    h.telemetry.shutdown()


def test_span_name_taken_from_record(harness: Harness) -> None:
    call = harness.telemetry.start("loopguard", {})
    harness.telemetry.finish(call, tool_record())
    harness.span("execute_tool lookup_order")


def test_without_incoming_traceparent_a_new_trace_starts(harness: Harness) -> None:
    call, upstream = harness.run(tool_record(), headers={"authorization": "Bearer x"})
    span = harness.span("execute_tool lookup_order")
    assert span.parent is None
    assert upstream["traceparent"].split("-")[1] == call.trace_id != AGENT_TRACE


def test_tracestate_is_continued(harness: Harness) -> None:
    headers = {"Traceparent": TRACEPARENT, "Tracestate": "vendor=abc"}
    _, upstream = harness.run(tool_record(), headers=headers)
    assert upstream["tracestate"] == "vendor=abc"
    assert upstream["traceparent"].split("-")[1] == AGENT_TRACE


def test_finish_twice_ends_once(harness: Harness) -> None:
    call = harness.telemetry.start("execute_tool lookup_order", {})
    harness.telemetry.finish(call, tool_record())
    harness.telemetry.finish(call, tool_record())
    assert len(harness.spans.get_finished_spans()) == 1
    assert len(harness.records) == 1


# -- content capture ----------------------------------------------------------------------


def captured() -> dict[str, str]:
    return {
        "gen_ai.input.messages": '[{"role":"user","parts":[{"type":"text","content":"[email]"}]}]',
        "gen_ai.tool.call.arguments": '{"order_id":"tok_1"}',
        "gen_ai.tool.call.result": '{"status":"shipped"}',
        "raw_body": "must never appear",
    }


def test_capture_off_keeps_content_off_spans(harness: Harness) -> None:
    record = streamed_chat_record()
    record.captured = captured()
    harness.run(record)
    a = harness.span("chat gpt-4o").attributes
    for key in (*captured(), *tm.CAPTURE_ATTRIBUTES):
        assert key not in a
    assert not any("shipped" in str(v) or "tok_1" in str(v) for v in a.values())
    assert not any("shipped" in json.dumps(r) for r in harness.records)


def test_capture_on_puts_redacted_content_on_span_only() -> None:
    h = make_harness(capture_content=True)
    record = tool_record()
    record.captured = captured()
    h.run(record)
    a = h.span("execute_tool lookup_order").attributes
    assert a["gen_ai.input.messages"] == captured()["gen_ai.input.messages"]
    assert a["gen_ai.tool.call.arguments"] == '{"order_id":"tok_1"}'
    assert a["gen_ai.tool.call.result"] == '{"status":"shipped"}'
    assert "raw_body" not in a  # only the convention's content attributes
    # Records never carry content, capture or not.
    assert not any("shipped" in json.dumps(r) for r in h.records)
    h.telemetry.shutdown()


# -- metrics ------------------------------------------------------------------------------


def test_metrics_for_each_kind_with_semconv_buckets(harness: Harness) -> None:
    for record in all_records():
        harness.run(record)
    metrics = harness.metrics()
    for name, buckets in EXPECTED_BUCKETS.items():
        assert name in metrics, name
        for point in metrics[name].data.data_points:
            assert tuple(point.explicit_bounds) == buckets, name

    assert metrics["gen_ai.client.operation.duration"].unit == "s"
    assert metrics["gen_ai.client.token.usage"].unit == "{token}"
    duration = metrics["gen_ai.client.operation.duration"].data.data_points
    by_op: dict[str, int] = {}
    for p in duration:
        op = p.attributes["gen_ai.operation.name"]
        by_op[op] = by_op.get(op, 0) + p.count
    # tool + MCP (execute_tool), chat; the stopped call never ran and is not a duration.
    assert by_op == {"execute_tool": 2, "chat": 1}

    tokens = {
        p.attributes["gen_ai.token.type"]: p
        for p in metrics["gen_ai.client.token.usage"].data.data_points
    }
    assert tokens["input"].sum == 120 and tokens["output"].sum == 50
    assert tokens["input"].attributes["gen_ai.provider.name"] == "openai"
    assert tokens["input"].attributes["gen_ai.request.model"] == "gpt-4o"

    (ttfc,) = metrics["gen_ai.client.operation.time_to_first_chunk"].data.data_points
    assert ttfc.count == 1 and ttfc.sum == pytest.approx(0.25)
    (per_chunk,) = metrics["gen_ai.client.operation.time_per_output_chunk"].data.data_points
    # 11 output chunks -> 10 gaps covering total - ttft.
    assert per_chunk.count == 10 and per_chunk.sum == pytest.approx(1.0)

    (stops,) = metrics["loopguard.stops"].data.data_points
    assert stops.value == 1
    assert dict(stops.attributes) == {
        "loopguard.stall.rule": "stalled_repeat",
        "loopguard.route": "stop_and_review",
        "gen_ai.tool.name": "lookup_order",
    }


def test_chunk_gaps_when_given_are_recorded_each(harness: Harness) -> None:
    harness.run(streamed_chat_record(), chunk_gaps=[0.01, 0.5, 3.0])
    (point,) = harness.metrics()["gen_ai.client.operation.time_per_output_chunk"].data.data_points
    assert point.count == 3 and point.sum == pytest.approx(3.51)


def test_non_streamed_call_has_no_chunk_metrics(harness: Harness) -> None:
    record = streamed_chat_record()
    record.stream, record.ttft_s = False, None
    harness.run(record)
    metrics = harness.metrics()
    assert "gen_ai.client.operation.time_to_first_chunk" not in metrics
    assert "gen_ai.client.operation.time_per_output_chunk" not in metrics
    assert "gen_ai.client.operation.duration" in metrics


def test_absent_usage_is_not_a_token_metric(harness: Harness) -> None:
    record = streamed_chat_record()
    record.usage = Usage(source="absent")
    harness.run(record)
    assert "gen_ai.client.token.usage" not in harness.metrics()
    assert harness.span("chat gpt-4o").attributes["loopguard.usage.source"] == "absent"


METRIC_ATTRIBUTE_KEYS = {
    "gen_ai.operation.name",
    "gen_ai.provider.name",
    "gen_ai.request.model",
    "gen_ai.token.type",
    "gen_ai.tool.name",
    "error.type",
    "server.address",
    "server.port",
    "loopguard.stall.rule",
    "loopguard.route",
}


def test_metric_attributes_are_low_cardinality(harness: Harness) -> None:
    for record in all_records():
        harness.run(record)
    for metric in harness.metrics().values():
        for point in metric.data.data_points:
            assert set(point.attributes) <= METRIC_ATTRIBUTE_KEYS, metric.name
            values = " ".join(str(v) for v in point.attributes.values())
            assert "session" not in values and "3f2a" not in values


# -- names against the conventions ----------------------------------------------------------


def _constants(module: Any, prefix: str) -> set[str]:
    return {
        value
        for name, value in vars(module).items()
        if name.isupper() and isinstance(value, str) and value.startswith(prefix)
    }


def test_every_emitted_convention_name_exists_in_semconv() -> None:
    gen_ai = _constants(gen_ai_attributes, "gen_ai.")
    gen_ai_metric_names = _constants(gen_ai_metrics, "gen_ai.")
    known = {
        "gen_ai.": gen_ai,
        "mcp.": _constants(mcp_attributes, "mcp."),
        "jsonrpc.": _constants(jsonrpc_attributes, "jsonrpc."),
        "server.": _constants(server_attributes, "server."),
        "error.": _constants(error_attributes, "error."),
        "http.": _constants(http_attributes, "http."),
    }
    assert "gen_ai.usage.cache_read.input_tokens" in gen_ai  # the constant's actual value
    h = make_harness(capture_content=True, app_namespace="app.")
    for record in [*all_records(), stopped_record()]:
        record.captured = captured()
        record.app = {"route": "x"}
        h.run(record)
    failed = streamed_chat_record()
    failed.failure_stage = FailureStage.STREAM
    h.run(failed)

    emitted: set[str] = set()
    for span in h.spans.get_finished_spans():
        emitted |= set(span.attributes)
    metrics = h.metrics()
    for metric in metrics.values():
        for point in metric.data.data_points:
            emitted |= set(point.attributes)

    own = {v for k, v in vars(tm).items() if k.startswith("LG_")}
    for key in emitted:
        prefix = next((p for p in known if key.startswith(p)), None)
        if prefix is not None:
            assert key in known[prefix], f"{key} is not a semconv {prefix}* name"
        elif key.startswith("loopguard."):
            assert key in own, key
        else:
            assert key.startswith("app."), key
    # Metric names: every gen_ai.* one is a semconv metric name.
    for name in metrics:
        assert name in gen_ai_metric_names or name == "loopguard.stops", name
    # Operation values are well-known values.
    values = {m.value for m in gen_ai_attributes.GenAiOperationNameValues}
    assert {tm.OP_CHAT, tm.OP_EXECUTE_TOOL} <= values
    h.telemetry.shutdown()


# -- durable records ------------------------------------------------------------------------


def test_records_are_json_lines_without_content(tmp_path) -> None:
    path = tmp_path / "sub" / "records.jsonl"
    h = make_harness(records=str(path), capture_content=True)
    calls = []
    for record in all_records():
        record.captured = captured()
        calls.append(h.run(record)[0])
    h.telemetry.shutdown()

    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4
    rows = [json.loads(line) for line in lines]
    assert rows == h.records  # the sink sees exactly what is written
    for row, call in zip(rows, calls, strict=True):
        assert list(row) == list(RECORD_FIELDS)
        assert row["trace_id"] == call.trace_id == AGENT_TRACE
        assert row["span_id"] == call.span_id
        assert row["request_id"] == call.request_id and len(row["request_id"]) == 32
        assert row["scrub_policy"] == "default-v1"
        assert row["ts"].endswith("Z")
        text = json.dumps(row)
        for content in ("shipped", "tok_1", "[email]", "must never appear"):
            assert content not in text
    assert len({r["request_id"] for r in rows}) == 4

    tool, mcp, chat, stop = rows
    assert tool["tool"] == "lookup_order" and tool["operation"] == "execute_tool"
    assert tool["params_hash"] == "3f2a" * 8 and tool["progress_marker"] == "9c1d" * 4
    assert tool["total_ms"] == 50.0 and tool["status_code"] == 200
    assert mcp["mcp_method"] == "tools/call" and mcp["tool"] == "search_docs"
    assert chat["model"] == "gpt-4o" and chat["provider"] == "openai"
    assert (chat["input_tokens"], chat["output_tokens"], chat["cached_input_tokens"]) == (
        120,
        50,
        64,
    )
    assert chat["usage_source"] == "response"
    assert chat["ttft_ms"] == 250.0 and chat["total_ms"] == 1250.0 and chat["output_tps"] == 49.0
    assert chat["finish_reasons"] == ["tool_calls"]
    assert stop["route"] == "stop_and_review" and stop["failure_stage"] == "loop_guard"
    assert stop["stall_rule"] == "stalled_repeat" and stop["repeat_count"] == 3

    # Sessions are pseudonyms: stable within a run, distinct across sessions, never raw.
    assert "agent-session-1" not in path.read_text(encoding="utf-8")
    assert tool["session"] == chat["session"] == stop["session"] != mcp["session"]
    assert tool["session"].startswith("s_")


def test_records_append_and_stdout(tmp_path, capsys) -> None:
    path = tmp_path / "records.jsonl"
    for _ in range(2):
        h = make_harness(records=str(path))
        h.run(tool_record())
        h.telemetry.shutdown()
    assert len(path.read_text().splitlines()) == 2

    h = make_harness(records="-")
    h.run(tool_record())
    h.telemetry.shutdown()
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["tool"] == "lookup_order"


def test_no_record_file_is_created_before_a_call(tmp_path) -> None:
    path = tmp_path / "records.jsonl"
    h = make_harness(records=str(path))
    h.telemetry.shutdown()
    assert not path.exists()


def test_session_hasher_is_keyed() -> None:
    a, b = keyed_session_hasher(b"k1"), keyed_session_hasher(b"k2")
    assert a("agent-session-1") == a("agent-session-1") != b("agent-session-1")
    assert a("agent-session-1") != a("agent-session-2")
    assert "agent-session" not in a("agent-session-1")
    # Default: a random key per hasher, so pseudonyms do not match across processes.
    assert keyed_session_hasher()("x") != keyed_session_hasher()("x")


def test_custom_session_hasher_is_used() -> None:
    records: list[dict[str, Any]] = []
    tel = Telemetry(
        TelemetryConfig(records=""),
        "p-v2",
        tracer_provider=TracerProvider(),
        meter_provider=MeterProvider(),
        record_sink=records.append,
        session_hasher=lambda s: "pseudo",
    )
    tel.finish(tel.start("x", {}), tool_record())
    assert records[0]["session"] == "pseudo"
    tel.shutdown()


def test_a_broken_sink_does_not_fail_the_call(harness: Harness) -> None:
    def boom(_: dict[str, Any]) -> None:
        raise OSError("disk full")

    tel = Telemetry(
        TelemetryConfig(records=""),
        "default-v1",
        tracer_provider=harness.telemetry.tracer_provider,
        meter_provider=harness.telemetry.meter_provider,
        record_sink=boom,
    )
    with structlog.testing.capture_logs() as logs:
        tel.finish(tel.start("x", {}), tool_record())
    assert harness.span("execute_tool lookup_order").end_time is not None
    (failure,) = [e for e in logs if e["event"] == "durable record failed"]
    assert failure["error"] == "OSError"
    assert "disk full" not in json.dumps(logs, default=str)


def test_an_unusable_record_path_warns_once(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    h = make_harness(records=str(blocker / "records.jsonl"))  # parent is a file
    with structlog.testing.capture_logs() as logs:
        h.run(tool_record())
        h.run(tool_record())
    assert [e["event"] for e in logs] == ["record file unusable"]
    assert len(h.records) == 2  # the sink still sees every record
    assert len(h.spans.get_finished_spans()) == 2
    h.telemetry.shutdown()


# -- canaries -------------------------------------------------------------------------------

CANARIES = (
    "sk-canary0000000000000000000000",
    "Bearer canary-bearer-token",
    "canary.person@example.com",
    "ORD-CANARY-991",
)


def test_no_canary_in_spans_metrics_records_or_logs(tmp_path) -> None:
    path = tmp_path / "records.jsonl"
    h = make_harness(records=str(path))
    headers = {
        "traceparent": TRACEPARENT,
        "authorization": CANARIES[1],
        "x-api-key": CANARIES[0],
        "x-user": CANARIES[2],
    }
    with structlog.testing.capture_logs() as logs:
        for record in all_records():
            # Content is only ever in `captured`, and capture is off.
            record.captured = {
                "gen_ai.input.messages": " ".join(CANARIES),
                "gen_ai.tool.call.arguments": CANARIES[3],
                "gen_ai.tool.call.result": CANARIES[2],
            }
            call = h.telemetry.start(record.span_name, headers)
            upstream: dict[str, str] = {}
            call.inject(upstream)
            assert set(upstream) == {"traceparent"}  # nothing else is copied upstream
            h.telemetry.finish(call, record)
        h.telemetry.shutdown()
    emitted = [
        json.dumps([dict(s.attributes), s.name, [dict(e.attributes) for e in s.events]])
        for s in h.spans.get_finished_spans()
    ]
    emitted += [h.reader.get_metrics_data().to_json()]
    emitted += [path.read_text(encoding="utf-8"), json.dumps(logs, default=str)]
    for canary in CANARIES:
        for text in emitted:
            assert canary not in text


# -- providers built from config -------------------------------------------------------------


def _service_name(tel: Telemetry) -> str:
    return tel.tracer_provider.resource.attributes["service.name"]


def test_resource_service_name(monkeypatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=test")
    tel = Telemetry(TelemetryConfig(records=""), "p")
    assert _service_name(tel) == "loopguard"
    assert tel.tracer_provider.resource.attributes["deployment.environment.name"] == "test"
    tel.shutdown()

    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    tel = Telemetry(TelemetryConfig(records=""), "p")
    assert _service_name(tel) == "from-env"
    tel.shutdown()

    tel = Telemetry(TelemetryConfig(records="", service_name="from-config"), "p")
    assert _service_name(tel) == "from-config"
    tel.shutdown()


def test_exporter_none_still_propagates_context() -> None:
    tel = Telemetry(TelemetryConfig(exporter="none", records=""), "p")
    call = tel.start("chat m", {"traceparent": TRACEPARENT})
    upstream = call.inject({})
    _, trace_id, parent_id, flags = upstream["traceparent"].split("-")
    assert (trace_id, flags) == (AGENT_TRACE, "01") and parent_id != AGENT_SPAN
    tel.finish(call, streamed_chat_record())

    # An unsampled agent trace stays unsampled upstream.
    unsampled = tel.start("chat m", {"traceparent": f"00-{AGENT_TRACE}-{AGENT_SPAN}-00"})
    assert unsampled.inject({})["traceparent"].endswith("-00")
    tel.finish(unsampled, streamed_chat_record())
    tel.shutdown()
    tel.shutdown()  # idempotent
    tel.finish(tel.start("late", {}), tool_record())  # after shutdown: no error


def test_console_exporter_prints_spans_on_shutdown(capsys) -> None:
    tel = Telemetry(TelemetryConfig(exporter="console", records=""), "p")
    tel.finish(tel.start("x", {}), tool_record())
    tel.shutdown()
    out = capsys.readouterr().out
    assert '"name": "execute_tool lookup_order"' in out
    assert "gen_ai.client.operation.duration" in out


def test_otlp_endpoints() -> None:
    assert otlp_endpoints(None) == (None, None)
    assert otlp_endpoints("http://c:4318/v1/traces") == (
        "http://c:4318/v1/traces",
        "http://c:4318/v1/metrics",
    )
    assert otlp_endpoints("http://c:4318/") == (
        "http://c:4318/v1/traces",
        "http://c:4318/v1/metrics",
    )
    assert otlp_endpoints("http://gw/otel/traces") == ("http://gw/otel/traces", None)
