"""Durable call records: one redacted JSON line per guarded call.

A record is what an operator keeps after spans have been sampled away: who was
called, what loopguard decided and why, how long it took, what it cost. It
never holds a raw payload: parameters are a hash, outcomes a progress marker,
the session a keyed pseudonym. The keys and their order are ``RECORD_FIELDS``,
declared with the span and metric attributes in ``guard.telemetry.fields``.

The writer renders each record with orjson and appends it to its own file (the
timestamp put first when the record is built); it never touches structlog's global
configuration, which the application may own.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson
import structlog

from guard.engine.calls import CallRecord
from guard.engine.pseudonym import SessionHasher
from guard.telemetry.fields import PROJECTIONS, RECORD_FIELDS
from guard.telemetry.sink import RecordCallback, SinkSetup
from guard.telemetry.spans import CallSpan

_log = structlog.get_logger("loopguard.records")

# The record's keys, in order (declared in guard.telemetry.fields). Consumers (the
# monitor) read these names: append, never rename or reorder.
__all__ = ["RECORD_FIELDS", "RecordWriter", "RecordsSink", "sink"]


class RecordsSink:
    """Writes one durable record per call: the field table's projection, with the
    call's time and ids first and the session as a keyed pseudonym."""

    failure_event = "durable record failed"

    def __init__(self, writer: RecordWriter, session_hasher: SessionHasher) -> None:
        self._writer = writer
        self._session_hasher = session_hasher

    def emit(self, record: CallRecord, call: CallSpan) -> None:
        # Built once, in its final order (``ts`` first): the writer passes this very
        # dict down the chain, no merged copies.
        fields = PROJECTIONS.record(
            record, self._session_hasher,
            _now_iso(), "call", call.request_id, call.trace_id, call.span_id,
        )  # fmt: skip
        self._writer.write(fields)

    def force_flush(self, timeout_millis: int) -> None:
        pass  # every line is flushed as it is written

    def shutdown(self) -> None:
        self._writer.close()


def sink(setup: SinkSetup) -> RecordsSink | None:
    """Only when a record would go somewhere: a file, stdout or the callback."""
    if not setup.cfg.records and setup.record_callback is None:
        return None
    return RecordsSink(RecordWriter(setup.cfg.records, setup.record_callback), setup.session_hasher)


def _json_fallback(value: object) -> str:
    """A value JSON has no type for is written as its ``repr``: the record is never
    lost to one odd field."""
    return repr(value)


class RecordWriter:
    """Appends one JSON line per call to ``path`` ("-" stdout, "" nowhere).

    The file is opened on the first record (constructing a guard creates no
    file) and every line is flushed as it is written, so a crash loses nothing
    already recorded.

    A line is the record dict rendered by orjson (``repr`` for a value JSON has no
    type for, as structlog's renderer did before), written by one call: no processor
    chain or logger in between, which cost as much as the rendering on every call.
    """

    def __init__(self, path: str, callback: RecordCallback | None = None) -> None:
        self._path = path
        self._callback = callback
        self._file: IO[bytes] | None = None
        # Where a rendered line goes (None: nowhere, the callback only); set on open.
        self._out: Callable[[bytes], object] | None = None
        self._opened = False
        self._lock = threading.Lock()
        self._closed = False

    def _open(self) -> None:
        if self._path == "-":
            # stdout as it is when the first record is written (text: tests capture it).
            printer = structlog.PrintLogger(sys.stdout)
            self._out = lambda line: printer.msg(line[:-1].decode("utf-8"))
        elif self._path:
            path = Path(os.path.expanduser(self._path))
            path.parent.mkdir(parents=True, exist_ok=True)
            # Unbuffered: each line goes to the file by one write(2) of its own, in the
            # file as the call returns, with no copy into a buffer and no flush.
            file = self._file = path.open("ab", buffering=0)
            write = file.write

            def out(line: bytes) -> None:
                written = write(line)
                if written is None or written < len(line):
                    _write_rest(write, line, written or 0)

            self._out = out
        self._opened = True

    @property
    def enabled(self) -> bool:
        """False when a record would go nowhere (callers skip building it)."""
        return bool(self._path or self._callback is not None) and not self._closed

    def write(self, fields: dict[str, Any]) -> None:
        """Write one record: the records sink's dict (``ts`` first) as it is; a dict
        without ``ts`` gets one put first."""
        if not self._path and self._callback is None:
            return
        if self._closed:
            return
        if not self._opened:
            with self._lock:
                if self._closed:
                    return
                if not self._opened:
                    try:
                        self._open()
                    except OSError as exc:
                        # Once, not per call; the callback (if any) still gets the records.
                        _log.warning(
                            "record file unusable", path=self._path, error=type(exc).__name__
                        )
                        self._path = ""
                        self._open()
        # ts first, then the fields in the order given (the records sink builds them
        # in RECORD_FIELDS order), so the lines read well and diff cleanly.
        if "ts" not in fields:
            fields = {"ts": _now_iso(), **fields}
        if self._callback is not None:
            self._callback(dict(fields))
        # Rendered even when it goes nowhere: a record JSON cannot carry fails alike.
        line = orjson.dumps(fields, default=_json_fallback, option=orjson.OPT_APPEND_NEWLINE)
        out = self._out
        if out is not None:
            out(line)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._out = None
            if self._file is not None:
                self._file.close()
                self._file = None


def _write_rest(write: Callable[[memoryview], int | None], line: bytes, written: int) -> None:
    """The rest of a line a write(2) took only part of (a disk filling up: the next
    write raises, as the flush of a buffered file did)."""
    view = memoryview(line)
    while written < len(line):
        done = write(view[written:])
        if not done:
            raise OSError("the record file takes no more bytes")
        written += done


# (second, "YYYY-MM-DDTHH:MM:SS") of the last timestamp: records come many per second,
# and formatting the date and time is most of a timestamp's cost. One tuple, replaced
# whole, so threads writing records never see half of it.
_ts_cache: tuple[int, str] = (-1, "")


def _now_iso() -> str:
    """UTC ISO 8601 with a ``Z``, as ``structlog.processors.TimeStamper(fmt="iso", utc=True)``.

    Exactly ``datetime.now(UTC).isoformat()`` with ``+00:00`` as ``Z``: microseconds
    as six digits, left out when they are zero (as ``isoformat`` does).
    """
    global _ts_cache
    # Truncated to the microsecond, as datetime.now() does (it rounds toward floor).
    seconds, micros = divmod(time.time_ns() // 1000, 1_000_000)
    cached_second, prefix = _ts_cache
    if seconds != cached_second:
        # isoformat of the whole second: the same date and time digits, no fraction.
        prefix = datetime.fromtimestamp(seconds, tz=UTC).replace(tzinfo=None).isoformat()
        _ts_cache = (seconds, prefix)
    return f"{prefix}.{micros:06d}Z" if micros else f"{prefix}Z"
