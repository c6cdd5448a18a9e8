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
from guard.engine.rules.stalled_repeat import STALLED_REPEAT

# The most absolute rule first: it names the verdict when several apply.
RULES: tuple[Rule, ...] = (HARD_CAP, IDENTICAL_ERRORS, ERROR_STREAK, STALLED_REPEAT)

RULES_BY_NAME: dict[str, Rule] = {rule.name: rule for rule in RULES}


def tool_wide(rule: Rule) -> bool:
    """A rule that reads the tool's steps whatever their arguments (``tool_wide = True``)."""
    return bool(getattr(rule, "tool_wide", False))


__all__ = ["RULES", "RULES_BY_NAME", "CallWindow", "Limits", "Rule", "tool_wide"]
