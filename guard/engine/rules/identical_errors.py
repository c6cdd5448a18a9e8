"""identical errors: K failed ``max_identical_errors`` times since the reset point,
whatever the error text (re-running a failing test between edits is not a loop: each
edit is something new and moves the reset point)."""

from __future__ import annotations

from dataclasses import dataclass

from guard.engine.calls import StallRule
from guard.engine.rules.base import CallWindow, Limits


@dataclass(frozen=True, slots=True)
class IdenticalErrors:
    name: str = StallRule.IDENTICAL_ERRORS
    words: str = "failed {n} times with nothing new in between"

    def min_calls(self, limits: Limits) -> int:
        return limits.max_identical_errors

    def fires(self, window: CallWindow, limits: Limits) -> tuple[int, ...] | None:
        history = window.history
        errors = tuple(i for i in window.recent if history[i].error)
        return errors if len(errors) >= limits.max_identical_errors else None


IDENTICAL_ERRORS = IdenticalErrors()
