"""OpenAI Chat Completions and Responses through loopguard, with the official SDK.

Real sockets throughout: the fake upstream and the proxy each run on uvicorn on
loopback (``fake_models.guarded``); the SDK talks to the proxy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
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

from adapters.openai import OpenAIAdapter
from adapters.sse import SSEParser
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
    """The module's servers, with a fresh fake model and no records."""
    return running.fresh()


def client(g: Guarded) -> openai.OpenAI:
    return openai.OpenAI(base_url=g.openai_base, api_key="sk-test", max_retries=0)


def aclient(g: Guarded) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=g.openai_base, api_key="sk-test", max_retries=0)


def chat_text(chunks) -> tuple[str, dict[int, list[str]]]:
    """Text and tool-call (name, id, arguments) assembled from streamed chunks."""
    text, calls = "", {}
    for chunk in chunks:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for call in choice.delta.tool_calls or ():
                entry = calls.setdefault(call.index, ["", "", ""])
                if call.function and call.function.name:
                    entry[0] = call.function.name
                if call.id:
                    entry[1] = call.id
                if call.function and call.function.arguments:
                    entry[2] += call.function.arguments
    return text, calls


# -- Chat Completions -----------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_chat_text_sync(g: Guarded, stream: bool) -> None:
    g.fake.behaviour = Behaviour(split_events=True)
    c = client(g)
    raw = c.chat.completions.with_raw_response.create(
        model="gpt-test", messages=MESSAGES, stream=stream
    )
    assert raw.headers["x-loopguard-route"] == "serve"
    result = raw.parse()
    if stream:
        text, calls = chat_text(result)
        assert calls == {}
    else:
        text = result.choices[0].message.content
        assert result.usage.prompt_tokens_details.cached_tokens == CACHED_TOKENS
    assert text == "The answer is 42."
    (record,) = wait_records(g, 1)
    assert record["route"] == "serve"
    assert record["failure_stage"] == "passed"
    assert record["model"] == "gpt-test"
    assert record["provider"] == "openai"
    assert record["stream"] is stream
    assert record["finish_reasons"] == ["stop"]
    if stream:
        # No stream_options in the request and no injection: the API sends no usage.
        assert record["usage_source"] == "absent"
        assert record["ttft_ms"] is not None
    else:
        assert record["usage_source"] == "response"
        assert (record["input_tokens"], record["output_tokens"]) == (INPUT_TOKENS, 4)
        assert record["cached_input_tokens"] == CACHED_TOKENS


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_tool_call_async(g: Guarded, stream: bool) -> None:
    # Tool-call deltas split over chunks, each event cut in two across body writes.
    g.fake.reply = Reply(tool=TOOL)
    g.fake.behaviour = Behaviour(split_events=True)
    async with aclient(g) as c:
        result = await c.chat.completions.create(
            model="gpt-test",
            messages=MESSAGES,
            stream=stream,
            **({"stream_options": {"include_usage": True}} if stream else {}),
        )
        if stream:
            chunks = [chunk async for chunk in result]
            text, calls = chat_text(chunks)
            assert chunks[-1].usage.completion_tokens == 4  # the usage chunk the client asked for
            assert text == ""
            assert calls == {0: ["search", "call_fake1", json.dumps(TOOL[1])]}
        else:
            (call,) = result.choices[0].message.tool_calls
            assert (call.function.name, json.loads(call.function.arguments)) == TOOL
    (record,) = wait_records(g, 1)
    assert record["finish_reasons"] == ["tool_calls"]
    assert record["usage_source"] == "response"


