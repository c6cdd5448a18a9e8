"""The stateless stall analysis of model conversations (guard.engine.conversation), unit level.

The end-to-end behaviour through the SDKs is in test_model_stalls.py; here the edge
cases of the decision itself: who gets nudged, who gets stopped, and who is left alone.
"""

from __future__ import annotations

import json
from typing import Any

from conversations import LOOP, SEARCH, THINK, Step, anthropic_messages, chat_messages

from adapters.anthropic import AnthropicAdapter
from adapters.openai import OpenAIAdapter
from guard.doors.exchange import Exchange
from guard.engine.calls import Verdict
from guard.engine.config import Config, RouteConfig
from guard.engine.contract import HistoryStep, RequestView
from guard.engine.conversation import analyze
from guard.engine.core import Engine
from guard.engine.problem import stop_text

ROUTE = RouteConfig(prefix="/openai", upstream="http://model", adapter="openai")
ANTHROPIC_ROUTE = RouteConfig(prefix="/anthropic", upstream="http://model", adapter="anthropic")


def engine() -> Engine:
    return Engine(Config.from_mapping({"telemetry": {"records": ""}}))


def history(steps: list[Step]) -> list[HistoryStep]:
    return [HistoryStep(tool, args, result) for tool, args, result in steps]


def parse(messages: list[dict[str, Any]], headers: dict[str, str] | None = None):
    body = json.dumps({"model": "m", "messages": messages}).encode()
    view = RequestView("POST", "/v1/chat/completions", "", headers or {}, body)
    return view, OpenAIAdapter(ROUTE).parse(view)


def test_a_fresh_stall_is_nudged_and_a_continued_one_stopped() -> None:
    e = engine()
    assert analyze(e, history(LOOP[:-1])).action == "serve"
    assert analyze(e, history(LOOP)).action == "nudge"
    assert analyze(e, history([*LOOP, THINK, SEARCH])).action == "stop"
    assert analyze(e, history(LOOP), nudge_first=False).action == "stop"


def test_a_new_user_turn_after_a_stall_is_left_alone() -> None:
    messages = [*chat_messages(LOOP), {"role": "user", "content": "try the other airline"}]
    _, parsed = parse(messages)
    # Only the text tail (the user turn) for the text-loop rule: no tool step to judge.
    assert [step.kind for step in parsed.history or ()] == ["user"]
    assert analyze(engine(), parsed.history).action == "serve"
    _, looping = parse(chat_messages(LOOP))
    assert analyze(engine(), looping.history).action == "nudge"


def test_a_framework_retry_after_a_stop_is_stopped_again_and_a_human_answer_served() -> None:
    """The rule: loopguard's stop answer followed only by user turns no human wrote
    (empty, quoting the stop, a framework's retry prompt) is the same stall; any user
    turn with new human content after the stop is a human answering."""
    e = engine()
    stalled = [*LOOP, LOOP[-1]]  # nudged at LOOP, repeated once more: stopped
    assert analyze(e, history(stalled)).action == "stop"
    verdict = analyze(e, history(stalled)).verdict
    assert verdict is not None
    stop = {"role": "assistant", "content": stop_text(verdict)}
    retries = [
        "Validation feedback:\nSay the status.\n\nFix the errors and try again.",
        "Your previous response failed the application's validation (this is automated"
        " feedback, not a message from the user):\n<pyai:retry_feedback>x</pyai:retry_feedback>",
        f"Invalid JSON: input_value='{stop_text(verdict)[:40]}...'",
        "   ",
    ]
    for retry in retries:
        _, parsed = parse([*chat_messages(stalled), stop, {"role": "user", "content": retry}])
        decision = analyze(e, parsed.history or [])
        assert decision.action == "stop", retry
        assert decision.verdict is not None and decision.verdict.repeats == verdict.repeats
    for human in ["try flight AB124 instead", "ok, what now?"]:
        _, parsed = parse([*chat_messages(stalled), stop, {"role": "user", "content": human}])
        assert [step.kind for step in parsed.history or ()] == ["text", "user"]  # no tools
        assert analyze(e, parsed.history or []).action == "serve", human
    # A human turn anywhere after the stop ends the retry: the request is served.
    mixed = [
        *chat_messages(stalled),
        stop,
        {"role": "user", "content": "try flight AB124 instead"},
        {"role": "user", "content": "Fix the errors and try again."},
    ]
    assert analyze(e, parse(mixed)[1].history or []).action == "serve"
    # A retry prompt with no stop before it is not a stall of loopguard's.
    plain = [*chat_messages(LOOP[:2]), {"role": "assistant", "content": "It is on time."}]
    plain.append({"role": "user", "content": "Fix the errors and try again."})
    assert analyze(e, parse(plain)[1].history or []).action == "serve"


def parse_anthropic(messages: list[dict[str, Any]]):
    body = json.dumps({"model": "m", "max_tokens": 5, "messages": messages}).encode()
    view = RequestView("POST", "/v1/messages", "", {}, body)
    return AnthropicAdapter(ANTHROPIC_ROUTE).parse(view)


