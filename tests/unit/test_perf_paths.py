"""The guard's fast paths give the same answers as the paths they shortcut.

- ``MemoryStore.history_for_call``: a call with no step in the window gets ``[]``
  (and so the same verdict as with the full history);
- telemetry with exporter "none": non-recording spans that still continue the
  agent's trace upstream and name their ids in the durable records;
- the durable record writer: one flushed JSON line per call, fields in order;
- the record timestamp (second cached, microseconds appended): exactly
  ``datetime.now(UTC).isoformat()`` with ``Z``;
- the progress markers' caches of volatile-key tests and stripped strings.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guard.engine.calls import CallRecord, Step
from guard.engine.config import LoopConfig, TelemetryConfig
from guard.engine.detector import Detector
from guard.engine.progress import ProgressMarkers
from guard.engine.redact import Redactor
from guard.engine.store import MemoryStore
from guard.telemetry import Telemetry, records
from guard.telemetry.records import RECORD_FIELDS

AGENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
AGENT_SPAN = "b7ad6b7169203331"

steps = st.builds(
    Step,
    tool=st.sampled_from(["a", "b"]),
    params_hash=st.sampled_from(["h1", "h2", "h3"]),
    marker=st.sampled_from(["m1", "m2"]),
    error=st.booleans(),
)


@settings(max_examples=150, deadline=None)
@given(
    appended=st.lists(st.tuples(steps, st.sampled_from([3, 4, 64])), max_size=40),
    tool=st.sampled_from(["a", "b"]),
    params_hash=st.sampled_from(["h1", "h2", "h3"]),
)
def test_history_for_call_matches_history(
    appended: list[tuple[Step, int]], tool: str, params_hash: str
) -> None:
    async def run() -> None:
        store = MemoryStore()
        detector = Detector(LoopConfig(max_repeats=2, max_identical_errors=2, max_error_streak=2))
        for step, window in appended:  # windows change too: the counts are rebuilt
            await store.append("s", step, window)
            full = await store.history("s")
            fast = await store.history_for_call("s", tool, params_hash)
            # The window comes back when it holds the call or a failure of its tool
            # (the error streak reads the tool's failures whatever the params).
            called = any(s.tool == tool and (s.params_hash == params_hash or s.error) for s in full)
            assert fast == (full if called else [])
            assert detector.evaluate(fast, tool, params_hash) == detector.evaluate(
                full, tool, params_hash
            )

    asyncio.run(run())


def test_history_for_call_touches_and_expires_like_history() -> None:
    now = [0.0]
    store = MemoryStore(max_sessions=2, ttl_seconds=10, clock=lambda: now[0])

    async def run() -> None:
        await store.append("old", Step("t", "h", "m"), 8)
        await store.append("new", Step("t", "h", "m"), 8)
        now[0] = 5.0
        assert await store.history_for_call("old", "t", "other") == []
        await store.append("third", Step("t", "h", "m"), 8)  # evicts the LRU: "new"
        assert await store.history("new") == []
        assert len(await store.history("old")) == 1
        now[0] = 100.0
        assert await store.history_for_call("old", "t", "other") == []
        assert len(store) == 1  # "old" expired and was dropped, as history() does

    asyncio.run(run())


def _tool_record() -> CallRecord:
    return CallRecord(
        operation="execute_tool",
        span_name="execute_tool lookup",
        tool="lookup",
        session="agent-1",
        session_tracked=True,
        params_hash="0" * 32,
    )


def test_unexported_spans_still_continue_the_trace_and_name_it_in_records(tmp_path) -> None:
    path = tmp_path / "records.jsonl"
    tel = Telemetry(TelemetryConfig(exporter="none", records=str(path)), "p")
    incoming = {"traceparent": f"00-{AGENT_TRACE}-{AGENT_SPAN}-01", "tracestate": "k=v"}
    call = tel.start("execute_tool lookup", incoming)
    assert call.span is None  # no SDK span is built when nothing would read it
    upstream = call.inject({})
    _, trace_id, parent_id, flags = upstream["traceparent"].split("-")
    assert (trace_id, flags) == (AGENT_TRACE, "01")
    assert parent_id == call.span_id != AGENT_SPAN
    assert upstream["tracestate"] == "k=v"
    tel.finish(call, _tool_record())

    # No traceparent: a new sampled trace with fresh ids each time.
    fresh = [tel.start("execute_tool lookup", {"Content-Type": "x"}) for _ in range(2)]
    assert fresh[0].trace_id != fresh[1].trace_id != AGENT_TRACE
    assert all(c.inject({})["traceparent"].endswith("-01") for c in fresh)
    for c in fresh:
        tel.finish(c, _tool_record())
    # Header names in any case are understood.
    mixed = tel.start("x", {"TraceParent": f"00-{AGENT_TRACE}-{AGENT_SPAN}-00"})
    assert mixed.inject({})["traceparent"].split("-")[1::2] == [AGENT_TRACE, "00"]
    tel.shutdown()

    lines = path.read_bytes().splitlines()
    records: list[dict[str, Any]] = [json.loads(line) for line in lines]
    assert len(records) == 3
    assert (records[0]["trace_id"], records[0]["span_id"]) == (AGENT_TRACE, call.span_id)
    assert [r["trace_id"] for r in records[1:]] == [c.trace_id for c in fresh]
    assert list(records[0]) == list(RECORD_FIELDS)
    assert records[0]["session"].startswith("s_") and "agent-1" not in lines[0].decode()


def test_given_providers_still_record(tmp_path) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    tel = Telemetry(TelemetryConfig(records=""), "p", tracer_provider=TracerProvider())
    call = tel.start("x", {})
    assert call.span.is_recording()
    ctx = call.span.get_span_context()  # the call's ids are its SDK span's
    assert (call.trace_int, call.span_int) == (ctx.trace_id, ctx.span_id)
    assert call.flags == ctx.trace_flags
    tel.finish(call, _tool_record())
    tel.shutdown()


@settings(max_examples=300, deadline=None)
@given(
    ns=st.one_of(
        st.integers(min_value=0, max_value=4_102_444_800 * 10**9),
        # Whole seconds and the last microsecond of a second.
        st.integers(min_value=0, max_value=4_102_444_800).map(lambda s: s * 10**9),
        st.integers(min_value=1, max_value=4_102_444_800).map(lambda s: s * 10**9 - 1),
    )
)
def test_record_timestamp_is_isoformat_with_z(ns: int) -> None:
    micros = ns // 1000
    expected = (
        datetime.fromtimestamp(micros // 10**6, tz=UTC)
        .replace(microsecond=micros % 10**6)
        .isoformat()
        .replace("+00:00", "Z")
    )
    with mock.patch.object(records.time, "time_ns", return_value=ns):
        assert records._now_iso() == expected
        assert records._now_iso() == expected  # from the cached second too


def test_record_timestamp_follows_the_clock_across_seconds() -> None:
    for ns in (1_700_000_000_999_999_000, 1_700_000_001_000_000_000, 1_700_000_001_000_001_999):
        with mock.patch.object(records.time, "time_ns", return_value=ns):
            got = records._now_iso()
        micros = ns // 1000
        want = datetime.fromtimestamp(micros // 10**6, tz=UTC).replace(microsecond=micros % 10**6)
        assert got == want.isoformat().replace("+00:00", "Z")
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    assert records._now_iso()[:19] >= now[:19]


def test_marker_caches_give_the_uncached_answer() -> None:
    markers = ProgressMarkers(LoopConfig(), Redactor())
    outcome = {
        "status": "in transit",
        "Timestamp": "2026-01-02T03:04:05Z",
        "seen": "at 2026-01-02 by 0123456789abcdef0123",
        "nested": {"request_id": "x", "list": ["2026-01-02", 1, 2.5, None, True]},
    }
    stripped = {
        "status": "in transit",
        "seen": "at ~ by ~",
        "nested": {"list": ["~", 1, 2.5, None, True]},
    }
    first = markers.marker("t", outcome)
    for _ in range(3):  # cached keys and strings from now on
        assert markers._default.value(outcome) == stripped
        assert markers.marker("t", outcome) == first
    assert markers._default.value({1: "2026-01-02", "ETag": "v"}) == {
        1: "~"
    }  # non-string keys kept
    long_text = "x" * 600 + " 2026-01-02"
    assert markers._default.value({"v": long_text}) == {"v": "x" * 600 + " ~"}


def test_one_sweeper_serves_every_relay_and_sleeps_when_none_needs_it() -> None:
    """The proxy's single timer ticks each relay in flight until the relay says it needs
    no more sweeps (done, or watched with no deadline), then disarms: an idle proxy, or
    one holding only long-lived streams, never wakes for nothing."""
    from guard.doors.proxy import _Sweeper

    class Relay:
        def __init__(self, answers: list[bool]) -> None:
            self.answers = answers
            self.ticks = 0

        def tick(self, now: float) -> bool:
            self.ticks += 1
            return self.answers.pop(0)

    async def run() -> None:
        sweeper = _Sweeper()
        short, long_lived = Relay([False]), Relay([True, True, False])
        sweeper.add(short)
        sweeper.add(long_lived)
        deadline = asyncio.get_running_loop().time() + 10
        while sweeper.handle is not None and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert sweeper.handle is None and not sweeper.relays
        assert (short.ticks, long_lived.ticks) == (1, 3)
        # Armed again by the next relay.
        again = Relay([False])
        sweeper.add(again)
        assert sweeper.handle is not None
        while sweeper.handle is not None and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert again.ticks == 1

    asyncio.run(run())


def test_record_lines_are_written_whole_even_by_short_writes(tmp_path) -> None:
    """The record file is unbuffered (one write per line): a write that takes part of a
    line gets the rest written, and a file that takes nothing more is an error (the
    sink reports it), never a line silently cut."""
    writer = records.RecordWriter(str(tmp_path / "records.jsonl"))
    writer.write({"ts": "t", "event": "call", "n": 1})
    writer.write({"ts": "t", "event": "call", "n": 2})
    lines = (tmp_path / "records.jsonl").read_bytes().splitlines()
    assert [json.loads(line)["n"] for line in lines] == [1, 2]
    writer.close()

    taken: list[bytes] = []

    def three_at_a_time(data: Any) -> int:
        taken.append(bytes(data[:3]))
        return min(3, len(data))

    records._write_rest(three_at_a_time, b"0123456789\n", 3)
    assert b"".join(taken) == b"3456789\n"
    with pytest.raises(OSError):
        records._write_rest(lambda data: 0, b"0123456789\n", 3)
