"""Proxy benchmark: loopguard against the Python floor (and a peer), in one run.

    python benchmarks/bench_proxy.py [--duration 6] [--rounds 1] [--only floor,loopguard]

Each target is a uvicorn process (uvloop + httptools, one worker) in front of one fast
static upstream (raw ASGI: a small JSON tool answer, or a ``chat.completion`` on
``/v1/chat/completions``); ``TARGETS`` below says what each runs:

- ``floor``: a raw-ASGI passthrough over an ``aiohttp.ClientSession``, nothing else:
  what any Python proxy on this stack costs at least;
- ``floor-guard-minimum``: the floor plus the least per-call work a guard of this
  design does, hand-written (``minimal_guard.py``: parse, redact, hash, one stall rule,
  progress marker, one record line; no spans, metrics, limits or other rules): a bound
  on what any Python guard on this stack reaches;
- ``loopguard``: ``guard.doors.proxy.ProxyApp`` with an http-tool route, every call
  fingerprinted, checked, recorded and served (no blocks), with the default telemetry
  (spans for trace propagation, metrics) and durable records to a temp file;
- ``loopguard-no-records``: the same without the durable records file;
- ``loopguard-redis``: ``loopguard`` with its sessions in Redis, when ``redis-server``
  is installed (a ``redis-server`` on loopback, sharing the upstream's core);
- ``loopguard-redis-2w``: the same through ``loopguard serve --workers 2`` (the serve
  path's uvicorn options), its workers free to run on every core, the upstream's, the
  load generator's and Redis's included: scale-out on this machine. Its CPU per
  request sums the workers;
- ``loopguard-openai``: loopguard's openai route, a chat request with a tool call in
  its history;
- ``litellm``: the LiteLLM proxy (when ``litellm[proxy]`` is importable) with one
  model routed to the same static upstream, the same chat request.

The load is ``wrk`` (a Lua script POSTs the bodies) when installed, else a built-in
aiohttp load generator, at concurrency 1 and 16: a new session per request (its own
``x-loopguard-session``), a ~1 KB tool call body (the chat body is ~1 KB too), its
arguments different on every request. The proxies are pinned to one CPU, the
upstream and the load generator to the others, where the machine has more than one.

It prints requests/s, p50 and p99 latency, and the CPU time the proxy process spent
per request (from /proc: the figure that shows where the cost is when the machine is
busy with other work), then ratios: every tool target against the floor, and
loopguard's openai route against LiteLLM on the same chat request.

Targets: loopguard >= 80 % of the floor's requests/s at concurrency 16, at most
0.3 ms added to p50 at concurrency 1; >= 50x LiteLLM.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STATIC_BODY = b'{"order_id":"A10234","status":"in transit","last_scan":"Memphis TN hub"}'
CHAT_MODEL = "gpt-4o-mini"
CHAT_ANSWER = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1764460800,
        "model": CHAT_MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Your parcel is in Memphis."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 212, "completion_tokens": 7, "total_tokens": 219},
    },
    separators=(",", ":"),
).encode()

# The request bodies, "{n}" replaced by a per-request tag (thread and counter), so no
# two calls carry the same arguments. Both are ~1 KB.
_ADDRESS = "1600 Amphitheatre Parkway, Mountain View, CA 94043, United States"
TOOL_TEMPLATE = json.dumps(
    {
        "order_id": "A{n}",
        "detail": True,
        "customer": {"name": "Ada Lovelace", "email": "ada@example.com", "tier": "gold"},
        "shipping": {"address": _ADDRESS, "carrier": "UPS", "service": "ground"},
        "items": [
            {"sku": f"SKU-{i:04d}", "name": f"Replacement part {i}", "qty": i % 3 + 1}
            for i in range(1, 11)
        ],
        "note": "Customer asked twice about this order; check the last scan and the ETA, "
        "and say whether the parcel left the hub.",
        "fields": ["status", "last_scan", "eta", "carrier", "events", "signature"],
    },
    separators=(",", ":"),
)
CHAT_TEMPLATE = json.dumps(
    {
        "model": CHAT_MODEL,
        "messages": [
            {
                "role": "system",
                "content": "You are a support agent for an online store. Use the tools to "
                "look orders up before answering; never guess a date; be brief and polite.",
            },
            {
                "role": "user",
                "content": "Where is my order A{n}? It should have come on Monday and the "
                "tracking page has not changed since. Can you check with the carrier?",
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_{n}",
                        "type": "function",
                        "function": {
                            "name": "lookup_tracking",
                            "arguments": '{"order_id":"A{n}","detail":true}',
                        },
                    }
                ],
            },
            {
                "role": "tool",
                "tool_call_id": "call_{n}",
                "content": STATIC_BODY.decode(),
            },
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "lookup_tracking",
                    "description": "Look up the carrier's tracking events for an order.",
                    "parameters": {
                        "type": "object",
                        "properties": {
                            "order_id": {"type": "string", "description": "The order id."},
                            "detail": {"type": "boolean", "description": "Every scan."},
                        },
                        "required": ["order_id"],
                    },
                },
            }
        ],
    },
    separators=(",", ":"),
)
TOOL_PATH = "/tools/lookup_tracking"
CHAT_PATH = "/v1/chat/completions"
LITELLM_KEY = "sk-bench-master-key"

WRK_SCRIPT = """
local counter = 0
local n = 0
local parts = {%(parts)s}
function setup(thread)
  n = n + 1
  thread:set("id", n)
