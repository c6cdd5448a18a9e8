"""What a record means to the monitor: the one place each per-call definition lives.

Both paths use this module: the live monitor calls the Python functions once per
record, the batch report runs the SQL expressions built here from the same constants
(``SQL``). ``tests/unit/test_monitor_definitions.py`` checks the two agree.

Record fields read (``guard.records.RECORD_FIELDS``):

- the app's decisions, from the ``app`` map (``x-loopguard-app-NAME`` response headers,
  ``-`` -> ``_``): ``route`` (serve / shorten / abstain ...), ``unsafe_claim_served``
  (``"true"``/``"false"``), ``failure_stage`` (the app's first failed stage),
  ``template`` (prompt template; ``prompt_template`` is read when ``template`` is
  absent), ``evidence_version``;
- loopguard's own: ``route`` (serve | nudge | stop_and_review | observe),
  ``failure_stage``, ``stall_rule``, ``tool``, ``model``, ``session``, ``params_hash``,
  ``repeat_count``, ``request_id``, ``trace_id``, ``stream``, ``ttft_ms``, ``total_ms``,
  ``timing_malformed``, ``input_tokens`` (includes cached), ``cached_input_tokens``,
  ``output_tokens``, ``ts`` (ISO 8601 UTC with ``Z``).

Definitions:

- **unsafe serve**: the app says an unsupported claim was served
  (``app.unsafe_claim_served`` is ``true``, any case), or loopguard's route is
  ``observe`` (a stall served anyway in observe mode);
- **abstention**: ``app.route == "abstain"``: counted and shown, never alerted on;
- **first failed stage**: ``app.failure_stage`` when given (non-empty), else loopguard's
  ``failure_stage`` unless it is ``passed`` (not a failure);
- **TTFT**: ``ttft_ms`` of streamed calls (``stream`` true) that have one;
- **post-first-token throughput**: ``(output_tokens - 1) / (total - ttft)`` in tokens
  per second, for calls with more than one output token and both times. A multi-token
  call with ``total <= ttft`` (or one loopguard already flagged ``timing_malformed``)
  is *malformed*: counted apart, never divided;
- **cost**: ``(input - cached) * input + cached * cached_input + output * output`` per
  million tokens, rates from the first rate card whose glob matches ``model``; a
  *billable* call (one with a model or token usage) with no matching card (or no card
  at all) is *unpriced*, never given a price. A plain tool call (no model, no tokens)
  is not billable: neither priced nor unpriced.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any, NamedTuple

from guard.monitor.policy import ANY_NAME, Policy, RateCard

ROUTE_SERVE = "serve"
ROUTE_NUDGE = "nudge"
ROUTE_STOP = "stop_and_review"
ROUTE_OBSERVE = "observe"
ROUTES = (ROUTE_SERVE, ROUTE_NUDGE, ROUTE_STOP, ROUTE_OBSERVE)
APP_ABSTAIN = "abstain"
APP_UNSAFE_TRUE = "true"
NOT_A_FAILURE = ("passed", "none", "")
METRIC_UNSAFE = "unsafe_claim_served"
METRIC_TTFT = "p95_ttft_ms"
METRIC_COST = "window_cost_usd"
# Exemplar fields, in the order an on-call engineer reads them.
EXEMPLAR_FIELDS = (
    "ts",
    "request_id",
    "trace_id",
    "session",
    "model",
    "tool",
    "template",
    "evidence_version",
    "failure_stage",
)


def _app(record: dict[str, Any]) -> dict[str, Any]:
    app = record.get("app")
    return app if isinstance(app, dict) else {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value != "" else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _num(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def parse_ts(value: Any) -> datetime | None:
    """The record's ``ts`` as an aware UTC datetime; None when missing or unparsable."""
    if not isinstance(value, str):
        return None
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        return None
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def is_unsafe(record: dict[str, Any]) -> bool:
    """An unsupported claim served, or a stall served anyway in observe mode."""
    flag = _app(record).get("unsafe_claim_served")
    return (isinstance(flag, str) and flag.lower() == APP_UNSAFE_TRUE) or record.get(
        "route"
    ) == ROUTE_OBSERVE


