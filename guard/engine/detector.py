"""The stall rules (docs/architecture.md, "The stall rules") over a bounded session history.

For a call K = (tool, params_hash), looking only at the last ``window`` steps:

* reset point: the last step that is *not* K and whose (tool, marker) had not been
  seen earlier in the window, i.e. another call brought something new. K's own steps
  never reset K (a poll whose status changes is handled by the marker comparison);
* stalled repeat: K's steps after the reset point whose marker equals the marker of
  K's most recent step; ``>= max_repeats`` blocks;
* identical errors: K's steps after the reset point that failed (any error text);
  ``>= max_identical_errors`` blocks;
* hard cap: K's steps anywhere in the window; ``>= max_identical_calls`` blocks.

Precedence when several apply: hard cap, then identical errors, then stalled repeat
(the most absolute rule names the verdict). ``Verdict.steps`` holds the indexes (in
the history as passed) of the steps the winning rule counted.

One forward pass over at most ``window`` steps; the only allocations are a small set
of markers per tool and the list of K's step indexes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from guard.engine.calls import StallRule, Step, Verdict
from guard.engine.config import LoopConfig


@dataclass(frozen=True, slots=True)
class Limits:
    mode: str
    max_repeats: int
    max_identical_errors: int
    max_identical_calls: int


class Detector:
    def __init__(self, loop_cfg: LoopConfig | None = None) -> None:
        self.cfg = loop_cfg or LoopConfig()
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
        if not mine:
            return self._allow(tool, params_hash)

        enforced = limits.mode == "enforce"
        if len(mine) >= limits.max_identical_calls:
            return Verdict(
                "block", tool, params_hash, StallRule.HARD_CAP, len(mine), enforced, tuple(mine)
            )
        if len(mine) < limits.max_repeats and len(mine) < limits.max_identical_errors:
            return self._allow(tool, params_hash)  # too few to be a stall either way
        recent = [i for i in mine if i > reset] if reset >= 0 else mine
        if not recent:
            return self._allow(tool, params_hash)
        errors = [i for i in recent if history[i].error]
        if len(errors) >= limits.max_identical_errors:
            return Verdict(
                "block",
                tool,
                params_hash,
                StallRule.IDENTICAL_ERRORS,
                len(errors),
                enforced,
                tuple(errors),
            )
        last_marker = history[recent[-1]].marker
        same = [i for i in recent if history[i].marker == last_marker]
        if len(same) >= limits.max_repeats:
            return Verdict(
                "block",
                tool,
                params_hash,
                StallRule.STALLED_REPEAT,
                len(same),
                enforced,
                tuple(same),
            )
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
