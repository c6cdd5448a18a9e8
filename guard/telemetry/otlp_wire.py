"""Spans to an OTLP ``ExportTraceServiceRequest`` in protobuf wire format, written
directly as bytes.

The SDK's encoder builds a protobuf object per span, per attribute and per value in
Python before serializing: ~30 us a span, on the export thread but under the same GIL
as the event loop, so it was most of what a live collector cost a call. A span's
wire form is a few length-prefixed fields; written here it costs a fraction of that.
The bytes parse to the very message ``encode_spans`` builds (a test holds them
equal); a batch this encoder does not cover (events, links, a value type the field
table never produces) goes to the SDK's encoder whole. ``wire_span`` writes one span
from its pieces as it ends (``DirectSpans``, on the loop): only those bytes are queued
(``span_queue``), and the export thread only joins them under the resource and scope
header and sends them.

``WireSpanExporter`` is the SDK's OTLP/HTTP span exporter (endpoint, headers,
compression, timeout and retries as configured) with this encoder, posting over one
kept-open connection where it can (``otlp_http``). Imported only when
the exporter is "otlp" (it brings the HTTP client in).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.common._internal import (
    _encode_instrumentation_scope,
    _encode_resource,
)
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http._common import _resolve_endpoint
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.environment_variables import OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, TraceState

from guard.engine.calls import CallRecord
from guard.telemetry.fields import PROJECTIONS
from guard.telemetry.otlp_http import persistent_transport

# What the span queue holds: a span's wire bytes (its pipeline's resource and scope),
# or a span the wire writer did not cover, encoded on the export thread.
SpanItem = bytes | ReadableSpan

# Span.kind: the SDK's enum is one below OTLP's (OTLP 0 is "unspecified").
_KIND = {kind: bytes((0x30, kind.value + 1)) for kind in SpanKind}
# Span.flags (fixed32, field 16): "has is_remote", and "is remote" for a remote parent.
_FLAGS_LOCAL = b"\x85\x01" + struct.pack("<I", 0x100)
_FLAGS_REMOTE = b"\x85\x01" + struct.pack("<I", 0x300)
_CLIENT = SpanKind.CLIENT  # a module global: an enum class's attribute is slower
_KIND_CLIENT = _KIND[_CLIENT]
# Span.start_time_unix_nano and end_time_unix_nano (fixed64 fields 7 and 8), with tags.
_pack_times = struct.Struct("<BQBQ").pack
# Span.trace_id and span_id (bytes fields 1 and 2), with tags and sizes: the trace id's
# halves big-endian (one call; two ``int.to_bytes`` and their joins cost a third more).
_pack_ids = struct.Struct(">BBQQBBQ").pack
_LOW64 = (1 << 64) - 1
_pack_double = struct.Struct("<d").pack


class NotCovered(Exception):
    """A span this encoder does not write (the SDK's encoder does)."""


_ONE_BYTE = tuple(bytes((i,)) for i in range(0x80))


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _ONE_BYTE[value]
    if value < 0x4000:  # a span's or an attribute's size: two bytes, no loop
        return bytes(((value & 0x7F) | 0x80, value >> 7))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field (tag already holds field number and wire type 2)."""
    size = len(payload)
    if size < 0x80:
        return _ONE_BYTE[tag] + _ONE_BYTE[size] + payload
    return _ONE_BYTE[tag] + _varint(size) + payload


def _any_value(value: Any) -> bytes:
    """An AnyValue message, as the SDK's ``_encode_value`` chooses the member."""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _field(0x0A, value.encode("utf-8"))
    if isinstance(value, int):
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)  # int64: two's complement
    if isinstance(value, float):
        return b"\x21" + _pack_double(value)
    if isinstance(value, tuple | list):
        return _field(0x2A, b"".join([_field(0x0A, _any_value(v)) for v in value]))
    raise NotCovered(type(value).__name__)