end
function init(args)
  wrk.method = "POST"
  wrk.headers["content-type"] = "application/json"
  %(auth)s
end
function request()
  counter = counter + 1
  local tag = id .. "-" .. counter
  wrk.headers["x-loopguard-session"] = "bench-" .. tag
  return wrk.format(nil, "%(path)s", nil, table.concat(parts, tag))
end
"""


# -- the targets ---------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One proxy under load: the server role its process runs, the request it gets."""

    name: str
    role: str  # run_role(): "floor", "loopguard", "litellm" …
    path: str  # the request path the load posts to
    template: str  # the request body, "{n}" made unique per request
    records: bool = False  # loopguard: durable records on
    redis: bool = False  # loopguard: sessions in Redis
    otlp: bool = False  # loopguard: spans and metrics exported to a live OTLP collector
    workers: int = 1  # above 1: ``loopguard serve --workers N`` (role "loopguard-serve")
    available: Callable[[], str] = lambda: ""  # why it cannot run here, "" when it can
    headers: tuple[tuple[str, str], ...] = ()


def _litellm_missing() -> str:
    import importlib.util

    if importlib.util.find_spec("litellm") is None:
        return "needs litellm[proxy]"
    # Its bundled model cost map, not one fetched from the network at import.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    try:
        # The proxy's own dependencies come with the extra only.
        import litellm.proxy.proxy_server  # noqa: F401
    except Exception:
        return "needs litellm[proxy]"
    return ""


TARGETS = (
    Target("floor", "floor", TOOL_PATH, TOOL_TEMPLATE),
    Target("floor-guard-minimum", "floor-guard-minimum", TOOL_PATH, TOOL_TEMPLATE, records=True),
    Target("loopguard", "loopguard", TOOL_PATH, TOOL_TEMPLATE, records=True),
    Target("loopguard-no-records", "loopguard", TOOL_PATH, TOOL_TEMPLATE),
    Target("loopguard-redis", "loopguard", TOOL_PATH, TOOL_TEMPLATE, records=True, redis=True),
    Target(
        "loopguard-redis-2w",
        "loopguard-serve",
        TOOL_PATH,
        TOOL_TEMPLATE,
        records=True,
        redis=True,
        workers=2,
    ),
    Target("loopguard-otlp", "loopguard", TOOL_PATH, TOOL_TEMPLATE, records=True, otlp=True),
    Target(
        "loopguard-openai", "loopguard-openai", "/openai" + CHAT_PATH, CHAT_TEMPLATE, records=True
    ),
    Target(
        "litellm",
        "litellm",
        CHAT_PATH,
        CHAT_TEMPLATE,
        available=_litellm_missing,
        headers=(("authorization", f"Bearer {LITELLM_KEY}"),),
    ),
)
# Ratios printed: (target, against), when both ran.
RATIOS = (
    *((t.name, "floor") for t in TARGETS if t.template is TOOL_TEMPLATE and t.name != "floor"),
    ("loopguard", "floor-guard-minimum"),
    ("loopguard-openai", "litellm"),
    ("loopguard-otlp", "loopguard"),
)


