"""The telemetry contract: sinks with one signature, and CallRecord fields declared once."""

from __future__ import annotations

from typing import Any

import pytest
import structlog
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from guard.engine.calls import CallRecord, FailureStage, Route, Usage
from guard.engine.config import Config, TelemetryConfig
from guard.engine.core import Engine
from guard.engine.telemetry_port import NullTelemetry, TelemetryPort
from guard.telemetry import SINKS, CallSpan, Sink, SinkSetup, Telemetry, build
from guard.telemetry.fields import CALL_FIELDS, FIELDS, PROJECTIONS, Field, Projections
from guard.telemetry.records import RECORD_FIELDS


class Collecting:
    """A sink that keeps what it is given."""

    failure_event = "collecting sink failed"

    def __init__(self) -> None:
        self.calls: list[tuple[CallRecord, CallSpan]] = []
        self.flushed = 0
        self.closed = 0

    def emit(self, record: CallRecord, call: CallSpan) -> None:
        self.calls.append((record, call))

    def force_flush(self, timeout_millis: int) -> None:
        self.flushed += 1

    def shutdown(self) -> None:
        self.closed += 1


class Failing(Collecting):
    failure_event = "failing sink failed"

    def emit(self, record: CallRecord, call: CallSpan) -> None:
        raise RuntimeError("secret-value-in-message")


def tool_record(**kw: Any) -> CallRecord:
    base: dict[str, Any] = {
        "operation": "execute_tool",
        "span_name": "execute_tool lookup",
        "tool": "lookup",
        "session": "agent-1",
        "params_hash": "0" * 32,
        "server_address": "tools.internal",
        "server_port": 8080,
    }
    return CallRecord(**{**base, **kw})


def telemetry_with(*extra: Any, records: list[dict[str, Any]] | None = None) -> tuple:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    factories = [*SINKS, *(lambda _setup, s=s: s for s in extra)]
    tel = Telemetry(
        TelemetryConfig(records=""),
        "p",
        tracer_provider=tracer_provider,
        meter_provider=MeterProvider(metric_readers=[reader]),
        record_sink=(records if records is not None else []).append,
        sinks=factories,
    )
    return tel, spans, reader


# -- the sink registry ----------------------------------------------------------------------


def test_a_registered_sink_receives_every_call_once() -> None:
    sink = Collecting()
    tel, _, _ = telemetry_with(sink)
    started = [tel.start(f"call {i}", {}) for i in range(3)]
    for i, call in enumerate(started):
        tel.finish(call, tool_record(tool=f"t{i}"))
    tel.finish(started[0], tool_record())  # finished already: not emitted again
    assert [(r.tool, c) for r, c in sink.calls] == [(f"t{i}", c) for i, c in enumerate(started)]
    tel.force_flush()
    tel.shutdown()
    tel.shutdown()  # idempotent: each sink is shut down once
    assert (sink.flushed, sink.closed) == (1, 1)


def test_a_failing_sink_breaks_neither_the_call_nor_the_other_sinks() -> None:
    before, after = Collecting(), Collecting()
    records: list[dict[str, Any]] = []
    tel, spans, _ = telemetry_with(before, Failing(), after, records=records)
    with structlog.testing.capture_logs() as logs:
        tel.finish(tel.start("x", {}), tool_record())  # does not raise
    assert len(before.calls) == len(after.calls) == 1
    assert len(records) == 1 and len(spans.get_finished_spans()) == 1
    (failure,) = [e for e in logs if e["event"] == "failing sink failed"]
    assert failure["error"] == "RuntimeError"
    assert "secret-value-in-message" not in repr(logs)
    tel.shutdown()


def test_a_factory_returning_none_registers_nothing() -> None:
    tel = Telemetry(TelemetryConfig(records=""), "p", sinks=[lambda _setup: None])
    tel.finish(tel.start("x", {}), tool_record())  # no sink: nothing to do, no error
    tel.shutdown()


def test_sinks_are_built_only_where_they_would_be_read() -> None:
    seen: list[SinkSetup] = []
    tel = Telemetry(TelemetryConfig(exporter="none", records=""), "p", sinks=[*SINKS, seen.append])
    # Exporter "none", no providers, no record file or callback: no span, metric or
    # record sink is built, and the setup tells a new sink the same.
    assert tel._sinks == ()
    (setup,) = seen
    assert not setup.recording_spans and setup.meter is None and setup.record_callback is None
    tel.shutdown()


def test_the_default_sinks_satisfy_the_protocol() -> None:
    tel, _, _ = telemetry_with(records=[])
    sinks: tuple[Sink, ...] = tel._sinks
    assert [type(s).__name__ for s in sinks] == ["SpanSink", "MetricSink", "RecordsSink"]
    for sink in sinks:
        assert isinstance(sink.failure_event, str)
    tel.shutdown()


# -- the engine's port and the null sink ----------------------------------------------------