# Span.attributes fields (KeyValue) by (key, value, type): most attributes repeat
# (operation, route, stage, status, server). A key whose values do not (hashes,
# markers, ids) is found out by its count of distinct values and no longer cached: its
# values are written each time, and they do not push the repeating ones out. Full, the
# cache starts over.
_ATTRIBUTE_CACHE_MAX = 2048
_VARYING_AFTER = 64  # distinct values of one key
_attribute_cache: dict[tuple[str, Any, type], bytes] = {}
_key_fields: dict[str, bytes] = {}  # a key's KeyValue.key field
_distinct: dict[str, int] = {}  # values cached per key, until it is found varying
_varying: set[str] = set()


def _key_field(key: str) -> bytes:
    found = _key_fields.get(key)
    if found is None:
        found = _field(0x0A, key.encode())
        if len(_key_fields) < _ATTRIBUTE_CACHE_MAX:
            _key_fields[key] = found
    return found


def _key_value(key_field: bytes, value: Any) -> bytes:
    """A Span.attributes field (KeyValue): the key's field, then the AnyValue."""
    return _field(0x4A, key_field + _field(0x12, _any_value(value)))


def _attribute(key: str, value: Any) -> bytes:
    if key in _varying:
        if type(value) is str:
            return _varying_str(_key_field(key), value.encode())
        return _key_value(_key_field(key), value)
    if type(value) is float:  # not cached: -0.0 equals 0.0
        return _key_value(_key_field(key), value)
    try:
        cache_key = (key, value, type(value))  # the type: True and 1 are equal keys
        cached = _attribute_cache.get(cache_key)
    except TypeError:  # a list: not hashable, not cached
        return _key_value(_key_field(key), value)
    if cached is not None:
        return cached
    encoded = _key_value(_key_field(key), value)
    if len(_attribute_cache) >= _ATTRIBUTE_CACHE_MAX:
        _attribute_cache.clear()
        _distinct.clear()
    _attribute_cache[cache_key] = encoded
    seen = _distinct[key] = _distinct.get(key, 0) + 1
    if seen > _VARYING_AFTER and len(_varying) < _ATTRIBUTE_CACHE_MAX:
        _varying.add(key)
    return encoded


def _varying_str(key_field: bytes, value: bytes) -> bytes:
    """A string attribute's KeyValue field, its sizes written at once when each takes
    one byte (a hash, a marker, an id)."""
    size = len(key_field) + len(value) + 4  # KeyValue: key, value tag and size, AnyValue
    if size < 0x80:
        return (
            bytes((0x4A, size)) + key_field + bytes((0x12, len(value) + 2, 0x0A, len(value)))
        ) + value
    return _field(0x4A, key_field + _field(0x12, _field(0x0A, value)))


def _field_writer(
    key: str, kind: type | None
) -> tuple[Callable[[Any], Any], Callable[[Any], bytes]]:
    """``Projections.span_writer``'s pair for one span attribute: the lookup of its
    KeyValue field by value, and the writer of a value not found. The field's own
    cache holds only values of ``kind`` (the one type the field table converts its
    values to: no True found for 1), up to a few: a key whose values do not repeat
    (hashes, markers, ids) has its strings written each time, after a prefix (tags
    and sizes) looked up by the value's size."""
    key_field = _field(0x0A, key.encode())
    cache: dict[Any, bytes] = {}
    # KeyValue field, key, AnyValue's tag and size, string_value's: one byte each size.
    prefixes = tuple(
        bytes((0x4A, len(key_field) + n + 4)) + key_field + bytes((0x12, n + 2, 0x0A, n))
        for n in range(max(0, 0x80 - 4 - len(key_field)))
    )
    short = len(prefixes)

    def written(value: Any) -> bytes:
        if type(value) is str:
            data = value.encode()
            if len(data) < short:
                return prefixes[len(data)] + data
            return _varying_str(key_field, data)
        return _key_value(key_field, value)

    if kind is None:  # nothing cached: the lookup is never asked
        return cache.get, written

    def write(value: Any) -> bytes:
        encoded = written(value)
        if type(value) is kind and len(cache) < _VARYING_AFTER:
            cache[value] = encoded
        return encoded

    return cache.get, write


_write_table = PROJECTIONS.span_writer(_field_writer)


