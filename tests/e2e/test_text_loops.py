"""Text loops on model routes (issue 14, class 4), through the official SDKs.

A model that answers with the same text turn after turn and calls no tool, while the
agent harness keeps replying with the same "continue" prompt, is nudged when the
answer comes the third time running, and stopped if it comes again. The harness reply
is written after OpenHands' headless auto-reply, not copied from a recorded run.
Hard negative: answers of the same shape that say different things are served.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
from fake_models import Guarded, guarded, wait_records

APIS = ["chat", "responses", "anthropic"]
TASK = "Fix the failing test in tests/test_dates.py."
CONTINUE = (
    "Please continue working on the task on whatever approach you think is suitable. "
    "If you think you have solved the task, please finish the interaction."
)
CHANT = "I have fixed the date parsing bug. The tests should now pass."


def conversation(api: str, answers: list[str], last_user: str = CONTINUE) -> list[Any]:
    items: list[Any] = [{"role": "user", "content": TASK}]
    for answer in answers:
        if api == "responses":
            part = {"type": "output_text", "text": answer, "annotations": []}
            items.append({"type": "message", "role": "assistant", "content": [part]})
        elif api == "anthropic":
            items.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        else:
            items.append({"role": "assistant", "content": answer})
        items.append({"role": "user", "content": CONTINUE})
    if last_user != CONTINUE:
        items[-1] = {"role": "user", "content": last_user}
    return items


def send(g: Guarded, api: str, answers: list[str], last_user: str = CONTINUE) -> tuple[str, str]:
    """(x-loopguard-route, the text the agent got)."""
    items = conversation(api, answers, last_user)
    if api == "anthropic":
        c = anthropic.Anthropic(base_url=g.anthropic_base, api_key="k", max_retries=0)
        raw = c.messages.with_raw_response.create(
            model="claude-test", max_tokens=100, messages=items
        )
        text = "".join(b.text for b in raw.parse().content if b.type == "text")
        return raw.headers["x-loopguard-route"], text
    o = openai.OpenAI(base_url=g.openai_base, api_key="k", max_retries=0)
    if api == "chat":
        raw = o.chat.completions.with_raw_response.create(model="gpt-test", messages=items)
        return raw.headers["x-loopguard-route"], raw.parse().choices[0].message.content or ""
    raw = o.responses.with_raw_response.create(model="gpt-test", input=items)
    return raw.headers["x-loopguard-route"], raw.parse().output_text


@pytest.fixture(scope="module")
def running() -> Iterator[Guarded]:
    with guarded(loop={"max_text_repeats": 3}) as g:
        yield g


@pytest.fixture
def g(running: Guarded) -> Guarded:
    running.fake.requests.clear()
    running.records.clear()
    return running


@pytest.mark.parametrize("api", APIS)
def test_the_same_answer_is_nudged_then_stopped(g: Guarded, api: str) -> None:
    assert send(g, api, [CHANT, CHANT])[0] == "serve"
    # Whitespace and case do not make an answer new.
    route, _ = send(g, api, [CHANT, CHANT, "  " + CHANT.upper()])
    assert route == "nudge"
    nudged = g.fake.requests[-1][1]
    assert "same answer 3 turns running" in str(nudged)
    calls = len(g.fake.requests)
    route, text = send(g, api, [CHANT] * 4)
    assert route == "stop_and_review"
    assert len(g.fake.requests) == calls  # the model was not called
    assert "loopguard stopped this call" in text and "same answer 4 turns" in text
    # The agent records the stop and the model chants again: stopped at once.
    route, _ = send(g, api, [CHANT] * 4 + [text, CHANT])
    assert route == "stop_and_review"
    records = wait_records(g, 4)
    assert [r["route"] for r in records] == ["serve", "nudge", "stop_and_review"] * 1 + [
        "stop_and_review"
    ]
    stopped = records[2]
    assert (stopped["stall_rule"], stopped["repeat_count"]) == ("text_loop", 4)
    assert stopped["tool"] == "(text)"


@pytest.mark.parametrize("api", APIS)
def test_different_answers_of_the_same_shape_are_served(g: Guarded, api: str) -> None:
    answers = [f"I checked src/{name}.py: it does not call parse_date." for name in "abcdef"]
    for n in range(1, len(answers) + 1):
        assert send(g, api, answers[:n])[0] == "serve"


@pytest.mark.parametrize("api", APIS)
def test_a_human_answering_starts_the_count_again(g: Guarded, api: str) -> None:
    route, _ = send(g, api, [CHANT] * 3, last_user="No, run the tests and show me the output.")
    assert route == "serve"


def test_off_by_default() -> None:
    with guarded() as plain:
        assert send(plain, "chat", [CHANT] * 6)[0] == "serve"