def test_engine_without_telemetry_records_nothing() -> None:
    engine = Engine(Config())
    assert isinstance(engine.telemetry, NullTelemetry)
    call = engine.telemetry.start("x", {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"})
    assert call.inject({}) == {}  # nothing continued, nothing injected
    engine.telemetry.finish(call, tool_record())


def test_doors_build_telemetry_keyed_with_the_engine_session_pseudonyms() -> None:
    records: list[dict[str, Any]] = []

    def make(config: Config, hasher: Any) -> TelemetryPort:
        built = build(config, hasher)  # what the doors pass
        assert built.scrub_policy == config.redaction.policy_id
        built.shutdown()
        return Telemetry(config.telemetry, "p", record_sink=records.append, session_hasher=hasher)

    engine = Engine(Config.from_mapping({"telemetry": {"records": ""}}), make_telemetry=make)
    telemetry = engine.telemetry
    assert isinstance(telemetry, Telemetry)
    telemetry.finish(telemetry.start("x", {}), tool_record())
    assert records[0]["session"] == engine.session_hasher("agent-1")
    telemetry.shutdown()


def test_telemetry_ignores_a_span_it_did_not_start() -> None:
    records: list[dict[str, Any]] = []
    tel = Telemetry(TelemetryConfig(records=""), "p", record_sink=records.append)
    tel.finish(NullTelemetry().start("x", {}), tool_record())
    assert records == []
    tel.shutdown()


# -- the field table -----------------------------------------------------------------------


def test_record_fields_are_the_call_fields_then_the_table_in_order() -> None:
    assert PROJECTIONS.record_fields == RECORD_FIELDS
    assert RECORD_FIELDS[: len(CALL_FIELDS)] == CALL_FIELDS
    assert RECORD_FIELDS[len(CALL_FIELDS) :] == tuple(f.record for f in FIELDS if f.record)


def test_every_projection_reads_only_the_table() -> None:
    record = tool_record(
        usage=Usage(input_tokens=3, output_tokens=4, source="response"),
        stream=True,
        ttft_s=0.25,
    )
    span_keys = set(PROJECTIONS.span(record))
    assert span_keys <= {f.span for f in FIELDS}
    assert set(PROJECTIONS.metric(record)) <= {f.span for f in FIELDS if f.metric}
    assert list(PROJECTIONS.record(record, str.upper)) == list(RECORD_FIELDS)


def test_a_field_added_to_the_table_shows_in_all_three_projections() -> None:
    added = Field(
        "retries", "loopguard.retries", get=lambda r: len(r.app), span_as=int, metric=True
    )
    projections = Projections((*FIELDS, added))
    record = tool_record(app={"a": "1", "b": "2"})

    assert projections.record_fields == (*RECORD_FIELDS, "retries")
    assert projections.record(record, str.upper)["retries"] == 2
    assert projections.span(record)["loopguard.retries"] == 2
    assert projections.metric(record)["loopguard.retries"] == 2
    # And none of it without the row.
    assert "retries" not in PROJECTIONS.record(record, str.upper)
    assert "loopguard.retries" not in PROJECTIONS.span(record)


def test_projections_follow_the_rows_rules() -> None:
    record = tool_record(server_address=None, finish_reasons=(), timing_malformed=False)
    span = PROJECTIONS.span(record)
    # None and the converters' None leave a span attribute off; records keep every key.
    assert "server.address" not in span and "gen_ai.response.finish_reasons" not in span
    assert "loopguard.timing.malformed" not in span
    row = PROJECTIONS.record(record, lambda s: "s_" + s)
    assert row["finish_reasons"] == [] and row["timing_malformed"] is False
    assert row["session"] == "s_agent-1"  # a pseudonym field leaves only hashed
    # server.port is a metric attribute only with server.address.
    assert "server.port" in span and "server.port" not in PROJECTIONS.metric(record)
    # Semconv attributes first, then the guard's own.
    keys = list(span)
    first_own = next(i for i, k in enumerate(keys) if k.startswith("loopguard."))
    assert all(k.startswith("loopguard.") for k in keys[first_own:])


def test_fields_within_the_usage_show_only_with_usage() -> None:
    # A run of two such fields, then one apart: each read from the record's usage.
    within = (
        Field(span="t.input", attr="input_tokens", within="usage", span_as=int),
        Field(span="t.source", attr="source", within="usage"),
        Field(span="t.tool", attr="tool"),
        Field(span="t.output", attr="output_tokens", within="usage", span_as=int),
    )
    projections = Projections((*FIELDS, *within))
    keys = [f.span for f in within]
    with_usage = tool_record(usage=Usage(input_tokens=3, output_tokens=4, source="response"))
    for tool in ("lookup", None):  # the run after t.tool is read whatever t.tool is
        got = projections.span(tool_record(usage=with_usage.usage, tool=tool))
        assert [(k, got[k]) for k in got if k in keys] == [
            ("t.input", 3), ("t.source", "response"), *([("t.tool", tool)] if tool else []),
            ("t.output", 4),
        ]  # fmt: skip
    without = projections.span(tool_record(usage=None))
    assert [k for k in without if k in keys] == ["t.tool"]
    assert within[0].reader()(with_usage) == 3 and within[0].reader()(tool_record()) is None


@pytest.mark.parametrize(
    "row",
    [
        {"span": "t.x", "within": "usage"},  # no attribute
        {"span": "t.x", "within": "usage", "expr": "r.usage"},
        {"span": "t.x", "within": "usage", "attr": "input_tokens", "get": len},
    ],
)
def test_a_field_within_an_object_is_read_by_attribute_only(row: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="within"):
        Field(**row)


def test_a_field_within_an_object_needs_attribute_names() -> None:
    with pytest.raises(ValueError, match="attribute name"):
        Projections((*FIELDS, Field(span="t.x", attr="input_tokens", within="usage()")))


@pytest.mark.parametrize(
    ("route", "stage"),
    [*zip(Route, FailureStage, strict=False), ("serve", "passed"), ("own", "stage")],
)
def test_a_route_and_a_failure_stage_show_as_their_text(route: Any, stage: Any) -> None:
    record = tool_record(route=route, failure_stage=stage)
    row = PROJECTIONS.record(record, str.upper)
    span = PROJECTIONS.span(record)
    for got in (row["route"], span["loopguard.route"]):
        assert got == str(route) and type(got) is str
    for got in (row["failure_stage"], span["loopguard.failure.stage"]):
        assert got == str(stage) and type(got) is str


def test_a_record_key_declared_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        Projections((*FIELDS, Field("tool", attr="tool")))
