"""Responses API with server-side state (``previous_response_id``) through loopguard.

The fake upstream honours ``previous_response_id`` as the real server does: it keeps
every response it made and refuses an id it never made. Each request carries only the
newest tool result; loopguard rebuilds the chain from what it kept of the responses it
relayed and judges it as a full history: a nudge, then a stop.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from servers import run_server
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from guard.doors.proxy import ProxyApp
from guard.engine.config import Config
from guard.engine.core import Engine
from guard.engine.problem import STOP_SIGNATURE
from guard.telemetry import Telemetry

TOOL = {"type": "function", "name": "lookup_tracking", "parameters": {"type": "object"}}


class StatefulFake:
    """A stuck model behind a Responses API that keeps state: it calls
    ``lookup_tracking(A1)`` every turn, nudged or not."""

    def __init__(self) -> None:
        self.ids = itertools.count(1)
        self.responses: dict[str, dict[str, Any]] = {}
        self.requests: list[dict[str, Any]] = []

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/responses", self.create, methods=["POST"])])

    async def create(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        previous = body.get("previous_response_id")
        if previous is not None and previous not in self.responses:
            message = f"Previous response with id '{previous}' not found."
            error = {"message": message, "type": "invalid_request_error", "code": None}
            return JSONResponse({"error": error}, status_code=400)
        n = next(self.ids)
        call = {
            "type": "function_call",
            "id": f"fc_{n}",
            "call_id": f"call_{n}",
            "name": "lookup_tracking",
            "arguments": json.dumps({"order_id": "A1"}),
            "status": "completed",
        }
        response = {
            "id": f"resp_{n}",
            "object": "response",
            "created_at": 0,
            "status": "completed",
            "model": body.get("model", "gpt-test"),
            "output": [call],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": body.get("tools", []),
            "usage": {"input_tokens": 5, "output_tokens": 3, "total_tokens": 8},
        }
        self.responses[response["id"]] = response
        if not body.get("stream"):
            return JSONResponse(response)
        events = [
            {"type": "response.created", "response": {**response, "output": []}},
            {"type": "response.output_item.added", "output_index": 0, "item": call},
            {"type": "response.output_item.done", "output_index": 0, "item": call},
            {"type": "response.completed", "response": response},
        ]
        lines = [
            f"event: {e['type']}\ndata: {json.dumps({**e, 'sequence_number': i})}\n\n"
            for i, e in enumerate(events)
        ]
        return StreamingResponse(iter(lines), media_type="text/event-stream")


def proxy_app(upstream: str, records: list[dict[str, Any]], **store: Any) -> ProxyApp:
    config = Config.from_mapping(
        {
            "telemetry": {"records": ""},
            "store": store,
            "routes": [{"prefix": "/openai", "upstream": upstream, "adapter": "openai"}],
        }
    )
    telemetry = Telemetry(config.telemetry, config.redaction.policy_id, record_sink=records.append)
    return ProxyApp(config, engine=Engine(config, telemetry=telemetry))


@pytest.fixture
def stack() -> Iterator[tuple[StatefulFake, str, str, list[dict[str, Any]]]]:
    fake = StatefulFake()
    records: list[dict[str, Any]] = []
    with run_server(fake.app()) as upstream, run_server(proxy_app(upstream, records)) as proxy:
        yield fake, upstream, proxy + "/openai/v1", records


def run_agent(client: openai.OpenAI, first: Any, *, stream: bool) -> tuple[int, list[str], Any]:
    """An agent loop on server-side state: runs the tool for each call, sends only its
    result. Returns the tool's run count, the route of each continuation, the last answer."""
    runs, routes, response = 0, [], first
    for _ in range(10):
        calls = [item for item in response.output if item.type == "function_call"]
        if not calls:
            break
        runs += 1  # the real tool runs
        output = {
            "type": "function_call_output",
            "call_id": calls[0].call_id,
            "output": "in transit",
        }
        raw = client.responses.with_raw_response.create(
            model="gpt-test", previous_response_id=response.id, input=[output], stream=stream
        )
        routes.append(raw.headers["x-loopguard-route"])
        parsed = raw.parse()
        response = (
            [e for e in parsed if e.type == "response.completed"][-1].response if stream else parsed
        )
    return runs, routes, response


@pytest.mark.parametrize("stream", [False, True])
def test_a_stuck_agent_on_previous_response_id_is_nudged_then_stopped(stack, stream) -> None:
    fake, _, base, records = stack
    client = openai.OpenAI(base_url=base, api_key="k", max_retries=0)
    first = client.responses.create(model="gpt-test", input="where is A1?", tools=[TOOL])
    runs, routes, last = run_agent(client, first, stream=stream)
    assert routes == ["serve", "serve", "nudge", "stop_and_review"]
    assert runs == 4
    assert last.id.startswith("resp_loopguard_")
    assert last.output_text.startswith(STOP_SIGNATURE) and "4 times" in last.output_text
    nudged = fake.requests[3]["input"][-1]
    assert nudged["role"] == "developer" and "3 times" in nudged["content"]
    assert len(fake.requests) == 4  # the stopped request never reached the model
    stop = records[-1]
    assert (stop["route"], stop["repeat_count"], stop["tool"]) == (
        "stop_and_review",
        4,
        "lookup_tracking",
    )