# -- the servers (run as subprocesses: ``--role``) -----------------------------------


async def drain(receive: Any) -> None:
    """Read the request body to its end (the servers below answer without it)."""
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)


async def otlp_collector(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An OTLP/HTTP collector that reads each export and acknowledges it (an empty
    Export*ServiceResponse is an empty protobuf body)."""
    if scope["type"] != "http":
        return
    await drain(receive)
    headers = [(b"content-type", b"application/x-protobuf"), (b"content-length", b"0")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


async def static_upstream(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await drain(receive)
    body = CHAT_ANSWER if scope["path"].endswith("/chat/completions") else STATIC_BODY
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
    }
)


class FloorProxy:
    """The floor: forward with aiohttp and stream back, nothing else.

    No guard, no loopguard code: the ASGI messages, one header filter each way and an
    ``aiohttp.ClientSession`` called directly (configured as a transparent proxy's
    must be: no headers, cookies, redirects or decompression of its own).
    """

    def __init__(self, upstream: str, prefix: str = "/tools", guard: Any = None) -> None:
        self.upstream = upstream
        self.prefix = prefix.encode()
        self.session: Any = None
        # ``floor-guard-minimum``: a ``minimal_guard.MinimalGuard``; None for the floor.
        self.guard = guard
        # The upstream call, replaceable (``bench_overhead.py`` answers it in memory).
        self.open: Callable[..., Any] = self._open

    async def _open(
        self, method: str, url: str, headers: list[tuple[str, str]], body: bytes
    ) -> Any:
        import aiohttp
        from yarl import URL

        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=100, keepalive_timeout=4.0),
                skip_auto_headers=("Accept", "Accept-Encoding", "Content-Type", "User-Agent"),
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60),
            )
        return await self.session.request(
            method,
            URL(url, encoded=True),
            headers=headers,
            data=body or None,
            allow_redirects=False,
        )

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    if self.session is not None:
                        await self.session.close()
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
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k not in HOP_BY_HOP
        ]
        guard, call, answer = self.guard, None, []
        if guard is not None:
            session = next((v for k, v in scope["headers"] if k == b"x-loopguard-session"), b"")
            call = guard.admit(raw_path.decode("latin-1")[1:], session.decode("latin-1"), body)
            if call is None:
                await send_stop(send)
                return
        response = await self.open(scope["method"], url, headers, body)
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": [
                        (k, v)
                        for k, v in response.raw_headers
                        if k.lower() not in HOP_BY_HOP or k.lower() == b"content-length"
                    ],
                }
            )
            read = response.content.readany
            while chunk := await read():
                if call is not None:
                    answer.append(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            response.release()
        if call is not None:
            guard.settle(call, response.status, b"".join(answer))


async def send_stop(send: Any) -> None:
    """The minimal guard's answer to a stalled repeat (the benchmark never repeats)."""
    body = b'{"error":"stalled repeat"}'
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 409, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def loopguard_config(
    upstream: str, records: str, store: str = "", adapter: str = "http-tool", **server: Any
) -> Any:
    from guard.engine.config import Config

    prefix = "/tools" if adapter == "http-tool" else "/openai"
    mapping: dict[str, Any] = {
        "routes": [{"prefix": prefix, "upstream": upstream, "adapter": adapter}],
        "telemetry": {"records": records},
        "server": server,
    }
    if store:
        mapping["store"] = {"backend": "redis", "url": store}
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):  # the loopguard-otlp target
        mapping["telemetry"]["exporter"] = "otlp"
    return Config.from_mapping(mapping)


def loopguard_app(upstream: str, records: str, store: str = "", adapter: str = "http-tool") -> Any:
    from guard.doors.proxy import ProxyApp

    return ProxyApp(loopguard_config(upstream, records, store, adapter))


def loopguard_serve(upstream: str, records: str, store: str, port: int, workers: int) -> None:
    """``loopguard serve --workers N``: the supervisor and its worker processes."""
    from guard.doors.serve import serve

    server = {"listen": f"127.0.0.1:{port}", "workers": workers}
    serve(loopguard_config(upstream, records, store, **server), log_level="warning")


