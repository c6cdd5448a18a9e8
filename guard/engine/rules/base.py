"""What a stall rule sees and what it must answer.

A rule looks at one call K = (tool, params_hash) in a session's window, through the
``CallWindow`` the detector builds in a single forward pass, and returns the indexes of
the steps it counted when it fires (their number is the verdict's ``repeats``), else
``None``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from guard.engine.calls import Step


@dataclass(frozen=True, slots=True)
class Limits:
    """The thresholds in force for one tool (the loop config, with per-tool overrides)."""

    mode: str
    max_repeats: int
    max_identical_errors: int
    max_identical_calls: int
    max_error_streak: int
    # What counts as something new from this tool's steps (guard.engine.profiles).
    progress: str = "outcome"
    # The session-wide no-progress breaker's W (0: off); the same for every tool.
    no_progress_window: int = 0


class CallWindow:
    """K's steps in the window and the reset points, from the detector's one pass.

    ``mine``: indexes (in ``history``) of K's own steps, oldest first. ``reset``: the
    last step that is not K and brought something new (an outcome the window had not
    seen from its tool, or for a tool that changes state a successful call with new
    arguments), -1 when none did. ``reset_other``: the same, counting only steps of
    tools other than K's (a tool-wide rule reads K's tool's own steps itself).
    ``start``: the first index of the window. ``fresh``: the last step, K's own
    included, that brought something new (-1: none did), for session-wide rules.
    """

    __slots__ = ("_recent", "fresh", "history", "mine", "reset", "reset_other", "start", "tool")

    def __init__(
        self,
        history: Sequence[Step],
        mine: list[int],
        reset: int,
        tool: str = "",
        reset_other: int = -1,
        start: int = 0,
        fresh: int = -1,
    ) -> None:
        self.history = history
        self.mine = mine
        self.reset = reset
        self.tool = tool
        self.reset_other = reset_other
        self.start = start
        self.fresh = fresh
        self._recent: list[int] | None = None

    @property
    def recent(self) -> list[int]:
        """K's steps after the reset point (computed once, shared by the rules)."""
        if self._recent is None:
            reset = self.reset
            self._recent = [i for i in self.mine if i > reset] if reset >= 0 else self.mine
        return self._recent


class Rule(Protocol):
    """One stall rule. ``name`` is its id in verdicts, spans, records and answers."""

    @property
    def name(self) -> str: ...

    @property
    def words(self) -> str:
        """What the call did, for the stop text: ``{n}`` is the count (e.g. "failed {n}
        times with nothing new in between")."""
        ...

    def min_calls(self, limits: Limits) -> int:
        """Below this many of K's own steps the rule cannot fire (lets the detector
        answer most calls without asking any rule). A rule that reads the tool's steps
        whatever their arguments also sets ``tool_wide = True``: it is asked even when K
        has no step in the window, and its stall is the tool's, not the call's; one that
        reads the whole session sets ``session_wide = True`` (asked always, its stall is
        the session's)."""
        ...

    def fires(self, window: CallWindow, limits: Limits) -> tuple[int, ...] | None:
        """The steps counted when the rule fires, else None."""
        ...
