"""Stalls read from a model conversation, with no store.

A model request carries the agent's whole history: the tool calls the model made
and the results they got. Replaying that history through the detector tells us
whether the agent is stuck, and whether it already was on an earlier turn:

- the end state would block the latest call, and no earlier step would have been
  blocked: the stall is new -> ``nudge`` (add a guard message, forward);
- the end state would block, and the model already repeated the call past the
  point where it was nudged (an earlier step would have been blocked) -> ``stop``.

A request that asks for the model's next turn after text turns (no tool results) carries
its text tail instead (``HistoryStep.kind`` "text" / "user"): the optional text-loop rule
judges it the same way, nudge first, then stop.

A framework's retry turn after a stop is part of the same stall: when the request's
last turns are loopguard's stop answer followed only by user turns no human wrote
(``is_retry_turn``: empty, quoting the stop, or a framework's retry prompt such as
pydantic-ai's "Validation feedback: ... Fix the errors and try again."), the adapter
hands the tool history before the stop too and the request is judged on it: the stop
stands and is answered again, so the retry never reaches the model (nor the tool).

This is deterministic in the conversation alone, so N replicas agree without
sharing state, and a client that resends the same history gets the same answer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from guard.engine.calls import Step, Verdict
from guard.engine.problem import is_stop_answer, is_stop_text
from guard.engine.rules import RULES_BY_NAME, TEXT_LOOP, session_wide, tool_wide

if TYPE_CHECKING:
    from guard.engine.contract import HistoryStep
    from guard.engine.core import Engine


@dataclass(frozen=True, slots=True)
class StallDecision:
    action: Literal["serve", "nudge", "stop"]
    verdict: Verdict | None = None
    # Steps of the conversation that would already have been blocked.
    stall_points: int = 0


SERVE = StallDecision("serve")


def analyze(
    engine: Engine, history: list[HistoryStep], *, nudge_first: bool = True
) -> StallDecision:
    if not history:
        return SERVE
    if history[-1].kind != "tool":
        if not retry_after_stop(history):
            return _text_loop(engine, history, nudge_first)
        # A framework's retry of a stopped request: judged on the tool history it has.
        tools = [step for step in history if step.kind == "tool"]
        decision = analyze(engine, tools, nudge_first=nudge_first) if tools else SERVE
        if decision.action == "stop":
            return decision
        return _text_loop(engine, [s for s in history if s.kind != "tool"], nudge_first)
    steps: list[Step] = []
    # Per stall (a call's, or a tool-wide rule's on a tool): how many of its steps
    # would already have been blocked.
    stall_points: dict[tuple[str, str], int] = {}
    last_marker: dict[tuple[str, str], Step] = {}
    # Steps whose result is loopguard's own stop: the tool did not run there.
    stopped: set[int] = set()
    for item in history:
        params_hash = item.params_hash or engine.fingerprint(item.params)
        key = (item.tool, params_hash)
        earlier = engine.evaluate(steps, item.tool, params_hash)
        if earlier.action == "block":
            stall = _stall_key(earlier)
            stall_points[stall] = stall_points.get(stall, 0) + 1
        previous = last_marker.get(key)
        if previous is not None and is_stop_answer(item.outcome):
            # The agent recorded our stop as the result: it is the same outcome again,
            # not something new that would reset the stall.
            step = previous
            stopped.add(len(steps))
        else:
            marker = item.marker or engine.marker(item.tool, item.outcome)
            step = Step(item.tool, params_hash, marker, item.error)
        last_marker[key] = step
        steps.append(step)
    last = steps[-1]
    verdict = engine.evaluate(steps, last.tool, last.params_hash)
    if verdict.action != "block":
        return SERVE
    if stopped:
        # One count everywhere: the times the tool actually ran (a stop is not a run).
        ran = sum(1 for index in verdict.steps if index not in stopped)
        verdict = replace(verdict, repeats=ran)
    # Only earlier stalls of this same call (or, for a tool-wide rule, of this tool
    # under that rule) mean the model was already nudged about it.
    points = stall_points.get(_stall_key(verdict), 0)
    if not verdict.enforced:
        # Observe mode: recorded as what would have happened, never acted on.
        return StallDecision("serve", verdict, points)
    if nudge_first and points == 0:
        return StallDecision("nudge", verdict, points)
    return StallDecision("stop", verdict, points)


# Text a framework puts in the user turn it sends on its own after an answer it could
# not use (no human wrote it): pydantic-ai's retry prompts, both its older form
# ("Validation feedback: ... Fix the errors and try again.", "... include your response
# in a tool call") and its newer tagged one ("<pyai:retry_feedback>").
RETRY_PROMPT_MARKERS = (
    "Fix the errors and try again.",
    "Validation feedback:",
    "include your response in a tool call",
    "<pyai:retry_feedback>",
    "automated feedback, not a message from the user",
)


def is_retry_turn(text: object) -> bool:
    """A user turn with no new human content: empty, quoting loopguard's stop back (a
    framework's validation error carries the text it rejected), or a retry prompt."""
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    if not text.strip() or is_stop_text(text):
        return True
    return any(marker in text for marker in RETRY_PROMPT_MARKERS)


def retry_after_stop(tail: list[HistoryStep]) -> bool:
    """The request ends in loopguard's stop answer (an assistant text turn) followed only
    by user turns no human wrote: the framework retrying a stopped request."""
    users = 0
    for turn in reversed(tail):
        if turn.kind == "user":
            if not is_retry_turn(turn.outcome):
                return False  # a human answered: a new turn, served
            users += 1
            continue
        return users > 0 and turn.kind == "text" and is_stop_answer(turn.outcome)
    return False


# The tool a text-loop verdict names (records, spans, the stops metric): no tool was called.
TEXT_TOOL = "(text)"


def _text_loop(engine: Engine, turns: list[HistoryStep], nudge_first: bool) -> StallDecision:
    """The text tail of a request that asks for the model's next turn (no tool results):
    a nudge when the model has given the same answer ``max_text_repeats`` turns running,
    a stop when it gave it again after that (the nudge was ignored)."""
    cfg = engine.config.loop
    limit = cfg.max_text_repeats
    if not limit or cfg.mode == "off":
        return SERVE
    normalized = [
        (turn.kind, engine.marker(TEXT_TOOL, " ".join(str(turn.outcome).casefold().split())))
        for turn in turns
        if not (turn.kind == "text" and is_stop_answer(turn.outcome))
    ]
    run = TEXT_LOOP.run(normalized)
    if len(run) < limit:
        return SERVE
    verdict = Verdict(
        "block",
        TEXT_TOOL,
        normalized[run[-1]][1],
        TEXT_LOOP.name,
        len(run),
        cfg.mode == "enforce",
        run,
    )
    # Turns past the limit: requests that would already have been stopped or nudged.
    points = len(run) - limit
    if not verdict.enforced:
        return StallDecision("serve", verdict, points)
    if nudge_first and points == 0:
        return StallDecision("nudge", verdict, points)
    return StallDecision("stop", verdict, points)


def _stall_key(verdict: Verdict) -> tuple[str, str]:
    rule = RULES_BY_NAME.get(verdict.rule or "")
    if rule is not None and session_wide(rule):
        # Any call may be the one blocked: the nudge was about the session.
        return ("", "rule:" + str(verdict.rule))
    if rule is not None and tool_wide(rule):
        # The arguments vary in a tool-wide stall: the nudge was about the tool.
        return (verdict.tool, "rule:" + str(verdict.rule))
    return (verdict.tool, verdict.params_hash)
