"""stalled repeat: K returned the same outcome as its latest ``max_repeats`` times since
the reset point. Filler calls that bring nothing new do not move the reset point, so
A-B-A-B cycles and loops padded with filler are caught; polling whose status changes
is not (its markers differ)."""

from __future__ import annotations

from dataclasses import dataclass

from guard.engine.calls import StallRule
from guard.engine.rules.base import CallWindow, Limits


@dataclass(frozen=True, slots=True)
class StalledRepeat:
    name: str = StallRule.STALLED_REPEAT
    words: str = "returned the same result {n} times in a row with nothing new in between"

    def min_calls(self, limits: Limits) -> int:
        return limits.max_repeats

    def fires(self, window: CallWindow, limits: Limits) -> tuple[int, ...] | None:
        recent = window.recent
        if not recent:
            return None
        history = window.history
        last_marker = history[recent[-1]].marker
        same = tuple(i for i in recent if history[i].marker == last_marker)
        return same if len(same) >= limits.max_repeats else None


STALLED_REPEAT = StalledRepeat()
