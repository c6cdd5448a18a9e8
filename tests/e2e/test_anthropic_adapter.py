"""Anthropic Messages through loopguard, with the official SDK, on real sockets."""

from __future__ import annotations

import json
from collections.abc import Iterator

import anthropic
import httpx
import pytest
from fake_models import (
    CACHED_TOKENS,
    INPUT_TOKENS,
    Behaviour,
    Guarded,
    Reply,
    guarded,
    wait_records,
)

from adapters.anthropic import AnthropicAdapter
from guard.engine.config import RouteConfig
from guard.engine.contract import RequestView

MESSAGES = [{"role": "user", "content": "What is the answer?"}]
TOOL = ("search", {"query": "the answer", "limit": 3})


@pytest.fixture(scope="module")
def running() -> Iterator[Guarded]:
    with guarded() as g:
        yield g


@pytest.fixture
def g(running: Guarded) -> Guarded:
    return running.fresh()


def client(g: Guarded) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=g.anthropic_base, api_key="sk-ant-test", max_retries=0)


def aclient(g: Guarded) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=g.anthropic_base, api_key="sk-ant-test", max_retries=0)


def create(c, **extra):
    return c.messages.create(model="claude-test", max_tokens=100, messages=MESSAGES, **extra)


@pytest.mark.parametrize("stream", [False, True])
def test_text_sync(g: Guarded, stream: bool) -> None:
    g.fake.behaviour = Behaviour(split_events=True)
    c = client(g)
    if stream:
        with c.messages.stream(model="claude-test", max_tokens=100, messages=MESSAGES) as events:
            text = "".join(events.text_stream)
            final = events.get_final_message()
        assert final.stop_reason == "end_turn"
    else:
        raw = c.messages.with_raw_response.create(
            model="claude-test", max_tokens=100, messages=MESSAGES
        )
        assert raw.headers["x-loopguard-route"] == "serve"
        text = raw.parse().content[0].text
    assert text == "The answer is 42."
    (record,) = wait_records(g, 1)
    assert (record["provider"], record["model"], record["stream"]) == (
        "anthropic",
        "claude-test",
        stream,
    )
    assert record["finish_reasons"] == ["end_turn"]
    # All input tokens (uncached + cache reads), and the cache reads on their own.
    assert (record["input_tokens"], record["cached_input_tokens"]) == (INPUT_TOKENS, CACHED_TOKENS)
    assert record["output_tokens"] == 4
    assert record["usage_source"] == "response"


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_use_async(g: Guarded, stream: bool) -> None:
    # input_json_delta fragments split over chunks, each event cut in two across writes.
    g.fake.reply = Reply(tool=TOOL)
    g.fake.behaviour = Behaviour(split_events=True)
    async with aclient(g) as c:
        if stream:
            async with c.messages.stream(
                model="claude-test", max_tokens=100, messages=MESSAGES
            ) as events:
                async for _ in events:
                    pass
                final = await events.get_final_message()
        else:
            final = await create(c)
    (block,) = final.content
    assert (block.type, block.name, block.input) == ("tool_use", *TOOL)
    (record,) = wait_records(g, 1)
    assert record["finish_reasons"] == ["tool_use"]


def test_ttft_counts_content_not_message_start_or_ping(g: Guarded) -> None:
    g.fake.behaviour = Behaviour(first_delay=0.2)
    list(create(client(g), stream=True))
    (record,) = wait_records(g, 1)
    assert 150 <= record["ttft_ms"] <= 400


@pytest.mark.parametrize("status", [400, 529])
def test_provider_errors_pass_through(g: Guarded, status: int) -> None:
    g.fake.behaviour = Behaviour(error_status=status)
    body = {"model": "claude-test", "max_tokens": 10, "messages": MESSAGES}
    direct = httpx.post(g.upstream + "/v1/messages", json=body)
    through = httpx.post(g.anthropic_base + "/v1/messages", json=body)
    assert (through.status_code, through.content) == (status, direct.content)
    with pytest.raises(anthropic.APIStatusError) as raised:
        create(client(g))
    assert raised.value.status_code == status
    assert raised.value.body["error"]["message"] == "fake failure"


def test_stream_without_message_stop_is_a_stream_failure(g: Guarded) -> None:
    g.fake.behaviour = Behaviour(die_mid_stream=True, chunks=6)
    events = list(create(client(g), stream=True))
    assert [e.type for e in events][:2] == ["message_start", "content_block_start"]
    (record,) = wait_records(g, 1)
    assert (record["failure_stage"], record["error_type"]) == ("stream", "incomplete_stream")


@pytest.mark.parametrize("chunked_by", [None, 1, 5])
def test_observer_assembles_tool_input(g: Guarded, chunked_by: int | None) -> None:
    g.fake.reply, g.fake.behaviour = Reply(tool=TOOL), Behaviour(split_events=True)
    adapter = AnthropicAdapter(RouteConfig(prefix="/", upstream="http://x", adapter="anthropic"))
    raw = json.dumps({"model": "m", "max_tokens": 5, "messages": MESSAGES, "stream": True}).encode()
    parsed = adapter.parse(RequestView("POST", "/v1/messages", "", {}, raw))
    with httpx.stream("POST", g.upstream + "/v1/messages", content=raw) as response:
        observer = adapter.observer(parsed, 200, {"content-type": response.headers["content-type"]})
        passed = b"".join(observer.feed(c, 1.0) for c in response.iter_raw(chunked_by))
    obs = observer.finish()
    assert passed.count(b"event: ") == 9  # every byte passed on, pings included
    (call,) = obs.requested_tools
    assert (call.tool, call.params, call.call_id) == (*TOOL, "toolu_fake1")
    assert (obs.response_id, obs.response_model, obs.output_chunks) == ("msg_fake1", "m", 3)
    assert obs.finish_reasons == ("tool_use",)
    assert obs.complete


def test_parse() -> None:
    adapter = AnthropicAdapter(RouteConfig(prefix="/", upstream="http://x", adapter="anthropic"))
    body = {"model": "claude-test", "system": "be brief", "messages": MESSAGES, "stream": True}
    parsed = adapter.parse(RequestView("POST", "/v1/messages", "", {}, json.dumps(body).encode()))
    # No tool step to judge (only the text tail the text-loop rule reads).
    tool_steps = [step for step in parsed.history or () if step.kind == "tool"]
    assert (parsed.span_name, parsed.stream, tool_steps) == ("chat claude-test", True, [])
    assert len(parsed.fields.conversation_digest) == 32
    count = adapter.parse(RequestView("POST", "/v1/messages/count_tokens", "", {}, b"{}"))
    assert count.operation == "passthrough"
