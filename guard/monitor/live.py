"""``LiveMonitor``: the current window and its firing findings, fed one record at a time.

For the live ``/status`` endpoint: ``loopguard serve`` calls ``add(record)`` once per
durable record (from any thread) and ``status()`` when asked. ``add`` is O(1)
amortised and takes one short lock: it classifies the record with the same functions
the batch report's SQL is built from (``guard.monitor.definitions``), bumps counters,
and keeps the window's TTFT and throughput values for exact nearest-rank percentiles.
``status`` builds the same ``WindowStats`` the batch report builds and runs the same
rules (``guard.monitor.findings``), so a live status and ``loopguard report`` over the
same records agree.

Memory is bounded: two windows (current and previous) of counters, at most
``max_samples`` TTFT/throughput values per window (past that, a uniform reservoir:
percentiles become estimates and ``status()`` says ``"exact": false``), at most
``max_streak_keys`` open loop streaks (least recently used dropped) and capped sets of
stopped sessions and unpriced model names.

Windows are fixed, aligned to the Unix epoch, as in the batch report; a record belongs
to the window of its own ``ts``. Records older than the previous window are counted
as ``late_records`` and otherwise ignored.
"""

from __future__ import annotations

import random
import threading
from array import array
from collections import Counter, OrderedDict
from datetime import UTC, datetime, timedelta
from typing import Any

from guard.monitor import definitions as d
from guard.monitor.findings import LoopStats, WindowStats, findings, iso, window_dict
from guard.monitor.policy import NO_POLICY, Policy

_CAP_SET = 10_000


class _Window:
    """Counters of one window (under the monitor's lock)."""

    def __init__(self, start_us: int, width_us: int, max_samples: int) -> None:
        self.start_us, self.width_us, self.max_samples = start_us, width_us, max_samples
        self.requests = self.unsafe = self.abstain = self.streamed = self.malformed = 0
        self.routes: Counter[str] = Counter()
        self.app_routes: Counter[str] = Counter()
        self.stages: Counter[str] = Counter()
        self.ttft = array("d")
        self.tps = array("d")
        self.seen_ttft = self.seen_tps = 0
        self.tokens = [0, 0, 0]
        self.cost = 0.0
        self.priced = self.unpriced = 0
        self.unpriced_models: set[str] = set()
        self.loops = LoopStats()
        self.stopped_sessions: set[str] = set()
        self.streak_cost: float | None = None
        # metric -> (sort key, exemplar)
        self.exemplars: dict[str, tuple[Any, dict[str, Any]]] = {}

    def sample(self, values: array, seen: int, value: float) -> None:
        if len(values) < self.max_samples:
            values.append(value)
        else:  # reservoir: every value kept with equal probability
            j = random.randrange(seen)
            if j < self.max_samples:
                values[j] = value

    def keep_exemplar(self, metric: str, key: Any, record: dict[str, Any]) -> None:
        held = self.exemplars.get(metric)
        if held is None or key < held[0]:
            self.exemplars[metric] = (key, d.exemplar(record))

    def stats(self, policy: Policy) -> WindowStats:
        start = datetime.fromtimestamp(self.start_us / 1e6, UTC)
        ttft, tps = sorted(self.ttft), sorted(self.tps)
        loops = LoopStats(**{**self.loops.__dict__})
        loops.sessions_stopped = len(self.stopped_sessions)
        loops.streak_cost_usd = self.streak_cost
        return WindowStats(
            start=start,
            end=start + timedelta(microseconds=self.width_us),
            requests=self.requests,
            routes=dict(self.routes),
            app_routes=dict(self.app_routes),
            unsafe_serves=self.unsafe,
            abstentions=self.abstain,
            failure_stages=dict(self.stages),
            streamed=self.streamed,
            ttft_p50=d.nearest_rank(ttft, 0.50),
            ttft_p95=d.nearest_rank(ttft, 0.95),
            ttft_p99=d.nearest_rank(ttft, 0.99),
            tps_p5=d.nearest_rank(tps, 0.05),
            tps_p50=d.nearest_rank(tps, 0.50),
            tps_p95=d.nearest_rank(tps, 0.95),
            tps_calls=self.seen_tps,
            malformed_timings=self.malformed,
            input_tokens=self.tokens[0],
            cached_input_tokens=self.tokens[1],
            output_tokens=self.tokens[2],
            cost_usd=self.cost if policy.rate_cards and self.priced else None,
            priced_calls=self.priced,
            unpriced_calls=self.unpriced,
            unpriced_models=sorted(self.unpriced_models),
            loops=loops,
            exemplars={metric: ex for metric, (_key, ex) in self.exemplars.items()},
        )


