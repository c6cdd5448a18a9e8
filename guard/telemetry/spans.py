"""One span per guarded call: its start (continuing the agent's ``traceparent``), its ids,
and the span sink that attributes and ends it.

* Span kind is CLIENT: loopguard calls the model or tool on the agent's behalf.
* Span status is ERROR when the call failed (failure stage other than ``passed`` and
  ``loop_guard``). A stop by the guard is the guard working, not the call failing.
* With exporter "none" (and no provider given) spans are non-recording but carry real
  ids, so ``traceparent`` propagation and the records' trace ids work.
* With a pipeline telemetry built itself (exporter "console" or "otlp", the default
  sampler) no SDK span lives through the call either: the call keeps its ids and start
  time, and its finished span is handed to the batch processor whole, as the SDK's
  ``Span.end`` would hand it (``DirectSpans``). What the SDK does per span besides
  (sampler, context, lock, per-attribute validation of values the field table already
  typed) was most of what export cost a call. With OTLP not even that: the span's
  wire bytes are written and queued, no span object is made.
* Content (messages, arguments, results) is on a span only when ``capture_content`` is
  on, and then only what the caller already redacted.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from itertools import islice
from typing import Any, NamedTuple

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.sampling import DEFAULT_ON
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from guard.engine.calls import CallRecord
from guard.engine.config import TelemetryConfig
from guard.telemetry.fields import NOT_ERRORS, PROJECTIONS
from guard.telemetry.semconv import CAPTURE_ATTRIBUTES
from guard.telemetry.sink import SinkSetup

_SAMPLED_INT = int(TraceFlags.SAMPLED)
# A new trace's flags as the SDK's tracer sets them (its ids are random: W3C level 2).
_SDK_ROOT_FLAGS = int(TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID)
_APP_VALUE_MAX = 256


# Ids as hex, printf-style: the same text as an f-string's ``:032x`` at half its cost
# (five ids a call).
_hex128 = "%032x".__mod__
_hex64 = "%016x".__mod__
_traceparent = "00-%032x-%016x-%02x".__mod__


class CallSpan:
    """One call's span, from ``Telemetry.start`` to ``Telemetry.finish``.

    The ids live here as ints, read once: ``traceparent`` for the upstream and the
    record's ids come from them. ``span`` is the SDK span when spans are recorded
    (``SdkCallSpan``), else None (nothing would read it; no OTel objects are built per
    call). ``started`` is the monotonic start; ``chunk_gaps`` what the caller passed to
    ``finish`` (for the sinks).
    """

    __slots__ = (
        "_request_id",
        "chunk_gaps",
        "finished",
        "flags",
        "span_int",
        "started",
        "state",
        "trace_int",
    )

    # A class attribute, not a slot: a call without an SDK span sets nothing (a
    # ``DirectCallSpan``'s is a property: a slot set here went through its setter).
    span: trace.Span | None = None

    def __init__(
        self,
        trace_id: int,
        span_id: int,
        flags: int,
        state: trace.TraceState | None,
    ) -> None:
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
            self._request_id = _hex128(random.getrandbits(128))
        return self._request_id

    @property
    def trace_id(self) -> str:
        return _hex128(self.trace_int)

    @property
    def span_id(self) -> str:
        return _hex64(self.span_int)

    def inject(self, headers: dict[str, str]) -> dict[str, str]:
        """Write ``traceparent`` (and ``tracestate``) naming this span as the parent:
        the W3C format as ``TraceContextTextMapPropagator.inject`` writes it."""
        headers["traceparent"] = _traceparent((self.trace_int, self.span_int, self.flags))
        if self.state:
            headers["tracestate"] = self.state.to_header()
        return headers


class SdkCallSpan(CallSpan):
    """A call with the SDK's span (spans recorded by a pipeline the telemetry was
    given)."""

    __slots__ = ("span",)

    def __init__(self, span: trace.Span, ctx: SpanContext) -> None:
        CallSpan.__init__(self, ctx.trace_id, ctx.span_id, ctx.trace_flags, ctx.trace_state)
        self.span = span


class DirectCallSpan(CallSpan):
    """A call whose span is built whole when it finishes (``DirectSpans``): its name,
    kind, parent and wall-clock start are kept until then."""

    __slots__ = ("kind", "name", "parent", "start_ns")

    def __init__(
        self,
        name: str,
        kind: SpanKind,
        parent: SpanContext | None,
        ids: tuple[int, int, int, trace.TraceState | None],
    ) -> None:
        trace_id, span_id, flags, state = ids  # no star call: it is not inlined
        CallSpan.__init__(self, trace_id, span_id, flags, state)  # no super object made
        self.name = name
        self.kind = kind
        self.parent = parent
        self.start_ns = time.time_ns()

    @property
    def span(self) -> trace.Span:  # type: ignore[override]  # read-only: never set
        """A non-recording stand-in with this call's ids, made when asked: a caller that
        makes it the current span (the in-process guard) gets children in this trace."""
        context = SpanContext(
            self.trace_int, self.span_int, False, TraceFlags(self.flags), self.state
        )
        return trace.NonRecordingSpan(context)


# Writes a span's wire form from its pieces (``otlp_wire.wire_span``): trace id, span
# id, trace state, parent, name, kind, start, end, attributes, status; None when it
# does not cover a value.
WireWriter = Callable[
    [int, int, "trace.TraceState | None", "SpanContext | None", str, SpanKind, int, int,
     "Mapping[str, Any]", Status],
    "bytes | None",
]  # fmt: skip


# Writes a call's span with its attributes straight from its record
# (``otlp_wire.wire_record``): as ``WireWriter``, then the record, the extra attributes
# and the status, and the attribute limit; None when it does not cover them.
RecordSpanWriter = Callable[
    [int, int, "trace.TraceState | None", "SpanContext | None", str, SpanKind, int, int,
     CallRecord, "Mapping[str, Any] | None", Status, "int | None"],
    "bytes | None",
]  # fmt: skip


class WireOut(NamedTuple):
    """The OTLP pipeline's way out for a span: ``write`` its wire form, ``push`` those
    bytes to the span queue (``span_queue.WireSpanProcessor``). ``record``: a call's
    span written with its attributes straight from its record, no attribute dict
    built."""

    write: WireWriter
    push: Callable[[bytes], None]
    record: RecordSpanWriter | None = None


class DirectSpans:
    """Ends calls of an owned pipeline: the finished span, built once, to the batch
    processor (which only queues it; export is on its worker thread).

    With the wire exporter (``wire``) the span's wire form is written here, on the
    loop, as the span ends, and only those bytes are queued: the export thread then
    only joins bytes and sends them. Written there, a batch held the GIL for
    milliseconds while the loop waited (a request's latency); here it is a few
    microseconds a call, spread out. A span the writer does not cover goes to the
    processor as a span (encoded by the SDK's encoder on the export thread).
    """

    def __init__(
        self,
        processor: SpanProcessor,
        resource: Resource,
        scope: InstrumentationScope,
        wire: WireOut | None = None,
    ) -> None:
        self._processor = processor
        self._resource = resource
        self._scope = scope
        self._wire = wire
        # The record writer and the queue's push, looked up once (for ``SpanSink.emit``).
        self._record_out: tuple[RecordSpanWriter, Callable[[bytes], None]] | None = None
        if wire is not None and wire.record is not None:
            self._record_out = (wire.record, wire.push)
        self._max_attributes = SpanLimits().max_span_attributes

    @staticmethod
    def usable(provider: TracerProvider) -> bool:
        """The SDK would make the same span: its default sampler (parent-based, else
        always on, as ``_call_ids`` decides) and no attribute length limit."""
        return provider.sampler is DEFAULT_ON and SpanLimits().max_attribute_length is None

    def end(
        self, call: DirectCallSpan, name: str, attributes: dict[str, Any], status: Status
    ) -> None:
        if not call.flags & _SAMPLED_INT:
            return  # the SDK would not have recorded it
        if self._max_attributes is not None and len(attributes) > self._max_attributes:
            attributes = dict(islice(attributes.items(), self._max_attributes))
        end_ns = time.time_ns()
        wire = self._wire
        if wire is not None:
            encoded = wire.write(
                call.trace_int, call.span_int, call.state, call.parent, name, call.kind,
                call.start_ns, end_ns, attributes, status,
            )  # fmt: skip
            if encoded is not None:
                wire.push(encoded)
                return
        context = SpanContext(
            call.trace_int, call.span_int, False, TraceFlags(call.flags), call.state
        )
        span = ReadableSpan(
            name=name,
            context=context,
            parent=call.parent,
            resource=self._resource,
            attributes=attributes,
            kind=call.kind,
            status=status,
            start_time=call.start_ns,
            end_time=end_ns,
            instrumentation_scope=self._scope,
        )
        self._processor.on_end(span)


class Tracing:
    """Starts calls: an SDK span when spans are recorded by a pipeline this telemetry
    was given, the ids and start for ``DirectSpans`` when by one it built, else ids
    only."""

    def __init__(
        self, tracer: trace.Tracer, recording: bool, direct: DirectSpans | None = None
    ) -> None:
        self._tracer = tracer
        self._recording = recording
        self._direct = direct
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
        if self._direct is not None:
            parent_ctx = _valid_parent(parent)
            ids = _call_ids(parent_ctx, _SDK_ROOT_FLAGS)
            return DirectCallSpan(span_name, kind, parent_ctx, ids)
        if not self._recording:
            return CallSpan(*_call_ids(_valid_parent(parent), _SAMPLED_INT))
        span = self._tracer.start_span(span_name, context=parent, kind=kind)
        return SdkCallSpan(span, span.get_span_context())

    def _parent_context(self, headers: Mapping[str, str], lowercase: bool) -> Context | None:
        """The agent's trace context, None when it sent none (a new trace)."""
        if not lowercase and not all(k.islower() for k in headers):
            headers = {k.lower(): v for k, v in headers.items()}
        if "traceparent" not in headers:
            return None
        return self._propagator.extract(headers)


def _valid_parent(parent: Context | None) -> SpanContext | None:
    if parent is None:
        return None
    parent_ctx = trace.get_current_span(parent).get_span_context()
    return parent_ctx if parent_ctx.is_valid else None


def _call_ids(
    parent: SpanContext | None, root_flags: int
) -> tuple[int, int, int, trace.TraceState | None]:
    """(trace id, span id, flags, trace state) of a call made without the SDK's span,
    as a recording one would get them; ``root_flags`` those of a new trace.

    The SDK's default sampler (parent-based, else always on) decides the sampled flag
    the same way: the agent's flag when a ``traceparent`` came in, else sampled. Ids
    come from ``random.getrandbits`` as the SDK's ``RandomIdGenerator`` makes them.
    """
    if parent is not None:
        return parent.trace_id, _random_id(64), parent.trace_flags, parent.trace_state
    return _random_id(128), _random_id(64), root_flags, None


def _random_id(bits: int) -> int:
    value = random.getrandbits(bits)
    while not value:  # zero is the invalid id
        value = random.getrandbits(bits)
    return value


_SPAN_KEYS = frozenset(PROJECTIONS.span_keys)


def span_attributes(record: CallRecord, cfg: TelemetryConfig) -> dict[str, Any]:
    """The span's attributes for a record: the field table's, then the app's decision
    (under ``cfg.app_namespace``), then captured content when capture is on."""
    return _with_extra(record, extra_attributes(record, cfg))


def _with_extra(record: CallRecord, extra: dict[str, Any] | None) -> dict[str, Any]:
    """The field table's attributes, then ``extra``'s (as set one by one: a key set
    again keeps its place)."""
    attrs = PROJECTIONS.span(record)
    if extra:
        attrs.update(extra)
    return attrs


def extra_attributes(record: CallRecord, cfg: TelemetryConfig) -> dict[str, Any] | None:
    """The span's attributes besides the field table's: the app's decision, captured
    content; None when there are none to look at."""
    if not record.app and not cfg.capture_content:
        return None
    attrs: dict[str, Any] = {}
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
    """Names, attributes and ends the call's span."""

    failure_event = "span attributes failed"

    def __init__(self, cfg: TelemetryConfig, direct: DirectSpans | None = None) -> None:
        self._cfg = cfg
        self._direct = direct

    def emit(self, record: CallRecord, call: CallSpan) -> None:
        """A call of ``DirectSpans`` ends with the record's span attributes
        (``span_attributes``: the table's, then the extra ones), written straight to the
        wire with the wire writer's ``record``, as a dict where that does not cover them
        (a value, an extra key that is also the table's, more attributes than the
        limit). Here, not in a method of ``DirectSpans``: one call less per span."""
        direct = self._direct
        if direct is not None and isinstance(call, DirectCallSpan):
            # The usual call has no extra attributes and no error: no call for either.
            cfg = self._cfg
            extra = extra_attributes(record, cfg) if record.app or cfg.capture_content else None
            status = _UNSET if record.failure_stage in NOT_ERRORS else _status(record)
            if not call.flags & _SAMPLED_INT:
                return  # the SDK would not have recorded it
            name = record.span_name or call.name
            out = direct._record_out
            if out is not None and (not extra or _SPAN_KEYS.isdisjoint(extra)):
                write, push = out
                encoded = write(
                    call.trace_int, call.span_int, call.state, call.parent, name, call.kind,
                    call.start_ns, time.time_ns(), record, extra, status,
                    direct._max_attributes,
                )  # fmt: skip
                if encoded is not None:
                    push(encoded)
                    return
            direct.end(call, name, _with_extra(record, extra), status)
            return
        span = call.span
        if span is None:
            return
        try:
            if record.span_name:
                span.update_name(record.span_name)
            span.set_attributes(span_attributes(record, self._cfg))
            if record.failure_stage not in NOT_ERRORS:
                span.set_status(_status(record))
        finally:
            span.end()  # attributes or not, the span ends

    def force_flush(self, timeout_millis: int) -> None:
        pass  # the tracer provider's pipeline flushes

    def shutdown(self) -> None:
        pass


_UNSET = Status(StatusCode.UNSET)
# One Status per failure stage: the wire writer caches a status's field by its object.
_ERRORS: dict[str, Status] = {}


def _status(record: CallRecord) -> Status:
    if record.failure_stage in NOT_ERRORS:
        return _UNSET
    stage = str(record.failure_stage)
    found = _ERRORS.get(stage)
    if found is None:
        found = _ERRORS[stage] = Status(StatusCode.ERROR, stage)
    return found


def sink(setup: SinkSetup) -> SpanSink | None:
    """Only when spans are recorded (otherwise calls carry no SDK span)."""
    return SpanSink(setup.cfg, setup.direct_spans) if setup.recording_spans else None
