"""The one shape every telemetry sink has, and what a sink is built from.

A sink receives every finished call as ``emit(record, call)``: the ``CallRecord`` and
the ``CallSpan`` (ids, SDK span if any, start time, chunk gaps). ``Telemetry`` calls
the sinks in the order of its ``SINKS`` list, each in its own ``try``: a sink that
raises is logged (its ``failure_event``, the exception type only: a message could
quote a value) and neither the call nor the other sinks notice. A sink that needs
nothing at flush or shutdown makes those no-ops.

A new sink: a module with a class of this shape and a ``sink(setup)`` factory
(returning None when it would do nothing), and one line in ``guard.telemetry.SINKS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from guard.engine.calls import CallRecord
from guard.engine.config import TelemetryConfig
from guard.engine.pseudonym import SessionHasher

if TYPE_CHECKING:
    from opentelemetry.metrics import Meter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from guard.telemetry.spans import CallSpan, DirectSpans

# Receives each durable record as a dict (tests, in-process users).
RecordCallback = Callable[[dict[str, Any]], None]


class Sink(Protocol):
    # The warning logged when ``emit`` raises.
    failure_event: str

    def emit(self, record: CallRecord, call: CallSpan) -> None: ...

    def force_flush(self, timeout_millis: int) -> None: ...

    def shutdown(self) -> None: ...


@dataclass(frozen=True, slots=True)
class SinkSetup:
    """What a sink factory may use. ``meter`` is None when metrics are not recorded;
    ``meter_provider`` is then None too, else the provider ``meter`` came from, and
    ``scope`` is the instrumentation scope of ``meter`` and the tracer.
    ``direct_spans`` ends spans of a pipeline telemetry built itself (else None)."""

    cfg: TelemetryConfig
    recording_spans: bool
    meter: Meter | None
    record_callback: RecordCallback | None
    session_hasher: SessionHasher
    direct_spans: DirectSpans | None = None
    meter_provider: MeterProvider | None = None
    scope: InstrumentationScope | None = None


SinkFactory = Callable[[SinkSetup], "Sink | None"]
