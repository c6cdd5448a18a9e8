"""Spans, metrics and durable records for every guarded call.

loopguard is an OpenTelemetry span source. One span per guarded call, named and
attributed per the GenAI semantic conventions as of v1.41.1 (the constants of
``opentelemetry-semantic-conventions``; the tracer and meter carry that schema URL),
plus the guard's own ``loopguard.*`` attributes. The agent's ``traceparent`` is
continued, and the upstream request carries loopguard's span as its parent.

The package, by responsibility:

* ``facade``: ``Telemetry`` (start a call, hand the finished call to the sinks) and
  ``SINKS``, the list of sinks; ``build`` for the front doors.
* ``sink``: the one shape of a sink (``emit(record, call)``) and what it is built from.
* ``fields``: each field of a ``CallRecord`` declared once, projected to span
  attributes, metric attributes and the durable record.
* ``spans``, ``metrics``, ``records``: the three sinks (and ``CallSpan``, the ids).
* ``exporters``: providers, console/OTLP exporters, the resource.
* ``semconv``: every attribute and metric name emitted.
"""

from __future__ import annotations

from guard.telemetry.facade import SINKS, Telemetry, build
from guard.telemetry.sink import Sink, SinkSetup
from guard.telemetry.spans import CallSpan

__all__ = ["SINKS", "CallSpan", "Sink", "SinkSetup", "Telemetry", "build"]
