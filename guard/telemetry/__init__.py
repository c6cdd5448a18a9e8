"""Spans, metrics and durable records for every guarded call.

loopguard is an OpenTelemetry span source. One span per guarded call, named
and attributed per the GenAI semantic conventions as of v1.41.1 (the constants
of ``opentelemetry-semantic-conventions``; the tracer and meter carry that
schema URL), plus the guard's own ``loopguard.*`` attributes. The agent's
``traceparent`` is continued, and the upstream request carries loopguard's
span as its parent.

Decisions worth knowing:

* Span kind is CLIENT: loopguard calls the model or tool on the agent's behalf.
* Span status is ERROR when the call failed (failure stage other than
  ``passed`` and ``loop_guard``). A stop by the guard is the guard working,
  not the call failing: it is visible as ``loopguard.failure.stage =
  loop_guard``, ``loopguard.route`` and the ``loopguard.stops`` counter.
* A stopped call never ran, so it is not in ``gen_ai.client.operation.duration``.
* Providers are per instance (never the global ones): several guards, and
  many tests, live in one process. With exporter "none" (and no provider given)
  spans are non-recording but carry real ids, so ``traceparent`` propagation and
  the records' trace ids work; metrics are not recorded unless an extra metric
  reader (the admin listener's Prometheus reader) is given to read them.
* Export is batched on background threads and bounded by a short timeout; a
  dead collector costs a rate-limited warning and dropped spans, never a
  request, and at most one timeout per signal at shutdown.
* Content (messages, arguments, results) is on a span only when
  ``capture_content`` is on, and then only what the caller already redacted.
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any
from urllib.parse import urlsplit

import structlog
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricExportResult,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
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
from opentelemetry.trace import SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from guard.engine.calls import CallRecord, FailureStage, Route
from guard.engine.config import TelemetryConfig
from guard.engine.pseudonym import SessionHasher, keyed_session_hasher
from guard.telemetry.records import RecordSink, RecordWriter
from guard.telemetry.records import record_fields as _record_fields

_log = structlog.get_logger("loopguard.telemetry")

SCHEMA_URL = Schemas.V1_41_1.value
SEMCONV_VERSION = "1.41.1"
INSTRUMENTATION_NAME = "loopguard"

GA = gen_ai_attributes
# Semconv constants that exist for what we emit.
ATTR_OPERATION = GA.GEN_AI_OPERATION_NAME
ATTR_PROVIDER = GA.GEN_AI_PROVIDER_NAME
ATTR_REQUEST_MODEL = GA.GEN_AI_REQUEST_MODEL
ATTR_RESPONSE_MODEL = GA.GEN_AI_RESPONSE_MODEL
ATTR_RESPONSE_ID = GA.GEN_AI_RESPONSE_ID
ATTR_FINISH_REASONS = GA.GEN_AI_RESPONSE_FINISH_REASONS
ATTR_INPUT_TOKENS = GA.GEN_AI_USAGE_INPUT_TOKENS
ATTR_OUTPUT_TOKENS = GA.GEN_AI_USAGE_OUTPUT_TOKENS
# Value "gen_ai.usage.cache_read.input_tokens" in this semconv release.
ATTR_CACHE_READ_TOKENS = GA.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS
ATTR_STREAM = GA.GEN_AI_REQUEST_STREAM
ATTR_TTFC = GA.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK
ATTR_TOOL_NAME = GA.GEN_AI_TOOL_NAME
ATTR_CONVERSATION_ID = GA.GEN_AI_CONVERSATION_ID
ATTR_TOKEN_TYPE = GA.GEN_AI_TOKEN_TYPE
ATTR_SERVER_ADDRESS = server_attributes.SERVER_ADDRESS
ATTR_SERVER_PORT = server_attributes.SERVER_PORT
ATTR_ERROR_TYPE = error_attributes.ERROR_TYPE
ATTR_MCP_METHOD = mcp_attributes.MCP_METHOD_NAME
ATTR_MCP_SESSION = mcp_attributes.MCP_SESSION_ID
ATTR_JSONRPC_ID = jsonrpc_attributes.JSONRPC_REQUEST_ID
ATTR_HTTP_STATUS = http_attributes.HTTP_RESPONSE_STATUS_CODE

# Well-known gen_ai.operation.name values (GenAiOperationNameValues; that enum is marked
# deprecated in this semconv release, so its values are spelled here and checked in tests).
OP_CHAT = "chat"
OP_EXECUTE_TOOL = "execute_tool"

# The guard's own attributes (no convention exists for them).
LG_ROUTE = "loopguard.route"
LG_FAILURE_STAGE = "loopguard.failure.stage"
LG_PARAMS_HASH = "loopguard.params.hash"
LG_PROGRESS_MARKER = "loopguard.progress.marker"
LG_REPEAT_COUNT = "loopguard.repeat.count"
LG_STALL_RULE = "loopguard.stall.rule"
LG_SCRUB_POLICY = "loopguard.scrub.policy"
LG_SESSION_TRACKED = "loopguard.session.tracked"
LG_OUTPUT_THROUGHPUT = "loopguard.output.throughput"
LG_TIMING_MALFORMED = "loopguard.timing.malformed"
LG_USAGE_SOURCE = "loopguard.usage.source"

# The only keys of CallRecord.captured that may reach a span (when capture is on).
CAPTURE_ATTRIBUTES = frozenset(
    {
        GA.GEN_AI_INPUT_MESSAGES,
        GA.GEN_AI_OUTPUT_MESSAGES,
        GA.GEN_AI_SYSTEM_INSTRUCTIONS,
        GA.GEN_AI_TOOL_CALL_ARGUMENTS,
        GA.GEN_AI_TOOL_CALL_RESULT,
    }
)

# Bucket boundaries from the GenAI metrics conventions ("This metric SHOULD be specified
# with ExplicitBucketBoundaries of ..."): docs/gen-ai/gen-ai-metrics.md. The same doubling
# series is given for duration, time_to_first_chunk and time_per_output_chunk.
DURATION_BUCKETS = (
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
    81.92,
)
TOKEN_BUCKETS = (
    1,
    4,
    16,
    64,
    256,
    1024,
    4096,
    16384,
    65536,
    262144,
    1048576,
    4194304,
    16777216,
    67108864,
)
TTFC_BUCKETS = DURATION_BUCKETS
TIME_PER_CHUNK_BUCKETS = DURATION_BUCKETS

METRIC_STOPS = "loopguard.stops"
# A per-call cap on recorded chunk gaps (~2 us each, on the request path): the histogram's
# count is exact up to this many gaps per call.
_MAX_CHUNK_SAMPLES = 256

# Failure stages that are not an error of the call itself.
_NOT_ERRORS = frozenset({FailureStage.PASSED, FailureStage.LOOP_GUARD})
# Routes where a stall rule fired (served anyway in observe mode; nudged; stopped).
_STALL_ROUTES = frozenset({Route.STOP_AND_REVIEW, Route.NUDGE, Route.OBSERVE})

_EXPORT_TIMEOUT_S = 2.0
_SAMPLED_INT = int(TraceFlags.SAMPLED)
_WARN_EVERY_S = 60.0
_APP_VALUE_MAX = 256


def _version() -> str:
    try:
        return metadata.version("loopguard")
    except metadata.PackageNotFoundError:
        return "0"


class CallSpan:
    """One call's span, from ``Telemetry.start`` to ``Telemetry.finish``.

    The ids live here as ints, read once: ``traceparent`` for the upstream and the
    record's ids come from them. ``span`` is the SDK span when spans are recorded, else
    None (nothing would read it; no OTel objects are built per call).
    """

    __slots__ = (
        "_request_id",
        "finished",
        "flags",
        "span",
        "span_int",
        "started",
        "state",
        "trace_int",
    )

    def __init__(
        self,
        span: trace.Span | None,
        trace_id: int,
        span_id: int,
        flags: int,
        state: trace.TraceState | None,
    ) -> None:
        self.span = span
        self.trace_int = trace_id
        self.span_int = span_id
        self.flags = flags
        self.state = state
        self.started = 0.0  # monotonic; set only when metrics read it
        self.finished = False
        self._request_id: str | None = None

    @property
    def request_id(self) -> str:
        """The record's correlation id, made when first asked for (records only)."""
        if self._request_id is None:
            # Not a secret: no os.urandom system call per call.
            self._request_id = f"{random.getrandbits(128):032x}"
        return self._request_id

    @property
    def trace_id(self) -> str:
        return f"{self.trace_int:032x}"

    @property
    def span_id(self) -> str:
        return f"{self.span_int:016x}"

    def inject(self, headers: dict[str, str]) -> dict[str, str]:
        """Write ``traceparent`` (and ``tracestate``) naming this span as the parent:
        the W3C format as ``TraceContextTextMapPropagator.inject`` writes it."""
        headers["traceparent"] = f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"
        if self.state:
            headers["tracestate"] = self.state.to_header()
        return headers


