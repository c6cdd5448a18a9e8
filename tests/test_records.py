"""The record file's buffering: lines written together, within the flush interval.

Timing is never asserted beyond "eventually, within a generous deadline": the tests
prove what is (or is not) in the file at points the writer cannot race.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import structlog

from guard.config import TelemetryConfig
from guard.records import FLUSH_BYTES, RecordWriter

LONG = 60.0  # seconds: no flush by time during a test


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines() if path.exists() else []


def _flusher_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "loopguard-records-flush"]


def test_lines_wait_for_flush_or_close_and_the_sink_sees_them_at_once(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    seen: list[dict[str, Any]] = []
    writer = RecordWriter(str(path), seen.append, flush_interval_s=LONG)
    for i in range(3):
        writer.write({"event": "call", "i": i})
    assert [r["i"] for r in seen] == [0, 1, 2]  # the sink is not buffered
    assert _lines(path) == []  # the file exists (opened lazily) but holds nothing yet

    writer.flush()
    assert [json.loads(line)["i"] for line in _lines(path)] == [0, 1, 2]

    writer.write({"event": "call", "i": 3})
    assert len(_lines(path)) == 3
    writer.close()
    rows = [json.loads(line) for line in _lines(path)]
    assert [r["i"] for r in rows] == [0, 1, 2, 3]
    assert rows == seen
    writer.close()  # idempotent
    writer.write({"event": "call", "i": 4})  # after close: dropped, no error
    assert len(_lines(path)) == 4


def test_interval_zero_writes_every_line_at_once(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    before = len(_flusher_threads())
    writer = RecordWriter(str(path), flush_interval_s=0)
    for i in range(3):
        writer.write({"event": "call", "i": i})
        assert len(_lines(path)) == i + 1
    assert len(_flusher_threads()) == before  # no thread without an interval
    writer.close()


def test_the_flusher_thread_writes_idle_lines(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    writer = RecordWriter(str(path), flush_interval_s=0.05)
    writer.write({"event": "call", "i": 0})
    writer.write({"event": "call", "i": 1})
    deadline = time.monotonic() + 5.0
    while len(_lines(path)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(_lines(path)) == 2  # no further write, flush or close was needed
    writer.close()


def test_the_flusher_thread_starts_with_the_file_and_ends_on_close(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    before = set(_flusher_threads())
    writer = RecordWriter(str(path), flush_interval_s=0.05)
    assert set(_flusher_threads()) == before and not path.exists()
    writer.write({"event": "call"})
    (thread,) = set(_flusher_threads()) - before
    assert thread.daemon
    writer.close()
    thread.join(5.0)
    assert not thread.is_alive()


def test_64_kib_are_written_without_waiting(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    writer = RecordWriter(str(path), flush_interval_s=LONG)
    pad = "x" * 1000
    count = 0
    while not _lines(path):
        writer.write({"event": "call", "i": count, "pad": pad})
        count += 1
        assert count * len(pad) < 2 * FLUSH_BYTES, "nothing was written at the size threshold"
    assert len(_lines(path)) == count  # everything buffered so far went in one go
    assert path.stat().st_size >= FLUSH_BYTES
    writer.close()


def test_threads_writing_at_once_lose_no_line(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    writer = RecordWriter(str(path), flush_interval_s=0.001)
    start = threading.Barrier(4)

    def work(n: int) -> None:
        start.wait()
        for i in range(500):
            writer.write({"event": "call", "thread": n, "i": i, "pad": "y" * (i % 200)})

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.close()
    rows = [json.loads(line) for line in _lines(path)]
    assert len(rows) == 2000
    assert {(r["thread"], r["i"]) for r in rows} == {(n, i) for n in range(4) for i in range(500)}


def test_lines_are_written_at_exit_without_close(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    child = textwrap.dedent(
        f"""
        from guard.records import RecordWriter

        writer = RecordWriter({str(path)!r}, flush_interval_s=60.0)
        for i in range(3):
            writer.write({{"event": "call", "i": i}})
        assert not open({str(path)!r}, "rb").read()  # still buffered
        # no close(): the interpreter exits with the writer alive
        """
    )
    subprocess.run([sys.executable, "-c", child], check=True, timeout=60)
    assert [json.loads(line)["i"] for line in _lines(path)] == [0, 1, 2]


def test_an_unreferenced_writer_flushes_when_collected(tmp_path: Path) -> None:
    import gc

    path = tmp_path / "records.jsonl"
    writer = RecordWriter(str(path), flush_interval_s=LONG)
    writer.write({"event": "call"})
    del writer
    gc.collect()
    assert len(_lines(path)) == 1


def test_telemetry_force_flush_writes_records(tmp_path: Path) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider

    from guard.calls import CallRecord
    from guard.telemetry import Telemetry

    path = tmp_path / "records.jsonl"
    tel = Telemetry(
        TelemetryConfig(records=str(path), records_flush_ms=60_000),
        "p",
        tracer_provider=TracerProvider(),
        meter_provider=MeterProvider(),
    )
    record = CallRecord(operation="execute_tool", span_name="execute_tool x", tool="x")
    tel.finish(tel.start("execute_tool x", {}), record)
    assert _lines(path) == []
    tel.force_flush()
    assert len(_lines(path)) == 1
    tel.finish(tel.start("execute_tool x", {}), record)
    tel.shutdown()
    assert len(_lines(path)) == 2


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("interval", [0, LONG])
def test_a_failed_write_warns_and_never_raises(interval: float) -> None:
    seen: list[dict[str, Any]] = []
    writer = RecordWriter("/dev/full", seen.append, flush_interval_s=interval)
    with structlog.testing.capture_logs() as logs:
        writer.write({"event": "call"})
        writer.flush()
        writer.close()
    assert len(seen) == 1  # the sink still saw the record
    failures = [e for e in logs if e["event"] == "durable record failed"]
    # The lost line is named; closing the full file may fail (and warn) once more.
    assert failures and all(e["error"] == "OSError" for e in failures)
    assert failures[0]["lines"] == 1
