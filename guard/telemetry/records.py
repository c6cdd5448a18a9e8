"""Durable call records: one redacted JSON line per guarded call.

A record is what an operator keeps after spans have been sampled away: who was
called, what loopguard decided and why, how long it took, what it cost. It
never holds a raw payload: parameters are a hash, outcomes a progress marker,
the session a keyed pseudonym. The keys and their order are ``RECORD_FIELDS``,
declared with the span and metric attributes in ``guard.telemetry.fields``.

The writer is a structlog chain of its own (optional callback -> JSON over orjson,
the timestamp put first when the record is built) bound to its own file, so it
never touches structlog's global configuration that the application may own.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

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


class RecordWriter:
    """Appends one JSON line per call to ``path`` ("-" stdout, "" nowhere).

    The file is opened on the first record (constructing a guard creates no
    file) and every line is flushed as it is written, so a crash loses nothing
    already recorded.

    structlog's fast path: ``BytesLogger`` on the file and ``JSONRenderer`` over
    orjson, behind a two-step chain (tee to the callback, then render).
    """

    def __init__(self, path: str, callback: RecordCallback | None = None) -> None:
        self._path = path
        self._callback = callback
        self._file: BinaryIO | None = None
        self._logger: Any = None
        self._lock = threading.Lock()
        self._closed = False

    def _tee(self, _logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
        if self._callback is not None:
            self._callback(dict(event_dict))
        return event_dict

    def _open(self) -> Any:
        if self._path == "-":
            # stdout as it is when the first record is written (text: tests capture it).
            base: Any = structlog.PrintLogger(sys.stdout)
            serializer: Callable[..., Any] = _dumps_text
        elif self._path:
            path = Path(os.path.expanduser(self._path))
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("ab")
            base, serializer = structlog.BytesLogger(self._file), orjson.dumps
        else:
            # Without a file, ReturnLogger renders and discards: the callback still sees it.
            base, serializer = structlog.ReturnLogger(), orjson.dumps
        # Our own wrapper class and chain: the application's structlog configuration is
        # not ours. bind() turns wrap_logger's lazy proxy into the logger itself (the
        # proxy would rebuild it on every record).
        renderer = structlog.processors.JSONRenderer(serializer)
        # Without a callback the tee would only pass the dict on: one call less per record.
        processors: list[Processor] = [renderer]
        if self._callback is not None:
            processors.insert(0, self._tee)
        return structlog.wrap_logger(
            base,
            processors=processors,
            wrapper_class=_RecordLogger,
            context_class=dict,
        ).bind()

    @property
    def enabled(self) -> bool:
        """False when a record would go nowhere (callers skip building it)."""
        return bool(self._path or self._callback is not None) and not self._closed

    def write(self, fields: dict[str, Any]) -> None:
        """Write one record: the records sink's dict (``ts`` first) as it is; a dict
        without ``ts`` gets one put first."""
        if not self._path and self._callback is None:
            return
        with self._lock:
            if self._closed:
                return
            if self._logger is None:
                try:
                    self._logger = self._open()
                except OSError as exc:
                    # Once, not per call; the callback (if any) still gets the records.
                    _log.warning("record file unusable", path=self._path, error=type(exc).__name__)
                    self._path = ""
                    self._logger = self._open()
            logger = self._logger
        # ts first, then the fields in the order given (the records sink builds them
        # in RECORD_FIELDS order), so the lines read well and diff cleanly.
        if "ts" not in fields:
            fields = {"ts": _now_iso(), **fields}
        logger.record(fields)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._file is not None:
                self._file.close()
                self._file = None


class _RecordLogger(structlog.BoundLoggerBase):
    """A structlog wrapper class with one method: write a record through the chain.

    It runs the bound processors over the record dict itself, as ``_process_event``
    would, without that method's two copies of the ~36-field dict (``context.copy()``
    then ``update(**fields)``): the context is always empty here and the record already
    carries its own ``event``. The chain's last step (the JSON renderer) returns bytes
    or str, which the logger writes as one line.
    """

    def record(self, fields: dict[str, Any]) -> None:
        logger = self._logger
        event: Any = fields
        for proc in self._processors:
            event = proc(logger, "info", event)
        logger.info(event)


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


def _dumps_text(obj: Any, **kw: Any) -> str:
    return orjson.dumps(obj, **kw).decode("utf-8")