def litellm_app(upstream: str, folder: str) -> Any:
    """The LiteLLM proxy, one model routed to the static upstream's chat endpoint, a
    master key, no database, callbacks or logging of its own beyond the defaults. Its
    config file goes in ``folder`` (the driver's temp folder, removed after the run)."""
    config = {
        "model_list": [
            {
                "model_name": CHAT_MODEL,
                "litellm_params": {
                    "model": f"openai/{CHAT_MODEL}",
                    "api_base": upstream + "/v1",
                    "api_key": "sk-fake",
                },
            }
        ],
        "general_settings": {"master_key": LITELLM_KEY},
        "litellm_settings": {"drop_params": True},
    }
    path = os.path.join(folder, "litellm.yaml")
    with open(path, "w") as file:
        json.dump(config, file)  # JSON is YAML
    os.environ["CONFIG_FILE_PATH"] = path
    os.environ.setdefault("LITELLM_LOG", "ERROR")
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    from litellm.proxy.proxy_server import app

    return app


def serve_app(app: Any, port: int, *, lifespan: str) -> None:
    """Serve one benchmark process as ``loopguard serve`` runs (uvloop + httptools), with
    no access log and no header of uvicorn's own: every role of every benchmark alike."""
    import uvicorn

    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan=lifespan,
        access_log=False,
        log_level="warning",
        server_header=False,
        date_header=False,
        proxy_headers=False,
    )


def run_role(
    role: str, port: int, upstream: str, cpus: list[int], records: str, store: str
) -> None:
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(cpus))
    if role == "loopguard-serve":  # its workers inherit the CPUs
        workers = max(t.workers for t in TARGETS if t.role == role)
        loopguard_serve(upstream, records, store, port, workers)
        return
    if role == "upstream":
        app: Any = static_upstream
    elif role == "collector":
        app = otlp_collector
    elif role == "floor":
        app = FloorProxy(upstream)
    elif role == "floor-guard-minimum":
        from minimal_guard import MinimalGuard

        app = FloorProxy(upstream, guard=MinimalGuard(records))
    elif role == "litellm":
        app = litellm_app(upstream, os.path.dirname(records))
    elif role == "loopguard-openai":
        app = loopguard_app(upstream, records, store, adapter="openai")
    else:
        app = loopguard_app(upstream, records, store)
    if role != "litellm":
        # Process tuning as ``loopguard serve`` does it, for every role alike (LiteLLM
        # does its own start-up work in its lifespan, after this would run).
        from guard.doors.serve import freeze_startup_objects

        freeze_startup_objects()
    serve_app(app, port, lifespan="auto" if role not in ("upstream", "collector") else "off")


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
    role: str,
    port: int,
    upstream: str,
    cpus: list[int],
    records: str,
    store: str = "",
    extra_env: dict[str, str] | None = None,
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
    proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, **(extra_env or {})})
    try:
        # LiteLLM's start-up (imports, config, cost map) takes seconds.
        wait_listening(port, timeout=120.0 if role == "litellm" else 15.0)
    except RuntimeError:
        stop(proc)
        raise
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


def wrk_script(target: Target) -> str:
    parts = ", ".join(f"[==[{part}]==]" for part in target.template.split("{n}"))
    auth = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in target.headers)
    return WRK_SCRIPT % {"parts": parts, "auth": auth, "path": target.path}


def run_wrk(
    url: str, target: Target, concurrency: int, duration: float, cpus: list[int]
) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(wrk_script(target))
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
            f"  warning: {target.name}: wrk reported errors: {errors and errors.group(0)} "
            f"{socket_errors and socket_errors.group(0)}",
            file=sys.stderr,
        )
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99, "requests": requests}


async def _aiohttp_load(
    url: str, target: Target, concurrency: int, duration: float
) -> dict[str, float]:
    import aiohttp

    latencies: list[float] = []
    failures = 0
    stop_at = time.perf_counter() + duration
    parts = target.template.split("{n}")

    async def worker(wid: int, session: aiohttp.ClientSession) -> None:
        nonlocal failures
        n = 0
        while time.perf_counter() < stop_at:
            n += 1
            tag = f"{wid}-{n}"
            headers = {
                "content-type": "application/json",
                "x-loopguard-session": f"bench-{tag}",
                **dict(target.headers),
            }
            started = time.perf_counter()
            async with session.post(
                url + target.path, data=tag.join(parts).encode(), headers=headers
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
        print(f"  warning: {target.name}: {failures} non-200 answers", file=sys.stderr)
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[max(0, min(len(latencies) - 1, round(q * len(latencies)) - 1))] * 1e3

    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "requests": len(latencies),
    }


