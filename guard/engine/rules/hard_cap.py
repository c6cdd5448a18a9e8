"""hard cap: K made ``max_identical_calls`` times in the window, whatever the outcomes."""

from __future__ import annotations

from dataclasses import dataclass

from guard.engine.calls import StallRule
from guard.engine.rules.base import CallWindow, Limits


@dataclass(frozen=True, slots=True)
class HardCap:
    name: str = StallRule.HARD_CAP
    words: str = "was made {n} times in this session"

    def min_calls(self, limits: Limits) -> int:
        return limits.max_identical_calls

    def fires(self, window: CallWindow, limits: Limits) -> tuple[int, ...] | None:
        mine = window.mine
        return tuple(mine) if len(mine) >= limits.max_identical_calls else None


HARD_CAP = HardCap()