class LiveMonitor:
    """Current-window figures and firing findings from records as they are written."""

    def __init__(
        self,
        policy: Policy | None,
        *,
        max_samples: int = 200_000,
        max_streak_keys: int = 50_000,
    ) -> None:
        self.policy = policy or NO_POLICY
        self._has_policy = policy is not None
        self._width_us = int(self.policy.window_delta.total_seconds() * 1_000_000)
        self._max_samples = max_samples
        self._max_streak_keys = max_streak_keys
        self._lock = threading.Lock()
        self._current: _Window | None = None
        self._previous: _Window | None = None
        self._late = 0
        self._malformed = 0
        self._cards: dict[str | None, int | None] = {}
        # (session, tool, params_hash) -> [calls, input, cached, output, cost|None]
        self._streaks: OrderedDict[tuple[Any, Any, Any], list[Any]] = OrderedDict()

    # -- feeding ---------------------------------------------------------------------

    def _card(self, model: Any) -> int | None:
        """The card index for a model name, cached (bounded; safe without the lock: a
        lost or repeated cache entry only costs a recomputation)."""
        key = model if isinstance(model, str) else None
        try:
            return self._cards[key]
        except KeyError:
            index = d.card_index(self.policy, key)
            if len(self._cards) >= 1024:
                self._cards.clear()
            self._cards[key] = index
            return index

    def _window_for(self, start_us: int) -> _Window | None:
        cur = self._current
        if cur is None or start_us > cur.start_us:
            self._previous = (
                cur if cur is not None and start_us - cur.start_us == self._width_us else None
            )
            self._current = _Window(start_us, self._width_us, self._max_samples)
            return self._current
        if start_us == cur.start_us:
            return cur
        if self._previous is not None and start_us == self._previous.start_us:
            return self._previous
        return None

    def add(self, record: dict[str, Any]) -> None:
        """Count one durable record (thread-safe, cheap, never raises on bad input)."""
        ts = d.parse_ts(record.get("ts")) if isinstance(record, dict) else None
        if ts is None:
            with self._lock:
                self._malformed += 1
            return
        ts_us = int(ts.timestamp() * 1_000_000)
        start_us = ts_us - ts_us % self._width_us
        route = record.get("route")
        app_route = d.app_route(record)
        unsafe = d.is_unsafe(record)
        abstain = d.is_abstention(record)
        stage = d.first_failed_stage(record)
        ttft = d.ttft_ms(record)
        tput = d.throughput(record)
        tok = d.tokens(record)
        card_i = self._card(record.get("model"))
        card = None if card_i is None else self.policy.rate_cards[card_i]
        cost = d.cost(card, tok)
        billable = d.billable(record, tok)
        key = (record.get("session"), record.get("tool"), record.get("params_hash"))
        policy = self.policy
        with self._lock:
            w = self._window_for(start_us)
            if w is None:
                self._late += 1
                return
            w.requests += 1
            if isinstance(route, str):
                w.routes[route] += 1
            if app_route:
                w.app_routes[app_route] += 1
            if unsafe:
                w.unsafe += 1
                w.keep_exemplar(d.METRIC_UNSAFE, ts_us, record)
            if abstain:
                w.abstain += 1
            if stage:
                w.stages[stage] += 1
            if ttft is not None:
                w.streamed += 1
                w.seen_ttft += 1
                w.sample(w.ttft, w.seen_ttft, ttft)
                if policy.max_p95_ttft_ms is not None and ttft > policy.max_p95_ttft_ms:
                    w.keep_exemplar(d.METRIC_TTFT, ts_us, record)
            if tput.malformed:
                w.malformed += 1
            elif tput.tps is not None:
                w.seen_tps += 1
                w.sample(w.tps, w.seen_tps, tput.tps)
            w.tokens[0] += tok.input
            w.tokens[1] += tok.cached
            w.tokens[2] += tok.output
            if cost is None:
                if billable:
                    w.unpriced += 1
                    if len(w.unpriced_models) < _CAP_SET:
                        w.unpriced_models.add(str(record.get("model")))
            else:
                w.priced += 1
                w.cost += cost
                w.keep_exemplar(d.METRIC_COST, (-cost, ts_us), record)
            self._loops(w, route, record, key, tok, cost)

    def _loops(
        self,
        w: _Window,
        route: Any,
        record: dict[str, Any],
        key: tuple[Any, Any, Any],
        tok: d.Tokens,
        cost: float | None,
    ) -> None:
        if route == d.ROUTE_NUDGE:
            w.loops.nudges += 1
        if route == d.ROUTE_STOP:
            w.loops.stops += 1
            rule, tool, session = (
                record.get("stall_rule"),
                record.get("tool"),
                record.get("session"),
            )
            w.loops.stops_by_rule[str(rule)] = w.loops.stops_by_rule.get(str(rule), 0) + 1
            w.loops.stops_by_tool[str(tool)] = w.loops.stops_by_tool.get(str(tool), 0) + 1
            if session is not None and len(w.stopped_sessions) < _CAP_SET:
                w.stopped_sessions.add(str(session))
            streak = (
                self._streaks.pop(key, None) if key[0] is not None and key[2] is not None else None
            )
            if streak:
                w.loops.streak_calls += streak[0]
                w.loops.streak_input_tokens += streak[1]
                w.loops.streak_output_tokens += streak[3]
                if streak[4] is not None:
                    w.streak_cost = (w.streak_cost or 0.0) + streak[4]
            return
        if key[0] is None or key[2] is None:
            return
        streak = self._streaks.get(key)
        if streak is None:
            streak = self._streaks[key] = [0, 0, 0, 0, None]
            if len(self._streaks) > self._max_streak_keys:
                self._streaks.popitem(last=False)
        else:
            self._streaks.move_to_end(key)
        streak[0] += 1
        streak[1] += tok.input
        streak[2] += tok.cached
        streak[3] += tok.output
        if cost is not None:
            streak[4] = (streak[4] or 0.0) + cost

    # -- reading ---------------------------------------------------------------------

    def status(self, now: datetime | None = None) -> dict[str, Any]:
        """JSON-able: policy, rate card, the current window and its firing findings.

        Keys: ``policy_id`` (None without a policy), ``rate_card`` (version, None
        without cards), ``window`` (its length, e.g. ``"5m"``), ``generated_at``,
        ``window_current`` (the same dict as a window of ``loopguard report --json``:
        ``start``, ``end``, ``requests``, ``unsafe_serves``, ``unsafe_serve_rate``,
        ``abstentions``, ``failure_stages``, ``ttft_ms`` {p50, p95, p99}, ``cost_usd``,
        ``findings`` ...), ``findings`` (the current window's, each with its
        exemplar), ``window_previous`` (the window before, or None),
        ``percentiles_exact``, ``late_records``, ``malformed_records``.

        ``now`` (default: the clock) picks the current window; a window with no
        records yet reports zeros.
        """
        now = now or datetime.now(UTC)
        now_us = int(now.timestamp() * 1_000_000)
        start_us = now_us - now_us % self._width_us
        with self._lock:
            cur, prev = self._current, self._previous
            current = cur.stats(self.policy) if cur and cur.start_us == start_us else None
            if cur and cur.start_us == start_us - self._width_us:
                previous = cur.stats(self.policy)
            elif prev and prev.start_us == start_us - self._width_us:
                previous = prev.stats(self.policy)
            else:
                previous = None
            exact = all(w is None or w.seen_ttft <= w.max_samples for w in (cur, prev))
            late, malformed = self._late, self._malformed
        if current is None:
            start = datetime.fromtimestamp(start_us / 1e6, UTC)
            current = WindowStats(start=start, end=start + timedelta(microseconds=self._width_us))
        cur_dict = window_dict(current, self.policy)
        return {
            "policy_id": self.policy.policy_id if self._has_policy else None,
            "rate_card": self.policy.rate_card_version,
            "window": self.policy.window,
            "generated_at": iso(now),
            "window_current": cur_dict,
            "findings": cur_dict["findings"],
            "window_previous": None if previous is None else window_dict(previous, self.policy),
            "percentiles_exact": exact,
            "late_records": late,
            "malformed_records": malformed,
        }


__all__ = ["LiveMonitor", "findings"]
