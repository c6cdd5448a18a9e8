"""The detector: one pass over a bounded session history, then the stall rules.

For a call K = (tool, params_hash), looking only at the last ``window`` steps, the pass
finds K's own steps and the reset point (the last step that is *not* K and whose
(tool, marker) had not been seen earlier in the window, i.e. another call brought
something new; K's own steps never reset K). The rules (``guard.engine.rules``, in
precedence order: hard cap, identical errors, stalled repeat) read that and the first
that fires names the verdict; ``Verdict.steps`` holds the indexes (in the history as
passed) of the steps it counted. See docs/architecture.md, "The stall rules".

One forward pass over at most ``window`` steps; the only allocations are a small set
of markers per tool and the list of K's step indexes.
"""

from __future__ import annotations

from collections.abc import Sequence

from guard.engine.calls import Step, Verdict
from guard.engine.config import LoopConfig
from guard.engine.rules import RULES, CallWindow, Limits, Rule


class Detector:
    def __init__(self, loop_cfg: LoopConfig | None = None, rules: Sequence[Rule] = RULES) -> None:
        self.cfg = loop_cfg or LoopConfig()
        self.rules = tuple(rules)
        self.window = self.cfg.window
        self._default = Limits(
            self.cfg.mode,
            self.cfg.max_repeats,
            self.cfg.max_identical_errors,
            self.cfg.max_identical_calls,
        )
        self._limits: dict[str, Limits] = {}
        self._allows: dict[tuple[str, str], Verdict] = {}
        for name, o in self.cfg.tools.items():
            d = self._default
            self._limits[name] = Limits(
                o.mode or d.mode,
                o.max_repeats or d.max_repeats,
                o.max_identical_errors or d.max_identical_errors,
                o.max_identical_calls or d.max_identical_calls,
            )
        # Per Limits: fewer of K's steps than this and no rule can fire.
        self._min_calls = {
            limits: min(rule.min_calls(limits) for rule in self.rules)
            for limits in (self._default, *self._limits.values())
        }

    def limits_for(self, tool: str) -> Limits:
        return self._limits.get(tool, self._default)

    def disabled_for(self, tool: str) -> bool:
        return self.limits_for(tool).mode == "off"

    def evaluate(self, history: Sequence[Step], tool: str, params_hash: str) -> Verdict:
        if not history:
            # The common case (the store answers [] for a call not in the window): no
            # step can make a rule fire, so skip the pass and its allocations.
            return self._allow(tool, params_hash)
        limits = self._limits.get(tool, self._default)
        if limits.mode == "off":
            return self._allow(tool, params_hash)
        n = len(history)
        start = n - self.window if n > self.window else 0
        # Markers seen so far, per tool: string lookups only (a (tool, marker) tuple per
        # step would be the costliest thing here). Steps of one tool tend to come in
        # runs, so the tool's set is looked up again only when the tool changes.
        seen: dict[str, set[str]] = {}
        markers: set[str] = set()
        current = None
        mine: list[int] = []  # indexes of K's steps
        reset = -1
        for i, step in enumerate(history[start:] if start else history, start):
            t = step.tool
            if t != current:
                current = t
                markers = seen.get(t)  # type: ignore[assignment]
                if markers is None:
                    markers = seen[t] = set()
            m = step.marker
            if step.params_hash == params_hash and t == tool:
                mine.append(i)
                markers.add(m)
            elif m not in markers:
                markers.add(m)
                reset = i
        if not mine or len(mine) < self._min_calls[limits]:
            return self._allow(tool, params_hash)  # too few for any rule (or none at all)
        window = CallWindow(history, mine, reset)
        for rule in self.rules:
            steps = rule.fires(window, limits)
            if steps is not None:
                enforced = limits.mode == "enforce"
                return Verdict("block", tool, params_hash, rule.name, len(steps), enforced, steps)
        return self._allow(tool, params_hash)

    def _allow(self, tool: str, params_hash: str) -> Verdict:
        # Verdicts are immutable: the allow verdict for a call is built once.
        key = (tool, params_hash)
        verdict = self._allows.get(key)
        if verdict is None:
            if len(self._allows) >= 4096:
                self._allows.clear()
            verdict = self._allows[key] = Verdict("allow", tool, params_hash)
        return verdict


__all__ = ["Detector", "Limits"]