def app_route(record: dict[str, Any]) -> str | None:
    return _text(_app(record).get("route"))


def is_abstention(record: dict[str, Any]) -> bool:
    return _app(record).get("route") == APP_ABSTAIN


def template(record: dict[str, Any]) -> str | None:
    app = _app(record)
    return _text(app.get("template")) or _text(app.get("prompt_template"))


def first_failed_stage(record: dict[str, Any]) -> str | None:
    """The app's first failed stage where it gave one, else loopguard's real failure."""
    app_stage = _text(_app(record).get("failure_stage"))
    if app_stage:
        return app_stage
    own = _text(record.get("failure_stage"))
    return own if own and own.lower() not in NOT_A_FAILURE else None


def ttft_ms(record: dict[str, Any]) -> float | None:
    return _num(record.get("ttft_ms")) if record.get("stream") is True else None


class Throughput(NamedTuple):
    tps: float | None  # tokens/s after the first; None when not measurable
    malformed: bool


def throughput(record: dict[str, Any]) -> Throughput:
    """Post-first-token throughput, or malformed (never a fallback denominator)."""
    out = _int(record.get("output_tokens"))
    ttft, total = _num(record.get("ttft_ms")), _num(record.get("total_ms"))
    if out is None or out <= 1 or ttft is None or total is None:
        return Throughput(None, record.get("timing_malformed") is True)
    if total <= ttft or record.get("timing_malformed") is True:
        return Throughput(None, True)
    return Throughput((out - 1) / ((total - ttft) / 1000.0), False)


class Tokens(NamedTuple):
    input: int
    cached: int
    output: int


def tokens(record: dict[str, Any]) -> Tokens:
    return Tokens(
        _int(record.get("input_tokens")) or 0,
        _int(record.get("cached_input_tokens")) or 0,
        _int(record.get("output_tokens")) or 0,
    )


def card_index(policy: Policy, model: Any) -> int | None:
    """Index of the rate card pricing ``model`` (first glob match, file order)."""
    name = model if isinstance(model, str) else None
    for i, card in enumerate(policy.rate_cards):
        if card.matches(name):
            return i
    return None


def billable(record: dict[str, Any], t: Tokens) -> bool:
    """A call with a model or token usage: priced by a card, or counted unpriced.

    A plain tool call (no model, no tokens) has nothing to price and is neither.
    """
    return isinstance(record.get("model"), str) or (t.input + t.cached + t.output) > 0


def cost(card: RateCard | None, t: Tokens) -> float | None:
    """USD for one call's tokens; None (unpriced) without a card."""
    return None if card is None else card.cost(t.input, t.cached, t.output)


