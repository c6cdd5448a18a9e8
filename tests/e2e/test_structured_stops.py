"""A stop for a request that asks for structured output comes as the API's refusal.

Parsing the stop text as the requested JSON would fail with an error that does not
mention loopguard; a refusal is what SDKs and frameworks already report, with its text.
"""

from __future__ import annotations

import anthropic
import openai
from conversations import LOOP, SEARCH, anthropic_messages, chat_messages, responses_input
from fake_models import guarded
from pydantic import BaseModel

from guard.engine.problem import STOP_SIGNATURE

SCHEMA = {
    "type": "json_schema",
    "json_schema": {"name": "status", "schema": {"type": "object"}, "strict": False},
}


class Status(BaseModel):
    flight: str
    status: str


def test_chat_structured_output_gets_a_refusal_the_sdk_reports() -> None:
    with guarded() as g:
        c = openai.OpenAI(base_url=g.openai_base, api_key="k", max_retries=0)
        messages = chat_messages([*LOOP, SEARCH])
        parsed = c.chat.completions.parse(
            model="gpt-test", messages=messages, response_format=Status
        )
        message = parsed.choices[0].message
        assert message.parsed is None and message.content is None
        assert message.refusal is not None and message.refusal.startswith(STOP_SIGNATURE)
        chunks = list(
            c.chat.completions.create(
                model="gpt-test", messages=messages, response_format=SCHEMA, stream=True
            )
        )
        refusal = "".join(ch.choices[0].delta.refusal or "" for ch in chunks if ch.choices)
        assert refusal.startswith(STOP_SIGNATURE)
        assert not any(ch.choices[0].delta.content for ch in chunks if ch.choices)
        # A plain request still gets the text answer.
        plain = c.chat.completions.create(model="gpt-test", messages=messages)
        assert plain.choices[0].message.content.startswith(STOP_SIGNATURE)
        assert plain.choices[0].message.refusal is None
        assert g.fake.requests == []


def test_forced_tool_choice_gets_a_refusal() -> None:
    with guarded() as g:
        c = openai.OpenAI(base_url=g.openai_base, api_key="k", max_retries=0)
        answer = c.chat.completions.create(
            model="gpt-test", messages=chat_messages([*LOOP, SEARCH]), tool_choice="required"
        )
        assert answer.choices[0].message.refusal.startswith(STOP_SIGNATURE)


def test_responses_structured_output_gets_a_refusal_part() -> None:
    with guarded() as g:
        c = openai.OpenAI(base_url=g.openai_base, api_key="k", max_retries=0)
        items = responses_input([*LOOP, SEARCH])
        parsed = c.responses.parse(model="gpt-test", input=items, text_format=Status)
        assert parsed.output_parsed is None
        (part,) = parsed.output[0].content
        assert part.type == "refusal" and part.refusal.startswith(STOP_SIGNATURE)
        text = {"format": {"type": "json_schema", "name": "status", "schema": {"type": "object"}}}
        events = list(c.responses.create(model="gpt-test", input=items, text=text, stream=True))
        deltas = "".join(e.delta for e in events if e.type == "response.refusal.delta")
        assert deltas.startswith(STOP_SIGNATURE)
        assert events[-1].type == "response.completed"
        assert events[-1].response.output[0].content[0].type == "refusal"


def test_anthropic_forced_tool_gets_stop_reason_refusal() -> None:
    with guarded() as g:
        a = anthropic.Anthropic(base_url=g.anthropic_base, api_key="k", max_retries=0)
        messages = anthropic_messages([*LOOP, SEARCH])
        forced = {"type": "tool", "name": "search"}
        message = a.messages.create(
            model="claude-test", max_tokens=5, messages=messages, tool_choice=forced
        )
        assert message.stop_reason == "refusal"
        assert message.content[0].text.startswith(STOP_SIGNATURE)
        with a.messages.stream(
            model="claude-test", max_tokens=5, messages=messages, tool_choice=forced
        ) as stream:
            final = stream.get_final_message()
        assert final.stop_reason == "refusal"
        plain = a.messages.create(model="claude-test", max_tokens=5, messages=messages)
        assert plain.stop_reason == "end_turn"
