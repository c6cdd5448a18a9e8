"""Responses API with server-side state (``previous_response_id``, ``conversation``)
through loopguard.

The fake upstream honours ``previous_response_id`` and the Conversations API as the real
server does: it keeps every response and conversation it made and refuses an id it never
made. Each request carries only the
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
        # Conversations API: conversation id -> the items appended to it.
        self.conversations: dict[str, list[Any]] = {}
        # Characters of padding in every call's arguments (a large call).
        self.padding = 0

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/responses", self.create, methods=["POST"]),
                Route("/v1/conversations", self.new_conversation, methods=["POST"]),
            ]
        )

    async def new_conversation(self, request: Request) -> Response:
        conversation_id = f"conv_{next(self.ids)}"
        self.conversations[conversation_id] = list((await request.json()).get("items") or [])
        return JSONResponse(
            {"id": conversation_id, "object": "conversation", "created_at": 0, "metadata": {}}
        )

    async def create(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        previous = body.get("previous_response_id")
        if previous is not None and previous not in self.responses:
            message = f"Previous response with id '{previous}' not found."
            error = {"message": message, "type": "invalid_request_error", "code": None}
            return JSONResponse({"error": error}, status_code=400)
        conversation = body.get("conversation")
        if isinstance(conversation, dict):
            conversation = conversation.get("id")
        if conversation is not None and conversation not in self.conversations:
            message = f"Conversation with id '{conversation}' not found."
            error = {"message": message, "type": "invalid_request_error", "code": None}
            return JSONResponse({"error": error}, status_code=404)
        n = next(self.ids)
        call = {
            "type": "function_call",
            "id": f"fc_{n}",
            "call_id": f"call_{n}",
            "name": "lookup_tracking",
            "arguments": json.dumps(
                {"order_id": "A1", **({"note": "n" * self.padding} if self.padding else {})}
            ),
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
        if conversation is not None:
            items = body.get("input")
            items = [{"role": "user", "content": items}] if isinstance(items, str) else items
            self.conversations[conversation] += [*(items or []), call]
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


def run_agent(
    client: openai.OpenAI,
    first: Any,
    *,
    stream: bool,
    conversation: str | None = None,
    result: str = "in transit",
) -> tuple[int, list[str], Any]:
    """An agent loop on server-side state: runs the tool for each call, sends only its
    result (continuing the last response, or adding to ``conversation``). Returns the
    tool's run count, the route of each continuation, the last answer."""
    runs, routes, response = 0, [], first
    for _ in range(10):
        calls = [item for item in response.output if item.type == "function_call"]
        if not calls:
            break
        runs += 1  # the real tool runs
        output = {
            "type": "function_call_output",
            "call_id": calls[0].call_id,
            "output": result,
        }
        state: dict[str, Any] = (
            {"conversation": conversation}
            if conversation is not None
            else {"previous_response_id": response.id}
        )
        raw = client.responses.with_raw_response.create(
            model="gpt-test", input=[output], stream=stream, **state
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


@pytest.mark.parametrize("stream", [False, True])
def test_large_calls_and_results_on_server_side_state_are_judged_the_same(stack, stream) -> None:
    # 300 KB of arguments in every call and of output in every result: over the size
    # whose hashing, marking and judging run off the event loop; the same verdicts.
    fake, _, base, records = stack
    fake.padding = 300_000
    client = openai.OpenAI(base_url=base, api_key="k", max_retries=0)
    first = client.responses.create(model="gpt-test", input="where is A1?", tools=[TOOL])
    runs, routes, last = run_agent(client, first, stream=stream, result="in transit " * 30_000)
    assert routes == ["serve", "serve", "nudge", "stop_and_review"]
    assert runs == 4 and last.id.startswith("resp_loopguard_")
    assert records[-1]["route"] == "stop_and_review"


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


@pytest.mark.parametrize("stream", [False, True])
def test_a_stuck_agent_on_a_conversation_is_nudged_then_stopped(stack, stream) -> None:
    fake, _, base, records = stack
    session = {"x-loopguard-session": "agent-1"}
    client = openai.OpenAI(base_url=base, api_key="k", max_retries=0, default_headers=session)
    conversation = client.conversations.create()
    raw = client.responses.with_raw_response.create(
        model="gpt-test", input="where is A1?", tools=[TOOL], conversation=conversation.id
    )
    # loopguard has no state for a conversation created elsewhere: served, untracked.
    assert raw.headers["x-loopguard-route"] == "serve"
    assert records[-1]["session_tracked"] is False
    runs, routes, last = run_agent(client, raw.parse(), stream=stream, conversation=conversation.id)
    assert routes == ["serve", "serve", "nudge", "stop_and_review"]
    assert runs == 4
    assert last.output_text.startswith(STOP_SIGNATURE) and "4 times" in last.output_text
    assert all(r["conversation"] == conversation.id for r in fake.requests)
    assert "3 times" in fake.requests[3]["input"][-1]["content"]  # the nudge
    assert len(fake.requests) == 4  # the stopped request never reached the model
    assert [r["session_tracked"] for r in records[2:]] == [True] * 4
    stop = records[-1]
    assert (stop["route"], stop["repeat_count"]) == ("stop_and_review", 4)


def test_two_conversations_keep_separate_chains(stack) -> None:
    """Interleaved conversations: each is judged on its own chain (the state is per
    conversation), so neither is nudged before its own third repeat."""
    _, _, base, _records = stack
    client = openai.OpenAI(base_url=base, api_key="k", max_retries=0)
    ids = [client.conversations.create().id for _ in range(2)]
    last = {
        conv: client.responses.create(
            model="gpt-test", input="where is A1?", tools=[TOOL], conversation=conv
        )
        for conv in ids
    }
    routes: dict[str, list[str]] = {conv: [] for conv in ids}
    for _ in range(3):
        for conv in ids:
            output = {
                "type": "function_call_output",
                "call_id": last[conv].output[0].call_id,
                "output": "in transit",
            }
            raw = client.responses.with_raw_response.create(
                model="gpt-test", input=[output], conversation={"id": conv}
            )
            routes[conv].append(raw.headers["x-loopguard-route"])
            last[conv] = raw.parse()
    assert routes == {conv: ["serve", "serve", "nudge"] for conv in ids}


def test_the_conversation_id_is_kept_only_as_a_keyed_pseudonym() -> None:
    """The store never holds the conversation id itself."""
    from guard.engine.store import MemoryStore

    fake, records, store = StatefulFake(), [], MemoryStore()
    with run_server(fake.app()) as upstream:
        config = proxy_app(upstream, records).config
        app = ProxyApp(config, engine=Engine(config, store=store))
        with run_server(app) as proxy:
            client = openai.OpenAI(base_url=proxy + "/openai/v1", api_key="k", max_retries=0)
            conversation = client.conversations.create()
            client.responses.create(
                model="gpt-test", input="where is A1?", tools=[TOOL], conversation=conversation.id
            )
            keys = list(store._states)  # before the proxy's shutdown empties the store
    assert len(keys) == 1 and keys[0].startswith("conversation:")
    assert conversation.id not in keys[0]


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


def run_stuck_openai_agent(
    base: str,
    runs: list[str],
    *,
    output_type: Any = None,
    on_a_conversation: bool = False,
    **run_options: Any,
) -> Any:
    """openai-agents' Runner through the proxy with the tracking tool the fake model
    keeps calling; each run of the tool is appended to ``runs``."""
    from agents import Agent, OpenAIResponsesModel, Runner, function_tool

    @function_tool
    def lookup_tracking(order_id: str) -> str:
        """Tracking status of an order."""
        runs.append(order_id)
        return "in transit"

    async def run() -> Any:
        client = openai.AsyncOpenAI(base_url=base, api_key="k", max_retries=0)
        if on_a_conversation:
            run_options["conversation_id"] = (await client.conversations.create()).id
        model = OpenAIResponsesModel("gpt-test", openai_client=client)
        agent = Agent(name="support", model=model, tools=[lookup_tracking], output_type=output_type)
        return await Runner.run(agent, "where is A1?", max_turns=10, **run_options)

    return asyncio.run(run())


def test_openai_agents_with_auto_previous_response_id_ends_by_the_stop(stack) -> None:
    fake, _, base, _records = stack
    runs: list[str] = []
    result = run_stuck_openai_agent(base, runs, auto_previous_response_id=True)
    assert len(runs) == 4  # 3, the nudge, the one repeat after it; then the stop
    assert result.final_output.startswith(STOP_SIGNATURE)
    assert all(r.get("previous_response_id") for r in fake.requests[1:])


def test_openai_agents_with_an_output_type_ends_with_a_refusal_naming_loopguard(stack) -> None:
    from agents.exceptions import ModelRefusalError
    from pydantic import BaseModel

    class Status(BaseModel):
        order: str
        status: str

    runs: list[str] = []
    with pytest.raises(ModelRefusalError) as refused:
        run_stuck_openai_agent(stack[2], runs, output_type=Status, auto_previous_response_id=True)
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


def test_openai_agents_with_a_conversation_id_ends_by_the_stop(stack) -> None:
    fake, _, base, _records = stack
    runs: list[str] = []
    result = run_stuck_openai_agent(base, runs, on_a_conversation=True)
    assert len(runs) == 4  # 3, the nudge, the one repeat after it; then the stop
    assert result.final_output.startswith(STOP_SIGNATURE)
    assert all(r.get("conversation") for r in fake.requests)
    assert not any(r.get("previous_response_id") for r in fake.requests)


@pytest.mark.parametrize("output", ["prompted", "validator"])
def test_pydantic_ai_retry_turn_after_a_stop_is_stopped_again(stack, output: str) -> None:
    """pydantic-ai answers an output it cannot use with a retry prompt (a user turn no
    human wrote): that retry is part of the stopped stall, answered by the stop again,
    so the tool never runs a 5th time and the run ends with pydantic-ai's own limit."""
    from pydantic import BaseModel
    from pydantic_ai import Agent, ModelRetry, PromptedOutput
    from pydantic_ai.exceptions import UnexpectedModelBehavior
    from pydantic_ai.models.openai import OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    class Status(BaseModel):
        order: str
        status: str

    fake, _, base, records = stack
    client = openai.AsyncOpenAI(base_url=base, api_key="k", max_retries=0)
    model = OpenAIResponsesModel("gpt-test", provider=OpenAIProvider(openai_client=client))
    agent: Agent[None, Any]
    if output == "prompted":  # JSON asked for in the prompt only: the stop text fails it
        agent = Agent(model, output_type=PromptedOutput(Status))
    else:
        agent = Agent(model, output_type=str)

        @agent.output_validator
        def must_name_a_status(text: str) -> str:
            if "in transit" not in text:
                raise ModelRetry("Say the order's status.")
            return text

    runs: list[str] = []

    @agent.tool_plain
    def lookup_tracking(order_id: str) -> str:
        """Tracking status of an order."""
        runs.append(order_id)
        return "in transit"

    with pytest.raises(UnexpectedModelBehavior, match="retries"):
        agent.run_sync("where is A1?")
    assert len(runs) == 4  # the retry turn did not reach the model, nor the tool
    retries = [r for r in records if r["route"] == "stop_and_review"]
    assert len(retries) >= 2  # the stop, then the retry stopped again
    assert {r["repeat_count"] for r in retries} == {4}
    assert len(fake.requests) == 4  # nothing after the nudge reached the model


@pytest.mark.parametrize("state", ["previous_response_id", "conversation"])
def test_a_retry_continuing_loopguards_stop_on_server_side_state_is_stopped_again(
    stack, state: str
) -> None:
    """A framework that retries after a stop continues the stop itself (its id, or the
    conversation the upstream never saw the stop in) with a retry prompt: loopguard kept
    the chain under the stop, so the retry is the same stall and never reaches the
    model; the stop is answered again, with the same count."""
    fake, _, base, records = stack
    client = openai.OpenAI(base_url=base, api_key="k", max_retries=0)
    conversation = client.conversations.create().id if state == "conversation" else None
    kept = {"conversation": conversation} if conversation else {}
    first = client.responses.create(model="gpt-test", input="where is A1?", tools=[TOOL], **kept)
    runs, routes, stop = run_agent(client, first, stream=False, conversation=conversation)
    assert routes[-1] == "stop_and_review" and runs == 4
    reached = len(fake.requests)
    retry = {"role": "user", "content": "Validation feedback:\nFix the errors and try again."}
    again = client.responses.with_raw_response.create(
        model="gpt-test",
        input=[retry],
        **(kept or {"previous_response_id": stop.id}),
    )
    assert again.headers["x-loopguard-route"] == "stop_and_review"
    answer = again.parse()
    assert answer.output_text.startswith(STOP_SIGNATURE) and "4 times" in answer.output_text
    assert len(fake.requests) == reached  # the retry never reached the model
    assert records[-1]["repeat_count"] == 4
