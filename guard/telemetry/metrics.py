"""The GenAI client metrics and ``loopguard.stops``, with the conventions' buckets.

A stopped call never ran, so it is not in ``gen_ai.client.operation.duration``; it
counts in ``loopguard.stops`` (by rule, tool and route). Metric attributes are the
field table's low-cardinality ones (``guard.telemetry.fields``).
"""

from __future__ import annotations

import time

from opentelemetry.metrics import Meter
from opentelemetry.semconv._incubating.metrics import gen_ai_metrics

from guard.engine.calls import CallRecord, FailureStage, Route
from guard.telemetry.fields import PROJECTIONS, gen_ai_operation
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

# A per-call cap on recorded chunk gaps (~2 us each, on the request path): the histogram's
# count is exact up to this many gaps per call.
_MAX_CHUNK_SAMPLES = 256

# Routes where a stall rule fired (served anyway in observe mode; nudged; stopped).
_STALL_ROUTES = frozenset({Route.STOP_AND_REVIEW, Route.NUDGE, Route.OBSERVE})


class MetricSink:
    """Records each call on the GenAI histograms and the stops counter."""

    failure_event = "metrics failed"

    def __init__(self, meter: Meter) -> None:
        # The semconv create_* helpers take no bucket advice, so the histograms are made
        # here with the same names, units and descriptions plus the convention's buckets.
        self._duration = meter.create_histogram(
            gen_ai_metrics.GEN_AI_CLIENT_OPERATION_DURATION,
            unit="s",
            description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self._tokens = meter.create_histogram(
            gen_ai_metrics.GEN_AI_CLIENT_TOKEN_USAGE,
            unit="{token}",
            description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        )
        self._ttfc = meter.create_histogram(
            gen_ai_metrics.GEN_AI_CLIENT_OPERATION_TIME_TO_FIRST_CHUNK,
            unit="s",
            description="Time to receive the first chunk, measured from when the client issues "
            "the generation request to when the first chunk is received in the response stream.",
            explicit_bucket_boundaries_advisory=TTFC_BUCKETS,
        )
        self._per_chunk = meter.create_histogram(
            gen_ai_metrics.GEN_AI_CLIENT_OPERATION_TIME_PER_OUTPUT_CHUNK,
            unit="s",
            description="Time per output chunk, recorded for each chunk received after the "
            "first one.",
            explicit_bucket_boundaries_advisory=TIME_PER_CHUNK_BUCKETS,
        )
        self._stops = meter.create_counter(
            METRIC_STOPS,
            unit="{call}",
            description="Calls on which a stall rule fired, by rule, tool and route.",
        )

    def emit(self, record: CallRecord, call: CallSpan) -> None:
        """``call.chunk_gaps``: seconds between successive output chunks, if the caller
        kept them; otherwise time_per_output_chunk is recorded as the mean gap once per
        gap."""
        if record.stall_rule is not None and record.route in _STALL_ROUTES:
            stop_attrs: dict[str, str] = {
                LG_STALL_RULE: str(record.stall_rule),
                LG_ROUTE: str(record.route),
            }
            if record.tool:
                stop_attrs[ATTR_TOOL_NAME] = record.tool
            self._stops.add(1, stop_attrs)

        if gen_ai_operation(record) is None or record.failure_stage == FailureStage.LOOP_GUARD:
            return  # not a GenAI operation, or one that never ran
        attrs = PROJECTIONS.metric(record)
        total = record.total_s if record.total_s is not None else time.monotonic() - call.started
        self._duration.record(max(float(total), 0.0), attrs)

        usage = record.usage
        if usage is not None and usage.source == "response":
            for token_type, count in (
                ("input", usage.input_tokens),
                ("output", usage.output_tokens),
            ):
                if count is not None:
                    self._tokens.record(int(count), {**attrs, ATTR_TOKEN_TYPE: token_type})

        if not record.stream:
            return  # the chunk metrics are for streamed responses only
        if record.ttft_s is not None:
            self._ttfc.record(float(record.ttft_s), attrs)
        chunk_gaps = call.chunk_gaps
        if chunk_gaps:
            for gap in list(chunk_gaps)[:_MAX_CHUNK_SAMPLES]:
                self._per_chunk.record(max(float(gap), 0.0), attrs)
        elif (
            record.output_chunks >= 2
            and record.ttft_s is not None
            and record.total_s is not None
            and not record.timing_malformed
            and record.total_s > record.ttft_s
        ):
            # Mean gap, once per gap: count and sum are exact, the spread is not.
            gaps = record.output_chunks - 1
            mean = (record.total_s - record.ttft_s) / gaps
            for _ in range(min(gaps, _MAX_CHUNK_SAMPLES)):
                self._per_chunk.record(mean, attrs)

    def force_flush(self, timeout_millis: int) -> None:
        pass  # the meter provider's pipeline flushes

    def shutdown(self) -> None:
        pass


def sink(setup: SinkSetup) -> MetricSink | None:
    """Only when metrics are recorded (exporter "none" and no provider given: nothing
    would read them, and the SDK's histogram bookkeeping is most of a call's cost)."""
    return MetricSink(setup.meter) if setup.meter is not None else None
