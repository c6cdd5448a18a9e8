"""The export path of an owned pipeline: spans built whole at the end of a call
(``DirectSpans``) are the spans the SDK would have made, and the wire encoder writes
the very message the SDK's OTLP encoder builds."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NonRecordingSpan, SpanKind, Status, StatusCode

from guard.engine.calls import CallRecord, FailureStage, Route, StallRule, Usage
from guard.engine.config import TelemetryConfig
from guard.telemetry import otlp_wire
from guard.telemetry import spans as spans_module
from guard.telemetry.facade import Telemetry
from guard.telemetry.otlp_wire import SpanEncoder, WireSpanExporter, wire_span
from guard.telemetry.semconv import INSTRUMENTATION_NAME, SCHEMA_URL
from guard.telemetry.spans import DirectCallSpan, DirectSpans, SpanSink, Tracing, WireOut

SCOPE = InstrumentationScope(INSTRUMENTATION_NAME, "1", SCHEMA_URL)
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
UNSAMPLED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"


def records() -> list[CallRecord]:
    return [
        CallRecord(
            operation="chat", span_name="chat gpt-4o", provider="openai", model="gpt-4o",
            finish_reasons=("stop", "length"), stream=True, ttft_s=0.2, total_s=0.9,
            output_chunks=8, usage=Usage(input_tokens=30, output_tokens=0, source="response"),
            session="s-1", session_tracked=True, server_address="api.example", server_port=443,
            app={"route": "refund_flow"},
        ),
        CallRecord(
            operation="mcp", span_name="tools/call search", tool="search",
            mcp_method="tools/call", jsonrpc_request_id="3", route=Route.STOP_AND_REVIEW,
            failure_stage=FailureStage.LOOP_GUARD, stall_rule=StallRule.IDENTICAL_ERRORS,
            repeat_count=3, params_hash="ee" * 16,
        ),
        CallRecord(
            operation="execute_tool", span_name="execute_tool lookup", tool="lookup",
            failure_stage=FailureStage.UPSTREAM_TIMEOUT, error_type="timeout", status_code=504,
        ),
    ]  # fmt: skip


class Spans:
    """A provider with an in-memory exporter, its tracer and the pieces of both paths."""

    def __init__(self) -> None:
        self.resource = Resource.create({"service.name": "t"})
        self.provider = TracerProvider(resource=self.resource)
        self.exported = InMemorySpanExporter()
        self.processor = SimpleSpanProcessor(self.exported)
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer(INSTRUMENTATION_NAME, "1", schema_url=SCHEMA_URL)
        self.cfg = TelemetryConfig()

    def sdk(self, record: CallRecord, headers: dict[str, str]) -> ReadableSpan | None:
        call = Tracing(self.tracer, True).start(record.span_name, headers)
        SpanSink(self.cfg).emit(record, call)
        finished = self.exported.get_finished_spans()
        return finished[-1] if finished else None

    def direct(self, record: CallRecord, headers: dict[str, str]) -> DirectCallSpan:
        scope = InstrumentationScope(INSTRUMENTATION_NAME, "1", SCHEMA_URL)
        direct = DirectSpans(self.processor, self.resource, scope)
        call = Tracing(self.tracer, True, direct).start(record.span_name, headers)
        assert isinstance(call, DirectCallSpan)
        SpanSink(self.cfg, direct).emit(record, call)
        return call


def test_direct_spans_are_the_spans_the_sdk_would_make() -> None:
    spans = Spans()
    assert DirectSpans.usable(spans.provider)
    for record in records():
        for headers in ({"traceparent": TRACEPARENT}, {}):
            made = spans.sdk(record, headers)
            assert made is not None
            call = spans.direct(record, headers)
            direct = spans.exported.get_finished_spans()[-1]
            assert direct.context is not None and made.context is not None
            assert (direct.context.span_id, direct.context.trace_id) == (
                call.span_int,
                call.trace_int,
            )
            assert direct.context.trace_flags == made.context.trace_flags
            if headers:
                assert direct.context.trace_id == made.context.trace_id
            assert direct.parent == made.parent
            assert direct.name == made.name
            assert direct.kind == made.kind == SpanKind.CLIENT
            assert dict(direct.attributes or {}) == dict(made.attributes or {})
            assert direct.status.status_code == made.status.status_code
            assert direct.status.description == made.status.description
            assert direct.resource == made.resource
            assert direct.instrumentation_scope == made.instrumentation_scope
            assert direct.start_time is not None and direct.end_time is not None
            assert direct.start_time <= direct.end_time


def test_an_unsampled_parent_gets_no_direct_span_as_with_the_sdk() -> None:
    spans = Spans()
    spans.sdk(records()[0], {"traceparent": UNSAMPLED})
    spans.direct(records()[0], {"traceparent": UNSAMPLED})
    assert spans.exported.get_finished_spans() == ()


def test_a_direct_call_offers_a_stand_in_span_with_its_ids() -> None:
    # The in-process guard makes the call's span current, so the tool's spans are
    # its children: the stand-in carries the call's ids.
    call = Spans().direct(records()[2], {"traceparent": TRACEPARENT})
    stand_in = call.span
    assert isinstance(stand_in, NonRecordingSpan)
    ctx = stand_in.get_span_context()
    assert (ctx.trace_id, ctx.span_id, int(ctx.trace_flags)) == (
        call.trace_int,
        call.span_int,
        call.flags,
    )


def sample_spans() -> list[ReadableSpan]:
    spans = Spans()
    for record in records():
        spans.sdk(record, {"traceparent": TRACEPARENT})
        spans.direct(record, {})
    tracer = spans.tracer
    odd = tracer.start_span("odd", kind=SpanKind.SERVER)
    odd.set_attributes(
        {
            "neg": -5,
            "zero": 0,
            "big": 2**62,
            "no": False,
            "pi": 3.25,
            "empty": "",
            "ints": [1, -2, 3],
            "flags": (True, False),
            "utf": "é✓",
        }
    )
    odd.set_status(Status(StatusCode.OK))
    odd.end()
    return list(spans.exported.get_finished_spans())


def test_the_wire_encoder_writes_the_sdks_message() -> None:
    batch = sample_spans()
    encoded = ExportTraceServiceRequest.FromString(SpanEncoder()(batch))
    assert encoded == encode_spans(batch)


def test_a_batch_the_wire_encoder_does_not_cover_goes_to_the_sdks_encoder() -> None:
    spans = Spans()
    with_event = spans.tracer.start_span("with event")
    with_event.add_event("e", {"k": "v"})
    with_event.end()
    batch = [*sample_spans(), *spans.exported.get_finished_spans()]
    encoded = ExportTraceServiceRequest.FromString(SpanEncoder()(batch))
    assert encoded == encode_spans(batch)


def test_the_wire_encoder_writes_varying_values_and_long_fields_as_the_sdk_does() -> None:
    # One telemetry's batch (one resource, one scope): hashes and markers that differ
    # on every call, past the point where their key is no longer cached, and values
    # whose sizes take one, two and three bytes.
    spans = Spans()
    scope = InstrumentationScope(INSTRUMENTATION_NAME, "1", SCHEMA_URL)
    direct = DirectSpans(spans.processor, spans.resource, scope)
    for i in range(300):
        record = CallRecord(
            operation="execute_tool", span_name="execute_tool lookup", tool="lookup",
            params_hash=f"{i:032x}", progress_marker=f"m{i}" * (1 + i % 3),
            app={"note": "x" * (i % 2 * 200), "long": "y" * (20_000 if i == 7 else 1)},
        )  # fmt: skip
        call = Tracing(spans.tracer, True, direct).start(record.span_name, {})
        SpanSink(spans.cfg, direct).emit(record, call)
    batch = list(spans.exported.get_finished_spans())
    assert len(batch) == 300
    encoder = SpanEncoder()
    for _ in range(2):  # the second time, the varying keys are written uncached
        encoded = ExportTraceServiceRequest.FromString(encoder(batch))
        assert encoded == encode_spans(batch)
    assert ExportTraceServiceRequest.FromString(encoder([])) == encode_spans([])


def test_a_spans_tag_and_size_are_the_fields_at_every_size() -> None:
    # Looked up by size (up to a bound, then written each time): the field's own form.
    sizes = [0, 1, 0x7F, 0x80, 0x3FFF, 0x4000, 1 << 21, *range(200, 1500)]
    for size in sizes * 2:
        body = b"x" * size
        assert (otlp_wire._span_heads.get(size) or otlp_wire._span_head(size)) + body == (
            otlp_wire._field(0x12, body)
        )


def test_a_batch_of_several_resources_and_scopes_is_the_sdks_message() -> None:
    # Spans of two resources, one of them under two scopes (one with no schema URL),
    # interleaved: grouped and written as the SDK's encoder groups them.
    batch = []
    for n, (service, scope) in enumerate(
        [("a", SCOPE), ("b", SCOPE), ("a", InstrumentationScope("other", "2")), ("b", SCOPE)] * 3
    ):
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        exported = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(exported))
        tracer = provider.get_tracer(scope.name, scope.version, schema_url=scope.schema_url)
        span = tracer.start_span(f"s{n}", attributes={"n": n, "x": "y" * (n * 40)})
        span.end()
        batch += exported.get_finished_spans()
    encoded = ExportTraceServiceRequest.FromString(SpanEncoder()(batch))
    assert encoded == encode_spans(batch)
    assert len(encoded.resource_spans) == 2


FIXED_NS = 1_796_000_000_000_000_000


def ended_both_ways(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[Spans, list[bytes], list[ReadableSpan]]:
    """The same calls ended by ``DirectSpans`` with the wire writer (their wire bytes
    pushed, as to the span queue) and without (their spans), with and without a parent:
    one clock, so both ways carry the same times."""
    monkeypatch.setattr(spans_module.time, "time_ns", lambda: FIXED_NS)
    spans = Spans()
    wires: list[bytes] = []
    wired = DirectSpans(spans.processor, spans.resource, SCOPE, WireOut(wire_span, wires.append))
    plain = DirectSpans(spans.processor, spans.resource, SCOPE)
    for record in records():
        for headers in ({"traceparent": TRACEPARENT}, {}):
            call = Tracing(spans.tracer, True, wired).start(record.span_name, headers)
            SpanSink(spans.cfg, wired).emit(record, call)
            SpanSink(spans.cfg, plain).emit(record, call)
    made = list(spans.exported.get_finished_spans())
    assert len(wires) == len(made) == 2 * len(records())
    return spans, wires, made


def test_spans_written_as_they_end_encode_to_the_sdks_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spans, wires, made = ended_both_ways(monkeypatch)
    encoder = SpanEncoder()
    joined = encoder.wired(spans.resource, SCOPE, wires)
    assert ExportTraceServiceRequest.FromString(joined) == encode_spans(made)
    # Byte for byte what the encoder writes from the spans' fields.
    assert joined == encoder(made)
    assert encoder.wired(spans.resource, SCOPE, []) == b""


def exporter(resource: Resource) -> WireSpanExporter:
    return WireSpanExporter(resource, SCOPE, endpoint="http://127.0.0.1:9/v1/traces")


def test_a_span_the_wire_writer_does_not_cover_is_encoded_by_the_sdk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spans, wires, made = ended_both_ways(monkeypatch)
    # A value type the field table never produces: no wire form...
    odd = {"odd": {"not": "covered"}}
    status = Status(StatusCode.UNSET)
    assert wire_span(1, 2, None, None, "n", SpanKind.CLIENT, 1, 2, odd, status) is None
    # ...so DirectSpans hands the processor the span instead of bytes.
    pushed: list[bytes] = []
    direct = DirectSpans(spans.processor, spans.resource, SCOPE, WireOut(wire_span, pushed.append))
    call = Tracing(spans.tracer, True, direct).start("odd", {})
    assert isinstance(call, DirectCallSpan)
    direct.end(call, "odd", odd, status)
    assert pushed == []
    fallback = spans.exported.get_finished_spans()[-1]
    assert fallback.name == "odd" and dict(fallback.attributes or {}) == odd
    # A queue's batch of both: the wire bytes under the pipeline's header, then the
    # spans by the SDK's encoder.
    sent = ExportTraceServiceRequest.FromString(exporter(spans.resource).encode([*wires, fallback]))
    expected = encode_spans(made)
    expected.MergeFrom(encode_spans([fallback]))
    assert sent == expected
    # Spans alone (no bytes): the SDK's message.
    only = [*made, fallback]
    assert ExportTraceServiceRequest.FromString(exporter(spans.resource).encode(only)) == (
        encode_spans(only)
    )


def test_an_otlp_pipeline_queues_each_span_as_its_wire_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent: list[object] = []

    def export(self: WireSpanExporter, items: Sequence[object]) -> SpanExportResult:
        sent.extend(items)
        return SpanExportResult.SUCCESS

    monkeypatch.setattr(WireSpanExporter, "export", export)
    tel = Telemetry(
        TelemetryConfig(exporter="otlp", otlp_endpoint="http://127.0.0.1:9", records=""), "p"
    )
    for record in records():
        tel.finish(tel.start(record.span_name, {}), record)
    tel.force_flush()
    tel.shutdown()
    assert len(sent) == len(records())
    assert all(type(item) is bytes for item in sent)  # no span object kept for export
    request = ExportTraceServiceRequest.FromString(
        exporter(tel.tracer_provider.resource).encode(sent)  # type: ignore[arg-type]
    )
    names = [s.name for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert names == [r.span_name for r in records()]
