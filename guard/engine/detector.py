"""The detector: one pass over a bounded session history, then the stall rules.

For a call K = (tool, params_hash), looking only at the last ``window`` steps, the pass
finds K's own steps and the reset point (the last step that is *not* K and whose
(tool, marker) had not been seen earlier in the window, i.e. another call brought
something new; K's own steps never reset K). The rules (``guard.engine.rules``, in
precedence order: hard cap, identical errors, error streak, stalled repeat, no
progress) read that and the first
that fires names the verdict; ``Verdict.steps`` holds the indexes (in the history as
passed) of the steps it counted. See docs/architecture.md, "The stall rules".

One forward pass over at most ``window`` steps; the only allocations are a small set
of markers per tool and the list of K's step indexes.
"""

from __future__ import annotations

from collections.abc import Sequence

from guard.engine.calls import Step, Verdict
from guard.engine.config import LoopConfig, ToolOverride
from guard.engine.profiles import Profile, profile_of
from guard.engine.rules import RULES, CallWindow, Limits, Rule, tool_wide

NO_PROFILE = Profile("")
NO_OVERRIDE = ToolOverride()
_MAX_TOOLS = 4096  # tool names resolved by name and kept (bounded: names come from agents)


class Detector:
    def __init__(self, loop_cfg: LoopConfig | None = None, rules: Sequence[Rule] = RULES) -> None:
        self.cfg = loop_cfg or LoopConfig()
        self.rules = tuple(rules)
        # Rules that may fire when K has too few steps of its own (or none).
        self._tool_rules = tuple(rule for rule in self.rules if tool_wide(rule))
        self.window = self.cfg.window
        cfg = self.cfg
        self._default = Limits(
            cfg.mode,
            cfg.max_repeats,
            cfg.max_identical_errors,
            cfg.max_identical_calls,
            cfg.max_error_streak,
            no_progress_window=cfg.no_progress_window,
        )
        # Per tool, resolved on first sight: configured tools now, others by name.
        self._limits: dict[str, Limits] = {name: self._resolve(name) for name in cfg.tools}
        self._configured = len(self._limits)
        # Per Limits: fewer of K's steps than this and no call rule can fire.
        self._min_calls: dict[Limits, int] = {}

    def _resolve(self, tool: str) -> Limits:
        """The tool's limits: its own overrides, over its profile's, over ``[loop]``."""
        cfg, d = self.cfg, self._default
        override = cfg.tools.get(tool)
        configured = override.profile if override is not None else None
        p = profile_of(tool, configured, cfg.profile_names) or NO_PROFILE
        o = override if override is not None else NO_OVERRIDE
        # A value written in [loop] holds for every tool: a profile's preset only
        # replaces [loop]'s built-in default.
        explicit = cfg.model_fields_set

        def pick(key: str) -> int:
            own = getattr(o, key)
            if own is not None:
                return int(own)
            preset = getattr(p, key)
            if preset is not None and key not in explicit:
                return int(preset)
            return int(getattr(d, key))

        return Limits(
            o.mode or d.mode,
            pick("max_repeats"),
            pick("max_identical_errors"),
            pick("max_identical_calls"),
            pick("max_error_streak"),
            p.progress,
            d.no_progress_window,
        )

    def limits_for(self, tool: str) -> Limits:
        limits = self._limits.get(tool)
        if limits is None:
            if len(self._limits) >= _MAX_TOOLS + self._configured:
                # Bounded: configured tools stay, the ones resolved by name are redone.
                self._limits = {name: self._resolve(name) for name in self.cfg.tools}
            limits = self._limits[tool] = self._resolve(tool)
        return limits

    def disabled_for(self, tool: str) -> bool:
        return self.limits_for(tool).mode == "off"

    def _min_calls_for(self, limits: Limits) -> int:
        found = self._min_calls.get(limits)
        if found is None:
            call_rules = [rule for rule in self.rules if not tool_wide(rule)]
            found = min((rule.min_calls(limits) for rule in call_rules), default=1 << 30)
            self._min_calls[limits] = found
        return found

    def evaluate(self, history: Sequence[Step], tool: str, params_hash: str) -> Verdict:
        # An allow verdict is built per call, not cached per (tool, params hash): nearly
        # every call is new, so such a cache mostly missed, and each miss kept a key and
        # a verdict alive (more work for the garbage collector than its hits saved).
        if not history:
            # The common case (the store answers [] for a call not in the window): no
            # step can make a rule fire, so skip the pass and its allocations.
            return Verdict("allow", tool, params_hash)
        limits = self._limits.get(tool) or self.limits_for(tool)
        if limits.mode == "off":
            return Verdict("allow", tool, params_hash)
        n = len(history)
        start = n - self.window if n > self.window else 0
        # Markers seen so far, per tool: string lookups only (a (tool, marker) tuple per
        # step would be the costliest thing here). Steps of one tool tend to come in
        # runs, so the tool's sets are looked up again only when the tool changes.
        seen: dict[str, set[str]] = {}
        markers: set[str] = set()
        # A tool that changes state: the arguments of its steps so far (else None).
        tried: dict[str, set[str]] = {}
        attempts: set[str] | None = None
        counts = True  # the tool's new outcomes are something new (not filler)
        current = None
        mine: list[int] = []  # indexes of K's steps
        reset = reset_other = fresh = -1
        for i, step in enumerate(history[start:] if start else history, start):
            t = step.tool
            if t != current:
                current = t
                markers = seen.get(t)  # type: ignore[assignment]
                if markers is None:
                    markers = seen[t] = set()
                progress = (self._limits.get(t) or self.limits_for(t)).progress
                counts = progress != "none"
                attempts = tried.setdefault(t, set()) if progress == "attempt" else None
            m = step.marker
            if step.params_hash == params_hash and t == tool:
                mine.append(i)
                if m not in markers:
                    markers.add(m)
                    if counts:
                        fresh = i  # K's own new outcome: progress for the session
            elif attempts is not None:
                new = m not in markers
                if new:
                    markers.add(m)
                h = step.params_hash
                if h not in attempts:
                    attempts.add(h)
                    new = new or not step.error  # a successful new attempt
                if new:
                    reset = i
                    if t != tool:
                        reset_other = i
            elif m not in markers:
                markers.add(m)
                if counts:
                    reset = i
                    if t != tool:
                        reset_other = i
        if len(mine) < (self._min_calls.get(limits) or self._min_calls_for(limits)):
            rules = self._tool_rules  # too few of K's own steps for the call rules
            if not rules:
                return Verdict("allow", tool, params_hash)
        else:
            rules = self.rules
        window = CallWindow(history, mine, reset, tool, reset_other, start, max(fresh, reset))
        for rule in rules:
            steps = rule.fires(window, limits)
            if steps is not None:
                enforced = limits.mode == "enforce"
                return Verdict("block", tool, params_hash, rule.name, len(steps), enforced, steps)
        return Verdict("allow", tool, params_hash)


__all__ = ["Detector", "Limits"]
