"""Soak: many mixed requests through a real ``loopguard serve``, counting its own 5xx and RSS.

    python benchmarks/soak.py [--requests 100000] [--concurrency 64]

Two processes on loopback: an upstream (the test harness's ``ToolServer`` for the
http-tool route, ``RawJsonRpcServer`` for the MCP route, ``FakeModels`` streaming
chat for the OpenAI route) and ``loopguard serve --config`` in front of it, with
durable records on. An aiohttp driver sends a fixed mix: new sessions on each route,
groups of identical calls that get stopped (422), malformed JSON, oversized bodies
(413), SSE streams read to the end, streams dropped after the first chunk, and
upstream 5xx answers passed through. Most calls come from ``--agents`` long-lived
sessions; one in ten requests opens a new session (the memory store keeps each until
its TTL or its ``max_sessions`` LRU bound, so a run of only new sessions measures that
bound, ~1.2 KB a session, rather than a leak).

A 5xx is the upstream's only on the route asked for one and when it is not a
problem+json document of loopguard's; every other 5xx counts as loopguard's own,
except an ``overloaded`` 503 (Retry-After), which is intended and counted apart. The proxy's RSS is
read from /proc after a warm-up and at the end. Exits 1 when loopguard answered any
other 5xx, a request failed at the transport, the mix did not produce its 413s and
422s, or RSS grew by more than ``--max-rss-growth-mb``.

``--tracemalloc DIR`` runs the proxy under tracemalloc (``benchmarks/tracemalloc_serve.py``,
slower: compare its RSS only with another traced run), snapshots it after the warm-up and
at the end, and splits the traced growth into what the session store holds (its
sessions and everything reachable from them, walked at each snapshot) and the rest,
then prints the top growth by traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from benchmarks.bench_proxy import free_port, serve_app, stop, wait_listening  # noqa: E402

MAX_BODY = 64 * 1024  # the proxy's [server] max_body_bytes here; oversized bodies are twice it
REPEAT_GROUP = 4  # identical calls in one session: past max_repeats (3) the rest are stopped
# One cycle of the mix; "repeat" stands for REPEAT_GROUP requests.
MIX = (
    ["tool"] * 4
    + ["tool_new"]
    + ["mcp"] * 2
    + ["chat"] * 2
    + ["sse", "sse_drop", "chat_drop"]
    + ["malformed"] * 2
    + ["oversized", "upstream_5xx", "repeat"]
)
PROBLEM_TYPE = "https://loopguard.dev/problems/"


# -- the upstream (a subprocess: ``--role upstream``) ----------------------------------


def run_upstream(port: int) -> None:
    from mcp_servers import RawJsonRpcServer
    from proxy_harness import ToolServer
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from guard.devtools.fakes import Behaviour, FakeModels, Reply

    models = FakeModels(
        reply=Reply(text="Soak answer, streamed in a few chunks."), behaviour=Behaviour(chunks=6)
    )
    app = Starlette(
        routes=[
            Mount("/tools", app=ToolServer().app()),
            Mount("/rpc", app=RawJsonRpcServer().app()),
            Mount("/openai", app=models.app()),
        ]
    )
    serve_app(app, port, lifespan="off")


def write_config(directory: str, port: int, upstream: str) -> Path:
    config = Path(directory) / "soak.toml"
    config.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
max_body_bytes = {MAX_BODY}

[telemetry]
records = "{Path(directory) / "records.jsonl"}"

[[routes]]
prefix = "/tools"
upstream = "{upstream}/tools"
adapter = "http-tool"

[[routes]]
prefix = "/mcp"
upstream = "{upstream}/rpc/mcp"
adapter = "mcp"

[[routes]]
prefix = "/openai"
upstream = "{upstream}/openai"
adapter = "openai"
"""
    )
    return config


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


# -- the driver ------------------------------------------------------------------------


class Tally:
    def __init__(self) -> None:
        self.statuses: Counter[int] = Counter()
        self.own_5xx: Counter[str] = Counter()  # loopguard's problem slug -> count
        self.overload_503 = 0
        self.upstream_5xx = 0
        self.transport_errors: Counter[str] = Counter()
        self.dropped = 0  # streams the client walked away from on purpose
        self.requests = 0

    async def note(self, response: Any, upstream_error: bool = False) -> None:
        """Count one answer; a 5xx that is not loopguard's problem document is the
        upstream's only where the upstream was asked for one (else it is unexplained,
        e.g. a server's bare 500, and counted against loopguard)."""
        self.requests += 1
        self.statuses[response.status] += 1
        if response.status < 500:
            return
        kind = ""
        if response.content_type == "application/problem+json":
            try:
                kind = str(json.loads(await response.read()).get("type", ""))
            except ValueError:
                kind = ""
        if not kind.startswith(PROBLEM_TYPE) and upstream_error:
            self.upstream_5xx += 1
        elif not kind.startswith(PROBLEM_TYPE):
            self.own_5xx[f"unexplained {response.status} {response.content_type}"] += 1
        elif kind.endswith("/overloaded") and response.status == 503:
            self.overload_503 += 1
        else:
            self.own_5xx[kind.removeprefix(PROBLEM_TYPE)] += 1


