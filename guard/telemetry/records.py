"""Durable call records: one redacted JSON line per guarded call.

A record is what an operator keeps after spans have been sampled away: who was
called, what loopguard decided and why, how long it took, what it cost. It
never holds a raw payload: parameters are a hash, outcomes a progress marker,
the session a keyed pseudonym. ``guard.monitor`` and ``loopguard report`` read
these lines back.

The writer is a structlog chain of its own (optional sink -> JSON over orjson,
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

from guard.engine.calls import CallRecord
from guard.engine.pseudonym import SessionHasher

_log = structlog.get_logger("loopguard.records")

RecordSink = Callable[[dict[str, Any]], None]

# The record's fields, in order. Consumers (monitor, report) may rely on these names.
RECORD_FIELDS = (
    "ts",
    "event",
    "request_id",
    "trace_id",
    "span_id",
    "session",
    "session_tracked",
    "conversation_id",
    "route",
    "failure_stage",
    "error_type",
    "status_code",
    "operation",
    "tool",
    "model",
    "response_model",
    "response_id",
    "provider",
    "mcp_method",
    "params_hash",
    "progress_marker",
    "repeat_count",
    "stall_rule",
    "stream",
    "finish_reasons",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "usage_source",
    "ttft_ms",
    "total_ms",
    "output_tps",
    "output_chunks",
    "timing_malformed",
    "app",
    "scrub_policy",
)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def record_fields(
    record: CallRecord,
    *,
    request_id: str,
    trace_id: str,
    span_id: str,
    scrub_policy: str,
    session_hasher: SessionHasher,
) -> dict[str, Any]:
    """The whole record for one call, in ``RECORD_FIELDS`` order: no content, ever.

    Built once, in its final order (``ts`` first): the writer passes this very dict
    down the chain, no merged copies.
    """
    usage = record.usage
    return {
        "ts": _now_iso(),
        "event": "call",
        "request_id": request_id,
        "trace_id": trace_id,
        "span_id": span_id,
        "session": session_hasher(record.session) if record.session else None,
        "session_tracked": record.session_tracked,
        # Either the agent's own id or a keyed pseudonym (guard.doors.exchange): never content.
        "conversation_id": record.conversation_id,
        "route": str(record.route),
        "failure_stage": str(record.failure_stage),
        "error_type": record.error_type,
        "status_code": record.status_code,
        "operation": record.operation,
        "tool": record.tool,
        "model": record.model,
        "response_model": record.response_model,
        "response_id": record.response_id,
        "provider": record.provider,
        "mcp_method": record.mcp_method,
        "params_hash": record.params_hash,
        "progress_marker": record.progress_marker,
        "repeat_count": record.repeat_count,
        "stall_rule": str(record.stall_rule) if record.stall_rule else None,
        "stream": record.stream,
        "finish_reasons": list(record.finish_reasons),
        "input_tokens": usage.input_tokens if usage else None,
        "output_tokens": usage.output_tokens if usage else None,
        "cached_input_tokens": usage.cached_input_tokens if usage else None,
        "usage_source": usage.source if usage else "absent",
        "ttft_ms": _ms(record.ttft_s),
        "total_ms": _ms(record.total_s),
        "output_tps": record.output_tps,
        "output_chunks": record.output_chunks,
        "timing_malformed": record.timing_malformed,
        "app": dict(record.app),
        # The policy the call was scrubbed under, so a record says how to read its hashes.
        "scrub_policy": record.scrub_policy or scrub_policy,
    }


class RecordWriter:
    """Appends one JSON line per call to ``path`` ("-" stdout, "" nowhere).

    The file is opened on the first record (constructing a guard creates no
    file) and every line is flushed as it is written, so a crash loses nothing
    already recorded.

    structlog's fast path: ``BytesLogger`` on the file and ``JSONRenderer`` over
    orjson, behind a two-step chain (tee to the sink, then render).
    """

    def __init__(self, path: str, sink: RecordSink | None = None) -> None:
        self._path = path
        self._sink = sink
        self._file: BinaryIO | None = None
        self._logger: Any = None
        self._lock = threading.Lock()
        self._closed = False

    def _tee(self, _logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        if self._sink is not None:
            self._sink(dict(event_dict))
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
            # Without a file, ReturnLogger renders and discards: the sink still sees it.
            base, serializer = structlog.ReturnLogger(), orjson.dumps
        # Our own wrapper class and chain: the application's structlog configuration is
        # not ours. bind() turns wrap_logger's lazy proxy into the logger itself (the
        # proxy would rebuild it on every record).
        renderer = structlog.processors.JSONRenderer(serializer)
        # Without a sink the tee would only pass the dict on: one call less per record.
        processors = [self._tee, renderer] if self._sink is not None else [renderer]
        return structlog.wrap_logger(
            base,
            processors=processors,
            wrapper_class=_RecordLogger,
            context_class=dict,
        ).bind()

    @property
    def enabled(self) -> bool:
        """False when a record would go nowhere (callers skip building it)."""
        return bool(self._path or self._sink is not None) and not self._closed

    def write(self, fields: dict[str, Any]) -> None:
        """Write one record: ``record_fields``' dict (``ts`` first) as it is; a dict
        without ``ts`` gets one put first."""
        if not self._path and self._sink is None:
            return
        with self._lock:
            if self._closed:
                return
            if self._logger is None:
                try:
                    self._logger = self._open()
                except OSError as exc:
                    # Once, not per call; the sink (if any) still gets the records.
                    _log.warning("record file unusable", path=self._path, error=type(exc).__name__)
                    self._path = ""
                    self._logger = self._open()
            logger = self._logger
        # ts first, then the fields in the order given (``record_fields`` builds them in
        # RECORD_FIELDS order), so the lines read well and diff cleanly.
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
