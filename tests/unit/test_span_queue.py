"""The OTLP pipeline's span queue (``WireSpanProcessor``): what it queues is exported,
in order and in batches, at a flush and at shutdown; a full queue drops its oldest
spans, counted and warned about; spans that are not bytes go through it too."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import pytest
import structlog
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import SpanContext, TraceFlags

from guard.telemetry.exporters import FailureWarnings
from guard.telemetry.span_queue import WireSpanProcessor

WAIT_S = 10.0  # a bound on waiting for the export thread, never an assertion on time


class Recorder:
    """An exporter keeping each batch; ``hold`` keeps the first export waiting."""

    def __init__(self, hold: bool = False) -> None:
        self.batches: list[list[Any]] = []
        self.shut = False
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        self.entered.set()
        assert self.release.wait(WAIT_S)
        self.batches.append(list(spans))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.shut = True

    @property
    def items(self) -> list[Any]:
        return [item for batch in self.batches for item in batch]


def wires(count: int, start: int = 0) -> list[bytes]:
    return [b"span-%d" % n for n in range(start, start + count)]


def processor(exporter: Recorder, **kwargs: Any) -> WireSpanProcessor:
    # A schedule delay far beyond the test: only a full batch, a flush or shutdown export.
    kwargs.setdefault("schedule_delay_millis", 3_600_000)
    return WireSpanProcessor(exporter, FailureWarnings(), **kwargs)


def test_shutdown_delivers_every_queued_span_in_order_and_in_batches() -> None:
    exporter = Recorder()
    queue = processor(exporter, max_queue_size=4096, max_export_batch_size=512)
    sent = wires(1300)
    for wire in sent:
        queue.push(wire)
    queue.shutdown()
    assert exporter.items == sent
    assert all(len(batch) <= 512 for batch in exporter.batches)
    assert exporter.shut
    assert queue.dropped == 0
    # After shutdown nothing more is queued, and a flush says so.
    queue.push(b"late")
    assert not queue.force_flush()
    assert exporter.items == sent


def test_a_providers_flush_and_shutdown_reach_the_queue() -> None:
    exporter = Recorder()
    queue = processor(exporter)
    provider = TracerProvider()
    provider.add_span_processor(queue)
    queue.push(b"one")
    assert provider.force_flush()
    assert exporter.items == [b"one"]
    queue.push(b"two")
    provider.shutdown()
    assert exporter.items == [b"one", b"two"] and exporter.shut


def test_a_full_batch_wakes_the_export_thread() -> None:
    exporter = Recorder()
    queue = processor(exporter, max_export_batch_size=8)
    for wire in wires(8):
        queue.push(wire)
    assert exporter.entered.wait(WAIT_S)  # no flush, no shutdown: the thread exported
    queue.shutdown()
    assert exporter.items == wires(8)


def test_below_a_batch_the_thread_sleeps_and_after_shutdown_nothing_is_queued() -> None:
    exporter = Recorder()
    queue = processor(exporter, max_export_batch_size=8)
    for wire in wires(7):
        queue.push(wire)
    assert not exporter.entered.is_set() and len(queue._queue) == 7
    queue.shutdown()
    queue.push(b"late")
    assert exporter.items == wires(7) and len(queue._queue) == 0


def test_the_schedule_delay_exports_a_partial_batch() -> None:
    exporter = Recorder()
    queue = processor(exporter, schedule_delay_millis=10, max_export_batch_size=512)
    queue.push(b"alone")
    assert exporter.entered.wait(WAIT_S)
    queue.shutdown()
    assert exporter.items == [b"alone"]


def test_a_full_queue_drops_its_oldest_spans_counted_and_warned() -> None:
    exporter = Recorder(hold=True)
    queue = processor(exporter, max_queue_size=4, max_export_batch_size=4)
    for wire in wires(4):
        queue.push(wire)
    assert exporter.entered.wait(WAIT_S)  # the thread holds that batch: the queue is empty
    with structlog.testing.capture_logs() as logs:
        for wire in wires(7, start=4):
            queue.push(wire)
    assert queue.dropped == 3
    exporter.release.set()
    queue.shutdown()
    # The first batch, then the four newest: spans 4, 5 and 6 were dropped.
    assert exporter.items == [*wires(4), *wires(4, start=7)]
    full = [e for e in logs if e["event"] == "otlp queue full"]
    # One warning a minute, with the count since the last one.
    assert len(full) == 1
    assert full[0]["log_level"] == "warning" and full[0]["signal"] == "traces"
    assert full[0]["dropped"] == 1


def test_spans_go_through_the_queue_as_they_are_unsampled_ones_not_at_all() -> None:
    exporter = Recorder()
    queue = processor(exporter)
    sampled = ReadableSpan("s", SpanContext(1, 2, False, TraceFlags(TraceFlags.SAMPLED)))
    unsampled = ReadableSpan("u", SpanContext(1, 3, False, TraceFlags(0)))
    queue.on_end(sampled)
    queue.on_end(unsampled)
    queue.push(b"wire")
    queue.shutdown()
    assert exporter.items == [sampled, b"wire"]


def test_an_exporter_that_raises_does_not_stop_the_queue(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Raising(Recorder):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            super().export(spans)
            raise RuntimeError("boom")

    exporter = Raising()
    queue = processor(exporter, max_export_batch_size=2)
    for wire in wires(2):
        queue.push(wire)
    assert queue.force_flush()
    queue.push(b"after")
    queue.shutdown()
    assert exporter.items == [*wires(2), b"after"]
    assert "span export raised" in caplog.text
