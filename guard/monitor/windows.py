"""The batch engine: DuckDB reads the record files and computes every window's figures.

One SQL pass over the JSON lines (DuckDB's own reader: globs, gzip, threads) groups
calls into fixed windows and computes all the figures in ``WindowStats``: counts,
nearest-rank percentiles (``quantile_disc``), token sums, cost, and exemplars
(``arg_min`` by time of the first violating call). Memory is bounded by the windows
(and the TTFT/throughput values of one window at a time), not by the file.

Loop streaks need a second, narrower pass, run only when the first found stops: the
stops (small) are joined against the calls of the same session, tool and parameters.

The SQL is assembled from ``guard.monitor.definitions.SQL``, the same definitions the
live monitor applies in Python.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb

from guard.monitor.definitions import (
    METRIC_COST,
    METRIC_TTFT,
    METRIC_UNSAFE,
    ROUTE_NUDGE,
    ROUTE_STOP,
    SQL,
)
from guard.monitor.findings import LoopStats, WindowStats
from guard.monitor.policy import Policy

# Declared so the schema is the same whether or not a key occurs in any line.
_APP = (
    "STRUCT(route VARCHAR, unsafe_claim_served VARCHAR, failure_stage VARCHAR, "
    "template VARCHAR, prompt_template VARCHAR, evidence_version VARCHAR)"
)
COLUMNS: dict[str, str] = {
    "ts": "VARCHAR",
    "request_id": "VARCHAR",
    "trace_id": "VARCHAR",
    "session": "VARCHAR",
    "route": "VARCHAR",
    "failure_stage": "VARCHAR",
    "tool": "VARCHAR",
    "model": "VARCHAR",
    "params_hash": "VARCHAR",
    "stall_rule": "VARCHAR",
    "stream": "BOOLEAN",
    "input_tokens": "BIGINT",
    "cached_input_tokens": "BIGINT",
    "output_tokens": "BIGINT",
    "ttft_ms": "DOUBLE",
    "total_ms": "DOUBLE",
    "timing_malformed": "BOOLEAN",
    "app": _APP,
}
_STREAK_COLUMNS = ("ts", "session", "tool", "params_hash", "route", "model",
                   "input_tokens", "cached_input_tokens", "output_tokens")  # fmt: skip

_EXEMPLAR = (
    "{'ts': ts, 'request_id': request_id, 'trace_id': trace_id, 'session': session, "
    "'model': model, 'tool': tool, 'template': " + SQL.TEMPLATE + ", "
    "'evidence_version': nullif(app.evidence_version, ''), 'failure_stage': " + SQL.STAGE + "}"
)


class EngineError(RuntimeError):
    """DuckDB could not read the input (e.g. a corrupt gzip stream)."""


@dataclass
class Scan:
    """What one report pass found."""

    windows: list[WindowStats]
    records: int
    malformed: int
    first_ts: datetime | None
    last_ts: datetime | None
    stops: int = 0
    memory_note: str | None = None


def _reader(paths: list[str], columns: dict[str, str]) -> str:
    cols = ", ".join(f"{_q(k)}: {_q(v)}" for k, v in columns.items())
    files = "[" + ", ".join(_q(p) for p in paths) + "]"
    return (
        f"read_json({files}, format='newline_delimited', columns={{{cols}}}, "
        "ignore_errors=true, compression='auto_detect', maximum_object_size=1048576)"
    )


def _q(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ts_literal(ts: datetime) -> str:
    return f"TIMESTAMPTZ {_q(ts.astimezone(UTC).isoformat())}"


# The engine's own memory cap: the report's peak stays bounded whatever the input's size
# (DuckDB spills what it can past it). A window too large for it (its TTFT values are
# kept for exact percentiles) retries once with RETRY_FACTOR times the cap.
DEFAULT_MEMORY = "200MB"
RETRY_FACTOR = 8


def _connect(memory: str) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(":memory:")
    con.execute("SET TimeZone = 'UTC'")
    # Windows are independent: no need to keep the files' order (less memory).
    con.execute("SET preserve_insertion_order = false")
    con.execute(f"SET memory_limit = {_q(memory)}")
    return con


def _calls_sql(
    paths: list[str],
    policy: Policy,
    width_us: int | None,
    since: datetime | None,
    until: datetime | None,
    columns: dict[str, str] = COLUMNS,
    template: str | None = None,
) -> str:
    """Every line with its parsed time ``t``, window ``w`` (NULL: malformed), card, cost."""
    in_range = ["TRUE"]
    if since is not None:
        in_range.append(f"t >= {_ts_literal(since)}")
    if until is not None:
        in_range.append(f"t < {_ts_literal(until)}")
    if template is not None:
        in_range.append(f"{SQL.TEMPLATE} = {_q(template)}")
    window = "0" if width_us is None else f"(epoch_us(t) // {width_us}) * {width_us}"
    return f"""
        WITH lines AS (
            SELECT *, try_cast(ts AS TIMESTAMPTZ) AS t FROM {_reader(paths, columns)}
        ), carded AS (
            SELECT *,
                CASE WHEN t IS NULL THEN NULL ELSE {window} END AS w,
                ({" AND ".join(in_range)}) AS in_range,
                {SQL.card_index(policy)} AS card
            FROM lines
        )
        SELECT *, {SQL.cost(policy)} AS cost FROM carded
        WHERE t IS NULL OR in_range
    """


def scan(
    paths: list[str],
    policy: Policy,
    window: timedelta | None,
    since: datetime | None = None,
    until: datetime | None = None,
    template: str | None = None,
) -> Scan:
    """Aggregate ``paths`` into windows of ``window`` (None: one window for all).

    ``since``/``until`` keep calls with ``since <= ts < until``; ``template`` keeps
    only the calls made with that prompt template (an experiment's candidate).
    """
    width_us = None if window is None else int(window.total_seconds() * 1_000_000)
    ttft_over = (
        f"{SQL.TTFT} > {float(policy.max_p95_ttft_ms)!r}"
        if policy.max_p95_ttft_ms is not None
        else "FALSE"
    )
    stop = f"route = '{ROUTE_STOP}'"
    cost_key = "{'cost': cost, 'early': -epoch_us(t)}"
    # Two levels: calls -> fine groups (window x the categorical fields, a few thousand
    # rows), then fine groups -> windows. Every figure is decomposable this way
    # (percentiles keep their values as lists), and DuckDB needs no per-histogram
    # fan-out of the whole input.
    query = f"""
        CREATE TEMP TABLE agg AS
        WITH calls AS ({_calls_sql(paths, policy, width_us, since, until, template=template)}),
        fine AS (
            SELECT
                w,
                route,
                nullif(app.route, '') AS app_route,
                {SQL.STAGE} AS stage,
                CASE WHEN {stop} THEN coalesce(stall_rule, 'None') END AS stop_rule,
                CASE WHEN {stop} THEN coalesce(tool, 'None') END AS stop_tool,
                CASE WHEN card IS NULL AND {SQL.BILLABLE} THEN coalesce(model, 'None') END
                    AS unpriced_model,
                count(*) AS n,
                min(t) AS first_t, max(t) AS last_t,
                count_if({SQL.UNSAFE}) AS unsafe,
                count_if({SQL.ABSTAIN}) AS abstain,
                list({SQL.TTFT}) FILTER (WHERE {SQL.TTFT} IS NOT NULL) AS ttfts,
                list({SQL.TPS}) FILTER (WHERE {SQL.TPS} IS NOT NULL) AS tpss,
                count_if({SQL.MALFORMED}) AS malformed_timings,
                sum({SQL.IN_TOK}) AS in_tok,
                sum({SQL.CACHED_TOK}) AS cached_tok,
                sum({SQL.OUT_TOK}) AS out_tok,
                sum(cost) AS cost,
                count(cost) AS priced,
                count_if(route = '{ROUTE_NUDGE}') AS nudges,
                count_if({stop}) AS stops,
                list(session) FILTER (WHERE {stop} AND session IS NOT NULL) AS stopped,
                list({{'session': session, 'tool': tool, 'params_hash': params_hash, 't': t}})
                    FILTER (WHERE {stop} AND session IS NOT NULL AND params_hash IS NOT NULL)
                    AS stop_keys,
                arg_min({_EXEMPLAR}, t) FILTER (WHERE {SQL.UNSAFE}) AS ex_unsafe,
                min(t) FILTER (WHERE {SQL.UNSAFE}) AS ex_unsafe_t,
                arg_min({_EXEMPLAR}, t) FILTER (WHERE {ttft_over}) AS ex_ttft,
                min(t) FILTER (WHERE {ttft_over}) AS ex_ttft_t,
                arg_max({_EXEMPLAR}, {cost_key}) FILTER (WHERE cost IS NOT NULL) AS ex_cost,
                max({cost_key}) FILTER (WHERE cost IS NOT NULL) AS ex_cost_k
            FROM calls
            GROUP BY ALL
        )
        SELECT
            w,
            sum(n)::BIGINT AS requests,
            min(first_t) AS first_t, max(last_t) AS last_t,
            list({{'k': route, 'v': n}}) AS routes,
            list({{'k': app_route, 'v': n}}) AS app_routes,
            list({{'k': stage, 'v': n}}) AS stages,
            sum(unsafe)::BIGINT AS unsafe,
            sum(abstain)::BIGINT AS abstain,
            list_sort(flatten(list(ttfts))) AS ttft_sorted,
            list_sort(flatten(list(tpss))) AS tps_sorted,
            sum(malformed_timings)::BIGINT AS malformed_timings,
            sum(in_tok)::BIGINT AS in_tok,
            sum(cached_tok)::BIGINT AS cached_tok,
            sum(out_tok)::BIGINT AS out_tok,
            sum(cost) AS cost,
            sum(priced)::BIGINT AS priced,
            list({{'k': unpriced_model, 'v': n}}) AS unpriced_models,
            sum(nudges)::BIGINT AS nudges,
            sum(stops)::BIGINT AS stops,
            list({{'k': stop_rule, 'v': stops}}) AS stops_by_rule,
            list({{'k': stop_tool, 'v': stops}}) AS stops_by_tool,
            len(list_distinct(flatten(list(stopped)))) AS sessions_stopped,
            flatten(list(stop_keys)) AS stop_keys,
            arg_min(ex_unsafe, ex_unsafe_t) AS ex_unsafe,
            arg_min(ex_ttft, ex_ttft_t) AS ex_ttft,
            arg_max(ex_cost, ex_cost_k) AS ex_cost
        FROM fine
        GROUP BY w
    """
    percentiles = ", ".join(
        f"{SQL.nearest_rank(col, q)} AS {name}"
        for col, qs in (
            ("ttft_sorted", ("p50", "p95", "p99")),
            ("tps_sorted", ("p5", "p50", "p95")),
        )
        for name, q in ((f"{col.split('_')[0]}_{p}", int(p[1:]) / 100) for p in qs)
    )
    memory = os.environ.get("LOOPGUARD_REPORT_MEMORY", DEFAULT_MEMORY)
    try:
        return _run(query, percentiles, memory, paths, policy, width_us, since, until, template)
    except duckdb.OutOfMemoryException:
        bigger = f"{_megabytes(memory) * RETRY_FACTOR}MB"
        try:
            scan_ = _run(
                query, percentiles, bigger, paths, policy, width_us, since, until, template
            )
        except duckdb.OutOfMemoryException as exc:
            raise EngineError(
                f"{str(exc).splitlines()[0]} (set LOOPGUARD_REPORT_MEMORY above {bigger}, "
                "or use shorter windows)"
            ) from None
        scan_.memory_note = f"engine memory raised from {memory} to {bigger} for this input"
        return scan_
    except duckdb.Error as exc:
        raise EngineError(str(exc).splitlines()[0]) from None


def _megabytes(text: str) -> int:
    """``"200MB"`` / ``"1GB"`` / ``"1.5GiB"`` -> megabytes (for the retry's larger cap)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*", text.upper())
    if not match:
        raise EngineError(f"LOOPGUARD_REPORT_MEMORY: not a size: {text!r} (e.g. 200MB, 1GB)")
    scale = {"K": 1 / 1024, "": 1 / 1024 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}
    return max(1, int(float(match.group(1)) * scale[match.group(2)]))


def _run(
    query: str,
    percentiles: str,
    memory: str,
    paths: list[str],
    policy: Policy,
    width_us: int | None,
    since: datetime | None,
    until: datetime | None,
    template: str | None,
) -> Scan:
    con = _connect(memory)
    try:
        con.execute(query)
        rows = con.execute(
            f"SELECT * EXCLUDE (ttft_sorted, tps_sorted), len(ttft_sorted) AS streamed, "
            f"len(tps_sorted) AS tps_calls, {percentiles} FROM agg ORDER BY w NULLS FIRST"
        ).fetchall()
        names = [c[0] for c in con.description or []]
        streaks = _streaks(con, paths, policy, width_us, since, until, template)
    finally:
        con.close()
    windows: list[WindowStats] = []
    malformed = 0
    for row in rows:
        r = dict(zip(names, row, strict=True))
        if r["w"] is None:
            malformed = r["requests"]
            continue
        windows.append(_window(r, width_us, streaks.get(r["w"])))
    return Scan(
        windows=windows,
        records=sum(w.requests for w in windows),
        malformed=malformed,
        first_ts=min((w.start for w in windows), default=None) if windows else None,
        last_ts=max((w.end for w in windows), default=None) if windows else None,
        stops=sum(w.loops.stops for w in windows),
    )


def _streaks(
    con: duckdb.DuckDBPyConnection,
    paths: list[str],
    policy: Policy,
    width_us: int | None,
    since: datetime | None,
    until: datetime | None,
    template: str | None,
) -> dict[int, tuple[int, int, int, float | None]]:
    """Per window of the stop: (calls, input, output tokens, cost) spent in the streaks.

    A stop's streak: the earlier calls (by ``ts``) of the same session, tool and
    params_hash, after that key's previous stop (if any), stops themselves excluded.
    """
    has = con.execute("SELECT count(*) FROM agg WHERE len(stop_keys) > 0").fetchone()
    if not has or not has[0]:
        return {}
    wanted = _STREAK_COLUMNS + (("app",) if template is not None else ())
    columns = {k: v for k, v in COLUMNS.items() if k in wanted}
    in_range = ""
    if since is not None:
        in_range += f" AND c.t >= {_ts_literal(since)}"
    if until is not None:
        in_range += f" AND c.t < {_ts_literal(until)}"
    same_template = "" if template is None else f" AND {SQL.TEMPLATE} = {_q(template)}"
    # Only the lines of sessions that had a stop are kept past the reader; their time,
    # card and cost are computed after the join (few rows), from the same SQL.
    con.execute(
        """
        CREATE TEMP TABLE stops AS
        SELECT w, k.session AS session, k.tool AS tool, k.params_hash AS params_hash, k.t AS t,
               lag(k.t) OVER (PARTITION BY k.session, k.tool, k.params_hash ORDER BY k.t) AS prev
        FROM (SELECT w, unnest(stop_keys) AS k FROM agg WHERE w IS NOT NULL)
        """
    )
    # Streaming filter: only calls of stopped sessions survive the reader (few rows);
    # the join then runs on two small tables.
    con.execute(
        f"""
        CREATE TEMP TABLE streak_calls AS
        SELECT * EXCLUDE (ts), try_cast(ts AS TIMESTAMPTZ) AS t FROM {_reader(paths, columns)}
        WHERE session IN (SELECT DISTINCT session FROM stops)
          AND params_hash IS NOT NULL
          AND route IS DISTINCT FROM '{ROUTE_STOP}'{same_template}
        """
    )
    rows = con.execute(
        f"""
        WITH joined AS (
            SELECT s.w AS sw, c.*, {SQL.card_index(policy)} AS card
            FROM stops s JOIN streak_calls c
              ON c.session = s.session AND c.params_hash = s.params_hash
             AND c.tool IS NOT DISTINCT FROM s.tool
            WHERE c.t < s.t AND (s.prev IS NULL OR c.t > s.prev){in_range}
        )
        SELECT sw, count(*), sum({SQL.IN_TOK}), sum({SQL.OUT_TOK}), sum({SQL.cost(policy)})
        FROM joined GROUP BY sw
        """
    ).fetchall()
    return {int(w): (int(n), int(i or 0), int(o or 0), c) for w, n, i, o, c in rows}


def _counts(pairs: list[dict[str, Any]] | None) -> dict[str, int]:
    """``[{k, v}, ...]`` from the fine groups, summed by key (NULL keys dropped)."""
    out: dict[str, int] = {}
    for pair in pairs or []:
        if pair["k"] is not None and pair["v"]:
            out[pair["k"]] = out.get(pair["k"], 0) + int(pair["v"])
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


def _exemplar(value: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if value is None else dict(value)


def _window(
    r: dict[str, Any], width_us: int | None, streak: tuple[int, int, int, float | None] | None
) -> WindowStats:
    if width_us is None:
        start, end = r["first_t"], r["last_t"]
    else:
        start = datetime.fromtimestamp(r["w"] / 1e6, UTC)
        end = start + timedelta(microseconds=width_us)
    loops = LoopStats(
        nudges=r["nudges"],
        stops=r["stops"],
        stops_by_rule=_counts(r["stops_by_rule"]),
        stops_by_tool=_counts(r["stops_by_tool"]),
        sessions_stopped=r["sessions_stopped"],
    )
    if streak:
        loops.streak_calls, loops.streak_input_tokens, loops.streak_output_tokens = streak[:3]
        loops.streak_cost_usd = streak[3]
    exemplars = {
        metric: ex
        for metric, ex in (
            (METRIC_UNSAFE, _exemplar(r["ex_unsafe"])),
            (METRIC_TTFT, _exemplar(r["ex_ttft"])),
            (METRIC_COST, _exemplar(r["ex_cost"])),
        )
        if ex is not None
    }
    return WindowStats(
        start=start.astimezone(UTC),
        end=end.astimezone(UTC),
        requests=r["requests"],
        routes=_counts(r["routes"]),
        app_routes=_counts(r["app_routes"]),
        unsafe_serves=r["unsafe"],
        abstentions=r["abstain"],
        failure_stages=_counts(r["stages"]),
        streamed=r["streamed"],
        ttft_p50=r["ttft_p50"],
        ttft_p95=r["ttft_p95"],
        ttft_p99=r["ttft_p99"],
        tps_p5=r["tps_p5"],
        tps_p50=r["tps_p50"],
        tps_p95=r["tps_p95"],
        tps_calls=r["tps_calls"],
        malformed_timings=r["malformed_timings"],
        input_tokens=int(r["in_tok"] or 0),
        cached_input_tokens=int(r["cached_tok"] or 0),
        output_tokens=int(r["out_tok"] or 0),
        cost_usd=r["cost"] if r["priced"] else None,
        priced_calls=r["priced"],
        unpriced_calls=sum(_counts(r["unpriced_models"]).values()),
        unpriced_models=sorted(_counts(r["unpriced_models"])),
        loops=loops,
        exemplars=exemplars,
    )