def wire_record(
    trace_id: int,
    span_id: int,
    trace_state: TraceState | None,
    parent: SpanContext | None,
    name: str,
    kind: SpanKind,
    start_time: int,
    end_time: int,
    record: CallRecord,
    extra: Mapping[str, Any] | None,
    status: Status,
    limit: int | None,
) -> bytes | None:
    """``wire_span`` of a call's span whose attributes are written straight from its
    record: the field table's (as ``PROJECTIONS.span`` gives them), then ``extra``'s,
    whose keys are none of the table's. None when this encoder does not cover a value
    or there are more than ``limit`` attributes (the caller then builds the dict)."""
    try:
        fields = _write_table(record)
        if extra:
            fields += [_attribute(key, value) for key, value in extra.items()]
    except (NotCovered, TypeError):  # TypeError: an unhashable value where a str goes
        return None
    if limit is not None and len(fields) > limit:
        return None
    return _span_field(
        trace_id, span_id, trace_state, parent, name, kind, start_time, end_time, fields, 0,
        status,
    )  # fmt: skip


# Span.status fields by (code, description): nearly always unset or one failure stage.
_status_fields: dict[tuple[int, str | None], bytes] = {}
# Span.name fields: a few names (operation and model or tool) repeat.
_name_fields: dict[str, bytes] = {}


# And by the Status object: ``spans._status`` gives each failure stage one.
_status_objects: dict[Status, bytes] = {}


def _status_field(status: Status) -> bytes:
    found = _status_objects.get(status)  # by identity: Status has no __eq__
    if found is None:
        found = _status(status.status_code.value, status.description)
        if len(_status_objects) < 256:  # held: an id is never reused while cached
            _status_objects[status] = found
    return found


def _status(code: int, description: str | None) -> bytes:
    found = _status_fields.get((code, description))
    if found is None:
        body = b"" if description is None else _field(0x12, description.encode())
        if code:
            body += b"\x18" + _varint(code)
        found = _field(0x7A, body)
        if len(_status_fields) < 256:
            _status_fields[(code, description)] = found
    return found


def _span(span: ReadableSpan) -> bytes:
    """A ScopeSpans.spans field."""
    if span.events or span.links:
        raise NotCovered("events or links")
    ctx = span.context
    if ctx is None or span.start_time is None or span.end_time is None:
        raise NotCovered("unfinished span")
    return _span_field(
        ctx.trace_id, ctx.span_id, ctx.trace_state, span.parent, span.name, span.kind,
        span.start_time, span.end_time, span.attributes or {}, span.dropped_attributes,
        span.status,
    )  # fmt: skip


def wire_span(
    trace_id: int,
    span_id: int,
    trace_state: TraceState | None,
    parent: SpanContext | None,
    name: str,
    kind: SpanKind,
    start_time: int,
    end_time: int,
    attributes: Mapping[str, Any],
    status: Status,
) -> bytes | None:
    """The ScopeSpans.spans field of a span with no events, links or dropped
    attributes, from its pieces (``DirectSpans`` writes it as the span ends); None
    when this encoder does not cover a value."""
    try:
        return _span_field(
            trace_id, span_id, trace_state, parent, name, kind, start_time, end_time,
            attributes, 0, status,
        )  # fmt: skip
    except NotCovered:
        return None


