"""Proxy benchmark: loopguard with the guard on against a bare passthrough proxy.

    python benchmarks/bench_proxy.py [--duration 8] [--rounds 1]

Three uvicorn processes (uvloop + httptools, one worker each):

- a fast static upstream (raw ASGI, a small JSON answer);
- ``bare``: a raw-ASGI passthrough proxy with the same upstream client as loopguard
  (``guard.doors.upstream.Upstream``) and no guard logic;
- ``loopguard``: ``guard.doors.proxy.ProxyApp`` with an http-tool route, a session header on
  every request and parameters that vary, so every call is fingerprinted, checked,
  recorded and served (no blocks), with the default telemetry (spans for trace
  propagation, metrics) and durable records written to a temp file;
- ``loopguard-no-records``: the same without the durable records file;
- ``loopguard-redis``: ``loopguard`` with its sessions in Redis (the store replicas
  share), when ``redis-server`` is installed: a ``redis-server`` on loopback, sharing
  the upstream's core;
- ``loopguard-redis-2w``: the same through ``loopguard serve --workers 2`` (the serve
  path's uvicorn options), its two workers free to run on every core, upstream, load
  generator and Redis included: scale-out on this machine. CPU per request sums the
  workers.

Each proxy is driven with the same load by ``wrk`` (a Lua script POSTs the JSON
bodies) when it is installed, else by a built-in aiohttp load generator, at
concurrency 1 and 16. The proxies are pinned to one CPU, the upstream and the load
generator to the others where the machine has more than one.

It prints requests/s, p50 and p99 latency, and the CPU time the proxy process spent
per request (from /proc: the figure that shows where the cost is when the machine
is busy with other work), then the ratios against the bare proxy.

Targets: loopguard >= 80 % of the bare proxy's requests/s at concurrency 16, and at
most 0.5 ms added to p50 at concurrency 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STATIC_BODY = b'{"order_id":"A10234","status":"in transit","last_scan":"Memphis TN hub"}'
HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"host",
    b"content-length",
}
WRK_SCRIPT = """
local counter = 0
local n = 0
function setup(thread)
  n = n + 1
  thread:set("id", n)
end
function init(args)
  wrk.method = "POST"
  wrk.headers["content-type"] = "application/json"
  wrk.headers["x-loopguard-session"] = "bench-" .. id
end
function request()
  counter = counter + 1
  local body = '{"order_id":"A' .. id .. '-' .. counter .. '","detail":true}'
  return wrk.format(nil, "/tools/lookup_tracking", nil, body)
