"""One count everywhere, a route's own stop wording, and the machine marker of a stop."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest
from conversations import LOOP, SEARCH, anthropic_messages, chat_messages, responses_input
from fake_models import guarded, wait_records

from guard.engine.calls import Verdict
from guard.engine.config import Config, ConfigError
from guard.engine.problem import STOP_ID_PREFIXES, STOP_SIGNATURE, stop_text

RAN = sum(1 for step in LOOP if step == SEARCH)  # the times the search tool ran in LOOP


def test_nudge_stop_and_record_count_the_times_the_tool_ran() -> None:
    stop = stop_text(Verdict("block", "search", "h", repeats=RAN + 1))
    with guarded() as g:
        c = openai.OpenAI(base_url=g.openai_base, api_key="k", max_retries=0)
        c.chat.completions.create(model="gpt-test", messages=chat_messages(LOOP))
        ((_, nudged),) = g.fake.requests
        assert f"{RAN} times" in nudged["messages"][-1]["content"]
        # The tool ran once more after the nudge; then the agent recorded a stop from a
        # guarded tool route as the result of a further attempt: that one did not run.
        history = [*LOOP, SEARCH, (SEARCH[0], SEARCH[1], stop)]
        answer = c.chat.completions.create(model="gpt-test", messages=chat_messages(history))
        text = answer.choices[0].message.content or ""
        assert f"{RAN + 1} times" in text
        _, stopped = wait_records(g, 2)
        assert stopped["repeat_count"] == RAN + 1


def test_stop_message_is_the_routes_own_words_with_the_count() -> None:
    words = "Sorry, I could not finish: {tool} gave the same answer {n} times ({rule})."
    with guarded(stop_message=words) as g:
        c = openai.OpenAI(base_url=g.openai_base, api_key="k", max_retries=0)
        answer = c.chat.completions.create(
            model="gpt-test", messages=chat_messages([*LOOP, SEARCH])
        )
        expected = f"Sorry, I could not finish: search gave the same answer {RAN + 1} times"
        assert answer.choices[0].message.content == expected + " (stalled_repeat)."
        assert answer.id.startswith("chatcmpl-loopguard-")  # the marker survives the words
        a = anthropic.Anthropic(base_url=g.anthropic_base, api_key="k", max_retries=0)
        message = a.messages.create(
            model="claude-test", max_tokens=5, messages=anthropic_messages([*LOOP, SEARCH])
        )
        assert message.content[0].text.startswith("Sorry, I could not finish: search")
        assert g.fake.requests == []


def test_every_stop_answer_carries_the_marker_in_its_id_and_text() -> None:
    with guarded() as g:
        c = openai.OpenAI(base_url=g.openai_base, api_key="k", max_retries=0)
        chat = c.chat.completions.create(model="gpt-test", messages=chat_messages([*LOOP, SEARCH]))
        response = c.responses.create(model="gpt-test", input=responses_input([*LOOP, SEARCH]))
        a = anthropic.Anthropic(base_url=g.anthropic_base, api_key="k", max_retries=0)
        message = a.messages.create(
            model="claude-test", max_tokens=5, messages=anthropic_messages([*LOOP, SEARCH])
        )
        ids = (chat.id, response.id, message.id)
        assert all(i.startswith(p) for i, p in zip(ids, STOP_ID_PREFIXES, strict=True))
        texts = (chat.choices[0].message.content, response.output_text, message.content[0].text)
        assert all((t or "").startswith(STOP_SIGNATURE) for t in texts)


@pytest.mark.parametrize("bad", ["{tools} ran", "{0} ran", "{n"])
def test_a_stop_message_that_cannot_be_filled_fails_at_start_up(bad: str) -> None:
    route = {"prefix": "/o", "upstream": "http://m", "adapter": "openai", "stop_message": bad}
    with pytest.raises(ConfigError, match="stop_message"):
        Config.from_mapping({"routes": [route]})


def test_on_stop_error_reaches_the_sdk_exception_text() -> None:
    # The SDKs keep only a body's "message" in the exception's text.
    with guarded(on_stop="error") as g:
        c = openai.OpenAI(base_url=g.openai_base, api_key="k", max_retries=0)
        with pytest.raises(openai.UnprocessableEntityError) as raised:
            c.chat.completions.create(model="gpt-test", messages=chat_messages([*LOOP, SEARCH]))
        assert STOP_SIGNATURE in str(raised.value) and f"{RAN + 1} times" in str(raised.value)
        a = anthropic.Anthropic(base_url=g.anthropic_base, api_key="k", max_retries=0)
        with pytest.raises(anthropic.UnprocessableEntityError) as stopped:
            a.messages.create(
                model="claude-test", max_tokens=5, messages=anthropic_messages([*LOOP, SEARCH])
            )
        assert STOP_SIGNATURE in str(stopped.value)


WORDS = "Stopped: {tool} gave the same answer {n} times ({rule})."


def test_stop_message_is_the_mcp_iserror_text_and_the_http_tool_problem_detail() -> None:
    """The route's own wording on tool routes too: the MCP tool error's text, the 422
    problem's detail (and its ``message``); the machine fields stay as they are."""
    from adapters.http_tool import HttpToolAdapter
    from adapters.mcp import McpAdapter
    from guard.engine.config import RouteConfig
    from guard.engine.contract import RequestView

    verdict = Verdict("block", "search", "h", "stalled_repeat", 3)
    expected = "Stopped: search gave the same answer 3 times (stalled_repeat)."
    mcp_route = RouteConfig(prefix="/mcp", upstream="http://t", adapter="mcp", stop_message=WORDS)
    call = {"jsonrpc": "2.0", "id": 7, "method": "tools/call"}
    call["params"] = {"name": "search", "arguments": {"q": "x"}}
    headers = {"accept": "application/json, text/event-stream"}
    request = RequestView("POST", "/mcp", "", headers, json.dumps(call).encode())
    mcp = McpAdapter(mcp_route)
    reply = json.loads(b"".join(mcp.stop_answer(request, mcp.parse(request), verdict).chunks))
    assert reply["result"]["isError"] is True
    assert reply["result"]["content"][0]["text"] == expected
    assert reply["result"]["_meta"]["loopguard/stop"]["repeats"] == 3
    # Without a stop_message: loopguard's own words.
    default = McpAdapter(RouteConfig(prefix="/mcp", upstream="http://t", adapter="mcp"))
    answer = default.stop_answer(request, default.parse(request), verdict)
    text = json.loads(b"".join(answer.chunks))["result"]["content"][0]["text"]
    assert text.startswith(STOP_SIGNATURE)

    http_route = RouteConfig(
        prefix="/tools", upstream="http://t", adapter="http-tool", stop_message=WORDS
    )
    tool_request = RequestView("POST", "/search", "", {}, b'{"q": "x"}', session="s1")
    http = HttpToolAdapter(http_route)
    answer = http.stop_answer(tool_request, http.parse(tool_request), verdict)
    problem = json.loads(b"".join(answer.chunks))
    assert answer.status == 422
    assert problem["detail"] == problem["message"] == expected
    assert (problem["tool"], problem["repeats"], problem["rule"]) == ("search", 3, "stalled_repeat")


def test_stop_message_is_the_422_detail_of_a_model_route_with_on_stop_error() -> None:
    with guarded(stop_message=WORDS, on_stop="error") as g:
        c = openai.OpenAI(base_url=g.openai_base, api_key="k", max_retries=0)
        with pytest.raises(openai.UnprocessableEntityError) as stopped:
            c.chat.completions.create(model="gpt-test", messages=chat_messages([*LOOP, SEARCH]))
        body = stopped.value.body
        assert isinstance(body, dict)
        expected = f"Stopped: search gave the same answer {RAN + 1} times (stalled_repeat)."
        assert body["detail"] == body["message"] == expected
        assert g.fake.requests == []
