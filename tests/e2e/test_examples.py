"""Every example in ``examples/`` runs here, as its header says a user runs it.

Each test executes the example's own code: the config files are loaded as they are
(only upstream URLs and record paths are pointed at loopback fakes), the Python
examples are imported from their files and served, run, or started as the documented
command in a subprocess. Examples that are not run rot.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import httpx
import httpx2
import openai
import pytest
import yaml
from mcp import Client
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp_servers import SCAN, TrackingServer
from pydantic import BaseModel
from servers import free_port, run_server

from guard.devtools.fakes import FakeModels
from guard.doors.proxy import ProxyApp
from guard.engine.config import Config, LoopConfig, RedactionConfig

try:
    from tests.otlp_receiver import OtlpReceiver
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from otlp_receiver import OtlpReceiver

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
PROXY_TOML = EXAMPLES / "proxy" / "loopguard.toml"
OTEL_TOML = EXAMPLES / "otel" / "loopguard.toml"
COLLECTOR_YAML = EXAMPLES / "otel" / "collector.yaml"
STARTUP_S = 20.0  # an upper bound for a subprocess to come up, not a measured figure
_fresh = itertools.count()


def load_example(name: str) -> ModuleType:
    """A fresh copy of ``examples/NAME`` imported from its file (its own state each time)."""
    path = EXAMPLES / name
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}_{next(_fresh)}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def with_fakes(path: Path, upstreams: dict[str, str], records: Path) -> Config:
    """The example config file as it is, upstreams swapped for loopback fakes by prefix."""
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    for route in data["routes"]:
        route["upstream"] = upstreams.get(route["prefix"], "http://127.0.0.1:9")
    data["telemetry"]["records"] = str(records)
    return Config.from_mapping(data, source=str(path))


@contextlib.contextmanager
def tracking_server() -> Iterator[tuple[TrackingServer, str]]:
    """The FastShip MCP server from the MCP tests; yields it and its /mcp URL."""
    tracking = TrackingServer()
    with run_server(tracking.app(json_response=False)) as base:
        tracking.allow_host(base)
        yield tracking, f"{base}/mcp"


async def loop_over_mcp(url: str, times: int) -> list[Any]:
    """An MCP agent calling the same lookup ``times`` times (SDK client, 2025-11-25)."""
    async with (
        streamable_http_client(url) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        return [
            await session.call_tool("lookup_tracking", {"order_id": "FS-1001"})
            for _ in range(times)
        ]


async def loop_with_client(url: str, order: str, times: int) -> list[Any]:
    """The same, with ``mcp.Client`` as in proxy/README.md (stateless protocol 2026-07-28:
    no Mcp-Session-Id, so the session is named with x-loopguard-session)."""
    async with (
        httpx2.AsyncClient(headers={"x-loopguard-session": "run-42"}) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        return [
            await client.call_tool("lookup_tracking", {"order_id": order}) for _ in range(times)
        ]


def text_of(result: Any) -> str:
    return "".join(block.text for block in result.content if block.type == "text")


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def looping_chat(times: int) -> list[dict[str, Any]]:
    """A chat transcript in which the model asked for the same lookup ``times`` times."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Where is order FS-1001?"}]
    for n in range(times):
        function = {"name": "lookup_tracking", "arguments": '{"order_id": "FS-1001"}'}
        call = {"id": f"call_{n}", "type": "function", "function": function}
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        messages.append({"role": "tool", "tool_call_id": f"call_{n}", "content": "in transit"})
    return messages