class _FailureWarnings:
    """Turns export failures into one rate-limited warning line (no payloads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0.0
        self._dropped = 0

    def failed(self, signal: str, items: int) -> None:
        with self._lock:
            self._dropped += items
            now = time.monotonic()
            if self._last and now - self._last < _WARN_EVERY_S:
                return
            self._last, dropped, self._dropped = now, self._dropped, 0
        _log.warning("otlp export failed", signal=signal, dropped=dropped)


class _GuardedSpanExporter(SpanExporter):
    """Delegates to the real exporter; warns on failure; at shutdown, a failed collector
    is not retried batch after batch (bounded shutdown)."""

    def __init__(self, inner: SpanExporter, warnings: _FailureWarnings) -> None:
        self._inner = inner
        self._warnings = warnings
        self.closing = False
        self._failing = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self.closing and self._failing:
            self._warnings.failed("traces", len(spans))
            return SpanExportResult.FAILURE
        try:
            result = self._inner.export(spans)
        except Exception:  # an exporter must never take the worker thread down
            result = SpanExportResult.FAILURE
        self._failing = result is not SpanExportResult.SUCCESS
        if self._failing:
            self._warnings.failed("traces", len(spans))
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class _GuardedMetricExporter(MetricExporter):
    def __init__(self, inner: MetricExporter, warnings: _FailureWarnings) -> None:
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self._inner = inner
        self._warnings = warnings
        self.closing = False
        self._failing = False

    def export(self, metrics_data: Any, timeout_millis: float = 10_000, **kwargs: Any) -> Any:
        if self.closing and self._failing:
            self._warnings.failed("metrics", 1)
            return MetricExportResult.FAILURE
        try:
            result = self._inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception:
            result = MetricExportResult.FAILURE
        self._failing = result is not MetricExportResult.SUCCESS
        if self._failing:
            self._warnings.failed("metrics", 1)
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self._inner.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._inner.shutdown(timeout_millis=timeout_millis, **kwargs)


def build_resource(cfg: TelemetryConfig) -> Resource:
    """service.name: the config, else OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES, else
    "loopguard"."""
    base = Resource.create({"service.version": _version()})
    if cfg.service_name:
        return base.merge(Resource({"service.name": cfg.service_name}))
    from_env = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    if from_env:
        return base
    return base.merge(Resource({"service.name": "loopguard"}))


def otlp_endpoints(configured: str | None) -> tuple[str | None, str | None]:
    """(traces, metrics) endpoints from ``telemetry.otlp_endpoint``; None lets the
    standard OTEL_EXPORTER_OTLP_* variables decide.

    The setting is the traces endpoint (``http://host:4318/v1/traces``); the metrics
    endpoint is its sibling. A bare base URL gets the standard signal paths.
    """
    if not configured:
        return None, None
    url = configured.rstrip("/")
    if url.endswith("/v1/traces"):
        return url, url[: -len("/v1/traces")] + "/v1/metrics"
    if urlsplit(url).path in ("", "/"):
        return url + "/v1/traces", url + "/v1/metrics"
    # A custom path (a proxied collector): metrics follow the environment.
    return url, None


def _otlp_timeout(signal: str) -> float | None:
    """A short export timeout unless the environment sets one."""
    if os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_TIMEOUT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TIMEOUT"
    ):
        return None
    return _EXPORT_TIMEOUT_S


class Telemetry:
    """Spans, metrics and durable records for guarded calls.

    ``tracer_provider``/``meter_provider``: given ones are used as they are (and only
    flushed by ``shutdown``); otherwise they are built from ``cfg`` and owned.
    ``record_sink`` receives each durable record as a dict (tests, in-process users).
    ``metric_readers``: readers added to the owned meter provider beside the configured
    exporter's (the admin listener's Prometheus reader); metrics are then recorded even
    with exporter "none".
    ``session_hasher`` pseudonymizes session ids in records (default: keyed BLAKE2b
    with a random per-process key; pass the scrub policy's for stable pseudonyms).
    """

    def __init__(
        self,
        cfg: TelemetryConfig,
        scrub_policy: str,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        record_sink: RecordSink | None = None,
        session_hasher: SessionHasher | None = None,
        metric_readers: Sequence[MetricReader] = (),
    ) -> None:
        if metric_readers and meter_provider is not None:
            raise ValueError("metric_readers need the meter provider Telemetry builds")
        self.cfg = cfg
        self.scrub_policy = scrub_policy
        self._warnings = _FailureWarnings()
        self._guarded: list[_GuardedSpanExporter | _GuardedMetricExporter] = []
        self._owns_tracer = tracer_provider is None
        self._owns_meter = meter_provider is None
        # Nothing would ever read a span or a metric point built here: exporter "none"
        # and no provider given. Spans are then non-recording (ids only, for
        # ``traceparent`` and the records) and metrics are not recorded at all -- the
        # SDK's span and histogram bookkeeping is most of the guard's cost per call.
        unread = cfg.exporter == "none"
        self._recording_spans = not (unread and self._owns_tracer)
        self._recording_metrics = not (unread and self._owns_meter and not metric_readers)
        resource = build_resource(cfg) if (self._owns_tracer or self._owns_meter) else None
        self.tracer_provider = tracer_provider or self._build_tracer_provider(resource)
        self.meter_provider = meter_provider or self._build_meter_provider(resource, metric_readers)
        self._tracer = self.tracer_provider.get_tracer(
            INSTRUMENTATION_NAME, _version(), schema_url=SCHEMA_URL
        )
        meter = self.meter_provider.get_meter(
            INSTRUMENTATION_NAME, _version(), schema_url=SCHEMA_URL
        )
        self._init_instruments(meter)
        self._records = RecordWriter(cfg.records, record_sink)
        self._session_hasher = session_hasher or keyed_session_hasher()
        self._propagator = TraceContextTextMapPropagator()
        self._shutdown_lock = threading.Lock()
        self._shut = False

    # -- providers -------------------------------------------------------------------

    def _build_tracer_provider(self, resource: Resource | None) -> TracerProvider:
        provider = TracerProvider(resource=resource)
        exporter: SpanExporter | None = None
        if self.cfg.exporter == "console":
            # sys.stdout as it is now (the SDK's default is bound at its import).
            exporter = ConsoleSpanExporter(out=sys.stdout)
        elif self.cfg.exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            traces, _ = otlp_endpoints(self.cfg.otlp_endpoint)
            exporter = OTLPSpanExporter(endpoint=traces, timeout=_otlp_timeout("TRACES"))
        if exporter is not None:
            guarded = _GuardedSpanExporter(exporter, self._warnings)
            self._guarded.append(guarded)
            provider.add_span_processor(BatchSpanProcessor(guarded))
        return provider

    def _build_meter_provider(
        self, resource: Resource | None, extra: Sequence[MetricReader]
    ) -> MeterProvider:
        readers: list[MetricReader] = list(extra)
        exporter: MetricExporter | None = None
        if self.cfg.exporter == "console":
            exporter = ConsoleMetricExporter(out=sys.stdout)
        elif self.cfg.exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

            _, metrics = otlp_endpoints(self.cfg.otlp_endpoint)
            exporter = OTLPMetricExporter(endpoint=metrics, timeout=_otlp_timeout("METRICS"))
        if exporter is not None:
            guarded = _GuardedMetricExporter(exporter, self._warnings)
            self._guarded.append(guarded)
            # Interval from OTEL_METRIC_EXPORT_INTERVAL (default 60 s); shutdown flushes.
            readers.append(PeriodicExportingMetricReader(guarded))
        return MeterProvider(metric_readers=readers, resource=resource or Resource.create())

    def _init_instruments(self, meter: Any) -> None:
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

    # -- one call ----------------------------------------------------------------------

    def start(
        self,
        span_name: str,
        incoming_headers: Mapping[str, str],
        kind: SpanKind = SpanKind.CLIENT,
        *,
        lowercase: bool = False,
    ) -> CallSpan:
        """Open the call's span as a child of the agent's span (its ``traceparent``).

        ``lowercase``: the caller's header names are lower-cased already (the front
        doors'), so they are not checked one by one."""
        parent = self._parent_context(incoming_headers, lowercase)
        if self._recording_spans:
            span = self._tracer.start_span(span_name, context=parent, kind=kind)
            ctx = span.get_span_context()
            call = CallSpan(span, ctx.trace_id, ctx.span_id, ctx.trace_flags, ctx.trace_state)
        else:
            call = _unrecorded_call(parent)
        if self._recording_metrics:
            call.started = time.monotonic()
        return call

    def _parent_context(self, headers: Mapping[str, str], lowercase: bool) -> Context | None:
        """The agent's trace context, None when it sent none (a new trace)."""
        if not lowercase and not all(k.islower() for k in headers):
            headers = {k.lower(): v for k, v in headers.items()}
        if "traceparent" not in headers:
            return None
        return self._propagator.extract(headers)

    def finish(
        self,
        call_span: CallSpan,
        record: CallRecord,
        chunk_gaps: Sequence[float] | None = None,
    ) -> None:
        """Attribute and end the span, record metrics, write the durable record.

        ``chunk_gaps``: seconds between successive output chunks, if the caller kept them;
        otherwise time_per_output_chunk is recorded as the mean gap once per gap.
        Never raises: telemetry must not fail a call.
        """
        if call_span.finished:
            return
        call_span.finished = True
        # Read by the metrics only (no clock read when they are not recorded).
        recording_metrics = self._recording_metrics
        elapsed = time.monotonic() - call_span.started if recording_metrics else 0.0
        # Failures are logged by exception type only: a message could quote a value.
        span = call_span.span
        if span is not None:
            try:
                self._end_span(span, record)
            except Exception as exc:
                _log.warning("span attributes failed", error=type(exc).__name__)
                span.end()
        if recording_metrics:
            try:
                self._record_metrics(record, elapsed, chunk_gaps)
            except Exception as exc:
                _log.warning("metrics failed", error=type(exc).__name__)
        if not self._records.enabled:
            return
        try:
            self._records.write(
                _record_fields(
                    record,
                    request_id=call_span.request_id,
                    trace_id=call_span.trace_id,
                    span_id=call_span.span_id,
                    scrub_policy=self.scrub_policy,
                    session_hasher=self._session_hasher,
                )
            )
        except Exception as exc:
            _log.warning("durable record failed", error=type(exc).__name__)

    def span_attributes(self, record: CallRecord) -> dict[str, Any]:
        """The span's attributes for a record (semconv first, then loopguard.*, then app)."""
        attrs: dict[str, Any] = {}

        def put(key: str, value: Any) -> None:
            if value is not None:
                attrs[key] = value

        operation = gen_ai_operation(record)
        put(ATTR_OPERATION, operation)
        put(ATTR_PROVIDER, record.provider)
        put(ATTR_REQUEST_MODEL, record.model)
        put(ATTR_RESPONSE_MODEL, record.response_model)
        put(ATTR_RESPONSE_ID, record.response_id)
        if record.finish_reasons:
            attrs[ATTR_FINISH_REASONS] = tuple(str(r) for r in record.finish_reasons)
        usage = record.usage
        if usage is not None:
            put(ATTR_INPUT_TOKENS, _int(usage.input_tokens))
            put(ATTR_OUTPUT_TOKENS, _int(usage.output_tokens))
            put(ATTR_CACHE_READ_TOKENS, _int(usage.cached_input_tokens))
        if record.stream is not None:
            attrs[ATTR_STREAM] = bool(record.stream)
        if record.ttft_s is not None:
            attrs[ATTR_TTFC] = float(record.ttft_s)
        put(ATTR_TOOL_NAME, record.tool)
        put(ATTR_CONVERSATION_ID, record.conversation_id)
        put(ATTR_SERVER_ADDRESS, record.server_address)
        put(ATTR_SERVER_PORT, _int(record.server_port))
        put(ATTR_ERROR_TYPE, error_type(record))
        put(ATTR_MCP_METHOD, record.mcp_method)
        put(ATTR_MCP_SESSION, record.mcp_session_id)
        if record.jsonrpc_request_id is not None:
            attrs[ATTR_JSONRPC_ID] = str(record.jsonrpc_request_id)
        put(ATTR_HTTP_STATUS, _int(record.status_code))

        attrs[LG_ROUTE] = str(record.route)
        attrs[LG_FAILURE_STAGE] = str(record.failure_stage)
        put(LG_PARAMS_HASH, record.params_hash)
        put(LG_PROGRESS_MARKER, record.progress_marker)
        put(LG_REPEAT_COUNT, _int(record.repeat_count))
        put(LG_STALL_RULE, str(record.stall_rule) if record.stall_rule else None)
        attrs[LG_SCRUB_POLICY] = record.scrub_policy or self.scrub_policy
        attrs[LG_SESSION_TRACKED] = bool(record.session_tracked)
        if record.output_tps is not None:
            attrs[LG_OUTPUT_THROUGHPUT] = float(record.output_tps)
        if record.timing_malformed:
            attrs[LG_TIMING_MALFORMED] = True
        if usage is not None:
            attrs[LG_USAGE_SOURCE] = usage.source

        namespace = self.cfg.app_namespace
        for name, value in record.app.items():
            key = name.strip().lower().replace("-", "_")
            if key:
                attrs[f"{namespace}{key}"] = str(value)[:_APP_VALUE_MAX]

        if self.cfg.capture_content:
            for key, value in record.captured.items():
                if key in CAPTURE_ATTRIBUTES and value is not None:
                    attrs[key] = str(value)
        return attrs

    def _end_span(self, span: trace.Span, record: CallRecord) -> None:
        if record.span_name:
            span.update_name(record.span_name)
        span.set_attributes(self.span_attributes(record))
        if record.failure_stage not in _NOT_ERRORS:
            span.set_status(Status(StatusCode.ERROR, str(record.failure_stage)))
        span.end()

    def metric_attributes(self, record: CallRecord) -> dict[str, Any]:
        """Low-cardinality attributes only: never session, hashes, markers or ids."""
        attrs: dict[str, Any] = {}
        for key, value in (
            (ATTR_OPERATION, gen_ai_operation(record)),
            (ATTR_PROVIDER, record.provider),
            (ATTR_REQUEST_MODEL, record.model),
            (ATTR_ERROR_TYPE, error_type(record)),
            (ATTR_SERVER_ADDRESS, record.server_address),
        ):
            if value is not None:
                attrs[key] = value
        if record.server_address is not None and record.server_port is not None:
            # Conditionally required with server.address.
            attrs[ATTR_SERVER_PORT] = int(record.server_port)
        return attrs

    def _record_metrics(
        self, record: CallRecord, elapsed: float, chunk_gaps: Sequence[float] | None
    ) -> None:
        if record.stall_rule is not None and record.route in _STALL_ROUTES:
            stop_attrs: dict[str, Any] = {
                LG_STALL_RULE: str(record.stall_rule),
                LG_ROUTE: str(record.route),
            }
            if record.tool:
                stop_attrs[ATTR_TOOL_NAME] = record.tool
            self._stops.add(1, stop_attrs)

        if gen_ai_operation(record) is None or record.failure_stage == FailureStage.LOOP_GUARD:
            return  # not a GenAI operation, or one that never ran
        attrs = self.metric_attributes(record)
        total = record.total_s if record.total_s is not None else elapsed
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

    # -- lifecycle ---------------------------------------------------------------------

    def force_flush(self, timeout_millis: int = 5_000) -> None:
        self.tracer_provider.force_flush(timeout_millis)
        self.meter_provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """Flush and stop exporters (owned providers) and close the record file. Idempotent."""
        with self._shutdown_lock:
            if self._shut:
                return
            self._shut = True
        for guarded in self._guarded:
            guarded.closing = True
        for owned, provider in (
            (self._owns_tracer, self.tracer_provider),
            (self._owns_meter, self.meter_provider),
        ):
            try:
                if owned:
                    provider.shutdown()
                else:
                    provider.force_flush()
            except Exception:
                _log.warning("telemetry shutdown failed", provider=type(provider).__name__)
        self._records.close()


def _unrecorded_call(parent: Context | None) -> CallSpan:
    """A call without an SDK span, with the ids a recording one would get.

    The SDK's default sampler (parent-based, else always on) decides the sampled flag
    the same way: the agent's flag when a ``traceparent`` came in, else sampled. Ids
    come from ``random.getrandbits`` as the SDK's ``RandomIdGenerator`` makes them.
    """
    if parent is not None:
        parent_ctx = trace.get_current_span(parent).get_span_context()
        if parent_ctx.is_valid:
            return CallSpan(
                None,
                parent_ctx.trace_id,
                _random_id(64),
                parent_ctx.trace_flags,
                parent_ctx.trace_state,
            )
    return CallSpan(None, _random_id(128), _random_id(64), _SAMPLED_INT, None)


def _random_id(bits: int) -> int:
    value = random.getrandbits(bits)
    while not value:  # zero is the invalid id
        value = random.getrandbits(bits)
    return value


def gen_ai_operation(record: CallRecord) -> str | None:
    """gen_ai.operation.name for a record; None where the call is not a GenAI operation
    (passthrough, MCP methods other than tools/call)."""
    if record.operation == "chat":
        return OP_CHAT
    if record.operation == "execute_tool":
        return OP_EXECUTE_TOOL
    if record.operation == "mcp" and (
        record.mcp_method == "tools/call" or (record.mcp_method is None and record.tool)
    ):
        return OP_EXECUTE_TOOL
    return None


def error_type(record: CallRecord) -> str | None:
    """error.type: the caller's low-cardinality error, else the failure stage."""
    if record.failure_stage in _NOT_ERRORS:
        return record.error_type
    return record.error_type or str(record.failure_stage)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)
