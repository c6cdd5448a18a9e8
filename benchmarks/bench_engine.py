"""Microbenchmark: redact + fingerprint + check + record per call, ~1 KB arguments.

    python benchmarks/bench_engine.py [--stdlib]

Single core, in-process (MemoryStore, no telemetry). Each call uses an argument
object of about 1 KB with realistic content (paths, a query, an email, an order id,
numbers); 1000 distinct argument objects, so caches cannot answer everything. Prints
the median of several runs in microseconds per call, wall clock (time.perf_counter);
the machine may be shared, so the minimum and the process CPU time are printed too.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time

from guard.engine.calls import Step
from guard.engine.config import Config, RedactionRule
from guard.engine.core import Engine
from guard.engine.store import MemoryStore

CALLS = 20_000
RUNS = 7


class _NoTelemetry:
    def shutdown(self) -> None:
        pass


def make_args(i: int) -> dict:
    return {
        "query": f"status of order #A{10000 + i % 500} for customer jane.doe@example.com",
        "path": "/srv/app/src/services/orders/tracking.py",
        "offset": (i % 7) * 100,
        "limit": 200,
        "include_history": True,
        "filters": {
            "carrier": ["ups", "fedex", "dhl"],
            "since": "2026-11-01T00:00:00Z",
            "region": "eu-west-1",
            "tags": ["priority", "international", "fragile", "signature-required"],
        },
        "notes": (
            "Customer called twice about the delay; promised an update by end of day. "
            "Check the warehouse scan log before escalating to the carrier's support desk."
        ),
        "context": {
            "agent": "support-bot",
            "step": i,
            "previous_tools": ["search_orders", "lookup_tracking", "read_file", "think"],
            "confidence": 0.82,
            "locale": "en-GB",
        },
        "headers": {"x-request-source": "agent", "authorization": "Bearer abcdef0123456789xyz"},
        "fields": ["id", "status", "eta", "carrier", "last_scan", "destination", "weight_kg"],
        "return_format": {"type": "json", "max_items": 25, "sort": "-updated_at"},
        "dry_run": False,
        "ratio": 0.375,
    }


async def run_once(
    engine: Engine, args: list[dict], sessions: list[str], markers: list[str]
) -> float:
    n, s, m = len(args), len(sessions), len(markers)
    cpu = time.process_time()
    start = time.perf_counter()
    for i in range(CALLS):
        h = engine.fingerprint(args[i % n])
        session = sessions[i % s]
        await engine.check(session, "lookup_tracking", h)
        await engine.record(session, Step("lookup_tracking", h, markers[i % m], False))
    wall = (time.perf_counter() - start) / CALLS * 1e6
    return wall, (time.process_time() - cpu) / CALLS * 1e6


async def main() -> None:
    from guard.engine import canonical

    if "--stdlib" in sys.argv:  # measure the fallback encoder (no orjson)
        canonical._ORJSON = None
    rule = RedactionRule(name="order", pattern=r"#A\d{5}").model_dump()
    config = Config.from_mapping({"redaction": {"rules": [rule]}})
    engine = Engine(config, store=MemoryStore(), telemetry=_NoTelemetry())
    args = [make_args(i) for i in range(1000)]
    # 100 sessions, each with a full window (64 steps) after the warm-up: the detector's
    # worst case. Markers come from the caller (computed after the call ran).
    sessions = [f"session-{i}" for i in range(100)]
    markers = [f"h:{i:016x}" for i in range(5)]
    size = len(json.dumps(args[0]))
    await run_once(engine, args, sessions, markers)  # warm up: caches, full windows
    runs = [await run_once(engine, args, sessions, markers) for _ in range(RUNS)]
    results = [wall for wall, _ in runs]
    cpu = statistics.median(c for _, c in runs)
    encoder = "orjson" if canonical._ORJSON is not None else "stdlib json"
    print(
        f"redact+fingerprint+check+record, {size} B args, {CALLS} calls x {RUNS} runs, "
        f"{encoder}: median {statistics.median(results):.1f} us/call "
        f"(min {min(results):.1f}, max {max(results):.1f}; CPU time median {cpu:.1f}); "
        "target < 25 us"
    )


if __name__ == "__main__":
    asyncio.run(main())
