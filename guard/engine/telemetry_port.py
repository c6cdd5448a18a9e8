"""What the engine and the front doors need of telemetry, declared by the engine.

``guard.telemetry.Telemetry`` implements it (spans, metrics, durable records); the
engine never imports that package. ``NullTelemetry`` records nothing: an engine given
no telemetry has it (replay, tests, benchmarks of the engine alone).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from guard.engine.calls import CallRecord
from guard.engine.pseudonym import SessionHasher

if TYPE_CHECKING:
    from guard.engine.config import Config


class SpanHandle(Protocol):
    """One call's span, from ``start`` to ``finish``."""

    def inject(self, headers: dict[str, str]) -> dict[str, str]:
        """Name this span as the parent in the upstream request's headers."""
        ...


class TelemetryPort(Protocol):
    def start(
        self, span_name: str, incoming_headers: Mapping[str, str], *, lowercase: bool = False
    ) -> SpanHandle:
        """Open a call's span, continuing the agent's ``traceparent`` if it sent one.
        ``lowercase``: the header names are lower-cased already."""
        ...

    def finish(
        self, call_span: SpanHandle, record: CallRecord, chunk_gaps: Sequence[float] | None = None
    ) -> None:
        """The call is over: emit it (once). Never raises."""
        ...

    def force_flush(self, timeout_millis: int = 5_000) -> None: ...

    def shutdown(self) -> None:
        """Flush and stop; idempotent."""
        ...


# How a front door makes an engine's telemetry: from the config and the engine's
# session pseudonyms (``guard.telemetry.build``).
TelemetryFactory = Callable[["Config", SessionHasher], TelemetryPort]


class _NullSpan:
    __slots__ = ()
    # No SDK span: the in-process door makes this the current span (OTel reads None
    # as the invalid span).
    span = None

    def inject(self, headers: dict[str, str]) -> dict[str, str]:
        return headers


_NULL_SPAN = _NullSpan()


class NullTelemetry:
    """Records nothing: no spans, no metrics, no records, no threads, no ids."""

    def start(
        self, span_name: str, incoming_headers: Mapping[str, str], *, lowercase: bool = False
    ) -> SpanHandle:
        return _NULL_SPAN

    def finish(
        self, call_span: SpanHandle, record: CallRecord, chunk_gaps: Sequence[float] | None = None
    ) -> None:
        pass

    def force_flush(self, timeout_millis: int = 5_000) -> None:
        pass

    def shutdown(self) -> None:
        pass
