"""The in-process Guard drives the Exchange: what that pins beyond the e2e tests."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from guard import Guard, StalledRepeatError
from guard.doors.inprocess import _run_now
from guard.engine.config import Config
from guard.engine.core import Engine
from guard.telemetry import Telemetry


def traced_guard(records: list[dict[str, Any]]) -> Guard:
    config = Config.from_mapping({"telemetry": {"records": ""}})
    telemetry = Telemetry(
        config.telemetry, scrub_policy=config.redaction.policy_id, record_sink=records.append
    )
    return Guard(engine=Engine(config, telemetry=telemetry))


class Interrupted(BaseException):
    """Not an Exception: the call did not finish (as KeyboardInterrupt, cancellation)."""


def test_a_call_that_did_not_finish_records_no_step_but_its_record():
    records: list[dict[str, Any]] = []
    guard = traced_guard(records)
    try:
        for _ in range(4):  # never a stop: no step was recorded to repeat
            with pytest.raises(Interrupted), guard.call("poll", {"job": 1}, session="s"):
                raise Interrupted
        assert guard.check_sync("s", "poll", {"job": 1}).action == "allow"
    finally:
        guard.close()
    assert len(records) == 4
    record = records[0]
    assert (record["failure_stage"], record["error_type"]) == ("upstream_status", "Interrupted")
    assert record["progress_marker"] is None
    # Not an HTTP call: no status code.
    assert record["status_code"] is None


async def test_sync_and_async_calls_share_one_session_history():
    records: list[dict[str, Any]] = []
    guard = traced_guard(records)
    try:
        with guard.call("lookup", {"id": 1}, session="s") as call:
            call.outcome = "same"
        async with guard.call("lookup", {"id": 1}, session="s") as call:
            call.outcome = "same"
        with guard.call("lookup", {"id": 1}, session="s") as call:
            call.outcome = "same"
        with pytest.raises(StalledRepeatError) as stopped:
            async with guard.call("lookup", {"id": 1}, session="s"):
                pytest.fail("a stopped call's block must not run")
    finally:
        await guard.aclose()
    assert stopped.value.repeats == 3
    assert [r["route"] for r in records] == ["serve"] * 3 + ["stop_and_review"]
    assert records[-1]["failure_stage"] == "loop_guard"


def test_run_now_refuses_a_step_that_waits_on_an_event_loop():
    async def waits() -> None:
        await asyncio.sleep(0)

    with pytest.raises(RuntimeError, match="event loop"):
        _run_now(waits())
