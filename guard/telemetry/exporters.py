"""Where spans and metrics go: the providers, their exporters (console, OTLP/HTTP) and
the resource.

Providers are per instance (never the global ones): several guards, and many tests,
live in one process. Export is batched on background threads and bounded by a short
timeout; a dead collector costs a rate-limited warning and dropped spans, never a
request, and at most one timeout per signal at shutdown. Given providers are used as
they are and only flushed at shutdown; built ones are owned and shut down.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar
from urllib.parse import urlsplit

import structlog
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

from guard.engine.config import TelemetryConfig

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from guard.telemetry.spans import WireOut

_log = structlog.get_logger("loopguard.telemetry")

_EXPORT_TIMEOUT_S = 2.0
_WARN_EVERY_S = 60.0


def version() -> str:
    try:
        return metadata.version("loopguard")
    except metadata.PackageNotFoundError:
        return "0"


class FailureWarnings:
    """Turns export failures, and spans dropped from a full queue, into rate-limited
    warning lines (one per kind and minute, with the count since the last; no
    payloads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}

    def failed(self, signal: str, items: int) -> None:
        self._warn("otlp export failed", signal, items)

    def queue_full(self, signal: str, items: int) -> None:
        self._warn("otlp queue full", signal, items)

    def _warn(self, event: str, signal: str, items: int) -> None:
        with self._lock:
            dropped = self._dropped[event] = self._dropped.get(event, 0) + items
            now = time.monotonic()
            last = self._last.get(event, 0.0)
            if last and now - last < _WARN_EVERY_S:
                return
            self._last[event], self._dropped[event] = now, 0
        _log.warning(event, signal=signal, dropped=dropped)


class GuardedSpanExporter(SpanExporter):
    """Delegates to the real exporter; warns on failure; at shutdown, a failed collector
    is not retried batch after batch (bounded shutdown). The OTLP pipeline's batches
    are queue items (``otlp_wire.SpanItem``: wire bytes and spans), the console's
    spans."""

    def __init__(self, inner: SpanExporter, warnings: FailureWarnings) -> None:
        self._inner = inner
        self._warnings = warnings
        self.closing = False
        self._failing = False

    def export(self, spans: Sequence[ReadableSpan | bytes]) -> SpanExportResult:
        if self.closing and self._failing:
            self._warnings.failed("traces", len(spans))
            return SpanExportResult.FAILURE
        try:
            result = self._inner.export(spans)  # type: ignore[arg-type]
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


class GuardedMetricExporter(MetricExporter):
    def __init__(self, inner: MetricExporter, warnings: FailureWarnings) -> None:
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
    base = Resource.create({"service.version": version()})
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


class _Provider(Protocol):
    def force_flush(self, timeout_millis: int = ...) -> bool: ...

    def shutdown(self) -> None: ...


P = TypeVar("P", TracerProvider, MeterProvider)


class Pipeline(Generic[P]):
    """One signal's provider, whether it is ours to shut down, and its guarded exporter."""

    def __init__(
        self,
        provider: P,
        owned: bool,
        guarded: GuardedSpanExporter | GuardedMetricExporter | None = None,
        processor: SpanProcessor | None = None,
        wire: WireOut | None = None,
    ) -> None:
        self.provider: P = provider
        self.owned = owned
        self._guarded = guarded
        # The span pipeline's batch processor, when this telemetry built it.
        self.processor = processor
        # Writes a span's OTLP wire form as it ends and queues it, when the exporter
        # sends that form.
        self.wire = wire

    def closing(self) -> None:
        """From now on a failing collector is not retried batch after batch."""
        if self._guarded is not None:
            self._guarded.closing = True

    def force_flush(self, timeout_millis: int) -> None:
        self.provider.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: int) -> None:
        """Owned: shut down (flushes); given: only flushed. Never raises. The SDK
        bounds some of this by ``timeout_millis``, not all of it: callers bound it
        themselves (``shutdown_all``)."""
        provider: _Provider = self.provider
        try:
            if not self.owned:
                provider.force_flush(timeout_millis)
            elif isinstance(provider, MeterProvider):
                provider.shutdown(timeout_millis=timeout_millis)
            else:
                provider.shutdown()
        except Exception:
            _log.warning("telemetry shutdown failed", provider=type(provider).__name__)


