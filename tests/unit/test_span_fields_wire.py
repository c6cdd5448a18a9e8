"""Span attributes written straight from the record (``otlp_wire.wire_record``) are,
byte for byte, what the wire writer makes of the attribute dict (``span_attributes``),
whatever the record holds; where they cannot be, ``DirectSpans`` takes the dict path."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind, Status, StatusCode

from guard.engine.calls import CallRecord, FailureStage, Route, StallRule, Usage
from guard.engine.config import TelemetryConfig
from guard.telemetry import spans as spans_module
from guard.telemetry.fields import (
    FIELDS,
    PROJECTIONS,
    Projections,
    _cached_metric_function,
    _metric_function,
    gen_ai_operation,
)
from guard.telemetry.otlp_wire import SpanEncoder, wire_record, wire_span
from guard.telemetry.semconv import (
    ATTR_OPERATION,
    ATTR_TOOL_NAME,
    CAPTURE_ATTRIBUTES,
    INSTRUMENTATION_NAME,
    SCHEMA_URL,
)
from guard.telemetry.spans import (
    DirectSpans,
    SpanSink,
    Tracing,
    WireOut,
    extra_attributes,
    span_attributes,
)

SCOPE = InstrumentationScope(INSTRUMENTATION_NAME, "1", SCHEMA_URL)
STATUS = Status(StatusCode.UNSET)
FIXED_NS = 1_796_000_000_000_000_000

# Text as a record holds it (any character a str can encode to UTF-8).
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
few = st.sampled_from(["a", "gpt-4o", "lookup", "é—ü", "", "x" * 200])
some_text = st.none() | few | text
big_int = st.none() | st.integers(-(2**63), 2**64 - 1) | st.sampled_from([0, 1, 200, 504])
some_float = st.none() | st.floats(allow_nan=True) | st.sampled_from([0.0, -0.0, 1.0])
usage = st.none() | st.builds(
    Usage,
    input_tokens=big_int,
    output_tokens=big_int,
    cached_input_tokens=big_int,
    source=st.sampled_from(["response", "absent"]),
)
call_records = st.builds(
    CallRecord,
    operation=st.sampled_from(["chat", "execute_tool", "mcp", "passthrough"]),
    span_name=few,
    route=st.sampled_from(list(Route)),
    failure_stage=st.sampled_from(list(FailureStage)),
    error_type=some_text,
    status_code=big_int,
    provider=some_text,
    tool=some_text,
    model=some_text,
    server_address=some_text,
    server_port=big_int,
    session=some_text,
    session_tracked=st.booleans(),
    conversation_id=some_text,
    params_hash=some_text,
    progress_marker=some_text,
    repeat_count=big_int,
    stall_rule=st.none() | st.sampled_from(list(StallRule)),
    scrub_policy=some_text,
    mcp_method=st.none() | st.sampled_from(["tools/call", "tools/list"]) | text,
    mcp_session_id=some_text,
    jsonrpc_request_id=some_text,
    stream=st.none() | st.booleans(),
    ttft_s=some_float,
    total_s=some_float,
    output_tps=some_float,
    timing_malformed=st.booleans(),
    usage=usage,
    response_id=some_text,
    response_model=some_text,
    finish_reasons=st.lists(few | text, max_size=3).map(tuple),
    output_chunks=st.integers(0, 10),
    app=st.dictionaries(few | text, few | text, max_size=3),
    captured=st.dictionaries(st.sampled_from(sorted(CAPTURE_ATTRIBUTES)) | text, text, max_size=2),
)


def dict_path(record: CallRecord, cfg: TelemetryConfig) -> bytes | None:
    return wire_span(
        1, 2, None, None, "n", SpanKind.CLIENT, 3, 4, span_attributes(record, cfg), STATUS
    )


def fused_path(record: CallRecord, cfg: TelemetryConfig, limit: int | None = None) -> bytes | None:
    extra = extra_attributes(record, cfg)
    return wire_record(1, 2, None, None, "n", SpanKind.CLIENT, 3, 4, record, extra, STATUS, limit)


@settings(max_examples=400, deadline=None)
@given(record=call_records, capture=st.booleans())
def test_fields_written_from_the_record_are_the_dicts_wire_bytes(
    record: CallRecord, capture: bool
) -> None:
    cfg = TelemetryConfig(capture_content=capture)
    extra = extra_attributes(record, cfg)
    if extra and not spans_module._SPAN_KEYS.isdisjoint(extra):
        return  # an app key that is the table's: DirectSpans takes the dict path
    fused = fused_path(record, cfg)
    assert fused is not None
    assert fused == dict_path(record, cfg)
    # Twice: the second time from the fields' caches.
    assert fused_path(record, cfg) == fused


@pytest.mark.parametrize(
    "record",
    [
        CallRecord(operation="chat", span_name="chat"),
        CallRecord(
            operation="mcp", span_name="tools/call s", tool="s", mcp_method="tools/call",
            jsonrpc_request_id="7", stream=False, ttft_s=-0.0, output_tps=float("inf"),
            repeat_count=-5, status_code=2**63 - 1, finish_reasons=("stop", "é"),
            usage=Usage(input_tokens=2**40, output_tokens=0, source="response"),
            timing_malformed=True, app={"Route-Name": "ü" * 300},
        ),
    ],
)  # fmt: skip
def test_fields_written_from_the_record_parse_to_the_sdks_message(record: CallRecord) -> None:
    cfg = TelemetryConfig()
    spans = Pipeline()
    call = Tracing(spans.tracer, True, spans.wired).start(record.span_name, {})
    SpanSink(cfg, spans.wired).emit(record, call)
    assert len(spans.wires) == 1
    made = list(spans.exported.get_finished_spans())
    assert made == []  # bytes only
    plain = DirectSpans(spans.processor, spans.resource, SCOPE)
    SpanSink(cfg, plain).emit(record, call)
    made = list(spans.exported.get_finished_spans())
    joined = SpanEncoder().wired(spans.resource, SCOPE, spans.wires)
    assert ExportTraceServiceRequest.FromString(joined) == encode_spans(made)


class Pipeline:
    """A provider with an in-memory exporter, and ``DirectSpans`` writing wire bytes
    from records (``wires``), on one clock."""

    def __init__(self) -> None:
        self.resource = Resource.create({"service.name": "t"})
        provider = TracerProvider(resource=self.resource)
        self.exported = InMemorySpanExporter()
        self.processor = SimpleSpanProcessor(self.exported)
        provider.add_span_processor(self.processor)
        self.tracer = provider.get_tracer(INSTRUMENTATION_NAME, "1", schema_url=SCHEMA_URL)
        self.wires: list[bytes] = []
        out = WireOut(wire_span, self.wires.append, wire_record)
        self.wired = DirectSpans(self.processor, self.resource, SCOPE, out)


@pytest.fixture(autouse=True)
def one_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spans_module.time, "time_ns", lambda: FIXED_NS)


def ended(pipeline: Pipeline, record: CallRecord, cfg: TelemetryConfig) -> None:
    call = Tracing(pipeline.tracer, True, pipeline.wired).start(record.span_name, {})
    SpanSink(cfg, pipeline.wired).emit(record, call)


def dict_bytes(pipeline: Pipeline, record: CallRecord, cfg: TelemetryConfig) -> bytes:
    """What ``DirectSpans`` writes of the record's attribute dict (no ``fields``)."""
    wires: list[bytes] = []
    plain = DirectSpans(
        pipeline.processor, pipeline.resource, SCOPE, WireOut(wire_span, wires.append)
    )
    call = Tracing(pipeline.tracer, True, plain).start(record.span_name, {})
    SpanSink(cfg, plain).emit(record, call)
    assert len(wires) == 1
    return wires[0]