@pytest.mark.parametrize("split_events", [True, False])
def test_injected_usage_is_hidden_byte_exact(split_events: bool) -> None:
    # The client did not ask for usage: loopguard asks the upstream and cuts the usage-only
    # chunk out of the stream; every other byte reaches the client unchanged. Events cut
    # in two with "\r\n" endings are read before they pass; whole "\n" events in which no
    # usage object shows pass unread (read one step late).
    with guarded(inject_stream_usage=True) as g:
        g.fake.behaviour = Behaviour(split_events=split_events, chunks=7)
        body = {"model": "gpt-test", "messages": MESSAGES, "stream": True}
        through = httpx.post(g.openai_base + "/chat/completions", json=body).content
        sent = g.fake.requests[-1][1]
        assert sent["stream_options"] == {"include_usage": True}
        # The upstream's own bytes for what loopguard sent, then the usage event cut out.
        direct = httpx.post(g.upstream + "/v1/chat/completions", json=sent).content
        events = SSEParser().feed(direct)
        usage_events = [e for e in events if '"choices": []' in e.data]
        assert len(usage_events) == 1
        cut = usage_events[0]
        assert through == direct[: cut.start] + direct[cut.end :]
        assert b"prompt_tokens" not in through
        (record,) = wait_records(g, 1)
        assert record["usage_source"] == "response"
        assert (record["input_tokens"], record["output_tokens"]) == (INPUT_TOKENS, 7)

        # The SDK sees a normal stream without a usage chunk.
        chunks = list(client(g).chat.completions.create(**body))
        assert all(chunk.choices for chunk in chunks)
        assert chat_text(chunks)[0] == "The answer is 42."


def test_client_that_asked_for_usage_gets_it() -> None:
    with guarded(inject_stream_usage=True) as g:
        chunks = list(
            client(g).chat.completions.create(
                model="gpt-test",
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert chunks[-1].choices == []
        assert chunks[-1].usage.prompt_tokens == INPUT_TOKENS


# -- Responses ------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_responses_text_sync(g: Guarded, stream: bool) -> None:
    c = client(g)
    if stream:
        events = list(c.responses.create(model="gpt-test", input="hi", stream=True))
        assert events[-1].type == "response.completed"
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert events[-1].response.output_text == text
    else:
        text = c.responses.create(model="gpt-test", input="hi").output_text
    assert text == "The answer is 42."
    (record,) = wait_records(g, 1)
    assert record["usage_source"] == "response"
    assert (record["input_tokens"], record["cached_input_tokens"]) == (INPUT_TOKENS, CACHED_TOKENS)
    assert record["finish_reasons"] == ["completed"]


@pytest.mark.parametrize("stream", [False, True])
async def test_responses_tool_call_async(g: Guarded, stream: bool) -> None:
    g.fake.reply = Reply(tool=TOOL)
    g.fake.behaviour = Behaviour(split_events=True)
    async with aclient(g) as c:
        if stream:
            async with c.responses.stream(model="gpt-test", input="hi") as events:
                async for _ in events:
                    pass
                final = await events.get_final_response()
        else:
            final = await c.responses.create(model="gpt-test", input="hi")
    (call,) = [item for item in final.output if item.type == "function_call"]
    assert (call.name, json.loads(call.arguments)) == TOOL
    (record,) = wait_records(g, 1)
    assert record["failure_stage"] == "passed"


# -- timing, errors, broken streams --------------------------------------------------------


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_ttft_counts_the_first_content_chunk_not_the_role_chunk(g: Guarded, api: str) -> None:
    # The role-only chunk (chat) / response.created (responses) leave at once; content
    # only after 200 ms.
    g.fake.behaviour = Behaviour(first_delay=0.2)
    c = client(g)
    if api == "chat":
        list(c.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True))
    else:
        list(c.responses.create(model="gpt-test", input="hi", stream=True))
    (record,) = wait_records(g, 1)
    assert 150 <= record["ttft_ms"] <= 400
    assert record["total_ms"] >= record["ttft_ms"]


@pytest.mark.parametrize("status", [400, 404, 500])
def test_provider_errors_pass_through(g: Guarded, status: int) -> None:
    g.fake.behaviour = Behaviour(error_status=status)
    body = {"model": "gpt-test", "messages": MESSAGES}
    direct = httpx.post(g.upstream + "/v1/chat/completions", json=body)
    through = httpx.post(g.openai_base + "/chat/completions", json=body)
    assert (through.status_code, through.content) == (status, direct.content)
    with pytest.raises(openai.APIStatusError) as raised:
        client(g).chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert raised.value.status_code == status
    assert raised.value.body["code"] == "fake_error"
    records = wait_records(g, 2)
    expected = "upstream_status" if status >= 500 else "passed"
    assert [r["failure_stage"] for r in records] == [expected, expected]


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_stream_without_terminal_event_is_a_stream_failure(g: Guarded, api: str) -> None:
    g.fake.behaviour = Behaviour(die_mid_stream=True, chunks=6)
    c = client(g)
    if api == "chat":
        chunks = list(c.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True))
        assert chat_text(chunks)[0]  # some content came through
    else:
        list(c.responses.create(model="gpt-test", input="hi", stream=True))
    (record,) = wait_records(g, 1)
    assert record["failure_stage"] == "stream"
    assert record["error_type"] == "incomplete_stream"