async def one(kind: str, n: int, session: Any, base: str, tally: Tally, agents: int) -> None:
    # Most calls come from a pool of long-lived agent sessions; "tool_new" and each
    # repeat group open a session of their own (the store keeps those until evicted).
    fresh = kind in ("tool_new", "repeat")
    sid = f"soak-new-{n}" if fresh else f"soak-agent-{n % agents}"
    headers = {"content-type": "application/json", "x-loopguard-session": sid}
    if kind in ("tool", "tool_new"):
        body = json.dumps({"order_id": f"A{n}", "detail": True})
        async with session.post(f"{base}/tools/lookup_tracking", data=body, headers=headers) as r:
            await r.read()
            await tally.note(r)
    elif kind == "mcp":
        rpc = {
            "jsonrpc": "2.0",
            "id": n,
            "method": "tools/call",
            "params": {"name": "lookup_tracking", "arguments": {"order_id": f"A{n}"}},
        }
        mcp_headers = {**headers, "accept": "application/json, text/event-stream"}
        async with session.post(f"{base}/mcp", data=json.dumps(rpc), headers=mcp_headers) as r:
            await r.read()
            await tally.note(r)
    elif kind in ("chat", "chat_drop"):
        chat = {
            "model": "gpt-4o-mini",
            "stream": True,
            "messages": [{"role": "user", "content": f"Where is order A{n}?"}],
        }
        url = f"{base}/openai/v1/chat/completions"
        async with session.post(url, data=json.dumps(chat), headers=headers) as r:
            await read_or_drop(r, kind.endswith("_drop"), tally)
    elif kind in ("sse", "sse_drop"):
        url = f"{base}/tools/sse?n=8&gap=0.002"
        async with session.post(url, data=json.dumps({"q": n}), headers=headers) as r:
            await read_or_drop(r, kind.endswith("_drop"), tally)
    elif kind == "malformed":
        body = '{"order_id": "A' + str(n) + '", "detail": tru'
        async with session.post(f"{base}/tools/fixed", data=body, headers=headers) as r:
            await r.read()
            await tally.note(r)
    elif kind == "oversized":
        body = json.dumps({"blob": "x" * (2 * MAX_BODY), "n": n})
        async with session.post(f"{base}/tools/fixed", data=body, headers=headers) as r:
            await r.read()
            await tally.note(r)
    elif kind == "upstream_5xx":
        async with session.post(f"{base}/tools/status/502", data=f"[{n}]", headers=headers) as r:
            await r.read()
            await tally.note(r, upstream_error=True)
    elif kind == "repeat":
        body = json.dumps({"question": "anything new?"})
        for _ in range(REPEAT_GROUP):
            async with session.post(f"{base}/tools/fixed", data=body, headers=headers) as r:
                await r.read()
                await tally.note(r)


async def read_or_drop(response: Any, drop: bool, tally: Tally) -> None:
    if not drop or response.status != 200:
        await response.read()
        await tally.note(response)
        return
    await response.content.readany()  # the first chunk, then the client goes away
    await tally.note(response)
    tally.dropped += 1
    response.close()


async def drive(
    base: str, total: int, concurrency: int, agents: int, tally: Tally, first: int = 0
) -> None:
    """``total`` requests (repeat groups count each call) from ``concurrency`` workers,
    numbered from ``first`` (so a later run opens sessions of its own)."""
    import aiohttp

    cycle = itertools.cycle(MIX)
    counter = itertools.count(first)
    issued = 0

    def next_job() -> tuple[str, int] | None:
        nonlocal issued
        if issued >= total:
            return None
        kind = next(cycle)
        issued += REPEAT_GROUP if kind == "repeat" else 1
        return kind, next(counter)

    async def worker(session: aiohttp.ClientSession) -> None:
        while (job := next_job()) is not None:
            kind, n = job
            try:
                await one(kind, n, session, base, tally, agents)
            except (TimeoutError, aiohttp.ClientError) as exc:
                tally.transport_errors[f"{kind}: {type(exc).__name__}"] += 1

    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))


def snapshot(proxy: subprocess.Popen[bytes], directory: Path, n: int) -> None:
    """Ask the traced proxy for snapshot ``n`` and wait until it is written."""
    import signal

    path = directory / f"snap-{n}.pickle"
    proxy.send_signal(signal.SIGUSR1)
    size = -1
    while not path.exists() or path.stat().st_size != size:
        size = path.stat().st_size if path.exists() else -1
        time.sleep(1.0)


