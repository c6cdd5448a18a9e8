"""The GenAI client metrics and ``loopguard.stops``, with the conventions' buckets.

A stopped call never ran, so it is not in ``gen_ai.client.operation.duration``; it
counts in ``loopguard.stops`` (by rule, tool and route). Metric attributes are the
field table's low-cardinality ones (``guard.telemetry.fields``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.metrics import Meter
from opentelemetry.semconv._incubating.metrics import gen_ai_metrics

from guard.engine.calls import CallRecord, FailureStage, Route
from guard.telemetry import aggregates
from guard.telemetry.aggregates import Aggregates, AttrKey, CounterTotals, HistogramTotals, Ids
from guard.telemetry.fields import PROJECTIONS
from guard.telemetry.semconv import (
    ATTR_TOKEN_TYPE,
    ATTR_TOOL_NAME,
    LG_ROUTE,
    LG_STALL_RULE,
    METRIC_STOPS,
)
from guard.telemetry.sink import SinkSetup
from guard.telemetry.spans import CallSpan

# Bucket boundaries from the GenAI metrics conventions ("This metric SHOULD be specified
# with ExplicitBucketBoundaries of ..."): docs/gen-ai/gen-ai-metrics.md. The same doubling
# series is given for duration, time_to_first_chunk and time_per_output_chunk.
DURATION_BUCKETS = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
TOKEN_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216,
    67108864,
)  # fmt: skip
TTFC_BUCKETS = DURATION_BUCKETS
TIME_PER_CHUNK_BUCKETS = DURATION_BUCKETS

# A per-call cap on recorded chunk gaps (each on the request path; 5-7 us on an SDK
# histogram): the histogram's count is exact up to this many gaps per call.
_MAX_CHUNK_SAMPLES = 256

# Routes where a stall rule fired (served anyway in observe mode; nudged; stopped).
_STALL_ROUTES = frozenset({Route.STOP_AND_REVIEW, Route.NUDGE, Route.OBSERVE})

# A module global: an enum class's attribute goes through its metaclass' __getattr__.
_LOOP_GUARD = FailureStage.LOOP_GUARD

# Module globals: read once per call, not through the projections object.
_operation_key = PROJECTIONS.operation_metric_key
_monotonic = time.monotonic

_INPUT = (ATTR_TOKEN_TYPE, "input")
_OUTPUT = (ATTR_TOKEN_TYPE, "output")


class _SdkHistogram:
    """An SDK histogram behind ``HistogramTotals``' methods: for providers whose readers
    ``aggregates`` cannot serve (views, another aggregation, not the SDK's). The SDK
    keeps its own exemplars (``exemplar`` is not used)."""

    def __init__(self, meter: Meter, name: str, unit: str, description: str, buckets: Any):
        self._histogram = meter.create_histogram(
            name, unit=unit, description=description, explicit_bucket_boundaries_advisory=buckets
        )

    def record(self, value: float, key: AttrKey, times: int = 1, exemplar: Any = None) -> None:
        attrs = dict(key)
        for _ in range(times):
            self._histogram.record(value, attrs)

    def record_each(self, values: Sequence[float], key: AttrKey, exemplar: Any = None) -> None:
        attrs = dict(key)
        for value in values:
            self._histogram.record(value, attrs)


class _SdkCounter:
    def __init__(self, meter: Meter, name: str, unit: str, description: str) -> None:
        self._counter = meter.create_counter(name, unit=unit, description=description)

    def add(self, amount: int, key: AttrKey, exemplar: Any = None) -> None:
        self._counter.add(amount, dict(key))


# (name, unit, description, buckets): the semconv create_* helpers take no bucket
# advice, so the histograms are declared here with the same names, units and
# descriptions plus the convention's buckets.
_DURATION = (
    gen_ai_metrics.GEN_AI_CLIENT_OPERATION_DURATION,
    "s",
    "GenAI operation duration.",
    DURATION_BUCKETS,
)
_TOKENS = (
    gen_ai_metrics.GEN_AI_CLIENT_TOKEN_USAGE,
    "{token}",
    "Number of input and output tokens used.",
    TOKEN_BUCKETS,
)
_TTFC = (
    gen_ai_metrics.GEN_AI_CLIENT_OPERATION_TIME_TO_FIRST_CHUNK,
    "s",
    "Time to receive the first chunk, measured from when the client issues the generation "
    "request to when the first chunk is received in the response stream.",
    TTFC_BUCKETS,
)
_PER_CHUNK = (
    gen_ai_metrics.GEN_AI_CLIENT_OPERATION_TIME_PER_OUTPUT_CHUNK,
    "s",
    "Time per output chunk, recorded for each chunk received after the first one.",
    TIME_PER_CHUNK_BUCKETS,
)
_STOPS = (
    METRIC_STOPS,
    "{call}",
    "Calls on which a stall rule fired, by rule, tool and route.",
)


class MetricSink:
    """Records each call on the GenAI histograms and the stops counter.

    With ``totals`` (the provider's ``Aggregates``), values are aggregated here and
    reach the SDK when a reader collects; without, they go to SDK instruments on
    ``meter``. Readers see the same metrics either way."""

    failure_event = "metrics failed"

    def __init__(self, meter: Meter, totals: Aggregates | None = None) -> None:
        self._duration: HistogramTotals | _SdkHistogram
        self._tokens: HistogramTotals | _SdkHistogram
        self._ttfc: HistogramTotals | _SdkHistogram
        self._per_chunk: HistogramTotals | _SdkHistogram
        self._stops: CounterTotals | _SdkCounter
        if totals is not None:
            self._duration, self._tokens, self._ttfc, self._per_chunk = (
                totals.histogram(*spec) for spec in (_DURATION, _TOKENS, _TTFC, _PER_CHUNK)
            )
            self._stops = totals.counter(*_STOPS)
            self._exemplar_ids: Callable[[], Ids | None] = totals.exemplar_ids
        else:
            self._exemplar_ids = aggregates.no_exemplar
            self._duration, self._tokens, self._ttfc, self._per_chunk = (
                _SdkHistogram(meter, *spec) for spec in (_DURATION, _TOKENS, _TTFC, _PER_CHUNK)
            )
            self._stops = _SdkCounter(meter, *_STOPS)

    def emit(self, record: CallRecord, call: CallSpan) -> None:
        """``call.chunk_gaps``: seconds between successive output chunks, if the caller
        kept them; otherwise time_per_output_chunk is recorded as the mean gap once per
        gap."""
        exemplar = self._exemplar_ids()
        if record.stall_rule is not None and record.route in _STALL_ROUTES:
            stop_key: AttrKey = (
                (LG_STALL_RULE, str(record.stall_rule)),
                (LG_ROUTE, str(record.route)),
            )
            if record.tool:
                stop_key += ((ATTR_TOOL_NAME, record.tool),)
            self._stops.add(1, stop_key, exemplar)

        if record.failure_stage == _LOOP_GUARD:
            return  # a GenAI operation or not, it never ran
        key = _operation_key(record)
        if key is None:
            return  # not a GenAI operation
        total = record.total_s
        total = float(total) if total is not None else _monotonic() - call.started
        if total < 0.0:  # max(total, 0.0) without the call: NaN and -0.0 are kept
            total = 0.0
        self._duration.record(total, key, 1, exemplar)

        usage = record.usage
        if usage is not None and usage.source == "response":
            if usage.input_tokens is not None:
                self._tokens.record(int(usage.input_tokens), (*key, _INPUT), 1, exemplar)
            if usage.output_tokens is not None:
                self._tokens.record(int(usage.output_tokens), (*key, _OUTPUT), 1, exemplar)

        if not record.stream:
            return  # the chunk metrics are for streamed responses only
        if record.ttft_s is not None:
            self._ttfc.record(float(record.ttft_s), key, 1, exemplar)
        chunk_gaps = call.chunk_gaps
        if chunk_gaps:
            gaps = [max(float(gap), 0.0) for gap in list(chunk_gaps)[:_MAX_CHUNK_SAMPLES]]
            self._per_chunk.record_each(gaps, key, exemplar)
        elif (
            record.output_chunks >= 2
            and record.ttft_s is not None
            and record.total_s is not None
            and not record.timing_malformed
            and record.total_s > record.ttft_s
        ):
            # Mean gap, once per gap: count and sum are exact, the spread is not.
            gaps_n = record.output_chunks - 1
            mean = (record.total_s - record.ttft_s) / gaps_n
            self._per_chunk.record(mean, key, min(gaps_n, _MAX_CHUNK_SAMPLES), exemplar)

    def force_flush(self, timeout_millis: int) -> None:
        pass  # the meter provider's pipeline flushes

    def shutdown(self) -> None:
        pass


def sink(setup: SinkSetup) -> MetricSink | None:
    """Only when metrics are recorded (exporter "none" and no provider given: nothing
    would read them)."""
    if setup.meter is None:
        return None
    provider, scope = setup.meter_provider, setup.scope
    totals = None
    if provider is not None and scope is not None:
        totals = aggregates.for_provider(provider, scope)
    return MetricSink(setup.meter, totals)
