"""LiveMonitor: the seed case's figures, one record at a time, from many threads."""

from __future__ import annotations

import threading
import tomllib
from datetime import UTC, datetime

from monitor_seed import POLICY_TOML, seed_records

from guard.monitor import LiveMonitor
from guard.monitor.policy import policy_from_mapping

POLICY = policy_from_mapping(tomllib.loads(POLICY_TOML))
NOW = datetime(2026, 5, 27, 9, 1, tzinfo=UTC)


def test_seed_case_live() -> None:
    monitor = LiveMonitor(POLICY)
    for record in seed_records():
        monitor.add(record)
    status = monitor.status(NOW)
    w = status["window_current"]
    assert status["policy_id"] == "delivery-grounding-slo-v1"
    assert status["rate_card"] == "internal-fixture-2026-05-27"
    assert (w["start"], w["end"]) == ("2026-05-27T09:00:00Z", "2026-05-27T09:05:00Z")
    assert w["requests"] == 6 and w["unsafe_serves"] == 2 and w["abstentions"] == 3
    assert round(w["unsafe_serve_rate"] * 100, 1) == 33.3
    assert w["failure_stages"]["serving_gate"] == 2
    # nearest rank: ceil(0.95 * 6) = 6th smallest of 172..240 -> 240
    assert w["ttft_ms"]["p95"] == 240.0
    # sum over the six calls of (in - cached) * 1 + cached * 0.1 + out * 5, per million:
    # 251 + 224 + 225 + 177.4 + 271 + 279 = 1427.4 -> 0.0014274 USD
    assert round(w["cost_usd"], 6) == 0.001427
    assert [f["headline"] for f in status["findings"]] == ["PAGE unsafe_claim_served=2/6"]
    assert status["findings"][0]["exemplar"]["request_id"] == "req-5"


def test_window_rolls_over_and_late_records_are_counted() -> None:
    monitor = LiveMonitor(POLICY)
    for record in seed_records(hour="09"):
        monitor.add(record)
    later = seed_records(hour="10")[:1]  # a new window an hour later
    monitor.add(later[0])
    monitor.add(seed_records(hour="08")[0])  # older than the previous window: late
    status = monitor.status(datetime(2026, 5, 27, 10, 1, tzinfo=UTC))
    assert status["window_current"]["requests"] == 1
    assert status["window_previous"] is None  # 09:00 is not the window before 10:00
    assert status["late_records"] == 1
    # Asked later still, the current window is empty (zeros, not the last one seen).
    empty = monitor.status(datetime(2026, 5, 27, 11, 0, tzinfo=UTC))["window_current"]
    assert empty["requests"] == 0 and empty["findings"] == []


def test_from_many_threads_nothing_is_lost() -> None:
    monitor = LiveMonitor(POLICY)
    records = seed_records()

    def feed() -> None:
        for _ in range(500):
            for record in records:
                monitor.add(record)

    threads = [threading.Thread(target=feed) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w = monitor.status(NOW)["window_current"]
    assert w["requests"] == 4 * 500 * 6
    assert w["unsafe_serves"] == 4 * 500 * 2


def test_bad_records_never_raise_and_are_counted() -> None:
    monitor = LiveMonitor(None)
    monitor.add({"ts": "not a time"})
    monitor.add({})
    monitor.add({"ts": "2026-05-27T09:00:00Z", "app": "junk", "input_tokens": "x", "model": "m"})
    monitor.add({"ts": "2026-05-27T09:00:01Z", "tool": "lookup"})  # a tool call: not billable
    status = monitor.status(NOW)
    assert status["malformed_records"] == 2
    assert status["policy_id"] is None and status["rate_card"] is None
    assert status["window_current"]["requests"] == 2
    assert status["window_current"]["cost_usd"] is None  # unpriced, never invented
    assert status["window_current"]["unpriced_calls"] == 1


def test_samples_and_streaks_stay_bounded() -> None:
    monitor = LiveMonitor(POLICY, max_samples=100, max_streak_keys=10)
    base = seed_records()[0]
    for i in range(1000):
        monitor.add({**base, "ttft_ms": float(i), "params_hash": f"h{i}", "tool": "t"})
    assert len(monitor._streaks) == 10
    assert monitor._current is not None and len(monitor._current.ttft) == 100
    assert monitor.status(NOW)["percentiles_exact"] is False
