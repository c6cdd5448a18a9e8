"""Session store benchmark: bytes per idle session and the garbage collector's time
over idle sessions (memory), CPU per call (both).

    python benchmarks/bench_store.py [--sessions 20000] [--gc-sessions 0,20000,100000]
                                     [--calls 20000] [--redis URL]

- ``memory bytes/session``: ``tracemalloc`` over ``--sessions`` sessions, each with one
  call admitted and settled (what an idle session holds), divided by their number:
  everything the store keeps, the session id, params hash and marker strings included
  (each session's own, as the proxy makes them).
- ``full gc.collect()``: the time of a full collection of the garbage collector (best
  of 5) in a process whose memory store holds each of ``--gc-sessions`` idle sessions,
  made as above, after two collections (as the young generations' would have), and the
  number of objects the collector tracks then. A full collection walks every one: what
  a store of many sessions adds to each is a latency spike the requests it interrupts
  pay (the p99).
- ``calls/s`` and ``CPU us/call``: ``--calls`` calls, 16 at a time, each admitted
  (``reserve``) then settled with its outcome, as the exchange drives a store; a new
  session every 8 calls. For Redis, a throwaway ``redis-server`` on loopback unless
  ``--redis`` names one. CPU: this process's (the client side, what a proxy pays) and
  the redis-server's (what the scripts cost the server).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_proxy import proc_cpu_s, start_redis  # noqa: E402
from guard.engine.calls import Step  # noqa: E402
from guard.engine.store import MemoryStore  # noqa: E402

TOOL = "lookup_tracking"
MARKER = "5f0c2a9d41e7b3c8"


def _hash(n: int) -> str:
    return f"{n:032x}"


async def _fill(store: MemoryStore, sessions: int) -> None:
    """``sessions`` idle sessions, each with one call admitted and settled."""
    for n in range(sessions):
        session, params_hash = f"session-{n:08d}", _hash(n)
        _, token = await store.reserve(session, TOOL, params_hash, 64, 630.0)
        await store.settle(session, token, Step(TOOL, params_hash, f"ptr:{n:012x}"), 64)


def memory_bytes_per_session(sessions: int) -> float:
    store = MemoryStore(max_sessions=sessions * 2)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    asyncio.run(_fill(store, sessions))
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(store) == sessions
    return (after - before) / sessions


def full_collection_ms(sessions: int) -> tuple[float, int]:
    """The time of a full collection (ms) and the number of objects it walks."""
    store = MemoryStore(max_sessions=max(sessions, 1))
    asyncio.run(_fill(store, sessions))
    gc.collect()
    gc.collect()
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        gc.collect()
        best = min(best, time.perf_counter() - started)
    assert len(store) == sessions
    return best * 1e3, len(gc.get_objects())


async def _drive(store: Any, calls: int, concurrency: int = 16) -> tuple[float, float]:
    counter = iter(range(calls))

    async def worker() -> None:
        for n in counter:
            session, params_hash = f"bench-{n // 8}", _hash(n)
            _, token = await store.reserve(session, TOOL, params_hash, 64, 630.0)
            await store.settle(session, token, Step(TOOL, params_hash, MARKER), 64)

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await store.aclose()
    return calls / (time.perf_counter() - wall), (time.process_time() - cpu) / calls * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=20_000)
    parser.add_argument("--gc-sessions", default="0,20000,100000", help="comma-separated")
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--redis", default="", help="a Redis URL (default: start one)")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    print(f"memory store: {memory_bytes_per_session(args.sessions):.0f} bytes/idle session")
    for sessions in (int(n) for n in args.gc_sessions.split(",") if n.strip()):
        ms, tracked = full_collection_ms(sessions)
        print(
            f"memory store: full gc.collect() {ms:.1f} ms with {sessions} idle sessions "
            f"({tracked} objects tracked)"
        )
    rate, cpu = asyncio.run(_drive(MemoryStore(), args.calls))
    print(f"memory store: {rate:.0f} calls/s, {cpu:.1f} CPU us/call")

    proc, url = (None, args.redis) if args.redis else start_redis([])
    if not url:
        print("redis store: skipped (no redis-server)")
        return 0
    try:
        from guard.engine.breaker import BreakerStore
        from guard.engine.store import RedisStore

        server_before = proc_cpu_s(proc.pid) if proc is not None else float("nan")
        store = BreakerStore(RedisStore(url, reply_timeout=None))  # as the engine builds it
        rate, cpu = asyncio.run(_drive(store, args.calls))
        server = (proc_cpu_s(proc.pid) - server_before) / args.calls * 1e6 if proc else float("nan")
        print(
            f"redis store:  {rate:.0f} calls/s, {cpu:.1f} CPU us/call client side, "
            f"{server:.1f} in redis-server"
        )
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
