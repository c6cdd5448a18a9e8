"""text loop (model routes): the model gave the same text ``max_text_repeats`` turns
running without calling a tool (issue 14, class 4: a model "chanting" the same answer,
or a monologue). Optional, off by default (``[loop] max_text_repeats = 0``).

It judges turns, not calls, so it is not in ``RULES``: ``guard.engine.conversation``
reads the text tail of a model request (the assistant and user turns after the last
tool call, ``HistoryStep.kind`` "text" / "user") and asks ``run`` for the current run.

*Near-identical* is exact after normalization: case and whitespace folded, then the
progress marker's volatile patterns (timestamps, ids, counters, durations) removed --
the same notion of "nothing new" as a tool outcome's. Answers that differ in a word
are different answers (a model reporting on file after file is not looping).

A user turn whose text appears once in the tail is a human answering: the run starts
again. A user text that recurs (an agent harness's "Please continue", sent after every
answer) is not. loopguard's own stop answers in the history are skipped, so a
model that keeps chanting after a stop is stopped again at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from guard.engine.calls import StallRule
from guard.engine.rules.base import CallWindow, Limits


@dataclass(frozen=True, slots=True)
class TextLoop:
    name: str = StallRule.TEXT_LOOP
    words: str = "gave the same answer {n} turns running without calling a tool"
    stop_words: str = (
        "you gave the same answer {n} turns running without calling a tool, so this "
        "request was not sent to the model. Do not repeat that answer. Do the next step "
        "with a tool, or tell the user what is blocking you and ask how to proceed."
    )
    nudge_words: str = (
        "You have given the same answer {n} turns running without calling a tool. "
        "Repeating it will not move the task on. Do the next step with a tool, or "
        "explain to the user what is blocking you."
    )

    def min_calls(self, limits: Limits) -> int:
        return 1 << 30  # never a call rule

    def fires(self, window: CallWindow, limits: Limits) -> tuple[int, ...] | None:
        return None

    def run(self, turns: Sequence[tuple[str, str]]) -> tuple[int, ...]:
        """``turns``: (kind, normalized-text marker) oldest first, kind "text" (an
        assistant turn) or "user". The indexes of the latest run of assistant turns with
        the same marker, not broken by another answer or by a new user turn."""
        said: dict[str, int] = {}
        for kind, marker in turns:
            if kind == "user":
                said[marker] = said.get(marker, 0) + 1
        run: list[int] = []
        current = None
        for i, (kind, marker) in enumerate(turns):
            if kind == "user":
                if said[marker] == 1:
                    run, current = [], None  # a human said something new
            elif marker == current:
                run.append(i)
            else:
                run, current = [i], marker
        return tuple(run)


TEXT_LOOP = TextLoop()