def run_load(
    url: str, target: Target, concurrency: int, duration: float, cpus: list[int]
) -> dict[str, float]:
    if shutil.which("wrk"):
        return run_wrk(url, target, concurrency, duration, cpus)
    return asyncio.run(_aiohttp_load(url, target, concurrency, duration))


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


def measure(target: Target, args: argparse.Namespace, env: dict[str, Any]) -> None:
    port = free_port()
    # LiteLLM gets the path too: its config goes next to it, in the driver's temp folder.
    records = env["records"] if target.records or target.role == "litellm" else ""
    store = env["redis"] if target.redis else ""
    # The collector named as in production, by the standard variable.
    extra_env = {"OTEL_EXPORTER_OTLP_ENDPOINT": env["collector"]} if target.otlp else None
    # Several workers may use every core (scale-out); one proxy process gets its own.
    cpus = env["proxy_cpus"] + env["other_cpus"] if target.workers > 1 else env["proxy_cpus"]
    proc = spawn(target.role, port, env["upstream"], cpus, records, store, extra_env)
    try:
        url = f"http://127.0.0.1:{port}"
        run_load(url, target, 4, 1.0, env["other_cpus"])  # warm-up: connections, caches
        for concurrency in (1, 16):
            cpu_before = proc_cpu_s(proc.pid)
            result = run_load(url, target, concurrency, args.duration, env["other_cpus"])
            cpu = proc_cpu_s(proc.pid) - cpu_before
            result["cpu_us_per_req"] = cpu / max(1, result["requests"]) * 1e6
            env["results"].setdefault((target.name, concurrency), []).append(result)
    finally:
        stop(proc)


def missing(target: Target, redis_running: bool) -> str:
    """Why a target cannot run on this machine, "" when it can."""
    if target.redis and not redis_running:
        return "needs redis-server"
    return target.available()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds per target")
    parser.add_argument(
        "--only", default="", help="comma-separated target names (default: every one)"
    )
    roles = sorted({t.role for t in TARGETS} | {"upstream", "collector"})
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

    only = {name for name in args.only.split(",") if name}
    unknown = only - {t.name for t in TARGETS}
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    chosen = [t for t in TARGETS if not only or t.name in only]
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
        "redis": "",
    }
    redis_proc = None
    if any(t.redis for t in chosen):
        redis_proc, env["redis"] = start_redis(other_cpus)
    targets = []
    for target in chosen:
        why = missing(target, redis_proc is not None)
        if why:
            print(f"{target.name}: skipped ({why})")
        else:
            targets.append(target)
    upstream_proc = spawn("upstream", upstream_port, "", other_cpus, "")
    collector_proc = None
    if any(t.otlp for t in targets):  # a live OTLP collector, on the upstream's cores
        collector_port = free_port()
        env["collector"] = f"http://127.0.0.1:{collector_port}"
        collector_proc = spawn("collector", collector_port, "", other_cpus, "")
    try:
        for _ in range(args.rounds):
            for target in targets:
                measure(target, args, env)
    finally:
        stop(upstream_proc)
        if collector_proc is not None:
            stop(collector_proc)
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
            r = best(target.name, concurrency)
            print(
                f"{target.name:<21} {concurrency:>4} {r['rps']:>8.0f} {r['p50_ms']:>8.3f} "
                f"{r['p99_ms']:>8.3f} {r['cpu_us_per_req']:>10.0f}"
            )
    print()
    ran = {t.name for t in targets}
    for name, against in RATIOS:
        if name not in ran or against not in ran:
            continue
        ratio16 = best(name, 16)["rps"] / best(against, 16)["rps"]
        added_p50 = best(name, 1)["p50_ms"] - best(against, 1)["p50_ms"]
        print(
            f"{name}: {ratio16:.2f}x the req/s of {against} at c=16, p50 {added_p50:+.3f} ms at c=1"
        )
    print(json.dumps({f"{t}@c{c}": v for (t, c), v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