# -- the observer on real upstream bytes -----------------------------------------------------


def observe(g: Guarded, path: str, body: dict, chunked_by: int | None = None):
    """Feed the fake's real response, as it arrives on the socket, to the adapter's observer."""
    adapter = OpenAIAdapter(RouteConfig(prefix="/", upstream="http://x", adapter="openai"))
    raw = json.dumps(body).encode()
    parsed = adapter.parse(RequestView("POST", path, "", {}, raw))
    with httpx.stream("POST", g.upstream + path, content=raw) as response:
        headers = {k.lower(): v for k, v in response.headers.items()}
        observer = adapter.observer(parsed, response.status_code, headers)
        passed = b""
        for n, chunk in enumerate(response.iter_raw(chunked_by)):
            passed += observer.feed(chunk, float(n))
    return observer.finish(), passed


@pytest.mark.parametrize("chunked_by", [None, 1, 7])
def test_observer_assembles_streamed_tool_calls(g: Guarded, chunked_by: int | None) -> None:
    g.fake.reply, g.fake.behaviour = Reply(tool=TOOL), Behaviour(split_events=True)
    for path, body in [
        ("/v1/chat/completions", {"model": "m", "messages": MESSAGES, "stream": True}),
        ("/v1/responses", {"model": "m", "input": "hi", "stream": True}),
    ]:
        obs, _ = observe(g, path, body, chunked_by)
        assert obs.complete
        (call,) = obs.requested_tools
        assert (call.tool, call.params, call.call_id) == (*TOOL, "call_fake1")
        assert obs.response_id in ("chatcmpl-fake123", "resp_fake1")
        assert obs.response_model == "m"
        # Chat: 1 chunk naming the call + 3 argument fragments; Responses: 3 fragments.
        assert obs.output_chunks == (4 if "chat" in path else 3)
        assert obs.first_output_at is not None


def test_observer_reads_non_streamed_tool_calls(g: Guarded) -> None:
    g.fake.reply = Reply(tool=TOOL)
    for path, body in [
        ("/v1/chat/completions", {"model": "m", "messages": MESSAGES}),
        ("/v1/responses", {"model": "m", "input": "hi"}),
    ]:
        obs, _ = observe(g, path, body)
        (call,) = obs.requested_tools
        assert (call.tool, call.params) == TOOL
        assert obs.usage.output_tokens == 4
        assert obs.first_output_at is None  # not a stream: no first token to time


