"""The rule registry: rules are small objects the detector asks in precedence order."""

from __future__ import annotations

from dataclasses import dataclass

from guard.engine.calls import StallRule, Step, Verdict
from guard.engine.config import LoopConfig
from guard.engine.detector import Detector
from guard.engine.problem import stop_text
from guard.engine.rules import RULES, RULES_BY_NAME, CallWindow, Limits


@dataclass(frozen=True, slots=True)
class BackToBack:
    """A toy rule: K's last two steps are adjacent in the history (no call in between)."""

    name: str = "back_to_back"
    words: str = "was made {n} times back to back"

    def min_calls(self, limits: Limits) -> int:
        return 2

    def fires(self, window: CallWindow, limits: Limits) -> tuple[int, ...] | None:
        mine = window.mine
        return (mine[-2], mine[-1]) if mine[-1] - mine[-2] == 1 else None


def step(tool: str, marker: str, *, h: str = "h1", error: bool = False) -> Step:
    return Step(tool, h, marker, error)


def test_the_built_in_rules_are_registered_in_precedence_order() -> None:
    assert [rule.name for rule in RULES] == [
        StallRule.HARD_CAP,
        StallRule.IDENTICAL_ERRORS,
        StallRule.ERROR_STREAK,
        StallRule.STALLED_REPEAT,
        StallRule.NO_PROGRESS,
    ]
    # text_loop judges turns, not calls: named, not in RULES.
    assert set(RULES_BY_NAME) == {str(rule) for rule in StallRule}


def test_a_new_rule_is_asked_after_the_built_in_ones() -> None:
    detector = Detector(LoopConfig(), rules=(*RULES, BackToBack()))
    # Two identical calls in a row, different outcomes: no built-in rule fires.
    history = [step("search", "m1"), step("search", "m2")]
    verdict = detector.evaluate(history, "search", "h1")
    assert (verdict.action, verdict.rule, verdict.repeats, verdict.steps) == (
        "block",
        "back_to_back",
        2,
        (0, 1),
    )
    # With a call in between the toy rule stays quiet.
    spaced = [step("search", "m1"), step("think", "t"), step("search", "m2")]
    assert detector.evaluate(spaced, "search", "h1").action == "allow"
    # Without the registration it never fires.
    assert Detector(LoopConfig()).evaluate(history, "search", "h1").action == "allow"


def test_precedence_the_first_rule_that_fires_names_the_verdict() -> None:
    # Three identical failures: identical_errors (before stalled_repeat) names it, and
    # a later registered rule that would also fire is not asked.
    history = [step("run", "boom", error=True) for _ in range(3)]
    detector = Detector(LoopConfig(), rules=(*RULES, BackToBack()))
    verdict = detector.evaluate(history, "run", "h1")
    assert verdict.rule == StallRule.IDENTICAL_ERRORS
    assert verdict.repeats == 3


def test_observe_mode_blocks_without_enforcing_whatever_the_rule() -> None:
    detector = Detector(LoopConfig(mode="observe"), rules=(BackToBack(),))
    verdict = detector.evaluate([step("a", "x"), step("a", "y")], "a", "h1")
    assert verdict.action == "block" and not verdict.enforced and not verdict.blocked


def test_stop_text_uses_the_rules_own_words() -> None:
    hard = Verdict("block", "lookup", "h", StallRule.HARD_CAP, 30)
    assert "was made 30 times in this session" in stop_text(hard)
    # A rule that is not registered still gets a readable sentence.
    unknown = Verdict("block", "lookup", "h", "someone_elses_rule", 4)
    assert "was repeated 4 times" in stop_text(unknown)