def split_growth(directory: Path) -> None:
    """The traced growth between the two snapshots: the store's share, then the rest."""
    import tracemalloc

    from benchmarks.tracemalloc_serve import compare

    old = tracemalloc.Snapshot.load(str(directory / "snap-0.pickle"))
    new = tracemalloc.Snapshot.load(str(directory / "snap-1.pickle"))
    total = sum(s.size_diff for s in new.compare_to(old, "filename"))
    # Measured on the objects (walked from the store at each snapshot), not by where
    # they were allocated: a step's strings come from the adapters and the exchange.
    held = sum(int((directory / f"store-{n}.txt").read_text()) * (1 if n else -1) for n in (0, 1))
    print(f"{'traced growth MB':<28} {total / 2**20:>+8.1f}")
    print(f"{'  held by the store MB':<28} {held / 2**20:>+8.1f}")
    print(f"{'  the rest MB':<28} {(total - held) / 2**20:>+8.1f}")
    compare(directory / "snap-0.pickle", directory / "snap-1.pickle")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--agents", type=int, default=256, help="long-lived sessions")
    parser.add_argument("--warmup", type=int, default=0, help="default: a tenth, at most 5000")
    parser.add_argument("--max-rss-growth-mb", type=float, default=30.0)
    parser.add_argument("--tracemalloc", metavar="DIR", help="trace the proxy, snapshots in DIR")
    parser.add_argument("--role", choices=["upstream"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        run_upstream(args.port)
        return 0

    warmup = args.warmup or min(5000, max(1, args.requests // 10))
    workdir = tempfile.mkdtemp(prefix="loopguard-soak-")
    upstream_port, proxy_port = free_port(), free_port()
    config = write_config(workdir, proxy_port, f"http://127.0.0.1:{upstream_port}")
    upstream = subprocess.Popen(
        [sys.executable, __file__, "--role", "upstream", "--port", str(upstream_port)], cwd=ROOT
    )
    serve = ["serve", "--config", str(config)]
    if args.tracemalloc:
        Path(args.tracemalloc).mkdir(parents=True, exist_ok=True)
        tracer = ROOT / "benchmarks" / "tracemalloc_serve.py"
        command = [sys.executable, str(tracer), args.tracemalloc, *serve]
    else:
        command = [sys.executable, "-m", "guard.cli", *serve]
    proxy = subprocess.Popen(command, cwd=ROOT)
    base = f"http://127.0.0.1:{proxy_port}"
    tally = Tally()
    try:
        wait_listening(upstream_port)
        wait_listening(proxy_port)
        asyncio.run(drive(base, warmup, args.concurrency, args.agents, Tally()))
        rss_start = rss_mb(proxy.pid)
        if args.tracemalloc:
            snapshot(proxy, Path(args.tracemalloc), 0)
        began = time.perf_counter()
        asyncio.run(drive(base, args.requests, args.concurrency, args.agents, tally, warmup))
        wall = time.perf_counter() - began
        time.sleep(0.5)  # let dropped streams' upstream legs finish
        rss_end = rss_mb(proxy.pid)
        alive = proxy.poll() is None
        if args.tracemalloc and alive:
            snapshot(proxy, Path(args.tracemalloc), 1)
    finally:
        stop(proxy)
        stop(upstream)
        shutil.rmtree(workdir, ignore_errors=True)

    growth = rss_end - rss_start
    failures = []
    if tally.own_5xx:
        failures.append(f"loopguard's own 5xx: {dict(tally.own_5xx)}")
    if tally.transport_errors:
        failures.append(f"transport errors: {dict(tally.transport_errors)}")
    if not tally.statuses[413] or not tally.statuses[422]:
        failures.append("the mix produced no 413 or no 422")
    if growth > args.max_rss_growth_mb:
        failures.append(f"RSS grew {growth:.1f} MB (limit {args.max_rss_growth_mb:g} MB)")
    if not alive:
        failures.append("the proxy exited during the soak")

    print(
        f"soak: {tally.requests} requests (after {warmup} warm-up) at concurrency "
        f"{args.concurrency} in {wall:.1f} s ({tally.requests / wall:.0f} req/s)"
    )
    print(f"{'status':<28} {'count':>8}")
    for status, count in sorted(tally.statuses.items()):
        print(f"{status:<28} {count:>8}")
    print(f"{'streams dropped mid-way':<28} {tally.dropped:>8}")
    print(f"{'upstream 5xx passed on':<28} {tally.upstream_5xx:>8}")
    print(f"{'loopguard overload 503':<28} {tally.overload_503:>8}")
    print(f"{'loopguard own other 5xx':<28} {sum(tally.own_5xx.values()):>8}")
    print(f"{'transport errors':<28} {sum(tally.transport_errors.values()):>8}")
    print(f"{'proxy RSS after warm-up MB':<28} {rss_start:>8.1f}")
    print(f"{'proxy RSS at end MB':<28} {rss_end:>8.1f}")
    print(f"{'RSS growth MB':<28} {growth:>+8.1f}")
    if args.tracemalloc and alive:
        split_growth(Path(args.tracemalloc))
    for failure in failures:
        print(f"FAIL: {failure}")
    print("PASS" if not failures else "FAIL")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
