"""One span per guarded call: its start (continuing the agent's ``traceparent``), its ids,
and the span sink that attributes and ends it.

* Span kind is CLIENT: loopguard calls the model or tool on the agent's behalf.
* Span status is ERROR when the call failed (failure stage other than ``passed`` and
  ``loop_guard``). A stop by the guard is the guard working, not the call failing.
* With exporter "none" (and no provider given) spans are non-recording but carry real
  ids, so ``traceparent`` propagation and the records' trace ids work.
* Content (messages, arguments, results) is on a span only when ``capture_content`` is
  on, and then only what the caller already redacted.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from guard.engine.calls import CallRecord
from guard.engine.config import TelemetryConfig
from guard.telemetry.fields import NOT_ERRORS, PROJECTIONS
from guard.telemetry.semconv import CAPTURE_ATTRIBUTES
from guard.telemetry.sink import SinkSetup

_SAMPLED_INT = int(TraceFlags.SAMPLED)
_APP_VALUE_MAX = 256


class CallSpan:
    """One call's span, from ``Telemetry.start`` to ``Telemetry.finish``.

    The ids live here as ints, read once: ``traceparent`` for the upstream and the
    record's ids come from them. ``span`` is the SDK span when spans are recorded, else
    None (nothing would read it; no OTel objects are built per call). ``started`` is the
    monotonic start; ``chunk_gaps`` what the caller passed to ``finish`` (for the sinks).
    """

    __slots__ = (
        "_request_id",
        "chunk_gaps",
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
        self.started = time.monotonic()
        self.finished = False
        self.chunk_gaps: Sequence[float] | None = None
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


class Tracing:
    """Starts calls: an SDK span when spans are recorded, else ids only."""

    def __init__(self, tracer: trace.Tracer, recording: bool) -> None:
        self._tracer = tracer
        self._recording = recording
        self._propagator = TraceContextTextMapPropagator()

    def start(
        self,
        span_name: str,
        incoming_headers: Mapping[str, str],
        kind: SpanKind = SpanKind.CLIENT,
        *,
        lowercase: bool = False,
    ) -> CallSpan:
        parent = self._parent_context(incoming_headers, lowercase)
        if not self._recording:
            return _unrecorded_call(parent)
        span = self._tracer.start_span(span_name, context=parent, kind=kind)
        ctx = span.get_span_context()
        return CallSpan(span, ctx.trace_id, ctx.span_id, ctx.trace_flags, ctx.trace_state)

    def _parent_context(self, headers: Mapping[str, str], lowercase: bool) -> Context | None:
        """The agent's trace context, None when it sent none (a new trace)."""
        if not lowercase and not all(k.islower() for k in headers):
            headers = {k.lower(): v for k, v in headers.items()}
        if "traceparent" not in headers:
            return None
        return self._propagator.extract(headers)


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


def span_attributes(record: CallRecord, cfg: TelemetryConfig) -> dict[str, Any]:
    """The span's attributes for a record: the field table's, then the app's decision
    (under ``cfg.app_namespace``), then captured content when capture is on."""
    attrs = PROJECTIONS.span(record)
    namespace = cfg.app_namespace
    for name, value in record.app.items():
        key = name.strip().lower().replace("-", "_")
        if key:
            attrs[f"{namespace}{key}"] = str(value)[:_APP_VALUE_MAX]
    if cfg.capture_content:
        for key, value in record.captured.items():
            if key in CAPTURE_ATTRIBUTES and value is not None:
                attrs[key] = str(value)
    return attrs


class SpanSink:
    """Names, attributes and ends the call's SDK span."""

    failure_event = "span attributes failed"

    def __init__(self, cfg: TelemetryConfig) -> None:
        self._cfg = cfg

    def emit(self, record: CallRecord, call: CallSpan) -> None:
        span = call.span
        if span is None:
            return
        try:
            if record.span_name:
                span.update_name(record.span_name)
            span.set_attributes(span_attributes(record, self._cfg))
            if record.failure_stage not in NOT_ERRORS:
                span.set_status(Status(StatusCode.ERROR, str(record.failure_stage)))
        finally:
            span.end()  # attributes or not, the span ends

    def force_flush(self, timeout_millis: int) -> None:
        pass  # the tracer provider's pipeline flushes

    def shutdown(self) -> None:
        pass


def sink(setup: SinkSetup) -> SpanSink | None:
    """Only when spans are recorded (otherwise calls carry no SDK span)."""
    return SpanSink(setup.cfg) if setup.recording_spans else None
