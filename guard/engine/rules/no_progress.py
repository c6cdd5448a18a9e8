"""no progress: nothing new came back in the session's last ``no_progress_window`` calls
(issue 14, class 5). Optional, off by default (``[loop] no_progress_window = 0``).

A session can loop without repeating any one call often enough for the other rules: a
rotation of searches and reads that each appear once or twice, none bringing anything
the window had not seen. This breaker reads the whole window: the last step that
brought something new (``CallWindow.fresh``: a new outcome of its tool, or a tool that
changes state tried with new arguments; never a ``think`` step) and blocks the next
call, whichever it is, when W calls have come since. Filler between real progress does
not trip it: each new outcome starts the count again.

Session-wide: asked for every call (the store must hand over the window even for a call
it has never seen: ``Engine.check`` asks for the whole history when this rule is on),
and its stall is the session's, so a model route is nudged once for it, then stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

from guard.engine.calls import StallRule
from guard.engine.rules.base import CallWindow, Limits


@dataclass(frozen=True, slots=True)
class NoProgress:
    name: str = StallRule.NO_PROGRESS
    words: str = "came after {n} calls in this session that brought nothing new"
    stop_words: str = (
        "the last {n} calls in this session brought nothing new, so this one was not "
        "made. Stop and take stock: use what you already have, change your approach, or "
        "tell the user what is blocking you and ask how to proceed."
    )
    nudge_words: str = (
        "The last {n} calls in this session brought nothing you had not already seen. "
        "Calling more tools the same way will not help. Take stock of what you have, "
        "change your approach, or explain to the user what is blocking you."
    )
    session_wide: bool = True

    def min_calls(self, limits: Limits) -> int:
        return 0

    def fires(self, window: CallWindow, limits: Limits) -> tuple[int, ...] | None:
        w = limits.no_progress_window
        if not w:
            return None
        n = len(window.history)
        # Fewer than W steps since the last new one (or in the window): not yet.
        if n - 1 - max(window.fresh, window.start - 1) < w:
            return None
        return tuple(range(n - w, n))


NO_PROGRESS = NoProgress()
