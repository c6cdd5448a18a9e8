"""``Telemetry``: starts each call's span and hands each finished call to the sinks.

The front doors see four methods (``start``, ``finish``, ``force_flush``,
``shutdown``: the engine's ``TelemetryPort``). Behind them: the tracer and meter
pipelines (``exporters``) and the sinks, one per way a call leaves loopguard, in
``SINKS`` order: the span, the metrics, the durable record. A new sink is a module
with a ``sink(setup)`` factory (see ``guard.telemetry.sink``) and one line in
``SINKS``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence

import structlog
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind

from guard.engine.calls import CallRecord
from guard.engine.config import Config, TelemetryConfig
from guard.engine.pseudonym import SessionHasher, keyed_session_hasher
from guard.engine.telemetry_port import SpanHandle
from guard.telemetry import exporters, metrics, records, spans
from guard.telemetry.semconv import INSTRUMENTATION_NAME, SCHEMA_URL
from guard.telemetry.sink import RecordCallback, Sink, SinkFactory, SinkSetup
from guard.telemetry.spans import CallSpan

_log = structlog.get_logger("loopguard.telemetry")

# Every sink, in the order a finished call reaches them.
SINKS: tuple[SinkFactory, ...] = (
    spans.sink,
    metrics.sink,
    records.sink,
)


class Telemetry:
    """Spans, metrics and durable records for guarded calls.

    ``tracer_provider``/``meter_provider``: given ones are used as they are (and only
    flushed by ``shutdown``); otherwise they are built from ``cfg`` and owned.
    ``record_sink`` receives each durable record as a dict (tests, in-process users).
    ``session_hasher`` pseudonymizes session ids in records (default: keyed BLAKE2b
    with a random per-process key; pass the engine's for stable pseudonyms).
    ``sinks``: the sink factories (default ``SINKS``).
    ``metric_readers``: readers added to the owned meter provider beside the configured
    exporter's (the admin listener's Prometheus reader); metrics are then recorded even
    with exporter "none".
    """

    def __init__(
        self,
        cfg: TelemetryConfig,
        scrub_policy: str,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        record_sink: RecordCallback | None = None,
        session_hasher: SessionHasher | None = None,
        sinks: Iterable[SinkFactory] = SINKS,
        metric_readers: Sequence[MetricReader] = (),
    ) -> None:
        self.cfg = cfg
        self.scrub_policy = scrub_policy
        warnings = exporters.FailureWarnings()
        owned = tracer_provider is None or meter_provider is None
        resource = exporters.build_resource(cfg) if owned else None
        version = exporters.version()
        scope = InstrumentationScope(INSTRUMENTATION_NAME, version, SCHEMA_URL)
        self._traces = exporters.trace_pipeline(cfg, tracer_provider, resource, warnings, scope)
        self._metrics = exporters.metric_pipeline(
            cfg, meter_provider, resource, warnings, metric_readers
        )
        self.tracer_provider = self._traces.provider
        self.meter_provider = self._metrics.provider
        # Nothing would ever read a span or a metric point built here: exporter "none"
        # and no provider given. Spans are then non-recording (ids only, for
        # ``traceparent`` and the records) and metrics are not recorded at all -- the
        # SDK's span and histogram bookkeeping is most of the guard's cost per call.
        unread = cfg.exporter == "none"
        recording_spans = not (unread and self._traces.owned)
        recording_metrics = not (unread and self._metrics.owned and not metric_readers)
        tracer = self.tracer_provider.get_tracer(
            INSTRUMENTATION_NAME, version, schema_url=SCHEMA_URL
        )
        meter = self.meter_provider.get_meter(INSTRUMENTATION_NAME, version, schema_url=SCHEMA_URL)
        direct = None
        processor = self._traces.processor
        if processor is not None and spans.DirectSpans.usable(self.tracer_provider):
            direct = spans.DirectSpans(
                processor, self.tracer_provider.resource, scope, self._traces.wire
            )
        self._tracing = spans.Tracing(tracer, recording_spans, direct)
        setup = SinkSetup(
            cfg=cfg,
            recording_spans=recording_spans,
            meter=meter if recording_metrics else None,
            record_callback=record_sink,
            session_hasher=session_hasher or keyed_session_hasher(),
            direct_spans=direct,
            meter_provider=self.meter_provider if recording_metrics else None,
            scope=scope,
        )
        built = (factory(setup) for factory in sinks)
        self._sinks: tuple[Sink, ...] = tuple(s for s in built if s is not None)
        self._shutdown_lock = threading.Lock()
        self._shut = False

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
        return self._tracing.start(span_name, incoming_headers, kind, lowercase=lowercase)

    def finish(
        self,
        call_span: SpanHandle,
        record: CallRecord,
        chunk_gaps: Sequence[float] | None = None,
    ) -> None:
        """Hand the finished call to every sink, once.

        ``chunk_gaps``: seconds between successive output chunks, if the caller kept
        them. Never raises: telemetry must not fail a call, and one sink's failure is
        logged (exception type only: a message could quote a value) without keeping the
        call from the others. A span this telemetry did not start is ignored.
        """
        if not isinstance(call_span, CallSpan) or call_span.finished:
            return
        call_span.finished = True
        call_span.chunk_gaps = chunk_gaps
        if not record.scrub_policy:
            # The record says which policy its hashes were made under.
            record.scrub_policy = self.scrub_policy
        for sink in self._sinks:
            try:
                sink.emit(record, call_span)
            except Exception as exc:
                _log.warning(sink.failure_event, error=type(exc).__name__)

    # -- lifecycle ---------------------------------------------------------------------

    def force_flush(self, timeout_millis: int = 5_000) -> None:
        self._traces.force_flush(timeout_millis)
        self._metrics.force_flush(timeout_millis)
        for sink in self._sinks:
            sink.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """Flush and stop exporters (owned providers) and the sinks (the record file),
        in at most ``cfg.shutdown_timeout_seconds``: a collector that never answers
        costs that wait and the spans and metrics not yet taken, nothing more. Records
        are written as calls finish, so the file is complete. Idempotent."""
        with self._shutdown_lock:
            if self._shut:
                return
            self._shut = True
        timeout_s = self.cfg.shutdown_timeout_seconds
        if not exporters.shutdown_all((self._traces, self._metrics), timeout_s):
            _log.warning("telemetry flush timed out", timeout_s=timeout_s)
        for sink in self._sinks:
            try:
                sink.shutdown()
            except Exception as exc:
                _log.warning(
                    "telemetry shutdown failed", sink=type(sink).__name__, error=type(exc).__name__
                )


def build(config: Config, session_hasher: SessionHasher) -> Telemetry:
    """The telemetry a front door gives its engine when it is given none: from the
    config, with the engine's session pseudonyms (``Engine.session_hasher``)."""
    return Telemetry(
        config.telemetry,
        scrub_policy=config.redaction.policy_id,
        session_hasher=session_hasher,
    )
