"""Durable call records: one redacted JSON line per guarded call.

A record is what an operator keeps after spans have been sampled away: who was
called, what loopguard decided and why, how long it took, what it cost. It
never holds a raw payload: parameters are a hash, outcomes a progress marker,
the session a keyed pseudonym. ``guard.monitor`` and ``loopguard report`` read
these lines back.

The writer is a structlog chain of its own (timestamp -> optional sink ->
JSON) bound to its own file, so it never touches structlog's global
configuration that the application may own.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import structlog

from guard.calls import CallRecord

_log = structlog.get_logger("loopguard.records")

RecordSink = Callable[[dict[str, Any]], None]
SessionHasher = Callable[[str], str]

# The record's fields, in order. Consumers (monitor, report) may rely on these names.
RECORD_FIELDS = (
    "ts",
    "event",
    "request_id",
    "trace_id",
    "span_id",
    "session",
    "session_tracked",
    "route",
    "failure_stage",
    "error_type",
    "status_code",
    "operation",
    "tool",
    "model",
    "response_model",
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
    "timing_malformed",
    "app",
    "scrub_policy",
)


def keyed_session_hasher(key: bytes | None = None) -> SessionHasher:
    """A keyed BLAKE2b pseudonym for session ids (random per-process key by default).

    Two calls of one session get the same token, and no one without the key can
    test a guessed session id against a record.
    """
    key = key if key is not None else secrets.token_bytes(32)

    def pseudonymize(session: str) -> str:
        # person= separates these pseudonyms from the scrub policy's, even under one key.
        digest = hashlib.blake2b(
            session.encode("utf-8"), key=key[:64], digest_size=16, person=b"loopguard.sess"
        )
        return "s_" + digest.hexdigest()

    return pseudonymize


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
    """The record's fields (without ``ts``) for one call: no content, ever."""
    usage = record.usage
    return {
        "event": "call",
        "request_id": request_id,
        "trace_id": trace_id,
        "span_id": span_id,
        "session": session_hasher(record.session) if record.session else None,
        "session_tracked": record.session_tracked,
        "route": str(record.route),
        "failure_stage": str(record.failure_stage),
        "error_type": record.error_type,
        "status_code": record.status_code,
        "operation": record.operation,
        "tool": record.tool,
        "model": record.model,
        "response_model": record.response_model,
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
    """

    def __init__(self, path: str, sink: RecordSink | None = None) -> None:
        self._path = path
        self._sink = sink
        self._file: TextIO | None = None
        self._logger: Any = None
        self._lock = threading.Lock()
        self._closed = False

    def _order_and_tee(
        self, _logger: Any, _name: str, event_dict: dict[str, Any]
    ) -> dict[str, Any]:
        # Fixed field order (ts first) so the lines read well and diff cleanly.
        ordered = {key: event_dict[key] for key in RECORD_FIELDS if key in event_dict}
        ordered.update((key, value) for key, value in event_dict.items() if key not in ordered)
        if self._sink is not None:
            self._sink(dict(ordered))
        return ordered

    def _open(self) -> Any:
        if self._path == "-":
            # stdout as it is when the first record is written.
            target: TextIO | None = sys.stdout
        elif self._path:
            path = Path(os.path.expanduser(self._path))
            path.parent.mkdir(parents=True, exist_ok=True)
            target = self._file = path.open("a", encoding="utf-8")
        else:
            target = None
        # Without a file, ReturnLogger renders and discards: the sink still sees the record.
        base = structlog.PrintLogger(target) if target is not None else structlog.ReturnLogger()
        return structlog.wrap_logger(
            base,
            processors=[
                structlog.processors.TimeStamper(fmt="iso", key="ts", utc=True),
                self._order_and_tee,
                structlog.processors.JSONRenderer(),
            ],
        )

    def write(self, fields: dict[str, Any]) -> None:
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
        fields = dict(fields)
        event = fields.pop("event", "call")
        logger.info(event, **fields)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._file is not None:
                self._file.close()
                self._file = None