def attributes(pipeline: Pipeline, wire: bytes) -> list[tuple[str, Any]]:
    """A written span's attributes (key, string value) as a collector reads them."""
    request = ExportTraceServiceRequest.FromString(
        SpanEncoder().wired(pipeline.resource, SCOPE, [wire])
    )
    span = request.resource_spans[0].scope_spans[0].spans[0]
    return [(kv.key, kv.value.string_value) for kv in span.attributes]


def test_an_app_key_that_is_the_tables_takes_the_dict_path() -> None:
    # The app's attribute set again under the table's key: the dict keeps the key's
    # place with the app's value; the fields cannot, so the dict is written.
    cfg = TelemetryConfig(app_namespace="gen_ai.tool.")
    record = CallRecord(operation="execute_tool", span_name="t", tool="lookup", app={"name": "x"})
    assert span_attributes(record, cfg)[ATTR_TOOL_NAME] == "x"
    pipeline = Pipeline()
    ended(pipeline, record, cfg)
    assert len(pipeline.wires) == 1
    assert attributes(pipeline, pipeline.wires[0]) == attributes(
        pipeline, dict_bytes(pipeline, record, cfg)
    )
    assert ("gen_ai.tool.name", "x") in attributes(pipeline, pipeline.wires[0])


def test_more_attributes_than_the_limit_keeps_the_first_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = TelemetryConfig()
    record = CallRecord(
        operation="chat", span_name="chat", model="m", app={f"k{i}": "v" for i in range(5)}
    )
    pipeline = Pipeline()
    monkeypatch.setattr(pipeline.wired, "_max_attributes", 6)
    ended(pipeline, record, cfg)
    (wire,) = pipeline.wires
    assert [key for key, _ in attributes(pipeline, wire)] == list(span_attributes(record, cfg))[:6]


