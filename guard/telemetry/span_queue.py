"""The OTLP pipeline's span queue: each span's wire bytes, exported in batches by one
thread.

``DirectSpans`` writes a span's wire form as it ends (on the loop) and ``push``es only
those bytes: bytes are not tracked by the garbage collector, so up to a full queue of
spans costs the collector nothing (a queue of span objects was traversed, and promoted
through the generations, on every collection), and nothing of the span outlives its
end but the bytes. A span the wire writer does not cover, or one ended through the
SDK's tracer, comes in through ``on_end`` as it is and is encoded on the export thread.

The schedule is the ``BatchSpanProcessor``'s, from the same settings
(``OTEL_BSP_SCHEDULE_DELAY``, ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE``,
``OTEL_BSP_MAX_QUEUE_SIZE``): the thread wakes when a batch is queued or the delay has
passed; a full queue drops its oldest span (counted in ``dropped``, and warned about,
rate-limited); ``force_flush`` exports everything queued; ``shutdown`` exports what is
left, then shuts the exporter down. It is registered on the tracer provider, so the
provider's ``force_flush`` and ``shutdown`` reach it.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor

_logger = logging.getLogger(__name__)

# How long ``shutdown`` waits for the thread's last export, as the SDK's processor.
_SHUTDOWN_JOIN_S = 30.0


class ItemExporter(Protocol):
    """Exports a batch of queued items (wire bytes and spans)."""

    def export(self, spans: Sequence[Any]) -> Any: ...

    def shutdown(self) -> None: ...


class Drops(Protocol):
    def queue_full(self, signal: str, items: int) -> None: ...


class WireSpanProcessor(SpanProcessor):
    def __init__(
        self,
        exporter: ItemExporter,
        drops: Drops,
        max_queue_size: int | None = None,
        schedule_delay_millis: float | None = None,
        max_export_batch_size: int | None = None,
    ) -> None:
        defaults = BatchSpanProcessor
        if max_queue_size is None:
            max_queue_size = defaults._default_max_queue_size()
        if schedule_delay_millis is None:
            schedule_delay_millis = defaults._default_schedule_delay_millis()
        if max_export_batch_size is None:
            max_export_batch_size = defaults._default_max_export_batch_size()
        defaults._validate_arguments(max_queue_size, schedule_delay_millis, max_export_batch_size)
        self._exporter = exporter
        self._drops = drops
        self._max_queue = max_queue_size
        self._batch = max_export_batch_size
        # Below this many queued, a push neither drops nor completes a batch.
        self._calm = max_export_batch_size - 1
        self._delay_s = schedule_delay_millis / 1e3
        # Appended at the right, taken from the left; full, an append drops the oldest.
        self._queue: deque[bytes | ReadableSpan] = deque(maxlen=max_queue_size)
        self.dropped = 0
        self._shutdown = False
        self._abandoned = False  # shutdown stopped waiting: no further export
        self._export_lock = threading.Lock()
        self._awake = threading.Event()
        self._worker = self._start()
        # A forked child (a pre-forking server) gets its own thread and an empty queue.
        ref = weakref.WeakMethod(self._after_fork)
        os.register_at_fork(after_in_child=lambda: (m := ref()) is not None and m())

    def _start(self) -> threading.Thread:
        worker = threading.Thread(target=self._work, name="loopguard-span-export", daemon=True)
        worker.start()
        return worker

    def _after_fork(self) -> None:
        self._queue.clear()
        self._export_lock = threading.Lock()
        self._awake = threading.Event()
        if not self._shutdown:
            self._worker = self._start()

    # -- the request path: queue only --------------------------------------------------

    def push(self, item: bytes | ReadableSpan) -> None:
        """Queue one span's wire bytes (``otlp_wire.wire_span``), or a span."""
        queue = self._queue
        if len(queue) < self._calm and not self._shutdown:
            queue.append(item)  # the usual: room, and short of a batch to wake the thread for
            return
        if self._shutdown:
            return
        if len(queue) == self._max_queue:
            self._full()
        queue.append(item)
        if len(queue) >= self._batch and not self._awake.is_set():
            self._awake.set()

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if span.context and span.context.trace_flags.sampled:
            self.push(span)

    def _full(self) -> None:
        self.dropped += 1
        self._drops.queue_full("traces", 1)

    # -- the export thread -------------------------------------------------------------

    def _work(self) -> None:
        while not self._shutdown:
            # Woken by a full batch (export while there is one), else by the delay
            # (export at least one batch, whatever its size).
            woken = self._awake.wait(self._delay_s)
            if self._shutdown:
                break
            self._export(everything=False, at_least_one=not woken)
            self._awake.clear()
        self._export(everything=True)

    def _export(self, everything: bool, at_least_one: bool = False) -> None:
        with self._export_lock:  # the thread and a caller's force_flush
            queue = self._queue
            first = True
            while queue and not self._abandoned:
                if len(queue) < self._batch and not (everything or (at_least_one and first)):
                    return
                first = False
                take = queue.popleft
                batch = [take() for _ in range(min(self._batch, len(queue)))]
                try:
                    self._exporter.export(batch)
                except Exception:  # the thread must not die
                    _logger.exception("span export raised")

    # -- lifecycle ---------------------------------------------------------------------

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export everything queued now, on the caller's thread."""
        if self._shutdown:
            return False
        self._export(everything=True)
        return True

    def shutdown(self) -> None:
        """Export what is queued (the thread's last round), then shut the exporter down.
        Spans ended from now on are dropped."""
        if self._shutdown:
            return
        self._shutdown = True
        self._awake.set()
        self._worker.join(_SHUTDOWN_JOIN_S)
        self._abandoned = True
        self._exporter.shutdown()