def nearest_rank(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values: the ceil(q*n)-th smallest.

    ``q`` in 0..1. The rank is rounded to 9 decimals first so 0.3 * 10 is rank 3, as
    DuckDB's ``quantile_disc`` (the batch path) counts it.
    """
    n = len(sorted_values)
    if n == 0:
        return None
    rank = max(1, math.ceil(round(q * n, 9)))
    return sorted_values[min(rank, n) - 1]


def exemplar(record: dict[str, Any]) -> dict[str, Any]:
    """The fields that let an on-call engineer open the call: ids, session, template..."""
    return {
        "ts": record.get("ts"),
        "request_id": record.get("request_id"),
        "trace_id": record.get("trace_id"),
        "session": record.get("session"),
        "model": record.get("model"),
        "tool": record.get("tool"),
        "template": template(record),
        "evidence_version": _text(_app(record).get("evidence_version")),
        "failure_stage": first_failed_stage(record),
    }


def _lit(value: str) -> str:
    """A SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


class SQL:
    """The same definitions as DuckDB expressions over the projected columns (``r``).

    Columns: ``route``, ``failure_stage``, ``stream``, ``ttft_ms``, ``total_ms``,
    ``timing_malformed``, ``input_tokens``, ``cached_input_tokens``, ``output_tokens``,
    ``model`` and the struct ``app``.
    """

    UNSAFE = (
        f"(coalesce(lower(app.unsafe_claim_served) = {_lit(APP_UNSAFE_TRUE)}, false)"
        f" OR coalesce(route = {_lit(ROUTE_OBSERVE)}, false))"
    )
    ABSTAIN = f"coalesce(app.route = {_lit(APP_ABSTAIN)}, false)"
    TEMPLATE = "coalesce(nullif(app.template, ''), nullif(app.prompt_template, ''))"
    STAGE = (
        "coalesce(nullif(app.failure_stage, ''), CASE WHEN lower(failure_stage) IN ("
        + ", ".join(_lit(s) for s in NOT_A_FAILURE)
        + ") THEN NULL ELSE failure_stage END)"
    )
    TTFT = "CASE WHEN stream IS TRUE THEN ttft_ms END"
    _MEASURABLE = "output_tokens > 1 AND ttft_ms IS NOT NULL AND total_ms IS NOT NULL"
    MALFORMED = (
        f"(timing_malformed IS TRUE OR coalesce({_MEASURABLE} AND total_ms <= ttft_ms, false))"
    )
    TPS = (
        f"CASE WHEN {_MEASURABLE} AND total_ms > ttft_ms AND timing_malformed IS NOT TRUE "
        "THEN (output_tokens - 1) / ((total_ms - ttft_ms) / 1000.0) END"
    )
    BILLABLE = (
        "(model IS NOT NULL OR coalesce(input_tokens, 0) + coalesce(cached_input_tokens, 0)"
        " + coalesce(output_tokens, 0) > 0)"
    )
    IN_TOK = "coalesce(input_tokens, 0)"
    CACHED_TOK = "coalesce(cached_input_tokens, 0)"
    OUT_TOK = "coalesce(output_tokens, 0)"

    @staticmethod
    def nearest_rank(sorted_list: str, q: float) -> str:
        """``nearest_rank`` over a sorted SQL list: the same rank, the same rounding."""
        return f"{sorted_list}[greatest(1, ceil(round({q!r} * len({sorted_list}), 9)))::BIGINT]"

    @staticmethod
    def card_index(policy: Policy) -> str:
        """The index of the pricing card, by the same regexes ``RateCard.matches`` uses."""
        if not policy.rate_cards:
            return "CAST(NULL AS INTEGER)"
        arms = []
        for i, card in enumerate(policy.rate_cards):
            cond = " OR ".join(
                # "*" matches every name: no regex per call for the common catch-all card.
                "model IS NOT NULL" if rx == ANY_NAME else f"regexp_full_match(model, {_lit(rx)})"
                for rx in card.regexes
            )
            arms.append(f"WHEN {cond} THEN {i}")
        return "CASE " + " ".join(arms) + " END"

    @staticmethod
    def cost(policy: Policy, card_col: str = "card") -> str:
        """Per-call USD from the card index column: ``RateCard.cost`` as SQL."""
        if not policy.rate_cards:
            return "CAST(NULL AS DOUBLE)"
        arms = []
        for i, c in enumerate(policy.rate_cards):
            arms.append(
                # DOUBLE, in RateCard.cost's order of operations: the same float result.
                f"WHEN {card_col} = {i} THEN (({SQL.IN_TOK} - {SQL.CACHED_TOK})::DOUBLE * "
                f"{c.input_per_million!r}::DOUBLE + {SQL.CACHED_TOK}::DOUBLE * "
                f"{c.cached_input_per_million!r}::DOUBLE + {SQL.OUT_TOK}::DOUBLE * "
                f"{c.output_per_million!r}::DOUBLE) / 1000000.0::DOUBLE"
            )
        return "CASE " + " ".join(arms) + " END"
