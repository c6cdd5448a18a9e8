"""loopguard's own CPU per request, without sockets: a steady figure to optimize against.

    python benchmarks/bench_overhead.py [--requests 20000] [--rounds 3]

``bench_proxy.py`` is the benchmark that counts (real sockets, uvicorn, wrk), but on a
virtual machine its figures move by up to ±10% between runs, more than most single
changes to the hot path are worth. This one drives the same two apps -- the floor
passthrough of ``bench_proxy.py`` and ``ProxyApp`` with the same http-tool route, with
and without durable records -- directly through ASGI, with the upstream answered in
memory (``MemoryUpstream``: the same static body, in place of the aiohttp call), 16
requests in flight, on uvloop. The requests are ``bench_proxy.py``'s: its ~1 KB tool
call (every value redacted and hashed: most of the guard's own work per call), its
arguments and its session different on every request. It prints the process CPU time
per request (best of ``--rounds``) for each, and loopguard's overhead over the floor.

What it leaves out is what the two share anyway (sockets, uvicorn, aiohttp); what it
keeps is every step loopguard adds. Inside the real server each step costs more (about
twice, on this machine: caches are shared with the HTTP stack), so read its overhead as
a lower bound and confirm a change with ``bench_proxy.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_proxy import STATIC_BODY, TOOL_TEMPLATE, FloorProxy, loopguard_app  # noqa: E402

from guard.devtools.memory_upstream import MemoryUpstream  # noqa: E402

UPSTREAM = "http://127.0.0.1:9"  # never contacted: the transport answers in memory
IN_FLIGHT = 16
_RESPONSE_HEADERS = [
    (b"content-type", b"application/json"),
    (b"date", b"Fri, 27 Nov 2026 15:00:00 GMT"),
    (b"server", b"uvicorn"),
]


def make_app(target: str, records: str) -> Any:
    upstream = MemoryUpstream(STATIC_BODY, headers=_RESPONSE_HEADERS)
    if target == "floor":
        app: Any = FloorProxy(UPSTREAM)
        app.open = upstream.open
    else:
        app = loopguard_app(UPSTREAM, records)
        app.upstream = upstream
    return app


async def one_request(app: Any, agent: int, n: int) -> None:
    # bench_proxy.py's ~1 KB tool call, its arguments different on every request.
    body = TOOL_TEMPLATE.replace("{n}", f"{agent}-{n}").encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8787),
        "client": ("127.0.0.1", 50000 + agent),
        "scheme": "http",
        "method": "POST",
        "root_path": "",
        "path": "/tools/lookup_tracking",
        "raw_path": b"/tools/lookup_tracking",
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1:8787"),
            (b"content-length", str(len(body)).encode()),
            (b"content-type", b"application/json"),
            (b"x-loopguard-session", b"bench-%d-%d" % (agent, n)),
        ],
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.Event().wait()  # the client never leaves
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and message["status"] != 200:
            raise RuntimeError(f"unexpected status {message['status']}")

    await app(scope, receive, send)


async def cpu_per_request(target: str, records: str, requests: int) -> float:
    app = make_app(target, records)
    for n in range(200):  # warm-up: caches, first-use paths
        await one_request(app, 0, n)
    gc.collect()
    per_agent = requests // IN_FLIGHT

    async def agent(a: int) -> None:
        for n in range(per_agent):
            await one_request(app, a + 1, n)

    started = time.process_time()
    await asyncio.gather(*(agent(a) for a in range(IN_FLIGHT)))
    elapsed = time.process_time() - started
    if hasattr(app, "aclose"):
        await app.aclose()
    return elapsed / (per_agent * IN_FLIGHT) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="best of this many")
    args = parser.parse_args()
    import uvloop

    records_dir = tempfile.mkdtemp(prefix="loopguard-overhead-")
    targets = {
        "floor": "",
        "loopguard": str(Path(records_dir) / "records.jsonl"),
        "loopguard-no-records": "",
    }
    best: dict[str, float] = {}
    for _ in range(args.rounds):  # interleaved, so a slow spell hits every target
        for target, records in targets.items():
            us = uvloop.run(cpu_per_request(target, records, args.requests))
            best[target] = min(us, best.get(target, float("inf")))
    print(f"in-process, {IN_FLIGHT} in flight, best of {args.rounds} x {args.requests} requests")
    print(f"{'target':<21} {'cpu us/req':>10} {'overhead':>9}")
    for target, us in best.items():
        print(f"{target:<21} {us:>10.1f} {us - best['floor']:>+9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
