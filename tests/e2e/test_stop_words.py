"""One count everywhere, a route's own stop wording, and the machine marker of a stop."""

from __future__ import annotations

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