end
"""


# -- the three servers (run as subprocesses: ``--role``) -------------------------------


async def static_upstream(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(STATIC_BODY)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": STATIC_BODY})


class BareProxy:
    """The baseline: forward and stream back, the same client, no guard."""

    def __init__(self, upstream: str, prefix: str = "/tools") -> None:
        from guard.doors.upstream import Upstream
        from guard.engine.config import ServerConfig

        self.upstream = upstream
        self.prefix = prefix.encode()
        self.client = Upstream(ServerConfig())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await self.client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        raw_path: bytes = scope["raw_path"]
        if raw_path.startswith(self.prefix):
            raw_path = raw_path[len(self.prefix) :]
        url = self.upstream + raw_path.decode("latin-1")
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode("latin-1")
        headers = [(k, v) for k, v in scope["headers"] if k not in HOP_BY_HOP]
        request = self.client.request(scope["method"], url, headers, body)
        response = await self.client.send(request)
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [
                        (k, v)
                        for k, v in response.headers.raw
                        if k.lower() not in HOP_BY_HOP or k.lower() == b"content-length"
                    ],
                }
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()


def loopguard_config(upstream: str, records: str, store: str = "", **server: Any) -> Any:
    from guard.engine.config import Config

    mapping: dict[str, Any] = {
        "routes": [{"prefix": "/tools", "upstream": upstream, "adapter": "http-tool"}],
        "telemetry": {"records": records},
        "server": server,
    }
    if store:
        mapping["store"] = {"backend": "redis", "url": store}
    return Config.from_mapping(mapping)


def loopguard_app(upstream: str, records: str, store: str = "") -> Any:
    from guard.doors.proxy import ProxyApp

    return ProxyApp(loopguard_config(upstream, records, store))


def run_role(
    role: str, port: int, upstream: str, cpus: list[int], records: str, store: str
) -> None:
    import uvicorn

    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(cpus))
    if role.startswith("loopguard-") and role.endswith("w"):  # loopguard-<N>w: serve
        from guard.doors.serve import serve

        workers = int(role.removeprefix("loopguard-").removesuffix("w"))
        config = loopguard_config(
            upstream, records, store, listen=f"127.0.0.1:{port}", workers=workers
        )
        serve(config, log_level="warning")
        return
    if role == "upstream":
        app: Any = static_upstream
    elif role == "bare":
        app = BareProxy(upstream)
    else:
        app = loopguard_app(upstream, records, store)
    # Process tuning as ``loopguard serve`` does it, for every role alike.
    from guard.doors.serve import freeze_startup_objects

    freeze_startup_objects()
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="auto" if role != "upstream" else "off",
        access_log=False,
        log_level="warning",
        server_header=False,
        date_header=False,
        proxy_headers=False,
    )


# -- the driver ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port}")


def spawn(
    role: str, port: int, upstream: str, cpus: list[int], records: str, store: str = ""
) -> subprocess.Popen:
    args = [
        sys.executable,
        __file__,
        "--role",
        role,
        "--port",
        str(port),
        "--upstream",
        upstream,
        "--records",
        records,
        "--store",
        store,
        "--cpus",
        ",".join(map(str, cpus)),
    ]
    proc = subprocess.Popen(args, cwd=ROOT)
    wait_listening(port)
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def run_wrk(url: str, concurrency: int, duration: float, cpus: list[int]) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT)
    threads = 1 if concurrency == 1 else min(2, concurrency)
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{concurrency}",
        f"-d{max(1, round(duration))}s",
        "--latency",
        "-s",
        script.name,
        url,
    ]
    if cpus and shutil.which("taskset"):
        cmd = ["taskset", "-c", ",".join(map(str, cpus)), *cmd]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(script.name)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    if errors or socket_errors:
        print(
            f"  warning: wrk reported errors: {errors and errors.group(0)} "
            f"{socket_errors and socket_errors.group(0)}",
            file=sys.stderr,
        )
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99, "requests": requests}


async def _aiohttp_load(url: str, concurrency: int, duration: float) -> dict[str, float]:
    import aiohttp

    latencies: list[float] = []
    failures = 0
    stop_at = time.perf_counter() + duration

    async def worker(wid: int, session: aiohttp.ClientSession) -> None:
        nonlocal failures
        n = 0
        headers = {"content-type": "application/json", "x-loopguard-session": f"bench-{wid}"}
        while time.perf_counter() < stop_at:
            n += 1
            body = json.dumps({"order_id": f"A{wid}-{n}", "detail": True}).encode()
            started = time.perf_counter()
            async with session.post(
                url + "/tools/lookup_tracking", data=body, headers=headers
            ) as r:
                await r.read()
                if r.status != 200:
                    failures += 1
            latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        begun = time.perf_counter()
        await asyncio.gather(*(worker(i, session) for i in range(concurrency)))
        elapsed = time.perf_counter() - begun
    if failures:
        print(f"  warning: {failures} non-200 answers", file=sys.stderr)
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[max(0, min(len(latencies) - 1, round(q * len(latencies)) - 1))] * 1e3

    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "requests": len(latencies),
    }


def run_load(url: str, concurrency: int, duration: float, cpus: list[int]) -> dict[str, float]:
    if shutil.which("wrk"):
        return run_wrk(url, concurrency, duration, cpus)
    return asyncio.run(_aiohttp_load(url, concurrency, duration))


TARGETS = ("bare", "loopguard", "loopguard-no-records")


def start_redis(cpus: list[int]) -> tuple[subprocess.Popen | None, str]:
    """A throwaway redis-server on loopback (no persistence), or (None, "") without one."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None, ""
    port = free_port()
    cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    if cpus and shutil.which("taskset"):
        cmd = ["taskset", "-c", ",".join(map(str, cpus)), *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    wait_listening(port)
    return proc, f"redis://127.0.0.1:{port}/0"


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux), NaN elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    try:  # and its children's (the workers of ``loopguard serve --workers N``)
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            return own + sum(proc_cpu_s(int(child)) for child in children.read().split())
    except OSError:
        return own


