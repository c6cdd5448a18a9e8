"""``loopguard demo``: a looping agent meets loopguard, all in one process.

Started on loopback ports inside this process: a fake OpenAI-compatible model that
streams tokens with a realistic first-token delay and, stubbornly, always asks for
the same tool; a fake FastShip tool server whose ``lookup_tracking`` keeps returning
the same scan; loopguard's reverse proxy in front of both; and a scripted agent that
does what looping agents do. No config, no network beyond 127.0.0.1.

What you should see: three tool calls served, the model nudged when its history
shows the stall, the fourth identical tool call stopped before it reaches the tool,
and the next model call answered by loopguard with a completion that says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from adapters.sse import SSEParser
from guard.devtools.fakes import Behaviour, FakeModels, Reply
from guard.doors.proxy import ProxyApp
from guard.engine.config import Config
from guard.engine.core import Engine
from guard.telemetry import Telemetry

SESSION = "demo-agent-1"
ORDER = {"order_id": "#A10234"}
MAX_TURNS = 8
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup_tracking",
            "description": "Latest carrier scan for an order.",
            "parameters": {
                "type": "object",
                "properties": {"order_id": {"type": "string"}},
                "required": ["order_id"],
            },
        },
    }
]


@dataclass
class Event:
    turn: int
    kind: str  # "model" | "tool"
    route: str
    status: int
    detail: str
    ttft_ms: float | None = None
    tokens_per_s: float | None = None


@dataclass
class DemoResult:
    events: list[Event] = field(default_factory=list)
    records_path: str = ""
    records: list[dict[str, Any]] = field(default_factory=list)
    spans: list[dict[str, Any]] = field(default_factory=list)
    tool_hits: int = 0
    final_answer: str = ""

    @property
    def stopped(self) -> bool:
        return any(e.route == "stop_and_review" for e in self.events)


def run(as_json: bool = False, records: str | None = None) -> int:
    result = asyncio.run(run_demo(records))
    if as_json:
        print(json.dumps(_as_dict(result), indent=2))
    else:
        _print(result)
    return 0 if result.stopped else 1


async def run_demo(records: str | None = None) -> DemoResult:
    records_path = records or str(
        Path(tempfile.mkdtemp(prefix="loopguard-demo-")) / "records.jsonl"
    )
    result = DemoResult(records_path=records_path)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    model = FakeModels(
        reply=Reply(tool=("lookup_tracking", ORDER)),
        behaviour=Behaviour(first_delay=0.12, chunk_delay=0.02, chunks=12),
    )
    tools = _tool_server(result)
    async with _serving(model.app()) as model_url, _serving(tools) as tools_url:
        config = Config.from_mapping(
            {
                "telemetry": {"records": records_path},
                "routes": [
                    {"prefix": "/model", "upstream": model_url, "adapter": "openai"},
                    {"prefix": "/tools", "upstream": tools_url, "adapter": "http-tool"},
                ],
            }
        )
        telemetry = Telemetry(
            config.telemetry,
            config.redaction.policy_id,
            tracer_provider=provider,
            record_sink=result.records.append,
        )
        proxy = ProxyApp(config, engine=Engine(config, telemetry=telemetry))
        async with _serving(proxy) as guard_url:
            tracer = provider.get_tracer("loopguard.demo")
            with tracer.start_as_current_span(
                "invoke_agent fastship-support", kind=SpanKind.INTERNAL
            ):
                await _agent(guard_url, result)
        await proxy.aclose()
    provider.force_flush()
    result.spans = _span_tree(exporter.get_finished_spans())
    for event, record in zip(result.events, result.records, strict=False):
        if event.kind == "model":
            event.ttft_ms = record.get("ttft_ms")
            event.tokens_per_s = record.get("output_tps")
    return result


# -- the scripted agent -------------------------------------------------------------------


async def _agent(guard_url: str, result: DemoResult) -> None:
    """A support agent that keeps checking the same tracking number."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are FastShip support. Use tools to answer."},
        {"role": "user", "content": "Where is my order #A10234? It has not moved in days."},
    ]
    headers = {"x-loopguard-session": SESSION}
    async with httpx.AsyncClient(base_url=guard_url, timeout=10) as client:
        for turn in range(1, MAX_TURNS + 1):
            carrier: dict[str, str] = {}
            TraceContextTextMapPropagator().inject(carrier)
            body = {
                "model": "fake-gpt",
                "stream": True,
                "stream_options": {"include_usage": True},
                "messages": messages,
                "tools": TOOLS,
            }
            async with client.stream(
                "POST", "/model/v1/chat/completions", json=body, headers={**headers, **carrier}
            ) as response:
                text, calls = await _read_completion(response)
                route = response.headers.get("x-loopguard-route", "?")
            note = {"nudge": "+ guard message"}.get(route, "")
            detail = f"calls {calls[0]['name']}" if calls else "loopguard answers: no tool call"
            result.events.append(
                Event(turn, "model", route, response.status_code, f"{detail} {note}".strip())
            )
            if not calls:
                result.final_answer = text
                return
            call_id = f"call_{turn}"
            messages.append(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": call_id,
                            "type": "function",
                            "function": {
                                "name": calls[0]["name"],
                                "arguments": calls[0]["arguments"],
                            },
                        }
                    ],
                }
            )
            tool = await client.post(
                f"/tools/{calls[0]['name']}",
                content=calls[0]["arguments"],
                headers={**headers, **carrier, "content-type": "application/json"},
            )
            route = tool.headers.get("x-loopguard-route", "?")
            if tool.status_code == 422:
                outcome = tool.json()["detail"]
                detail = "422 problem+json, tool not hit"
            else:
                outcome = tool.text
                detail = f"same scan {tool.json()['scan_id']}"
            result.events.append(Event(turn, "tool", route, tool.status_code, detail))
            messages.append({"role": "tool", "tool_call_id": call_id, "content": outcome})


