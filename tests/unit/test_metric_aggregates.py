"""loopguard's own metric aggregation (``guard.telemetry.aggregates``) against the SDK's.

The same calls recorded through the aggregator and through plain SDK instruments must
give every reader the same metrics: names, units, descriptions, attributes, counts,
sums, buckets, min and max, cumulative and delta."""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
import weakref
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import (
    AlwaysOffExemplarFilter,
    AlwaysOnExemplarFilter,
    Counter,
    Histogram,
    MeterProvider,
    TraceBasedExemplarFilter,
)
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.metrics.view import (
    ExplicitBucketHistogramAggregation,
    ExponentialBucketHistogramAggregation,
    View,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_harness import samples

from guard.doors.admin import Admin
from guard.engine.calls import CallRecord, Route, StallRule, Usage
from guard.engine.config import Config, TelemetryConfig
from guard.telemetry import Telemetry, aggregates
from guard.telemetry.metrics import MetricSink

DELTA = {Histogram: AggregationTemporality.DELTA, Counter: AggregationTemporality.DELTA}


def calls() -> list[tuple[CallRecord, list[float] | None]]:
    """Tool calls, streamed chats with and without kept gaps, stops, on a few series."""
    out: list[tuple[CallRecord, list[float] | None]] = []
    for i in range(12):
        out.append(
            (
                CallRecord(
                    operation="execute_tool",
                    span_name="execute_tool lookup",
                    tool=("lookup", "search")[i % 2],
                    total_s=0.003 * (i + 1),
                ),
                None,
            )
        )
        out.append(
            (
                CallRecord(
                    operation="chat",
                    span_name="chat m",
                    model=("m1", "m2")[i % 2],
                    provider="openai",
                    stream=True,
                    ttft_s=0.05 * (i + 1),
                    total_s=0.3 * (i + 1),
                    output_chunks=3 + i,
                    usage=Usage(input_tokens=10 * i, output_tokens=300 * i, source="response"),
                ),
                [0.001 * (i + 1), 0.5, 3.0 + i] if i % 3 else None,
            )
        )
        if i % 4 == 0:
            out.append(
                (
                    CallRecord(
                        operation="execute_tool",
                        span_name="execute_tool lookup",
                        tool="lookup",
                        route=(Route.STOP_AND_REVIEW, Route.NUDGE)[i % 8 // 4],
                        stall_rule=StallRule.STALLED_REPEAT,
                        failure_stage="loop_guard",  # type: ignore[arg-type]
                    ),
                    None,
                )
            )
    return out


def telemetry(reader: InMemoryMetricReader, **provider: Any) -> Telemetry:
    return Telemetry(
        TelemetryConfig(records=""),
        "p",
        tracer_provider=TracerProvider(),
        meter_provider=MeterProvider(metric_readers=[reader], **provider),
    )


def sdk_telemetry(reader: InMemoryMetricReader) -> Telemetry:
    """The same sinks, the metrics on plain SDK instruments (a View on a metric nobody
    records turns the aggregator off)."""
    tel = telemetry(reader, views=[View(instrument_name="nothing.here")])
    assert not any(isinstance(s._duration, aggregates.HistogramTotals) for s in metric_sinks(tel))
    return tel


def metric_sinks(tel: Telemetry) -> list[MetricSink]:
    return [s for s in tel._sinks if isinstance(s, MetricSink)]


def feed(tel: Telemetry, batch: list[tuple[CallRecord, list[float] | None]]) -> None:
    for record, gaps in batch:
        tel.finish(tel.start(record.span_name, {}), record, gaps)


def points(reader: InMemoryMetricReader) -> dict[tuple[str, frozenset], dict[str, Any]]:
    """{(metric, attributes): the point's data, timestamps aside}, plus each metric's
    identity under (name, None)."""
    data = reader.get_metrics_data()
    out: dict[tuple[str, frozenset], dict[str, Any]] = {}
    if data is None:
        return out
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                assert (m.name, None) not in out, f"{m.name} reported twice"
                out[(m.name, None)] = {  # type: ignore[index]
                    "unit": m.unit,
                    "description": m.description,
                    "kind": type(m.data).__name__,
                    "temporality": m.data.aggregation_temporality,  # type: ignore[union-attr]
                    "monotonic": getattr(m.data, "is_monotonic", None),
                    "scope": (sm.scope.name, sm.scope.version, sm.scope.schema_url),
                }
                for p in m.data.data_points:
                    fields = dict(vars(p))
                    for skip in ("attributes", "start_time_unix_nano", "time_unix_nano"):
                        fields.pop(skip)
                    fields["exemplars"] = [
                        (e.filtered_attributes, e.value, e.span_id, e.trace_id)
                        for e in fields["exemplars"]
                    ]
                    if "sum" in fields:  # a mean gap is added n times by the SDK
                        fields["sum"] = pytest.approx(fields["sum"], rel=1e-12)
                    out[(m.name, frozenset(p.attributes.items()))] = fields
    return out


def test_the_aggregator_serves_the_metrics_the_sdk_instruments_would() -> None:
    ours_reader, sdk_reader = InMemoryMetricReader(), InMemoryMetricReader()
    ours, sdk = telemetry(ours_reader), sdk_telemetry(sdk_reader)
    assert all(isinstance(s._duration, aggregates.HistogramTotals) for s in metric_sinks(ours))
    batch = calls()
    for tel in (ours, sdk):
        feed(tel, batch)
    first = points(ours_reader)
    assert first == points(sdk_reader)
    names = {name for name, attrs in first if attrs is None}
    assert names == {
        "gen_ai.client.operation.duration",
        "gen_ai.client.token.usage",
        "gen_ai.client.operation.time_to_first_chunk",
        "gen_ai.client.operation.time_per_output_chunk",
        "loopguard.stops",
    }
    # Cumulative: a second collection carries the totals of both batches.
    for tel in (ours, sdk):
        feed(tel, batch[:7])
    second = points(ours_reader)
    assert second == points(sdk_reader)
    duration = ("gen_ai.client.operation.duration", None)
    assert second[duration]["temporality"] is AggregationTemporality.CUMULATIVE
    assert sum(p["count"] for k, p in second.items() if k[0] == duration[0] and k[1]) == sum(
        p["count"] for k, p in first.items() if k[0] == duration[0] and k[1]
    ) + sum(1 for r, _ in batch[:7] if r.failure_stage != "loop_guard")


def test_delta_readers_get_each_intervals_own_points() -> None:
    ours_reader, sdk_reader = (InMemoryMetricReader(preferred_temporality=DELTA) for _ in "ab")
    ours, sdk = telemetry(ours_reader), sdk_telemetry(sdk_reader)
    batch = calls()
    for part in (batch[:10], batch[10:], [], batch[3:5]):
        for tel in (ours, sdk):
            feed(tel, part)
        got = points(ours_reader)
        assert got == points(sdk_reader)
        duration = got.get(("gen_ai.client.operation.duration", None))
        if part:
            assert duration is not None
            assert duration["temporality"] is AggregationTemporality.DELTA
        else:  # an empty interval: no point, as the SDK's delta collection gives none
            assert duration is None


def test_a_collection_while_calls_are_recorded_loses_no_count() -> None:
    # Threads switch as often as they can: a value written while a collection drains
    # would be lost by an unlocked drain.
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        _record_while_collecting()
    finally:
        sys.setswitchinterval(previous)


def _record_while_collecting() -> None:
    reader = InMemoryMetricReader(preferred_temporality=DELTA)
    tel = telemetry(reader)
    record = CallRecord(operation="execute_tool", span_name="t", tool="t", total_s=0.01)
    collected: list[int] = []
    done = threading.Event()

    def count() -> int:
        data = reader.get_metrics_data()
        if data is None:
            return 0
        return sum(
            p.count
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
            if m.name == "gen_ai.client.operation.duration"
            for p in m.data.data_points  # type: ignore[union-attr]
        )

    def collector() -> None:
        while not done.is_set():
            collected.append(count())

    thread = threading.Thread(target=collector)
    thread.start()
    n = 20_000
    for _ in range(n):
        tel.finish(tel.start("t", {}), record)
    done.set()
    thread.join()
    assert len(collected) > 1  # the collections ran while calls were recorded
    assert sum(collected) + count() == n


def test_a_negative_duration_is_recorded_as_zero() -> None:
    # A clock step can make a call's duration negative; an int one is recorded as is.
    reader = InMemoryMetricReader()
    tel = telemetry(reader)
    for total in (-0.5, -0.0, 3):
        record = CallRecord(operation="execute_tool", span_name="t", tool="t", total_s=total)
        tel.finish(tel.start("t", {}), record)
    got = points(reader)
    (found,) = [v for k, v in got.items() if k[0] == "gen_ai.client.operation.duration" and k[1]]
    assert found["count"] == 3 and found["sum"] == 3.0
    assert found["min"] == 0.0 and found["max"] == 3.0
    assert found["bucket_counts"][0] == 2


def test_two_telemetries_on_one_provider_report_each_metric_once() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    one, two = (Telemetry(TelemetryConfig(records=""), "p", meter_provider=provider) for _ in "ab")
    record = CallRecord(operation="execute_tool", span_name="t", tool="t", total_s=0.01)
    for tel in (one, two):
        tel.finish(tel.start("t", {}), record)
    got = points(reader)  # raises on a metric reported twice
    found = [v for k, v in got.items() if k[0] == "gen_ai.client.operation.duration" and k[1]]
    assert [p["count"] for p in found] == [2]


def test_past_the_cardinality_limit_new_series_go_to_the_overflow_point(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(aggregates, "CARDINALITY_LIMIT", 3)
    reader = InMemoryMetricReader()
    tel = telemetry(reader)
    for i in range(5):
        record = CallRecord(operation="chat", span_name="t", model=f"m{i}", total_s=0.01)
        tel.finish(tel.start("t", {}), record)
    got = points(reader)
    duration = {k[1]: v for k, v in got.items() if k[0] == "gen_ai.client.operation.duration"}
    overflow = frozenset({("otel.metric.overflow", True)})
    assert duration[overflow]["count"] == 2
    assert len([k for k in duration if k]) == 4


def test_the_admin_listeners_prometheus_metrics_show_the_histograms(tmp_path: Path) -> None:
    config = Config.from_mapping(
        {
            "admin": {"listen": "127.0.0.1:9464"},
            "telemetry": {"records": str(tmp_path / "records.jsonl")},
        }
    )
    admin = Admin(config)
    telemetry = admin.engine.telemetry
    assert isinstance(telemetry, Telemetry)
    feed(telemetry, calls())

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=admin.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
            return await client.get("/metrics")

    got = samples(asyncio.run(get()).text)
    tools = frozenset({("gen_ai_operation_name", "execute_tool")})
    duration = "gen_ai_client_operation_duration_seconds"
    assert got[(f"{duration}_count", tools)] == 12
    assert got[(f"{duration}_bucket", tools | {("le", "+Inf")})] == 12
    assert got[(f"{duration}_bucket", tools | {("le", "0.02")})] == 6  # 0.003 .. 0.018
    assert got[(f"{duration}_sum", tools)] == pytest.approx(0.003 * 78)
    chats = [k for k in got if k[0] == "gen_ai_client_token_usage_count"]
    assert len(chats) == 4  # two models, input and output
    stops = [v for (name, _), v in got.items() if name == "loopguard_stops_total"]
    assert sum(stops) == 3
    telemetry.shutdown()


def test_a_reader_added_later_sees_what_comes_after_as_with_sdk_instruments() -> None:
    first = InMemoryMetricReader()
    ours_provider = MeterProvider(metric_readers=[first])
    ours = Telemetry(TelemetryConfig(records=""), "p", meter_provider=ours_provider)
    sdk_first = InMemoryMetricReader()
    sdk = sdk_telemetry(sdk_first)
    batch = calls()
    feed(ours, batch[:9])
    feed(sdk, batch[:9])
    later, sdk_later = InMemoryMetricReader(), InMemoryMetricReader()
    ours_provider.add_metric_reader(later)
    ours_provider.add_metric_reader(later)  # once only (the SDK warns)
    sdk.meter_provider.add_metric_reader(sdk_later)
    feed(ours, batch[9:])
    feed(sdk, batch[9:])
    assert points(later) == points(sdk_later)
    assert points(first) == points(sdk_first)


def test_exemplars_are_the_sdks_under_a_sampled_current_span() -> None:
    # The SDK's defaults: the trace-based filter, the last value per bucket for the
    # histograms, one sample for the counter (here all its samples carry one span).
    ours_reader, sdk_reader = InMemoryMetricReader(), InMemoryMetricReader()
    ours, sdk = telemetry(ours_reader), sdk_telemetry(sdk_reader)
    tracer = TracerProvider().get_tracer("app")
    batch = calls()
    with trace.use_span(tracer.start_span("first"), end_on_exit=True):
        for tel in (ours, sdk):
            feed(tel, batch[:20])
    for tel in (ours, sdk):
        feed(tel, batch[20:25])  # no current span: no exemplar
    with trace.use_span(tracer.start_span("second"), end_on_exit=True):
        for tel in (ours, sdk):
            feed(tel, batch[25:])
    got = points(ours_reader)
    assert got == points(sdk_reader)
    exemplars = [e for p in got.values() for e in p.get("exemplars", ())]
    assert len({e[2] for e in exemplars}) == 2  # both spans, no exemplar without one
    # Collected, the exemplars are gone until new values come.
    assert all(not p.get("exemplars") for p in points(ours_reader).values())
    assert points(ours_reader) == points(sdk_reader)


def test_a_reader_asking_for_another_histogram_aggregation_gets_the_sdks() -> None:
    reader = InMemoryMetricReader(
        preferred_aggregation={Histogram: ExponentialBucketHistogramAggregation()}
    )
    tel = telemetry(reader)
    assert not any(isinstance(s._duration, aggregates.HistogramTotals) for s in metric_sinks(tel))
    feed(tel, calls())
    data = reader.get_metrics_data()
    assert data is not None
    kinds = {
        m.name: type(m.data).__name__
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert kinds["gen_ai.client.operation.duration"] == "ExponentialHistogram"
    assert kinds["loopguard.stops"] == "Sum"


def test_a_reader_with_its_own_buckets_gets_them_and_the_otlp_reader_is_served() -> None:
    reader = InMemoryMetricReader(
        preferred_aggregation={Histogram: ExplicitBucketHistogramAggregation((1.0, 2.0))}
    )
    tel = telemetry(reader)
    assert not any(isinstance(s._duration, aggregates.HistogramTotals) for s in metric_sinks(tel))
    feed(tel, calls())
    got = points(reader)
    assert all(
        p["explicit_bounds"] == (1.0, 2.0) for k, p in got.items() if k[1] and "bucket_counts" in p
    )
    # The OTLP exporter asks for explicit buckets with no boundaries of its own: the
    # instruments' advice, as the aggregator gives.
    otlp = Telemetry(
        TelemetryConfig(exporter="otlp", otlp_endpoint="http://127.0.0.1:9", records=""), "p"
    )
    assert all(isinstance(s._duration, aggregates.HistogramTotals) for s in metric_sinks(otlp))
    otlp.shutdown()


def test_a_provider_nobody_holds_is_freed() -> None:
    def used() -> weakref.ref[MeterProvider]:
        provider = MeterProvider(metric_readers=[InMemoryMetricReader()], shutdown_on_exit=False)
        tel = Telemetry(TelemetryConfig(records=""), "p", meter_provider=provider)
        assert all(isinstance(s._duration, aggregates.HistogramTotals) for s in metric_sinks(tel))
        feed(tel, calls()[:3])
        return weakref.ref(provider)

    gone = used()
    gc.collect()
    assert gone() is None


@pytest.mark.parametrize(
    ("exemplar_filter", "no_span", "sampled", "unsampled"),
    [
        (TraceBasedExemplarFilter(), None, "ids", None),
        (AlwaysOnExemplarFilter(), (None, None), "ids", "ids"),
        (AlwaysOffExemplarFilter(), None, None, None),
    ],
)
def test_exemplar_ids_follow_the_providers_filter(
    exemplar_filter: Any, no_span: Any, sampled: Any, unsampled: Any
) -> None:
    # The function for the filter is picked once; each must answer as the filter would.
    provider = MeterProvider(
        metric_readers=[InMemoryMetricReader()], exemplar_filter=exemplar_filter
    )
    found = aggregates.for_provider(provider, InstrumentationScope("t"))
    assert found is not None
    assert found.exemplar_ids() == no_span
    sampled_span = TracerProvider().get_tracer("app").start_span("s")
    unsampled_span = trace.NonRecordingSpan(trace.SpanContext(7, 9, False, trace.TraceFlags(0)))
    for span, expected in ((sampled_span, sampled), (unsampled_span, unsampled)):
        ctx = span.get_span_context()
        with trace.use_span(span):
            got = found.exemplar_ids()
        assert got == (None if expected is None else (ctx.span_id, ctx.trace_id))
