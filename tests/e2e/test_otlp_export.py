"""OTLP over HTTP/protobuf for real: a receiver on loopback decodes what loopguard sends.

And with nothing listening, calls still finish at once and shutdown is bounded:
a dead collector costs a warning and the dropped spans, nothing else.
"""

from __future__ import annotations

import socket
import time

import structlog
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.semconv.schemas import Schemas

from guard.engine.calls import CallRecord, FailureStage, Route, StallRule, Usage
from guard.engine.config import TelemetryConfig
from guard.telemetry import Telemetry

try:
    from tests.otlp_receiver import OtlpReceiver
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from otlp_receiver import OtlpReceiver

AGENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
AGENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{AGENT_TRACE}-{AGENT_SPAN}-01"


def chat_record() -> CallRecord:
    return CallRecord(
        operation="chat",
        span_name="chat gpt-4o",
        provider="openai",
        model="gpt-4o",
        finish_reasons=("stop",),
        stream=True,
        ttft_s=0.2,
        total_s=0.9,
        output_chunks=8,
        usage=Usage(input_tokens=30, output_tokens=8, source="response"),
        session="s-1",
        session_tracked=True,
    )


def stop_record() -> CallRecord:
    return CallRecord(
        operation="mcp",
        span_name="tools/call search",
        tool="search",
        mcp_method="tools/call",
        jsonrpc_request_id="3",
        route=Route.STOP_AND_REVIEW,
        failure_stage=FailureStage.LOOP_GUARD,
        stall_rule=StallRule.IDENTICAL_ERRORS,
        repeat_count=3,
        params_hash="ee" * 16,
    )


def send(tel: Telemetry, record: CallRecord) -> str:
    call = tel.start(record.span_name, {"traceparent": TRACEPARENT})
    tel.finish(call, record)
    return call.span_id


def test_spans_and_metrics_reach_an_otlp_receiver(monkeypatch) -> None:
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=ci")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    with OtlpReceiver() as receiver:
        cfg = TelemetryConfig(exporter="otlp", otlp_endpoint=receiver.traces_url, records="")
        tel = Telemetry(cfg, "default-v1")
        chat_id = send(tel, chat_record())
        stop_id = send(tel, stop_record())
        tel.shutdown()  # flushes both signals
        spans = {s.name: s for s in receiver.spans()}
        metric_names = receiver.metric_names()

    chat, stop = spans["chat gpt-4o"], spans["tools/call search"]
    assert chat.span_id == chat_id and stop.span_id == stop_id
    for span in (chat, stop):
        assert span.trace_id == AGENT_TRACE and span.parent_span_id == AGENT_SPAN
        assert span.kind == PbSpan.SPAN_KIND_CLIENT
        assert span.schema_url == Schemas.V1_41_1.value and span.scope_name == "loopguard"
        assert span.resource["service.name"] == "loopguard"
        assert span.resource["deployment.environment.name"] == "ci"
    # Types survive the wire: ints are ints, finish_reasons a string array, TTFT a double.
    assert chat.attributes["gen_ai.usage.input_tokens"] == 30
    assert isinstance(chat.attributes["gen_ai.usage.input_tokens"], int)
    assert chat.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert isinstance(chat.attributes["gen_ai.response.time_to_first_chunk"], float)
    assert stop.attributes["loopguard.failure.stage"] == "loop_guard"
    assert stop.attributes["loopguard.stall.rule"] == "identical_errors"
    assert stop.attributes["jsonrpc.request.id"] == "3"
    assert {
        "gen_ai.client.operation.duration",
        "gen_ai.client.token.usage",
        "gen_ai.client.operation.time_to_first_chunk",
        "gen_ai.client.operation.time_per_output_chunk",
        "loopguard.stops",
    } <= metric_names


def test_standard_otlp_environment_variables_decide_without_config(monkeypatch) -> None:
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.base_url)
        monkeypatch.setenv("OTEL_SERVICE_NAME", "agent-gateway")
        tel = Telemetry(TelemetryConfig(exporter="otlp", records=""), "default-v1")
        send(tel, chat_record())
        tel.shutdown()
        spans = receiver.spans()
    assert [s.name for s in spans] == ["chat gpt-4o"]
    assert spans[0].resource["service.name"] == "agent-gateway"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_dead_collector_costs_a_warning_not_a_request() -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}/v1/traces"
    with structlog.testing.capture_logs() as logs:
        tel = Telemetry(TelemetryConfig(exporter="otlp", otlp_endpoint=endpoint, records=""), "p")
        began = time.monotonic()
        for _ in range(50):
            send(tel, chat_record())
        calls_took = time.monotonic() - began
        began = time.monotonic()
        tel.shutdown()
        shutdown_took = time.monotonic() - began
    # Export is off the request path: 50 calls take far less than one export timeout (2 s).
    assert calls_took < 1.5, calls_took
    # Shutdown gives up after one bounded attempt per signal (2 s timeout each).
    assert shutdown_took < 10, shutdown_took
    warnings = [e for e in logs if e["event"] == "otlp export failed"]
    assert warnings and warnings[0]["log_level"] == "warning"
    assert warnings[0]["signal"] in {"traces", "metrics"} and warnings[0]["dropped"] >= 1