def test_parse_names_the_span_and_the_conversation() -> None:
    adapter = OpenAIAdapter(RouteConfig(prefix="/", upstream="http://x", adapter="openai"))

    def parse(body: dict, headers: dict | None = None, path: str = "/v1/chat/completions"):
        return adapter.parse(
            RequestView("POST", path, "", headers or {}, json.dumps(body).encode())
        )

    first = parse({"model": "gpt-test", "messages": MESSAGES})
    later = parse(
        {"model": "gpt-test", "messages": [*MESSAGES, {"role": "assistant", "content": "?"}]}
    )
    other = parse({"model": "gpt-test", "messages": [{"role": "user", "content": "else"}]})
    assert (first.operation, first.span_name, first.model) == ("chat", "chat gpt-test", "gpt-test")
    assert first.fields.conversation_digest == later.fields.conversation_digest
    assert first.fields.conversation_digest != other.fields.conversation_digest
    named = parse({"model": "m", "messages": MESSAGES}, {"x-loopguard-conversation": "c-1"})
    assert named.fields.conversation_id == "c-1"
    responses = parse({"model": "m", "input": "x", "conversation": "conv_9"}, path="/v1/responses")
    assert responses.fields.conversation_id == "conv_9"
    bad = adapter.parse(RequestView("POST", "/v1/chat/completions", "", {}, b"{not json"))
    assert bad.admission_error is not None
    models = adapter.parse(RequestView("GET", "/v1/models", "", {}, b""))
    assert models.operation == "passthrough"


@pytest.mark.parametrize("eol", ["\r\n", "\r"])
def test_hidden_usage_chunk_cut_byte_exact_with_any_line_ending(eol: str) -> None:
    # "\r\n" blank lines cut anywhere, also between their "\r" and "\n": the usage
    # event's bytes go, exactly; every other byte (the "\n" ending the block before it
    # included) reaches the client, whatever the split.
    route = RouteConfig(prefix="/", upstream="http://x", adapter="openai", inject_stream_usage=True)
    adapter = OpenAIAdapter(route)
    body = json.dumps({"model": "m", "messages": MESSAGES, "stream": True}).encode()
    parsed = adapter.parse(RequestView("POST", "/v1/chat/completions", "", {}, body))
    chunk = '{"id":"c","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}'
    usage = '{"id":"c","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1}}'
    shown = f"data: {chunk}{eol}{eol}: ping{eol}{eol}".encode()
    hidden = f"data: {usage}{eol}{eol}".encode()
    done = f"data: [DONE]{eol}{eol}".encode()
    stream = shown + hidden + done
    for cut in range(len(stream) + 1):
        for second in range(cut, len(stream) + 1, 7):
            observer = adapter.observer(parsed, 200, {"content-type": "text/event-stream"})
            pieces = (stream[:cut], stream[cut:second], stream[second:])
            out = b"".join(observer.feed(piece, 1.0) for piece in pieces)
            assert out == shown + done, (cut, second)
            obs = observer.finish()
            assert obs.complete and obs.usage.input_tokens == 5


def test_hidden_usage_chunk_at_every_split_point() -> None:
    # The usage-only chunk cut out wherever the network splits the stream, and every
    # other byte passed on: events complete in a chunk go on at once.
    route = RouteConfig(prefix="/", upstream="http://x", adapter="openai", inject_stream_usage=True)
    adapter = OpenAIAdapter(route)
    body = json.dumps({"model": "m", "messages": MESSAGES, "stream": True}).encode()
    parsed = adapter.parse(RequestView("POST", "/v1/chat/completions", "", {}, body))
    assert parsed.forward_body is not None and parsed.injected_stream_usage
    assert json.loads(parsed.forward_body)["stream_options"] == {"include_usage": True}
    chunk = '{"id":"c","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}'
    last = '{"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'
    usage = '{"id":"c","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1}}'
    shown = f"data: {chunk}\n\n: ping\n\ndata: {last}\n\n".encode()
    hidden = f"data: {usage}\n\n".encode()
    stream = shown + hidden + b"data: [DONE]\n\n"
    ends = [n + 2 for n in range(len(stream)) if stream[n : n + 2] == b"\n\n"]
    for cut in range(len(stream) + 1):
        observer = adapter.observer(parsed, 200, {"content-type": "text/event-stream"})
        first = observer.feed(stream[:cut], 1.0)
        second = observer.feed(stream[cut:], 2.0)
        assert first + second == shown + b"data: [DONE]\n\n"
        # Nothing complete is held back: only the unfinished block is.
        done = max((end for end in ends if end <= cut), default=0)
        assert first == stream[:done].replace(hidden, b"")
        obs = observer.finish()
        assert obs.complete and obs.usage.input_tokens == 5
