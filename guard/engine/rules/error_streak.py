"""error streak: K's tool failed ``max_error_streak`` times in a row with the same error
(the same progress marker: the normalized error text), whatever the arguments, and
nothing new came from any other tool in between (issue 14, class 2: "tool not found"
or "permission denied" for twenty argument shapes is one loop, not twenty calls).

The streak is the tool's latest steps: a success of the tool or a different error ends
it, and so does a step of another tool that brought something new (``reset_other``).
Tool-wide: asked whether or not K itself is in the window; the stall belongs to the
tool, so on a model route the nudge is per tool and rule, not per arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

from guard.engine.calls import StallRule
from guard.engine.rules.base import CallWindow, Limits


@dataclass(frozen=True, slots=True)
class ErrorStreak:
    name: str = StallRule.ERROR_STREAK
    words: str = "failed {n} times in a row with the same error, whatever the arguments"
    tool_wide: bool = True

    def min_calls(self, limits: Limits) -> int:
        return 0

    def fires(self, window: CallWindow, limits: Limits) -> tuple[int, ...] | None:
        history, tool = window.history, window.tool
        stop = max(window.reset_other, window.start - 1)
        streak: list[int] = []
        marker = None
        # Backwards from the latest step: usually the tool's latest step is not an
        # error and this ends at once.
        for i in range(len(history) - 1, stop, -1):
            step = history[i]
            if step.tool != tool:
                continue  # after reset_other: another tool's step with nothing new
            if not step.error or (marker is not None and step.marker != marker):
                break
            marker = step.marker
            streak.append(i)
        if len(streak) < limits.max_error_streak:
            return None
        streak.reverse()
        return tuple(streak)


ERROR_STREAK = ErrorStreak()