def test_a_value_the_wire_writer_does_not_cover_goes_as_a_span() -> None:
    # A value no field conversion makes (a caller's own type where a str goes).
    record = CallRecord(operation="chat", span_name="chat", model={"odd": 1})  # type: ignore[arg-type]
    assert fused_path(record, TelemetryConfig()) is None
    pipeline = Pipeline()
    ended(pipeline, record, TelemetryConfig())
    assert pipeline.wires == []
    (span,) = pipeline.exported.get_finished_spans()
    assert span.attributes is not None and span.attributes["gen_ai.request.model"] == {"odd": 1}


def test_unsampled_calls_write_nothing() -> None:
    pipeline = Pipeline()
    record = CallRecord(operation="chat", span_name="chat")
    unsampled = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"}
    call = Tracing(pipeline.tracer, True, pipeline.wired).start("chat", unsampled)
    SpanSink(TelemetryConfig(), pipeline.wired).emit(record, call)
    assert pipeline.wires == [] and list(pipeline.exported.get_finished_spans()) == []


def test_an_attribute_of_any_other_type_is_written_as_the_dict_would() -> None:
    # A str field holding an int, a list (unhashable: the dict path), a bool.
    values: list[Any] = [7, True, ["a", "b"], 2.5]
    cfg = TelemetryConfig()
    written = 0
    for value in values:
        record = CallRecord(operation="chat", span_name="chat", model=value)
        got = fused_path(record, cfg)
        if got is None:
            continue  # the dict path's
        written += 1
        assert got == dict_path(record, cfg)
    assert written == 3  # the list is not hashable: the dict path


def test_past_the_limit_the_record_writer_leaves_it_to_the_dict_path() -> None:
    record = CallRecord(operation="chat", span_name="chat", model="m", tool="t")
    count = len(span_attributes(record, TelemetryConfig()))
    assert fused_path(record, TelemetryConfig(), limit=count) is not None
    assert fused_path(record, TelemetryConfig(), limit=count - 1) is None