def test_a_response_loopguard_never_saw_is_served_and_marked_untracked(stack) -> None:
    _, upstream, base, records = stack
    direct = openai.OpenAI(base_url=upstream + "/v1", api_key="k", max_retries=0)
    elsewhere = direct.responses.create(model="gpt-test", input="where is A1?", tools=[TOOL])
    client = openai.OpenAI(base_url=base, api_key="k", max_retries=0)
    output = {"type": "function_call_output", "call_id": "call_1", "output": "in transit"}
    raw = client.responses.with_raw_response.create(
        model="gpt-test", previous_response_id=elsewhere.id, input=[output]
    )
    assert raw.headers["x-loopguard-route"] == "serve"
    assert raw.parse().output[0].type == "function_call"
    assert records[-1]["session_tracked"] is False
    # From there on the chain is loopguard's: it is judged from what it saw.
    runs, routes, last = run_agent(client, raw.parse(), stream=False)
    assert routes[:3] == ["serve", "serve", "nudge"] and runs <= 5
    assert last.output_text.startswith(STOP_SIGNATURE)


class Alternating(httpx.BaseTransport):
    """Sends each request to the next of several loopguard replicas in turn."""

    def __init__(self, bases: list[str]) -> None:
        self.bases = itertools.cycle(bases)
        self.inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        base = httpx.URL(next(self.bases))
        request.url = request.url.copy_with(host=base.host, port=base.port)
        return self.inner.handle_request(request)


def test_replicas_sharing_redis_agree_on_the_chain(redis_url: str) -> None:
    fake, records = StatefulFake(), []
    store = {"backend": "redis", "url": redis_url, "key_prefix": "chain:"}
    with (
        run_server(fake.app()) as upstream,
        run_server(proxy_app(upstream, records, **store)) as one,
        run_server(proxy_app(upstream, records, **store)) as two,
    ):
        http = httpx.Client(transport=Alternating([one, two]))
        client = openai.OpenAI(
            base_url=one + "/openai/v1", api_key="k", max_retries=0, http_client=http
        )
        first = client.responses.create(model="gpt-test", input="where is A1?", tools=[TOOL])
        runs, routes, last = run_agent(client, first, stream=False)
    assert routes == ["serve", "serve", "nudge", "stop_and_review"]
    assert runs == 4 and last.output_text.startswith(STOP_SIGNATURE)


def test_openai_agents_with_auto_previous_response_id_ends_by_the_stop(stack) -> None:
    from agents import Agent, OpenAIResponsesModel, Runner, function_tool

    fake, _, base, _records = stack
    runs: list[str] = []

    @function_tool
    def lookup_tracking(order_id: str) -> str:
        """Tracking status of an order."""
        runs.append(order_id)
        return "in transit"

    async def run() -> Any:
        client = openai.AsyncOpenAI(base_url=base, api_key="k", max_retries=0)
        model = OpenAIResponsesModel("gpt-test", openai_client=client)
        agent = Agent(name="support", model=model, tools=[lookup_tracking])
        return await Runner.run(agent, "where is A1?", max_turns=10, auto_previous_response_id=True)

    result = asyncio.run(run())
    assert len(runs) == 4  # 3, the nudge, the one repeat after it; then the stop
    assert result.final_output.startswith(STOP_SIGNATURE)
    assert all(r.get("previous_response_id") for r in fake.requests[1:])


def test_openai_agents_with_an_output_type_ends_with_a_refusal_naming_loopguard(stack) -> None:
    from agents import Agent, OpenAIResponsesModel, Runner, function_tool
    from agents.exceptions import ModelRefusalError
    from pydantic import BaseModel

    class Status(BaseModel):
        order: str
        status: str

    runs: list[str] = []

    @function_tool
    def lookup_tracking(order_id: str) -> str:
        """Tracking status of an order."""
        runs.append(order_id)
        return "in transit"

    async def run() -> Any:
        client = openai.AsyncOpenAI(base_url=stack[2], api_key="k", max_retries=0)
        model = OpenAIResponsesModel("gpt-test", openai_client=client)
        agent = Agent(name="s", model=model, tools=[lookup_tracking], output_type=Status)
        return await Runner.run(agent, "where is A1?", max_turns=10, auto_previous_response_id=True)

    with pytest.raises(ModelRefusalError) as refused:
        asyncio.run(run())
    assert len(runs) == 4
    assert STOP_SIGNATURE in str(refused.value) and "4 times" in str(refused.value)


@pytest.mark.parametrize("native", [False, True])
def test_pydantic_ai_with_an_output_type_ends_with_an_error_naming_loopguard(
    stack, native: bool
) -> None:
    from pydantic import BaseModel
    from pydantic_ai import Agent, NativeOutput
    from pydantic_ai.exceptions import ContentFilterError
    from pydantic_ai.models.openai import OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    class Status(BaseModel):
        order: str
        status: str

    client = openai.AsyncOpenAI(base_url=stack[2], api_key="k", max_retries=0)
    model = OpenAIResponsesModel("gpt-test", provider=OpenAIProvider(openai_client=client))
    # Tool output (a forced tool call) by default; NativeOutput asks for a JSON schema.
    agent = Agent(model, output_type=NativeOutput(Status) if native else Status)
    runs: list[str] = []

    @agent.tool_plain
    def lookup_tracking(order_id: str) -> str:
        """Tracking status of an order."""
        runs.append(order_id)
        return "in transit"

    with pytest.raises(ContentFilterError) as refused:
        agent.run_sync("where is A1?")
    assert len(runs) == 4  # no retry turn reached the tool
    assert STOP_SIGNATURE in str(refused.value)
