"""Stalls read from model conversations: a nudge first, then a stop, with the official SDKs.

A conversation replaying a real loop (the same search, same result, three times
between filler calls) gets a guard message added to the request it forwards; when the
model repeats the call anyway, the next request is answered by loopguard itself, in
the API's own shape, without calling the model. Results that keep changing get neither.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from conversations import (
    LOOP,
    PROGRESS,
    SEARCH,
    THINK,
    Step,
    anthropic_messages,
    chat_messages,
    responses_input,
)
from fake_models import Guarded, guarded, wait_records

from adapters.anthropic import AnthropicAdapter
from guard.engine.calls import StallRule, Verdict
from guard.engine.config import RouteConfig
from guard.engine.contract import ParsedRequest, RequestView
from guard.engine.problem import nudge_text

APIS = ["chat", "responses", "anthropic"]


# -- one request through the SDK, whatever the API -------------------------------------------


class Sent:
    def __init__(self, route: str, text: str, tool_calls: int, finish: str | None) -> None:
        self.route, self.text, self.tool_calls, self.finish = route, text, tool_calls, finish


def send(g: Guarded, api: str, steps: list[Step], *, stream: bool = False) -> Sent:
    if api == "anthropic":
        c = anthropic.Anthropic(base_url=g.anthropic_base, api_key="k", max_retries=0)
        raw = c.messages.with_raw_response.create(
            model="claude-test",
            max_tokens=100,
            system="You are a travel agent.",
            messages=anthropic_messages(steps),
            stream=stream,
        )
        route = raw.headers["x-loopguard-route"]
        if not stream:
            message = raw.parse()
            text = "".join(b.text for b in message.content if b.type == "text")
            tools = sum(b.type == "tool_use" for b in message.content)
            return Sent(route, text, tools, message.stop_reason)
        events = list(raw.parse())
        text = "".join(
            e.delta.text
            for e in events
            if e.type == "content_block_delta" and e.delta.type == "text_delta"
        )
        tools = sum(
            e.type == "content_block_start" and e.content_block.type == "tool_use" for e in events
        )
        finish = next(e.delta.stop_reason for e in events if e.type == "message_delta")
        return Sent(route, text, tools, finish)
    c = openai.OpenAI(base_url=g.openai_base, api_key="k", max_retries=0)
    if api == "chat":
        raw = c.chat.completions.with_raw_response.create(
            model="gpt-test", messages=chat_messages(steps), stream=stream
        )
        route = raw.headers["x-loopguard-route"]
        if not stream:
            choice = raw.parse().choices[0]
            tools = len(choice.message.tool_calls or ())
            return Sent(route, choice.message.content or "", tools, choice.finish_reason)
        chunks = [ch for ch in raw.parse() if ch.choices]
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
        tools = sum(len(ch.choices[0].delta.tool_calls or ()) for ch in chunks)
        finish = next(ch.choices[0].finish_reason for ch in chunks if ch.choices[0].finish_reason)
        return Sent(route, text, tools, finish)
    raw = c.responses.with_raw_response.create(
        model="gpt-test", input=responses_input(steps), stream=stream
    )
    route = raw.headers["x-loopguard-route"]
    if stream:
        events = list(raw.parse())
        assert events[-1].type == "response.completed"
        response = events[-1].response
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == (
            response.output_text
        )
    else:
        response = raw.parse()
    tools = sum(item.type == "function_call" for item in response.output)
    return Sent(route, response.output_text, tools, response.status)


def guard_message(api: str, body: dict[str, Any]) -> str | None:
    """The guard message in what the upstream received, in the API's own place for it."""
    if api == "chat":
        last = body["messages"][-1]
        return last["content"] if last["role"] == "system" else None
    if api == "responses":
        last = body["input"][-1]
        return last["content"] if last.get("role") == "developer" else None
    system = body.get("system", "")
    _, sep, added = system.partition("You are a travel agent.\n\n")
    return added if sep and added else None


@pytest.fixture(scope="module")
def running() -> Iterator[Guarded]:
    with guarded() as g:
        yield g


@pytest.fixture
def g(running: Guarded) -> Guarded:
    return running.fresh()


# -- nudge, then stop --------------------------------------------------------------------------


@pytest.mark.parametrize("api", APIS)
def test_loop_gets_a_nudge_then_a_stop(g: Guarded, api: str) -> None:
    first = send(g, api, LOOP)
    assert first.route == "nudge"
    assert first.text == "The answer is 42."  # the model was called, with the guard message
    ((_, body),) = g.fake.requests
    message = guard_message(api, body)
    assert message is not None
    assert "`search`" in message and "3 times" in message

    # The model ignored the nudge and searched again: loopguard answers, the model is not called.
    second = send(g, api, [*LOOP, SEARCH])
    assert second.route == "stop_and_review"
    assert len(g.fake.requests) == 1
    assert "loopguard stopped this call" in second.text
    assert "`search`" in second.text
    assert second.tool_calls == 0
    assert second.finish == {"chat": "stop", "responses": "completed"}.get(api, "end_turn")

    nudged, stopped = wait_records(g, 2)
    assert (nudged["route"], nudged["failure_stage"]) == ("nudge", "passed")
    assert (stopped["route"], stopped["failure_stage"]) == ("stop_and_review", "loop_guard")
    assert stopped["stall_rule"] == "stalled_repeat"
    assert stopped["repeat_count"] == 4
    assert stopped["tool"] == "search"