@contextlib.contextmanager
def subprocess_server(
    args: list[str], base: str, cwd: Path, env: dict[str, str] | None = None
) -> Iterator[str]:
    """Start ``args``; wait until ``base`` answers HTTP at all; stop it with SIGINT (Ctrl-C)
    and require a clean exit."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(
        args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{args} exited with {proc.returncode}:\n{proc.stdout.read()}")
            try:
                httpx.get(base, timeout=1)
                break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{args} did not start serving within {STARTUP_S}s")
            time.sleep(0.05)
        yield base
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=STARTUP_S)
        assert proc.returncode == 0, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def loopguard_command() -> list[str]:
    """The installed ``loopguard`` script (the module itself when it is not on PATH)."""
    script = shutil.which("loopguard")
    return [script] if script else [sys.executable, "-m", "guard.cli"]


# -- examples/proxy/loopguard.toml --------------------------------------------------------


def _fields(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields)


def test_proxy_config_sets_every_option_and_loads() -> None:
    config = Config.load(PROXY_TOML)
    raw = tomllib.loads(PROXY_TOML.read_text())

    # Every section and every key of each section is written out (the file is the reference).
    assert set(raw) == _fields(Config)
    for section in _fields(Config) - {"routes"}:
        model = type(getattr(config, section))
        assert set(raw[section]) == _fields(model), section
    tool_keys = set().union(*(t.keys() for t in raw["loop"]["tools"].values()))
    assert tool_keys == _fields(type(config.loop.tools["poll_status"]))
    rule_keys = set().union(*(rule.keys() for rule in raw["redaction"]["rules"]))
    assert rule_keys == _fields(type(config.redaction.rules[0]))
    route_keys = set().union(*(route.keys() for route in raw["routes"]))
    assert route_keys == _fields(type(config.routes[0]))
    assert {r.adapter for r in config.routes} >= {"openai", "mcp"}

    # Where the comments say "the defaults", they are.
    for key in ("volatile_keys", "volatile_patterns"):
        assert getattr(config.loop, key) == LoopConfig.model_fields[key].default, key
    assert config.redaction.secret_keys == RedactionConfig.model_fields["secret_keys"].default


async def test_proxy_example_guards_a_model_and_an_mcp_server(tmp_path: Path) -> None:
    fake = FakeModels()
    records = tmp_path / "records.jsonl"
    with (
        run_server(fake.app()) as model_upstream,
        tracking_server() as (tracking, mcp_upstream),
    ):
        config = with_fakes(PROXY_TOML, {"/openai": model_upstream, "/mcp": mcp_upstream}, records)
        with run_server(ProxyApp(config)) as proxy:
            # The OpenAI SDK pointed at loopguard, streaming, as in proxy/README.md.
            client = openai.AsyncOpenAI(
                base_url=f"{proxy}/openai/v1", api_key="sk-example", max_retries=0
            )
            stream = await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
            )
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            assert text == fake.reply.text

            # A conversation showing a loop: first a nudge, then a stop answer.
            nudged = await client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=looping_chat(3)
            )
            assert nudged.headers["x-loopguard-route"] == "nudge"
            stopped = await client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=looping_chat(4)
            )
            assert stopped.headers["x-loopguard-route"] == "stop_and_review"
            answer = stopped.parse().choices[0]
            assert "loopguard stopped this call" in answer.message.content
            assert not answer.message.tool_calls
            await client.close()

            # An MCP agent looping on one tool: the fourth call never reaches the server.
            results = await loop_over_mcp(f"{proxy}/mcp", 4)
            # The high-level Client of proxy/README.md, named by x-loopguard-session.
            modern = await loop_with_client(f"{proxy}/mcp", "FS-2002", 4)

    assert [r.is_error for r in results] == [False, False, False, True]
    assert text_of(results[0]) == SCAN.format(order_id="FS-1001")
    assert "loopguard stopped this call" in text_of(results[3])
    assert [r.is_error for r in modern] == [False, False, False, True]
    assert tracking.calls["lookup_tracking"] == 6
    # The durable records went where [telemetry] records says, redacted.
    routes = [(r["operation"], r.get("tool"), r["route"]) for r in read_records(records)]
    assert ("chat", "lookup_tracking", "stop_and_review") in routes
    assert routes.count(("execute_tool", "lookup_tracking", "stop_and_review")) == 2
    assert "FS-1001" not in records.read_text()


def test_loopguard_serve_starts_from_the_proxy_example(tmp_path: Path) -> None:
    port, admin_port = free_port(), free_port()
    args = [*loopguard_command(), "serve", "--config", str(PROXY_TOML)]
    args += ["--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin_port}"]
    with subprocess_server(args, f"http://127.0.0.1:{port}", tmp_path) as base:
        assert httpx.get(base + "/healthz").json() == {"status": "ok"}
        unrouted = httpx.get(base + "/nowhere")
        assert unrouted.status_code == 404
        assert unrouted.headers["content-type"] == "application/problem+json"
        # The admin listener, with the example's policy found beside the config file.
        status = httpx.get(f"http://127.0.0.1:{admin_port}/status").json()
        assert status["policy_id"] == "delivery-grounding-slo-v1"


# -- examples/fastapi_tool_server.py ------------------------------------------------------


def test_fastapi_example_stops_the_looping_tool_call(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RECORDS", str(tmp_path / "records.jsonl"))
    example = load_example("fastapi_tool_server.py")
    session = {"x-loopguard-session": "run-1"}
    with run_server(example.app, lifespan="on") as base, httpx.Client(base_url=base) as client:
        looped = [
            client.post("/tools/lookup_tracking", json={"order_id": "FS-1001"}, headers=session)
            for _ in range(4)
        ]
        polled = [
            client.post("/tools/poll_status", json={"job_id": "J7"}, headers=session)
            for _ in range(6)
        ]
        health = client.get("/health")

    assert [r.status_code for r in looped] == [200, 200, 200, 422]
    stop = looped[3]
    assert stop.headers["content-type"] == "application/problem+json"
    assert stop.headers["x-loopguard-route"] == "stop_and_review"
    problem = stop.json()
    assert (problem["tool"], problem["rule"], problem["repeats"]) == (
        "lookup_tracking",
        "stalled_repeat",
        3,
    )
    assert problem["session"] == "run-1"
    assert "loopguard stopped this call" in problem["detail"]
    # Polling whose status changes is progress: never stopped.
    assert [r.status_code for r in polled] == [200] * 6
    assert health.json() == {"status": "ok"}
    records = read_records(tmp_path / "records.jsonl")
    assert [r["route"] for r in records[:4]] == ["serve"] * 3 + ["stop_and_review"]


def test_fastapi_example_runs_with_uvicorn_as_documented() -> None:
    port = free_port()
    args = [sys.executable, "-m", "uvicorn", "examples.fastapi_tool_server:app"]
    args += ["--port", str(port)]
    with subprocess_server(args, f"http://127.0.0.1:{port}", REPO, {"RECORDS": ""}) as base:
        assert httpx.get(base + "/health").json() == {"status": "ok"}
        headers = {"x-loopguard-session": "cli"}
        statuses = [
            httpx.post(base + "/tools/lookup_tracking", json={"order_id": "A"}, headers=headers)
            for _ in range(4)
        ]
        assert [r.status_code for r in statuses] == [200, 200, 200, 422]


# -- examples/mcp_server.py ---------------------------------------------------------------


async def test_mcp_example_answers_the_looping_call_with_a_tool_error(monkeypatch) -> None:
    monkeypatch.setenv("RECORDS", "")
    example = load_example("mcp_server.py")
    with run_server(example.app, lifespan="on") as base:
        results = await loop_over_mcp(f"{base}/mcp", 4)
        async with (
            streamable_http_client(f"{base}/mcp") as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            label = await session.call_tool(
                "create_return_label", {"order_id": "FS-1001", "reason": "late"}
            )

    assert [r.is_error for r in results] == [False, False, False, True]
    assert text_of(results[0]) == "Order FS-1001: in transit, last scan Memphis TN hub."
    stop = text_of(results[3])
    assert stop.startswith("loopguard stopped this call: `lookup_tracking`")
    assert "3 times" in stop
    assert not label.is_error


def test_mcp_example_runs_as_a_script() -> None:
    port = free_port()
    args = [sys.executable, str(EXAMPLES / "mcp_server.py")]
    base = f"http://127.0.0.1:{port}"
    with subprocess_server(args, base, REPO, {"PORT": str(port), "RECORDS": ""}):
        # The MCP endpoint answers (a plain GET is no MCP client: a JSON-RPC error).
        answer = httpx.get(base + "/mcp")
        assert answer.status_code == 400
        assert answer.json()["jsonrpc"] == "2.0"


# -- examples/inprocess_tools.py ----------------------------------------------------------


def test_inprocess_example_main(capsys: pytest.CaptureFixture[str]) -> None:
    example = load_example("inprocess_tools.py")
    assert example.main() == 0
    out = capsys.readouterr().out
    assert "stopped: lookup_tracking (rule stalled_repeat, 3 repeats)" in out
    assert "4. lookup_tracking: loopguard stopped this call" in out
    assert "5. contact_carrier: Carrier: FS-1001 is delayed" in out
    # The stopped call never ran the tool function.
    assert example.calls_made == ["lookup_tracking"] * 3 + ["contact_carrier"]


# -- examples/otel/ -----------------------------------------------------------------------


def test_otel_collector_config_receives_what_loopguard_sends() -> None:
    collector = yaml.safe_load(COLLECTOR_YAML.read_text())
    telemetry = Config.load(OTEL_TOML).telemetry
    assert telemetry.exporter == "otlp"
    endpoint = urlsplit(telemetry.otlp_endpoint)
    assert endpoint.path == "/v1/traces"
    listen = collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert int(listen.rpartition(":")[2]) == endpoint.port == 4318
    pipelines = collector["service"]["pipelines"]
    for signal_name in ("traces", "metrics"):
        pipeline = pipelines[signal_name]
        assert pipeline["receivers"] == ["otlp"]
        assert set(pipeline["processors"]) <= set(collector["processors"])
        assert set(pipeline["exporters"]) <= set(collector["exporters"])


async def test_otel_example_exports_spans_and_metrics(tmp_path: Path, monkeypatch) -> None:
    for name in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    fake = FakeModels()
    with (
        OtlpReceiver() as receiver,  # in place of the collector: same protocol, same paths
        run_server(fake.app()) as model_upstream,
        tracking_server() as (_, mcp_upstream),
    ):
        config = with_fakes(
            OTEL_TOML, {"/openai": model_upstream, "/mcp": mcp_upstream}, tmp_path / "r.jsonl"
        )
        config = Config.from_mapping(
            {
                **config.model_dump(),
                "telemetry": {
                    **config.telemetry.model_dump(),
                    "otlp_endpoint": receiver.traces_url,
                },
            }
        )
        app = ProxyApp(config)
        with run_server(app, lifespan="on") as proxy:
            client = openai.AsyncOpenAI(
                base_url=f"{proxy}/openai/v1", api_key="sk-example", max_retries=0
            )
            stream = await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            async for _ in stream:
                pass
            await client.close()
            await loop_over_mcp(f"{proxy}/mcp", 4)
        # Server shutdown (lifespan) flushed both exporters.
        spans = receiver.spans()
        metrics = receiver.metric_names()

    chat = next(s for s in spans if s.name == "chat gpt-4o-mini")
    assert chat.resource["service.name"] == "loopguard"
    assert chat.attributes["gen_ai.provider.name"] == "openai"
    assert chat.attributes["gen_ai.request.stream"] is True
    assert chat.attributes["loopguard.route"] == "serve"
    stops = [
        s
        for s in spans
        if s.name == "tools/call lookup_tracking"
        and s.attributes["loopguard.route"] == "stop_and_review"
    ]
    assert len(stops) == 1
    assert stops[0].attributes["loopguard.stall.rule"] == "stalled_repeat"
    assert {"gen_ai.client.operation.duration", "loopguard.stops"} <= metrics
    assert "FS-1001" not in json.dumps([s.attributes for s in spans], default=str)