async def _read_completion(response: httpx.Response) -> tuple[str, list[dict[str, str]]]:
    """Text and tool calls from a Chat Completions SSE stream."""
    parser = SSEParser()
    text: list[str] = []
    calls: dict[int, dict[str, str]] = {}
    async for chunk in response.aiter_bytes():
        for event in parser.feed(chunk):
            if event.data == "[DONE]" or not event.data:
                continue
            for choice in json.loads(event.data).get("choices", []):
                delta = choice.get("delta") or {}
                text.append(delta.get("content") or "")
                for part in delta.get("tool_calls") or []:
                    call = calls.setdefault(part["index"], {"name": "", "arguments": ""})
                    function = part.get("function") or {}
                    call["name"] += function.get("name") or ""
                    call["arguments"] += function.get("arguments") or ""
    return "".join(text), [calls[i] for i in sorted(calls)]


def _tool_server(result: DemoResult) -> Starlette:
    async def lookup_tracking(request: Request) -> JSONResponse:
        result.tool_hits += 1
        params = await request.json()
        return JSONResponse(
            {
                "order_id": params.get("order_id"),
                "status": "in_transit",
                "last_scan": "Memphis, TN hub",
                "scan_id": "scan:v17",
                # Volatile: changes every call, and does not count as progress.
                "checked_at": datetime.now(UTC).isoformat(),
            }
        )

    return Starlette(routes=[Route("/lookup_tracking", lookup_tracking, methods=["POST"])])


# -- plumbing -----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _serving(app: Any) -> AsyncIterator[str]:
    """Serve an ASGI app on a free loopback port inside this event loop."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        if task.done() or time.monotonic() > deadline:
            raise RuntimeError(f"demo server on port {port} did not start")
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


def _span_tree(spans: tuple[ReadableSpan, ...] | list[ReadableSpan]) -> list[dict[str, Any]]:
    by_id = {span.context.span_id: span for span in spans}
    nodes = []
    for span in sorted(spans, key=lambda s: s.start_time or 0):
        parent = span.parent.span_id if span.parent else None
        nodes.append(
            {
                "name": span.name,
                "span_id": f"{span.context.span_id:016x}",
                "parent_id": f"{parent:016x}" if parent in by_id else None,
                "route": (span.attributes or {}).get("loopguard.route"),
                "failure_stage": (span.attributes or {}).get("loopguard.failure.stage"),
            }
        )
    return nodes


def _as_dict(result: DemoResult) -> dict[str, Any]:
    return {
        "stopped": result.stopped,
        "tool_server_hits": result.tool_hits,
        "final_answer": result.final_answer,
        "events": [asdict(e) for e in result.events],
        "spans": result.spans,
        "records_path": result.records_path,
        "records": len(result.records),
    }


def _print(result: DemoResult) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.tree import Tree

    console = Console()
    console.rule("[bold]loopguard demo[/]: a support agent stuck on one tracking number")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("turn", "call", "route", "HTTP", "TTFT ms", "tok/s", "what happened"):
        table.add_column(column, no_wrap=column != "what happened")
    styles = {"serve": "green", "nudge": "yellow", "stop_and_review": "bold red"}
    for e in result.events:
        table.add_row(
            str(e.turn),
            e.kind,
            f"[{styles.get(e.route, '')}]{e.route}[/]",
            str(e.status),
            f"{e.ttft_ms:.0f}" if e.ttft_ms is not None else "",
            f"{e.tokens_per_s:.0f}" if e.tokens_per_s is not None else "",
            e.detail,
        )
    console.print(table)
    console.print(f"tool server hits: {result.tool_hits} (the stopped call never reached it)")
    if result.final_answer:
        console.print(f"[bold]final answer from loopguard:[/] {result.final_answer}")
    tree = Tree("[bold]spans[/]")
    nodes: dict[str | None, Any] = {None: tree}
    for span in result.spans:
        label = span["name"]
        if span["route"]:
            label += f"  [dim]route={span['route']} stage={span['failure_stage']}[/]"
        nodes[span["span_id"]] = nodes.get(span["parent_id"], tree).add(label)
    console.print(tree)
    console.print(f"durable records: {len(result.records)} lines in {result.records_path}")
    console.print(
        f"[dim]windows, findings and costs from them: loopguard report {result.records_path}[/]"
    )
    verdict = "[bold green]stopped the loop[/]" if result.stopped else "[bold red]no stop[/]"
    console.print(f"result: {verdict}")