def test_an_anthropic_retry_after_a_stop_is_stopped_again_and_a_human_answer_served() -> None:
    """The same rule on the Messages API: loopguard's stop as the assistant's text (a
    string, or the text block the SDK returned), then a retry prompt (a string or text
    blocks) is the same stall; a human's new words after it are served."""
    e = engine()
    stalled = [*LOOP, LOOP[-1]]
    assert analyze(e, parse_anthropic(anthropic_messages(stalled)).history or []).action == "stop"
    verdict = analyze(e, history(stalled)).verdict
    assert verdict is not None
    text = stop_text(verdict)
    stops = [
        {"role": "assistant", "content": text},
        {"role": "assistant", "content": [{"type": "text", "text": text}]},
    ]
    retry = "Validation feedback:\nSay the status.\n\nFix the errors and try again."
    retries = [retry, [{"type": "text", "text": retry}], "   "]
    for stop in stops:
        for prompt in retries:
            messages = [*anthropic_messages(stalled), stop, {"role": "user", "content": prompt}]
            decision = analyze(e, parse_anthropic(messages).history or [])
            assert decision.action == "stop", (stop["content"], prompt)
            assert decision.verdict is not None and decision.verdict.repeats == verdict.repeats
        for human in ["try flight AB124 instead", [{"type": "text", "text": "ok, what now?"}]]:
            messages = [*anthropic_messages(stalled), stop, {"role": "user", "content": human}]
            parsed = parse_anthropic(messages)
            assert analyze(e, parsed.history or []).action == "serve", human
    # A retry prompt with no stop before it is not a stall of loopguard's.
    plain = [*anthropic_messages(LOOP[:2]), {"role": "assistant", "content": "It is on time."}]
    plain.append({"role": "user", "content": "Fix the errors and try again."})
    assert analyze(e, parse_anthropic(plain).history or []).action == "serve"


def test_an_old_stall_of_another_call_does_not_skip_the_nudge() -> None:
    other = ("lookup", {"id": 7}, "same")
    old_stall = [other, other, other, other]  # repeated past its limit earlier on
    decision = analyze(engine(), history([*old_stall, *LOOP]))
    assert decision.action == "nudge"
    assert decision.verdict is not None and decision.verdict.tool == "search"


def test_loopguards_own_stop_answer_in_the_history_counts_as_the_same_outcome() -> None:
    e = engine()
    stop = stop_text(Verdict("block", "search", "h", repeats=3))
    steps = [*LOOP, THINK, (SEARCH[0], SEARCH[1], stop)]
    decision = analyze(e, history(steps))
    assert decision.action == "stop"
    # Without the recognition the stop text would look like a new outcome and reset.
    renamed = [*LOOP, THINK, (SEARCH[0], SEARCH[1], "something else entirely")]
    assert analyze(e, history(renamed)).action == "serve"


async def test_a_conversation_id_derived_from_content_leaves_only_as_a_keyed_pseudonym() -> None:
    e = engine()
    view, parsed = parse(chat_messages(LOOP[:2]))
    digest = parsed.fields.conversation_digest
    exchange = Exchange(e, ROUTE, OpenAIAdapter(ROUTE), view)
    await exchange.admit()
    conversation = exchange.record.conversation_id
    assert conversation is not None and conversation.startswith("conv_")
    assert digest not in conversation
    # Stable within one key, different under another key.
    assert conversation == "conv_" + e.pseudonym(digest)
    assert engine().pseudonym(digest) != e.pseudonym(digest)
    named_view, _ = parse(chat_messages(LOOP[:2]), {"x-loopguard-conversation": "c-42"})
    named = Exchange(e, ROUTE, OpenAIAdapter(ROUTE), named_view)
    await named.admit()
    assert named.record.conversation_id == "c-42"
    await e.aclose()


def test_the_stop_counts_the_times_the_tool_ran_not_loopguards_own_stops() -> None:
    e = engine()
    stop = stop_text(Verdict("block", "search", "h", repeats=3))
    steps = [*LOOP, (SEARCH[0], SEARCH[1], stop), (SEARCH[0], SEARCH[1], stop)]
    decision = analyze(e, history(steps))
    assert decision.action == "stop" and decision.verdict is not None
    ran = sum(1 for step in LOOP if step == SEARCH)
    assert decision.verdict.repeats == ran
    assert f" {ran} times" in stop_text(decision.verdict)


def test_a_stop_in_the_routes_own_words_is_still_known_as_a_stop() -> None:
    """With ``stop_message`` the stop carries no "loopguard stopped this call": the
    engine learns the route's template, so the one count and the retry rule hold."""
    words = "Sorry, our assistant could not finish ({tool} gave the same answer {n} times)."
    route = {"prefix": "/o", "upstream": "http://m", "adapter": "openai", "stop_message": words}
    e = Engine(Config.from_mapping({"telemetry": {"records": ""}, "routes": [route]}))
    verdict = Verdict("block", "search", "h", "stalled_repeat", repeats=3)
    own = stop_text(verdict, words)
    assert "loopguard" not in own
    # The stop as the tool result the agent recorded: the same outcome, not a new one.
    steps = [*LOOP, THINK, (SEARCH[0], SEARCH[1], own)]
    assert analyze(e, history(steps)).action == "stop"
    # The stop as the assistant's answer, then a framework's retry prompt: stopped again.
    stalled = [*LOOP, LOOP[-1]]
    stop = {"role": "assistant", "content": own}
    retry = {"role": "user", "content": "Fix the errors and try again."}
    _, parsed = parse([*chat_messages(stalled), stop, retry])
    assert analyze(e, parsed.history or []).action == "stop"
    # Text that merely resembles it (another tool's answer) is not a stop.
    unrelated = [*LOOP, THINK, (SEARCH[0], SEARCH[1], "Sorry, no flights found.")]
    assert analyze(e, history(unrelated)).action == "serve"