def measure(target: str, args: argparse.Namespace, env: dict[str, Any]) -> None:
    port = free_port()
    redis = target.startswith("loopguard-redis")
    records = env["records"] if target == "loopguard" or redis else ""
    role = "bare" if target == "bare" else "loopguard"
    cpus = env["proxy_cpus"]
    if target.endswith("-2w"):  # loopguard serve --workers 2, on every core
        role, cpus = "loopguard-2w", env["proxy_cpus"] + env["other_cpus"]
    store = env["redis"] if redis else ""
    proc = spawn(role, port, env["upstream"], cpus, records, store)
    try:
        url = f"http://127.0.0.1:{port}"
        run_load(url, 4, 1.0, env["other_cpus"])  # warm-up: connections, caches
        for concurrency in (1, 16):
            cpu_before = proc_cpu_s(proc.pid)
            result = run_load(url, concurrency, args.duration, env["other_cpus"])
            cpu = proc_cpu_s(proc.pid) - cpu_before
            result["cpu_us_per_req"] = cpu / max(1, result["requests"]) * 1e6
            env["results"].setdefault((target, concurrency), []).append(result)
    finally:
        stop(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds per target")
    roles = ["upstream", "bare", "loopguard", "loopguard-2w"]
    parser.add_argument("--role", choices=roles, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", default="", help=argparse.SUPPRESS)
    parser.add_argument("--records", default="", help=argparse.SUPPRESS)
    parser.add_argument("--store", default="", help=argparse.SUPPRESS)
    parser.add_argument("--cpus", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        cpus = [int(c) for c in args.cpus.split(",") if c]
        run_role(args.role, args.port, args.upstream, cpus, args.records, args.store)
        return 0

    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    proxy_cpus = available[:1] if len(available) > 1 else []
    other_cpus = available[1:] if len(available) > 1 else []
    load_tool = "wrk" if shutil.which("wrk") else "aiohttp (wrk not installed)"
    print(
        f"load: {load_tool}; {args.duration:g} s per run; cpus: proxy {proxy_cpus or 'any'}, "
        f"upstream + load {other_cpus or 'any'}; load average {os.getloadavg()[0]:.2f}"
    )

    records_dir = tempfile.mkdtemp(prefix="loopguard-bench-")
    upstream_port = free_port()
    env: dict[str, Any] = {
        "upstream": f"http://127.0.0.1:{upstream_port}",
        "records": os.path.join(records_dir, "records.jsonl"),
        "proxy_cpus": proxy_cpus,
        "other_cpus": other_cpus,
        "results": {},
    }
    redis_proc, env["redis"] = start_redis(other_cpus)
    targets = TARGETS + (("loopguard-redis", "loopguard-redis-2w") if redis_proc else ())
    if redis_proc is None:
        print("loopguard-redis: skipped (needs redis-server)")
    upstream_proc = spawn("upstream", upstream_port, "", other_cpus, "")
    try:
        for _ in range(args.rounds):
            for target in targets:
                measure(target, args, env)
    finally:
        stop(upstream_proc)
        if redis_proc is not None:
            stop(redis_proc)
        shutil.rmtree(records_dir, ignore_errors=True)
    results: dict[tuple[str, int], list[dict[str, float]]] = env["results"]

    def best(target: str, concurrency: int) -> dict[str, float]:
        return max(results[(target, concurrency)], key=lambda r: r["rps"])

    print()
    print(f"{'target':<21} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'cpu us/req':>10}")
    for concurrency in (1, 16):
        for target in targets:
            r = best(target, concurrency)
            print(
                f"{target:<21} {concurrency:>4} {r['rps']:>8.0f} {r['p50_ms']:>8.3f} "
                f"{r['p99_ms']:>8.3f} {r['cpu_us_per_req']:>10.0f}"
            )
    print()
    for target in targets[1:]:
        ratio16 = best(target, 16)["rps"] / best("bare", 16)["rps"]
        added_p50 = best(target, 1)["p50_ms"] - best("bare", 1)["p50_ms"]
        print(
            f"{target}: {ratio16:.1%} of bare req/s at c=16 (target >= 80%), "
            f"p50 {added_p50:+.3f} ms at c=1 (target <= +0.5 ms)"
        )
    print(json.dumps({f"{t}@c{c}": v for (t, c), v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