def _span_field(
    trace_id: int,
    span_id: int,
    trace_state: TraceState | None,
    parent: SpanContext | None,
    name: str,
    kind: SpanKind,
    start_time: int,
    end_time: int,
    attributes: Mapping[str, Any] | list[bytes],
    dropped_attributes: int,
    status: Status,
) -> bytes:
    # The attributes loop looks cached fields up in place (a call per attribute was a
    # good part of a span's cost); a miss, a varying key or None goes to ``_attribute``.
    head = _pack_ids(0x0A, 0x10, trace_id >> 64, trace_id & _LOW64, 0x12, 0x08, span_id)
    if trace_state:
        head += _field(0x1A, ",".join(f"{k}={v}" for k, v in trace_state.items()).encode())
    if parent is not None:
        head += b"\x22\x08" + parent.span_id.to_bytes(8, "big")
    name_field = _name_fields.get(name)
    if name_field is None:
        name_field = _field(0x2A, name.encode("utf-8"))
        if len(_name_fields) < 256:
            _name_fields[name] = name_field
    fields: list[bytes]
    if type(attributes) is list:
        fields = attributes
    else:
        fields = []
        append = fields.append
        cached_field = _attribute_cache.get
        varying = _varying
        for key, value in attributes.items():  # type: ignore[union-attr]
            if key not in varying:
                try:
                    found = cached_field((key, value, type(value)))
                except TypeError:  # a list
                    found = None
                if found is not None:
                    append(found)
                    continue
            if value is None:
                raise NotCovered("None value")
            append(_attribute(key, value))
    if dropped_attributes:
        fields = [*fields, b"\x50" + _varint(dropped_attributes)]
    # One list display: no append call per part.
    parts = [
        head, name_field, _KIND_CLIENT if kind is _CLIENT else _KIND[kind],
        _pack_times(0x39, start_time, 0x41, end_time), *fields,
        _status_objects.get(status) or _status_field(status),
        _FLAGS_REMOTE if parent is not None and parent.is_remote else _FLAGS_LOCAL,
    ]  # fmt: skip
    # Joined, then prefixed: summing the parts' sizes first (to join once) costs more
    # than copying one span's few hundred bytes again.
    body = b"".join(parts)
    size = len(body)
    return (_span_heads.get(size) or _span_head(size)) + body


# ScopeSpans.spans tags and sizes by size: a service's spans come in a few sizes.
_span_heads: dict[int, bytes] = {}


def _span_head(size: int) -> bytes:
    head = _ONE_BYTE[0x12] + _varint(size)
    if len(_span_heads) < 1024:
        _span_heads[size] = head
    return head


def _resource(resource: Resource) -> bytes:
    return _encode_resource(resource).SerializeToString()


def _scope(scope: InstrumentationScope | None) -> bytes:
    return _encode_instrumentation_scope(scope).SerializeToString()  # type: ignore[arg-type]


def _canonical(obj: Any, seen: dict[int, Any], distinct: list[Any]) -> Any:
    """The first object of the batch equal to ``obj`` (a resource or a scope)."""
    found = seen.get(id(obj))
    if found is None:
        found = next((d for d in distinct if type(d) is type(obj) and d == obj), None)
        if found is None:
            distinct.append(obj)
            found = obj
        seen[id(obj)] = found
    return found