def shutdown_all(pipelines: Sequence[Pipeline[Any]], timeout_s: float) -> bool:
    """Shut the pipelines down side by side (a silent traces endpoint does not cost
    the metrics their flush), waiting ``timeout_s`` in all. False when one was still
    at it: it is left behind on a daemon thread, which the process does not wait for.
    """
    deadline = time.monotonic() + timeout_s
    for pipeline in pipelines:
        pipeline.closing()
    threads = [
        threading.Thread(
            target=pipeline.shutdown,
            args=(int(timeout_s * 1000),),
            name="loopguard-telemetry-shutdown",
            daemon=True,
        )
        for pipeline in pipelines
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return not any(thread.is_alive() for thread in threads)


def trace_pipeline(
    cfg: TelemetryConfig,
    given: TracerProvider | None,
    resource: Resource | None,
    warnings: FailureWarnings,
    scope: InstrumentationScope,
) -> Pipeline[TracerProvider]:
    """The tracer provider: the given one as it is, else one owned with the configured
    exporter. OTLP: spans are queued as their wire bytes (``span_queue``), written
    under ``scope`` (the tracer's)."""
    if given is not None:
        return Pipeline(given, owned=False)
    provider = TracerProvider(resource=resource)
    if cfg.exporter == "console":
        # sys.stdout as it is now (the SDK's default is bound at its import).
        guarded = GuardedSpanExporter(ConsoleSpanExporter(out=sys.stdout), warnings)
        processor = BatchSpanProcessor(guarded)
        provider.add_span_processor(processor)
        return Pipeline(provider, True, guarded, processor)
    if cfg.exporter == "otlp":
        from guard.telemetry.otlp_wire import WireSpanExporter, wire_record, wire_span
        from guard.telemetry.span_queue import WireSpanProcessor
        from guard.telemetry.spans import WireOut

        traces, _ = otlp_endpoints(cfg.otlp_endpoint)
        exporter = WireSpanExporter(
            provider.resource, scope, endpoint=traces, timeout=_otlp_timeout("TRACES")
        )
        guarded = GuardedSpanExporter(exporter, warnings)
        queue = WireSpanProcessor(guarded, warnings)
        provider.add_span_processor(queue)
        return Pipeline(provider, True, guarded, queue, WireOut(wire_span, queue.push, wire_record))
    return Pipeline(provider, owned=True)


def metric_pipeline(
    cfg: TelemetryConfig,
    given: MeterProvider | None,
    resource: Resource | None,
    warnings: FailureWarnings,
    extra_readers: Sequence[MetricReader] = (),
) -> Pipeline[MeterProvider]:
    """The meter provider: the given one as it is, else one owned with the configured
    exporter's reader plus ``extra_readers`` (the admin listener's Prometheus reader)."""
    if given is not None:
        if extra_readers:
            raise ValueError("extra metric readers need the meter provider telemetry builds")
        return Pipeline(given, owned=False)
    readers: list[MetricReader] = list(extra_readers)
    exporter: MetricExporter | None = None
    if cfg.exporter == "console":
        exporter = ConsoleMetricExporter(out=sys.stdout)
    elif cfg.exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        _, metrics = otlp_endpoints(cfg.otlp_endpoint)
        exporter = OTLPMetricExporter(endpoint=metrics, timeout=_otlp_timeout("METRICS"))
    guarded = None
    if exporter is not None:
        guarded = GuardedMetricExporter(exporter, warnings)
        # Interval from OTEL_METRIC_EXPORT_INTERVAL (default 60 s); shutdown flushes.
        readers.append(PeriodicExportingMetricReader(guarded))
    provider = MeterProvider(metric_readers=readers, resource=resource or Resource.create())
    return Pipeline(provider, owned=True, guarded=guarded)