@pytest.mark.parametrize("api", APIS)
def test_changing_results_get_neither(g: Guarded, api: str) -> None:
    for n in range(2, len(PROGRESS) + 1):
        assert send(g, api, PROGRESS[:n]).route == "serve"
    for _, body in g.fake.requests:
        assert guard_message(api, body) is None
    assert len(g.fake.requests) == len(PROGRESS) - 1


def test_each_conversation_is_judged_on_its_own(g: Guarded) -> None:
    assert send(g, "chat", [*LOOP, SEARCH]).route == "stop_and_review"
    assert send(g, "chat", [THINK, SEARCH]).route == "serve"


# -- the synthetic stop answer, every shape, parsed by the SDKs --------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("api", APIS)
def test_stop_answer_parses_in_the_sdk(g: Guarded, api: str, stream: bool) -> None:
    sent = send(g, api, [*LOOP, SEARCH], stream=stream)
    assert sent.route == "stop_and_review"
    assert "loopguard stopped this call" in sent.text
    assert sent.tool_calls == 0
    assert g.fake.requests == []


async def test_stop_answers_parse_in_the_async_sdks(g: Guarded) -> None:
    loop = [*LOOP, SEARCH]
    async with openai.AsyncOpenAI(base_url=g.openai_base, api_key="k", max_retries=0) as c:
        chunks = [
            chunk
            async for chunk in await c.chat.completions.create(
                model="gpt-test",
                messages=chat_messages(loop),
                stream=True,
                stream_options={"include_usage": True},
            )
        ]
        assert chunks[-1].usage.completion_tokens == 0  # the usage chunk it asked for
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert "loopguard stopped" in text
        async with c.responses.stream(model="gpt-test", input=responses_input(loop)) as events:
            async for _ in events:
                pass
            final = await events.get_final_response()
        assert "loopguard stopped" in final.output_text
        completion = await c.chat.completions.create(model="gpt-test", messages=chat_messages(loop))
        assert completion.choices[0].message.tool_calls is None
    async with anthropic.AsyncAnthropic(base_url=g.anthropic_base, api_key="k", max_retries=0) as a:
        async with a.messages.stream(
            model="claude-test", max_tokens=10, messages=anthropic_messages(loop)
        ) as events:
            message = await events.get_final_message()
        assert message.stop_reason == "end_turn"
        assert "loopguard stopped" in message.content[0].text
    assert g.fake.requests == []


# -- configuration: on_stop = "error", nudge = false, observe mode -----------------------------


def test_on_stop_error_is_a_422_problem_the_sdks_do_not_retry() -> None:
    with guarded(on_stop="error") as g:
        c = openai.OpenAI(base_url=g.openai_base, api_key="k", max_retries=3)
        with pytest.raises(openai.UnprocessableEntityError) as raised:
            c.chat.completions.create(model="gpt-test", messages=chat_messages([*LOOP, SEARCH]))
        assert raised.value.response.headers["x-loopguard-route"] == "stop_and_review"
        a = anthropic.Anthropic(base_url=g.anthropic_base, api_key="k", max_retries=3)
        with pytest.raises(anthropic.UnprocessableEntityError):
            a.messages.create(
                model="claude-test", max_tokens=5, messages=anthropic_messages([*LOOP, SEARCH])
            )
        response = httpx.post(
            g.openai_base + "/responses",
            json={"model": "gpt-test", "input": responses_input([*LOOP, SEARCH])},
        )
        assert response.status_code == 422
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert (problem["tool"], problem["rule"], problem["repeats"]) == (
            "search",
            "stalled_repeat",
            4,
        )
        assert g.fake.requests == []  # one attempt each, none reached the model
        assert len(wait_records(g, 3)) == 3


def test_without_nudges_a_stall_stops_at_once() -> None:
    with guarded(nudge=False) as g:
        assert send(g, "anthropic", LOOP).route == "stop_and_review"
        assert g.fake.requests == []


def test_observe_mode_serves_and_says_so() -> None:
    with guarded(loop={"mode": "observe"}) as g:
        sent = send(g, "chat", [*LOOP, SEARCH])
        assert sent.route == "observe"
        ((_, body),) = g.fake.requests
        assert guard_message("chat", body) is None
        (record,) = wait_records(g, 1)
        assert (record["route"], record["stall_rule"]) == ("observe", "stalled_repeat")


# -- the guard message in each API's own form ---------------------------------------------------


BRIEF = {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}


@pytest.mark.parametrize(
    ("system", "expected"),
    [
        (None, lambda text: text),
        ("Be brief.", lambda text: f"Be brief.\n\n{text}"),
        # A block list gets one more block: the cache breakpoint before it stays valid.
        ([BRIEF], lambda text: [BRIEF, {"type": "text", "text": text}]),
    ],
)
def test_anthropic_nudge_goes_into_system(system: Any, expected: Any) -> None:
    adapter = AnthropicAdapter(RouteConfig(prefix="/", upstream="http://x", adapter="anthropic"))
    body: dict[str, Any] = {"model": "m", "messages": anthropic_messages(LOOP)}
    if system is not None:
        body["system"] = system
    request = RequestView("POST", "/v1/messages", "", {}, json.dumps(body).encode())
    verdict = Verdict("block", "search", "h", StallRule.STALLED_REPEAT, 3)
    nudged = json.loads(adapter.nudge(request, ParsedRequest("chat"), verdict))
    assert nudged["system"] == expected(nudge_text(verdict))
    assert nudged["messages"] == body["messages"]