class SpanEncoder:
    """Encodes batches; the resource and scope headers are encoded once per pair."""

    def __init__(self) -> None:
        self._headers: dict[tuple[int, int], tuple[bytes, bytes, bytes]] = {}
        # The objects behind the cached ids, kept alive so an id is never reused.
        self._keep: list[tuple[Resource, Any]] = []

    def __call__(self, spans: Sequence[ReadableSpan]) -> bytes:
        try:
            return self._encode(spans)
        except NotCovered:
            return encode_spans(spans).SerializePartialToString()

    def wired(self, resource: Resource, scope: InstrumentationScope, wires: list[bytes]) -> bytes:
        """One ResourceSpans field holding spans written by ``wire_span`` (each a
        ScopeSpans.spans field) under ``resource`` and ``scope``."""
        if not wires:
            return b""
        return self._resource_spans(resource, [(scope, wires)])

    def _encode(self, spans: Sequence[ReadableSpan]) -> bytes:
        if not spans:
            return b""
        # Resource -> scope -> spans, grouped by equality in first-seen order, as the
        # SDK's encoder groups (equal objects are usually the same one: compared once).
        # The usual batch: one telemetry's spans, all with the same two objects.
        resource, scope = spans[0].resource, spans[0].instrumentation_scope
        if all(s.resource is resource and s.instrumentation_scope is scope for s in spans):
            encoded = [_span(span) for span in spans]
            return self._resource_spans(resource, [(scope, encoded)])
        seen: dict[int, Any] = {}
        distinct: list[Any] = []
        groups: dict[int, tuple[Resource, dict[int, tuple[Any, list[bytes]]]]] = {}
        for span in spans:
            resource = _canonical(span.resource, seen, distinct)
            scope = _canonical(span.instrumentation_scope, seen, distinct)
            scopes = groups.setdefault(id(resource), (resource, {}))[1]
            scopes.setdefault(id(scope), (scope, []))[1].append(_span(span))
        return b"".join(
            self._resource_spans(resource, list(scopes.values()))
            for resource, scopes in groups.values()
        )

    def _resource_spans(self, resource: Resource, scopes: list[tuple[Any, list[bytes]]]) -> bytes:
        """One ResourceSpans field: the resource's scopes, each with its encoded spans.
        Sizes are summed first and the whole written by one join: a batch's spans are
        copied once (nesting each level by concatenation copied them at every level)."""
        body: list[bytes] = []
        resource_head = resource_tail = b""
        for scope, encoded in scopes:
            head, resource_head, resource_tail = self._header(resource, scope)
            tail = self._tail(scope)
            size = len(head) + sum(map(len, encoded)) + len(tail)
            body += (_ONE_BYTE[0x12] + _varint(size), head)
            body += encoded
            body.append(tail)
        size = len(resource_head) + sum(map(len, body)) + len(resource_tail)
        return b"".join([_ONE_BYTE[0x0A] + _varint(size), resource_head, *body, resource_tail])

    def _header(self, resource: Resource, scope: Any) -> tuple[bytes, bytes, bytes]:
        key = (id(resource), id(scope))
        cached = self._headers.get(key)
        if cached is None:
            resource_tail = (
                _field(0x1A, resource.schema_url.encode()) if resource.schema_url else b""
            )
            cached = (_field(0x0A, _scope(scope)), _field(0x0A, _resource(resource)), resource_tail)
            if len(self._headers) < 64:
                self._keep.append((resource, scope))
                self._headers[key] = cached
        return cached

    @staticmethod
    def _tail(scope: Any) -> bytes:
        schema_url = scope.schema_url if scope is not None else ""
        return _field(0x1A, schema_url.encode()) if schema_url else b""


class WireSpanExporter(OTLPSpanExporter):
    """``OTLPSpanExporter`` sending what ``SpanEncoder`` writes, from a queue's items:
    wire bytes, written under ``resource`` and ``scope`` (those of the pipeline's
    ``DirectSpans``), and spans. Leaves out the SDK exporter's own metrics (off unless
    asked for) and its request-size cap (a batch of at most
    ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` calls' spans is far below it)."""

    def __init__(
        self,
        resource: Resource,
        scope: InstrumentationScope,
        endpoint: str | None = None,
        timeout: float | None = None,
    ) -> None:
        # The endpoint as the SDK resolves it, to pick the transport for it.
        endpoint = endpoint or _resolve_endpoint(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, "v1/traces")
        transport = persistent_transport(endpoint)
        if transport is None:
            super().__init__(endpoint=endpoint, timeout=timeout)
        else:
            super().__init__(endpoint=endpoint, timeout=timeout, _transport=transport)
        self._resource = resource
        self._scope = scope
        self._encode = SpanEncoder()

    def export(self, spans: Sequence[SpanItem]) -> SpanExportResult:
        if self._shutdown:
            return SpanExportResult.FAILURE
        try:
            data = self.encode(spans)
        except Exception:  # a value the SDK's encoder refuses too
            return SpanExportResult.FAILURE
        if self._client.export(data).success:
            return SpanExportResult.SUCCESS
        return SpanExportResult.FAILURE

    def encode(self, items: Sequence[SpanItem]) -> bytes:
        """One ExportTraceServiceRequest: the wire bytes under this pipeline's header,
        then the spans (a second ResourceSpans: a collector merges them alike)."""
        wires = [item for item in items if type(item) is bytes]
        data = self._encode.wired(self._resource, self._scope, wires)
        if len(wires) == len(items):
            return data
        return data + self._encode([item for item in items if isinstance(item, ReadableSpan)])
