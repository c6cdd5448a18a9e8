"""OTLP over HTTP/protobuf for real: a receiver on loopback decodes what loopguard sends.

And with nothing listening, calls still finish at once and shutdown is bounded:
a dead collector costs a warning and the dropped spans, nothing else.
"""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

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


def otlp_telemetry(endpoint: str) -> Telemetry:
    return Telemetry(TelemetryConfig(exporter="otlp", otlp_endpoint=endpoint, records=""), "p")


def test_shutdown_delivers_every_queued_span(monkeypatch) -> None:
    # No export before shutdown but full batches: the queue holds most of them then.
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "3600000")
    calls = 1100  # two full batches of 512 and a partial one, below the queue's 2048
    with OtlpReceiver() as receiver:
        tel = otlp_telemetry(receiver.traces_url)
        sent = [send(tel, chat_record() if n % 2 else stop_record()) for n in range(calls)]
        tel.shutdown()
        received = receiver.spans()
    assert sorted(s.span_id for s in received) == sorted(sent)
    assert {s.name for s in received} == {"chat gpt-4o", "tools/call search"}


def test_export_reconnects_after_the_collector_restarts() -> None:
    with OtlpReceiver() as first:
        port = first.port
        tel = otlp_telemetry(first.traces_url)
        before = send(tel, chat_record())
        tel.force_flush()
        assert [s.span_id for s in first.spans()] == [before]
    with structlog.testing.capture_logs() as logs:
        send(tel, chat_record())  # the collector is down: this one is lost, and said so
        tel.force_flush()
    assert any(e["event"] == "otlp export failed" and e["signal"] == "traces" for e in logs)
    with OtlpReceiver(port) as second:
        after = send(tel, stop_record())
        tel.force_flush()
        assert [s.span_id for s in second.spans()] == [after]
        tel.shutdown()


class _Refuse(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self.server.posts += 1  # type: ignore[attr-defined]
        self.send_response(400)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


class RefusingCollector(ThreadingHTTPServer):
    """Answers every export with 400 Bad Request (not retried)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Refuse)
        self.posts = 0
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1/traces"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> RefusingCollector:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


def test_a_refusing_collector_costs_no_call_and_is_warned_about(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "3600000")  # one batch, at the flush
    records = tmp_path / "records.jsonl"
    calls = 20
    with RefusingCollector() as collector, structlog.testing.capture_logs() as logs:
        cfg = TelemetryConfig(exporter="otlp", otlp_endpoint=collector.url, records=str(records))
        tel = Telemetry(cfg, "p")
        for _ in range(calls):
            send(tel, chat_record())
        tel.force_flush()  # traces first: the first warning is theirs
        tel.shutdown()
    assert collector.posts >= 1
    warnings = [e for e in logs if e["event"] == "otlp export failed"]
    assert warnings[0]["signal"] == "traces" and warnings[0]["dropped"] == calls
    # Every call finished and was recorded: export failing is not the calls' business.
    assert len(records.read_text().splitlines()) == calls


def test_a_span_the_wire_writer_does_not_cover_reaches_the_collector(monkeypatch) -> None:
    from guard.telemetry import otlp_wire

    wire_span = otlp_wire.wire_span

    def not_covering_stops(*args: Any) -> bytes | None:
        return None if args[4] == "tools/call search" else wire_span(*args)

    monkeypatch.setattr(otlp_wire, "wire_span", not_covering_stops)
    with OtlpReceiver() as receiver:
        tel = otlp_telemetry(receiver.traces_url)
        chat_id = send(tel, chat_record())
        stop_id = send(tel, stop_record())  # handed to the queue as a span
        # A span of the provider's own tracer, with an event (the SDK's encoder's).
        sdk_span = tel.tracer_provider.get_tracer("other").start_span("sdk span")
        sdk_span.add_event("event")
        sdk_span.end()
        tel.shutdown()
        spans = {s.name: s for s in receiver.spans()}
        events = [
            len(span.events)
            for request in receiver.trace_requests
            for rs in request.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
            if span.name == "sdk span"
        ]
    assert spans["chat gpt-4o"].span_id == chat_id
    stop = spans["tools/call search"]
    assert stop.span_id == stop_id and stop.parent_span_id == AGENT_SPAN
    assert stop.attributes["loopguard.stall.rule"] == "identical_errors"
    assert stop.scope_name == "loopguard" and stop.resource["service.name"] == "loopguard"
    assert spans["sdk span"].scope_name == "other" and events == [1]
