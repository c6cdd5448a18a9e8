"""Session store benchmark: bytes per idle session (memory) and CPU per call (both).

    python benchmarks/bench_store.py [--sessions 20000] [--calls 20000] [--redis URL]

- ``memory bytes/session``: ``tracemalloc`` over ``--sessions`` sessions, each with one
  call admitted and settled (what an idle session holds), divided by their number:
  everything the store keeps, the session id, params hash and marker strings included
  (each session's own, as the proxy makes them).
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


def memory_bytes_per_session(sessions: int) -> float:
    store = MemoryStore(max_sessions=sessions * 2)

    async def fill() -> None:
        for n in range(sessions):
            session, params_hash = f"session-{n:08d}", _hash(n)
            _, token = await store.reserve(session, TOOL, params_hash, 64, 630.0)
            await store.settle(session, token, Step(TOOL, params_hash, f"ptr:{n:012x}"), 64)

    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    asyncio.run(fill())
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(store) == sessions
    return (after - before) / sessions


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
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--redis", default="", help="a Redis URL (default: start one)")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    print(f"memory store: {memory_bytes_per_session(args.sessions):.0f} bytes/idle session")
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
