"""TTFT benchmark: time to first token seen by a client, direct vs through loopguard.

    python benchmarks/bench_ttft.py [--requests 300] [--chunks 100] [--first-delay-ms 5]
                                    [--chunk-delay-ms 0]

Three uvicorn processes (uvloop + httptools):

- the fake Chat Completions upstream of the tests (``tests/fake_models.py``): a
  role-only first chunk at once, then ``--chunks`` content chunks, the first after
  ``--first-delay-ms``, the others ``--chunk-delay-ms`` apart (0: in one burst, the
  worst case for a proxy on a small machine: the upstream, the proxy and the client
  all want a core while the first token is on its way; a model paces its tokens);
- loopguard (``guard.doors.proxy.ProxyApp``) with an ``openai`` route in front of it, durable
  records written to a temp file, no exporter;
- ``bare``: the floor passthrough of ``bench_proxy.py`` (raw ASGI over aiohttp, no
  guard), to tell what the guard adds from what any extra hop costs.

The client (this process, aiohttp) sends the same streamed request in turn to the
upstream directly, through the bare proxy and through loopguard, and times from
sending to the first SSE event that carries content (the role-only chunk does not
count), then reads the stream to its end. All paths run in the same run,
interleaved, so drift on the machine hits them alike. Prints p50/p99 for each and
the added p50 (loopguard vs direct: the target; loopguard vs bare: what the guard
itself adds over any extra hop).

Target: <= 1 ms added at p50.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from benchmarks.bench_proxy import free_port, serve_app  # noqa: E402  (after the path set-up)

TEXT = "Loopguard measures the first token and passes every byte on as it arrives. " * 20


def run_role(
    role: str, port: int, upstream: str, chunks: int, first_delay: float, chunk_delay: float
) -> None:
    if role == "bare":
        from benchmarks.bench_proxy import FloorProxy

        app = FloorProxy(upstream, prefix="/openai")
    elif role == "upstream":
        from guard.devtools.fakes import Behaviour, FakeModels, Reply

        fake = FakeModels(
            reply=Reply(text=TEXT),
            behaviour=Behaviour(first_delay=first_delay, chunk_delay=chunk_delay, chunks=chunks),
        )
        app = fake.app()
    else:
        from guard.doors.proxy import ProxyApp
        from guard.engine.config import Config

        records = os.path.join(tempfile.mkdtemp(prefix="loopguard-bench-"), "records.jsonl")
        config = Config.from_mapping(
            {
                "telemetry": {"records": records},
                "routes": [{"prefix": "/openai", "upstream": upstream, "adapter": "openai"}],
            }
        )
        app = ProxyApp(config)
    serve_app(app, port, lifespan="off" if role == "upstream" else "on")


def start(role: str, port: int, args: argparse.Namespace, upstream: str = "") -> subprocess.Popen:
    command = [
        sys.executable,
        __file__,
        "--role",
        role,
        "--port",
        str(port),
        "--upstream",
        upstream,
        "--chunks",
        str(args.chunks),
        "--first-delay-ms",
        str(args.first_delay_ms),
        "--chunk-delay-ms",
        str(args.chunk_delay_ms),
    ]
    return subprocess.Popen(command)


async def wait_up(port: int) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
    raise RuntimeError(f"server on port {port} did not start")


async def one(session, url: str, body: bytes) -> tuple[float, float]:
    """(TTFT, total) in seconds for one streamed request."""
    from adapters.sse import SSEParser

    parser = SSEParser()
    ttft = None
    started = time.perf_counter()
    async with session.post(url, data=body, headers={"content-type": "application/json"}) as resp:
        assert resp.status == 200, resp.status
        async for chunk in resp.content.iter_any():
            if ttft is None:
                for event in parser.feed(chunk):
                    if event.data.startswith("{") and '"content": "' in event.data:
                        delta = json.loads(event.data)["choices"][0]["delta"]
                        if delta.get("content"):
                            ttft = time.perf_counter() - started
                            break
    assert ttft is not None, "no content chunk"
    return ttft, time.perf_counter() - started


async def bench(args: argparse.Namespace, upstream: str, bare: str, proxy: str) -> None:
    import aiohttp

    from guard.engine.timing import percentile

    body = json.dumps(
        {
            "model": "gpt-bench",
            "stream": True,
            "messages": [{"role": "user", "content": "Tell me about loopguard."}],
        }
    ).encode()
    targets = {
        "direct": upstream + "/v1/chat/completions",
        "bare": bare + "/openai/v1/chat/completions",
        "loopguard": proxy + "/openai/v1/chat/completions",
    }
    ttfts: dict[str, list[float]] = {name: [] for name in targets}
    totals: dict[str, list[float]] = {name: [] for name in targets}
    connector = aiohttp.TCPConnector(limit=4)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(args.warmup):
            for url in targets.values():
                await one(session, url, body)
        for n in range(args.requests):
            # Rotate which path goes first, so none always follows another.
            items = list(targets.items())
            order = items[n % 3 :] + items[: n % 3]
            for name, url in order:
                ttft, total = await one(session, url, body)
                ttfts[name].append(ttft * 1000)
                totals[name].append(total * 1000)
    print(
        f"TTFT, streamed chat completion, {args.chunks} chunks, first content after "
        f"{args.first_delay_ms} ms, then every {args.chunk_delay_ms} ms, "
        f"{args.requests} requests per path (interleaved)"
    )
    print(f"{'path':<10} {'ttft p50':>10} {'ttft p99':>10} {'total p50':>10} {'total p99':>10}")
    for name in targets:
        t50, t99 = percentile(ttfts[name], 50), percentile(ttfts[name], 99)
        a50, a99 = percentile(totals[name], 50), percentile(totals[name], 99)
        print(f"{name:<10} {t50:>8.3f}ms {t99:>8.3f}ms {a50:>8.3f}ms {a99:>8.3f}ms")

    def added(values: dict[str, list[float]], base: str) -> float:
        return percentile(values["loopguard"], 50) - percentile(values[base], 50)

    verdict = "OK" if added(ttfts, "direct") <= 1.0 else "OVER TARGET"
    print(f"added TTFT p50, loopguard vs direct: {added(ttfts, 'direct'):.3f} ms ({verdict})")
    print(f"added TTFT p50, loopguard vs bare proxy: {added(ttfts, 'bare'):.3f} ms")
    print(f"added total p50, loopguard vs direct: {added(totals, 'direct'):.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--chunks", type=int, default=100)
    parser.add_argument("--first-delay-ms", type=float, default=5.0)
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0)
    parser.add_argument("--role", choices=["upstream", "bare", "proxy"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        run_role(
            args.role,
            args.port,
            args.upstream,
            args.chunks,
            args.first_delay_ms / 1000,
            args.chunk_delay_ms / 1000,
        )
        return
    ports = {"upstream": free_port(), "bare": free_port(), "proxy": free_port()}
    urls = {role: f"http://127.0.0.1:{port}" for role, port in ports.items()}
    processes = [
        start(role, port, args, "" if role == "upstream" else urls["upstream"])
        for role, port in ports.items()
    ]
    try:

        async def run() -> None:
            for port in ports.values():
                await wait_up(port)
            await bench(args, urls["upstream"], urls["bare"], urls["proxy"])

        asyncio.run(run())
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=10)


if __name__ == "__main__":
    main()
