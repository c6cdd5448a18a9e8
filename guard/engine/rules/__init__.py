"""The stall rules, in precedence order: the first rule that fires names the verdict.

Each rule is one module with one object satisfying ``Rule`` (``guard.engine.rules.base``).
Adding a rule is that module plus one entry in ``RULES`` below; where it needs a
threshold of its own, a field in ``LoopConfig`` and ``Limits`` too. The detector makes
the one pass over the history that every rule reads (``CallWindow``) and asks the
rules in this order. See docs/architecture.md, "The stall rules".
"""

from __future__ import annotations

from guard.engine.rules.base import CallWindow, Limits, Rule
from guard.engine.rules.error_streak import ERROR_STREAK
from guard.engine.rules.hard_cap import HARD_CAP
from guard.engine.rules.identical_errors import IDENTICAL_ERRORS
from guard.engine.rules.no_progress import NO_PROGRESS
from guard.engine.rules.stalled_repeat import STALLED_REPEAT
from guard.engine.rules.text_loop import TEXT_LOOP

# The most absolute rule first: it names the verdict when several apply.
RULES: tuple[Rule, ...] = (HARD_CAP, IDENTICAL_ERRORS, ERROR_STREAK, STALLED_REPEAT, NO_PROGRESS)

# TEXT_LOOP judges assistant text turns, not calls: named (for its words) but not in
# RULES; guard.engine.conversation asks it.
RULES_BY_NAME: dict[str, Rule] = {rule.name: rule for rule in (*RULES, TEXT_LOOP)}


def tool_wide(rule: Rule) -> bool:
    """A rule asked whatever K's own steps: it reads the tool's steps whatever their
    arguments (``tool_wide = True``) or the whole session (``session_wide = True``)."""
    return bool(getattr(rule, "tool_wide", False) or getattr(rule, "session_wide", False))


def session_wide(rule: Rule) -> bool:
    """A rule whose stall is the session's, not one call's or one tool's."""
    return bool(getattr(rule, "session_wide", False))


__all__ = [
    "RULES",
    "RULES_BY_NAME",
    "TEXT_LOOP",
    "CallWindow",
    "Limits",
    "Rule",
    "session_wide",
    "tool_wide",
]