def table_reference(record: CallRecord, *, metric: bool = False) -> dict[str, Any]:
    """The span attributes (or, ``metric``, the metric attributes) as the field table
    says them, field by field (no run of fields within one object read together)."""
    attrs: dict[str, Any] = {}
    for f in sorted(FIELDS, key=lambda f: (f.span or "").startswith("loopguard.")):
        if f.span is None or (metric and not f.metric):
            continue
        if metric and f.metric_with is not None and f.metric_with not in attrs:
            continue
        value = f.reader()(record)
        if value is not None and f.span_as is not None:
            value = f.span_as(value)
        if value is not None:
            attrs[f.span] = value
    return attrs


@settings(max_examples=200, deadline=None)
@given(record=call_records)
def test_the_span_projection_is_the_tables_span_attributes_in_order(record: CallRecord) -> None:
    expected = table_reference(record)
    got = PROJECTIONS.span(record)
    assert list(got.items()) == list(expected.items())
    # The usage fields, read together, are there exactly when the record has usage.
    usage_keys = {f.span for f in FIELDS if f.within == "usage"}
    assert (record.usage is not None) == bool(usage_keys & set(got))


def test_values_that_vary_are_written_without_a_lookup() -> None:
    kinds: dict[str, type | None] = {}

    def writer(key: str, kind: type | None) -> tuple[Any, Any]:
        kinds[key] = kind

        def lookup(value: Any) -> None:
            assert kind is not None, f"{key}: looked up"

        return lookup, lambda value: (key, value)

    write = PROJECTIONS.span_writer(writer)
    record = CallRecord(
        operation="execute_tool", span_name="t", tool="t", params_hash="h", progress_marker="m"
    )
    written = dict(write(record))
    assert written["loopguard.params.hash"] == "h" and written[ATTR_TOOL_NAME] == "t"
    varying = {f.span for f in FIELDS if f.varies}
    assert {"loopguard.params.hash", "loopguard.progress.marker"} <= varying
    assert {key for key, kind in kinds.items() if kind is None} >= varying
    assert kinds[ATTR_TOOL_NAME] is str


@settings(max_examples=200, deadline=None)
@given(record=call_records)
def test_the_metric_key_is_the_tables_metric_attributes_in_order(record: CallRecord) -> None:
    expected = table_reference(record, metric=True)
    assert PROJECTIONS.metric_key(record) == tuple(expected.items())
    operation = PROJECTIONS.operation_metric_key(record)
    assert operation == (tuple(expected.items()) if gen_ai_operation(record) else None)
    assert PROJECTIONS.operation_metric_key(record) == operation  # now from the cache
    assert PROJECTIONS.metric(record) == expected


def test_the_cached_metric_key_is_each_records_own() -> None:
    # Records that differ in one metric field's value each get their own key, found
    # again (the same object) for an equal record; a value that cannot be hashed is
    # not cached; a full cache keeps answering.
    base = {
        "operation": "chat", "span_name": "chat", "model": "m", "provider": "p",
        "server_address": "h", "server_port": 1, "error_type": "e",
    }  # fmt: skip
    changes: list[dict[str, Any]] = [
        {}, {"model": "m2"}, {"provider": "p2"}, {"server_address": "h2"},
        {"server_port": 2}, {"error_type": None}, {"error_type": "e2"},
        {"operation": "execute_tool", "tool": "t"}, {"operation": "passthrough"},
        {"operation": "mcp", "mcp_method": "tools/call"}, {"model": ["a", "b"]},
    ]  # fmt: skip
    for size in (1024, 1):
        projections = Projections(FIELDS)
        if size == 1:  # the cache full after its first key
            metric = [f for f in projections._spans if f.metric]
            projections.operation_metric_key = _cached_metric_function(
                metric, _metric_function(metric, ATTR_OPERATION), size
            )
        for change in changes * 2:
            record = CallRecord(**{**base, **change})
            expected = table_reference(record, metric=True)
            got = projections.operation_metric_key(record)
            assert got == (tuple(expected.items()) if gen_ai_operation(record) else None)
        twice = [projections.operation_metric_key(CallRecord(**base)) for _ in "ab"]
        assert twice[0] is twice[1]
