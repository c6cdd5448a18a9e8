"""Stalls read from a model conversation, with no store.

A model request carries the agent's whole history: the tool calls the model made
and the results they got. Replaying that history through the detector tells us
whether the agent is stuck, and whether it already was on an earlier turn:

- the end state would block the latest call, and no earlier step would have been
  blocked: the stall is new -> ``nudge`` (add a guard message, forward);
- the end state would block, and the model already repeated the call past the
  point where it was nudged (an earlier step would have been blocked) -> ``stop``.

This is deterministic in the conversation alone, so N replicas agree without
sharing state, and a client that resends the same history gets the same answer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from guard.engine.calls import Step, Verdict
from guard.engine.problem import is_stop_answer

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
    steps: list[Step] = []
    # Per call: how many of its steps would already have been blocked.
    stall_points: dict[tuple[str, str], int] = {}
    last_marker: dict[tuple[str, str], Step] = {}
    # Steps whose result is loopguard's own stop: the tool did not run there.
    stopped: set[int] = set()
    for item in history:
        params_hash = item.params_hash or engine.fingerprint(item.params)
        key = (item.tool, params_hash)
        if engine.evaluate(steps, item.tool, params_hash).action == "block":
            stall_points[key] = stall_points.get(key, 0) + 1
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
    # Only earlier stalls of this same call mean the model was already nudged about it.
    points = stall_points.get((last.tool, last.params_hash), 0)
    if not verdict.enforced:
        # Observe mode: recorded as what would have happened, never acted on.
        return StallDecision("serve", verdict, points)
    if nudge_first and points == 0:
        return StallDecision("nudge", verdict, points)
    return StallDecision("stop", verdict, points)
