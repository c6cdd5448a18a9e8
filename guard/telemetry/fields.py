"""What telemetry shows of a ``CallRecord``: each field declared once, three projections.

A call leaves loopguard three ways: span attributes, metric attributes and one durable
record. ``FIELDS`` says, for every fact about a call, where it goes (the record's key,
the span attribute, whether it is also a metric attribute) and how it is read (a
``CallRecord`` attribute as it is, or a function of the record). ``Projections`` turns
the table into the three projections once, at import, as precomputed tuples: per call
there is no reflection, only the reads the table names.

Rules the table keeps:

* The durable record's keys and their order are ``RECORD_FIELDS``: ``CALL_FIELDS``
  (filled by the records sink from the call), then the table's record keys in table
  order. A monitor reads these lines: append, never rename or reorder.
* A span attribute whose value is None is left off; a record key is always present.
* Metric attributes are low-cardinality only: never a session, hash, marker or id.
* Where the span and the record show one fact differently (milliseconds against
  seconds, the GenAI operation against loopguard's own), they are two rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from guard.engine.calls import CallRecord, FailureStage, Route
from guard.telemetry.semconv import (
    ATTR_CACHE_READ_TOKENS,
    ATTR_CONVERSATION_ID,
    ATTR_ERROR_TYPE,
    ATTR_FINISH_REASONS,
    ATTR_HTTP_STATUS,
    ATTR_INPUT_TOKENS,
    ATTR_JSONRPC_ID,
    ATTR_MCP_METHOD,
    ATTR_MCP_SESSION,
    ATTR_OPERATION,
    ATTR_OUTPUT_TOKENS,
    ATTR_PROVIDER,
    ATTR_REQUEST_MODEL,
    ATTR_RESPONSE_ID,
    ATTR_RESPONSE_MODEL,
    ATTR_SERVER_ADDRESS,
    ATTR_SERVER_PORT,
    ATTR_STREAM,
    ATTR_TOOL_NAME,
    ATTR_TTFC,
    LG_FAILURE_STAGE,
    LG_OUTPUT_THROUGHPUT,
    LG_PARAMS_HASH,
    LG_PROGRESS_MARKER,
    LG_REPEAT_COUNT,
    LG_ROUTE,
    LG_SCRUB_POLICY,
    LG_SESSION_TRACKED,
    LG_STALL_RULE,
    LG_TIMING_MALFORMED,
    LG_USAGE_SOURCE,
    OP_CHAT,
    OP_EXECUTE_TOOL,
)

Reader = Callable[[CallRecord], Any]

# Failure stages that are not an error of the call itself: a stop by the guard is the
# guard working (it shows as the route and the failure stage), not the call failing.
NOT_ERRORS = frozenset({FailureStage.PASSED, FailureStage.LOOP_GUARD})

# The durable record's first keys: facts of the call (its time and ids), not of the
# CallRecord. The records sink fills them; ``ts`` first so lines sort and diff well.
CALL_FIELDS = ("ts", "event", "request_id", "trace_id", "span_id")


@dataclass(frozen=True, slots=True)
class Field:
    """One fact about a call. ``record``/``span``: its key in the durable record and its
    span attribute (None: not there). The value is the ``CallRecord`` attribute ``attr``
    as it is, else ``expr`` (a Python expression over the record ``r``, written in this
    module's table: the generated projections inline it, no call per field), else
    ``get(record)``. ``span_as`` converts a value that is not None for
    the span (returning None leaves it off). ``metric``: also a metric attribute;
    ``metric_with``: only when that other metric attribute is present."""

    record: str | None = None
    span: str | None = None
    attr: str | None = None
    # ``attr`` is of the record's ``within`` object (its usage), None without one (None
    # or false): the span projections test a run of such fields for it once.
    within: str | None = None
    get: Reader | None = None
    expr: str | None = None
    span_as: Callable[[Any], Any] | None = None
    metric: bool = False
    metric_with: str | None = None
    # The record carries only a keyed pseudonym of the value (sessions).
    pseudonym: bool = False
    # Its values hardly ever repeat (hashes, markers, per-message ids): the span writer
    # writes each one, without looking it up first.
    varies: bool = False

    def __post_init__(self) -> None:
        if self.within is not None and (self.attr is None or self.expr or self.get):
            raise ValueError(f"field {self.record or self.span}: within goes with attr only")

    def reader(self) -> Reader:
        if self.get is not None:
            return self.get
        if self.expr is not None:
            return _expression_reader(self.expr)
        if self.within is not None:
            return _expression_reader(_read_expr(self, 0, {}))
        if self.attr is None:
            raise ValueError(f"field {self.record or self.span}: give attr or get")
        return attrgetter(self.attr)


# Readers the generated projections inline as expressions over the record ``r`` (no
# call per field); the functions below are built from the same text, for other callers.
# gen_ai.operation.name: None where the call is not a GenAI operation (passthrough,
# MCP methods other than tools/call).
_GEN_AI_OPERATION = (
    "(_OPERATIONS.get(r.operation) if r.operation != 'mcp' else"
    " _EXECUTE_TOOL if r.mcp_method == 'tools/call' or (r.mcp_method is None and r.tool)"
    " else None)"
)
# error.type: the caller's low-cardinality error, else the failure stage.
_ERROR_TYPE = (
    "(r.error_type if r.failure_stage in NOT_ERRORS else r.error_type or str(r.failure_stage))"
)


# The names a field's ``expr`` may use besides builtins.
_EXPR_NAMES: dict[str, Any] = {
    "NOT_ERRORS": NOT_ERRORS,
    "_OPERATIONS": {"chat": OP_CHAT, "execute_tool": OP_EXECUTE_TOOL},
    "_EXECUTE_TOOL": OP_EXECUTE_TOOL,
    # A route's or failure stage's text: ``str()`` of the member, looked up
    # (``_TEXT.get(x) or str(x)``): ``str()`` copies the text, and the copy is hashed
    # again by every cache it is looked up in.
    "_TEXT": {member: str(member) for enum in (Route, FailureStage) for member in enum},
}


def _expression_reader(expr: str) -> Reader:
    reader: Reader = eval(f"lambda r: {expr}", dict(_EXPR_NAMES))
    return reader


gen_ai_operation: Reader = _expression_reader(_GEN_AI_OPERATION)
gen_ai_operation.__doc__ = "gen_ai.operation.name for a record (None: not a GenAI operation)."
error_type: Reader = _expression_reader(_ERROR_TYPE)
error_type.__doc__ = "error.type: the caller's low-cardinality error, else the failure stage."


def _str_tuple(values: Iterable[Any]) -> tuple[str, ...] | None:
    return (tuple(map(str, values)) or None) if values else None


# A conversion's result type where the conversion is not a type itself.
_CONVERTED_TYPES: dict[Callable[[Any], Any], type] = {_str_tuple: tuple}

# fmt: off
FIELDS: tuple[Field, ...] = (
    Field("session", attr="session", pseudonym=True),
    Field("session_tracked", LG_SESSION_TRACKED, attr="session_tracked", span_as=bool),
    # Either the agent's own id or a keyed pseudonym (guard.doors.exchange): never content.
    Field("conversation_id", ATTR_CONVERSATION_ID, attr="conversation_id"),
    Field("route", LG_ROUTE, expr="_TEXT.get(r.route) or str(r.route)"),
    Field("failure_stage", LG_FAILURE_STAGE,
          expr="_TEXT.get(r.failure_stage) or str(r.failure_stage)"),
    Field("error_type", attr="error_type"),
    Field(span=ATTR_ERROR_TYPE, expr=_ERROR_TYPE, metric=True),
    Field("status_code", ATTR_HTTP_STATUS, attr="status_code", span_as=int),
    Field("operation", attr="operation"),
    Field(span=ATTR_OPERATION, expr=_GEN_AI_OPERATION, metric=True),
    Field("tool", ATTR_TOOL_NAME, attr="tool"),
    Field("model", ATTR_REQUEST_MODEL, attr="model", metric=True),
    Field("response_model", ATTR_RESPONSE_MODEL, attr="response_model"),
    Field("response_id", ATTR_RESPONSE_ID, attr="response_id", varies=True),
    Field("provider", ATTR_PROVIDER, attr="provider", metric=True),
    Field("mcp_method", ATTR_MCP_METHOD, attr="mcp_method"),
    Field(span=ATTR_MCP_SESSION, attr="mcp_session_id"),
    Field(span=ATTR_JSONRPC_ID, attr="jsonrpc_request_id", span_as=str, varies=True),
    Field(span=ATTR_SERVER_ADDRESS, attr="server_address", metric=True),
    # Conditionally required with server.address (semconv).
    Field(span=ATTR_SERVER_PORT, attr="server_port", span_as=int,
          metric=True, metric_with=ATTR_SERVER_ADDRESS),
    Field("params_hash", LG_PARAMS_HASH, attr="params_hash", varies=True),
    Field("progress_marker", LG_PROGRESS_MARKER, attr="progress_marker", varies=True),
    Field("repeat_count", LG_REPEAT_COUNT, attr="repeat_count", span_as=int),
    Field("stall_rule", LG_STALL_RULE, expr="str(r.stall_rule) if r.stall_rule else None"),
    Field("stream", ATTR_STREAM, attr="stream", span_as=bool),
    # The span's read: no list made, no conversion called, for none (the usual call).
    Field("finish_reasons", expr="list(r.finish_reasons)"),
    Field(span=ATTR_FINISH_REASONS, expr="r.finish_reasons or None", span_as=_str_tuple),
    Field("input_tokens", ATTR_INPUT_TOKENS, attr="input_tokens", within="usage", span_as=int),
    Field("output_tokens", ATTR_OUTPUT_TOKENS, attr="output_tokens", within="usage",
          span_as=int),
    Field("cached_input_tokens", ATTR_CACHE_READ_TOKENS, attr="cached_input_tokens",
          within="usage", span_as=int),
    # The record says "absent" without usage; the span then has no such attribute.
    Field("usage_source", expr="r.usage.source if r.usage else 'absent'"),
    Field(span=LG_USAGE_SOURCE, attr="source", within="usage"),
    # Seconds as milliseconds, rounded to the microsecond (inline: no call per record).
    Field("ttft_ms", expr="None if r.ttft_s is None else round(r.ttft_s * 1000.0, 3)"),
    Field(span=ATTR_TTFC, attr="ttft_s", span_as=float),
    Field("total_ms", expr="None if r.total_s is None else round(r.total_s * 1000.0, 3)"),
    Field("output_tps", LG_OUTPUT_THROUGHPUT, attr="output_tps", span_as=float),
    Field("output_chunks", attr="output_chunks"),
    # On the span only when true (read so: no conversion called for the usual false).
    Field("timing_malformed", attr="timing_malformed"),
    Field(span=LG_TIMING_MALFORMED, expr="r.timing_malformed or None", span_as=bool),
    # On spans the app's fields are attributes of their own, under the app namespace.
    Field("app", expr="dict(r.app)"),
    # The policy the call was scrubbed under, so a record says how to read its hashes.
    Field("scrub_policy", LG_SCRUB_POLICY, attr="scrub_policy"),
)
# fmt: on


def _record_function(recorded: Sequence[Field]) -> Callable[..., dict[str, Any]]:
    """The record projection as one generated function: a single dict display in the
    record's order, each value read as the table says (an attribute, a reader, the
    keyed pseudonym of either). Per call no template copy, no loop over the table.

    Only the table goes into the source: record keys as string literals, attributes
    checked to be identifiers, the table's own expressions, readers passed in by name."""
    env: dict[str, Any] = dict(_EXPR_NAMES)
    items = [f"{key!r}: {key}" for key in CALL_FIELDS]
    for i, f in enumerate(recorded):
        value = _read_expr(f, i, env)
        if f.pseudonym:
            value = f"(hasher(_v) if (_v := {value}) else None)"
        items.append(f"{f.record!r}: {value}")
    # The call's fields default to None (a projection without a call: tests, tools).
    params = ", ".join(f"{key}=None" for key in CALL_FIELDS)
    source = f"def record(r, hasher, {params}):\n    return {{{', '.join(items)}}}\n"
    return _compile(source, "record", env)


# Conversions that never give None: the value is present once it was read so.
_NEVER_NONE: frozenset[Callable[[Any], Any]] = frozenset({bool, int, float, str})


def _span_value_lines(
    f: Field, i: int, env: dict[str, Any], indent: str = "    ", read: str | None = None
) -> tuple[list[str], str]:
    """Generated lines setting ``v`` to field ``f``'s span value (the read, then the
    field's conversion unless the value is None) and testing it is not None; and the
    indent of what follows when it is not (the span and metric projections all start
    so). ``read``: the read's source, when not the field's own (``_span_lines``)."""
    inner = indent + "    "
    if read is None:
        read = _read_expr(f, i, env)
    lines = [f"{indent}v = {read}", f"{indent}if v is not None:"]
    if f.span_as in _NEVER_NONE:
        # A type: a value of it already (the usual) is not converted (no call).
        env[f"_as{i}"] = f.span_as
        lines += [f"{inner}if type(v) is not _as{i}:", f"{inner}    v = _as{i}(v)"]
    elif f.span_as is not None:
        env[f"_as{i}"] = f.span_as
        lines += [f"{inner}v = _as{i}(v)", f"{inner}if v is not None:"]
        inner += "    "
    return lines, inner


def _span_lines(
    spans: Sequence[Field], env: dict[str, Any], set_value: Callable[[int, Field], str]
) -> list[str]:
    """The span projections' body: per field ``_span_value_lines``, then
    ``set_value(i, f)`` (the line using ``v``) where it is not None. A run of fields
    ``within`` one object reads it once and, without it (no usage: most calls), skips
    them with one test."""
    lines: list[str] = []
    run: str | None = None
    for i, f in enumerate(spans):
        if f.within is None:
            run = None
            head, inner = _span_value_lines(f, i, env)
        else:
            if f.within != run:
                run = f.within
                _check_name(f.within, f)
                lines += [f"    w = r.{run}", "    if w:"]
            _check_name(f.attr, f)
            head, inner = _span_value_lines(f, i, env, "        ", f"w.{f.attr}")
        lines += head
        lines.append(f"{inner}{set_value(i, f)}")
    return lines


def _span_function(spans: Sequence[Field]) -> Callable[[CallRecord], dict[str, Any]]:
    """The span projection as one generated function: per field a read, the
    conversion when there is one, and the attribute set unless the value is None."""
    env: dict[str, Any] = dict(_EXPR_NAMES)
    lines = ["def span(r):", "    a = {}"]
    lines += _span_lines(spans, env, lambda i, f: f"a[{f.span!r}] = v")
    lines.append("    return a")
    return _compile("\n".join(lines) + "\n", "span", env)


# A field writer (``Projections.span_writer``): for an attribute key and the one type
# its values have after the field's conversion (None: not fixed, or not worth caching),
# a lookup of the attribute's written form by value (None: not there) and the writer
# of a value the lookup did not have.
FieldWriter = Callable[[str, type | None], tuple[Callable[[Any], Any], Callable[[Any], Any]]]


def _span_type(f: Field) -> type | None:
    """The type a span value of ``f`` always has (None: not fixed by the table, values
    that vary, or a float: floats are not cached, -0.0 equals 0.0)."""
    if f.varies:
        return None
    if f.span_as is None:
        return str  # the reads the table names give strings (or None)
    found = f.span_as if isinstance(f.span_as, type) else _CONVERTED_TYPES.get(f.span_as)
    return None if found is float else found


def _span_writer_function(spans: Sequence[Field], writer: FieldWriter) -> Callable[..., Any]:
    """The span projection as one generated function writing each attribute at once:
    per field the read, the conversion, and, unless the value is None, its written
    form: looked up by value, else written (``writer``'s pair for the field)."""
    env: dict[str, Any] = dict(_EXPR_NAMES)
    lines = ["def span(r):", "    o = []", "    add = o.append"]

    def add(i: int, f: Field) -> str:
        kind = _span_type(f)
        cached, write = writer(f.span or "", kind)
        env[f"_w{i}"] = write
        if kind is None:
            return f"add(_w{i}(v))"
        env[f"_c{i}"] = cached
        return f"add(_c{i}(v) or _w{i}(v))"

    lines += _span_lines(spans, env, add)
    lines.append("    return o")
    return _compile("\n".join(lines) + "\n", "span writer", env)


def _metric_function(metric: Sequence[Field], required: str | None = None) -> Callable[..., Any]:
    """The metric attributes as one generated function: per field the read, the
    conversion, and the (key, value) pair unless the value is None; a field with
    ``metric_with`` only when that attribute came before it. ``required``: an
    attribute without which the function returns None."""
    env: dict[str, Any] = dict(_EXPR_NAMES)
    needed = {f.metric_with for f in metric if f.metric_with is not None}
    lines = ["def metric(r):", "    k = []"]
    flags: dict[str, str] = {}
    for key in sorted(needed):
        flags[key] = f"_has{len(flags)}"
        lines.append(f"    {flags[key]} = False")
    for i, f in enumerate(metric):
        indent = "    "
        if f.metric_with is not None:
            lines.append(f"    if {flags[f.metric_with]}:")
            indent = "        "
        head, inner = _span_value_lines(f, i, env, indent)
        lines += head
        lines.append(f"{inner}k.append(({f.span!r}, v))")
        if f.span == required:
            if f.metric_with is not None or f.span_as not in (None, *_NEVER_NONE):
                raise ValueError(f"metric attribute {required}: read it as it is to require it")
            lines += [f"{indent}else:", f"{indent}    return None"]
        if f.span in flags:
            lines.append(f"{inner}{flags[f.span or '']} = True")
    lines.append("    return tuple(k)")
    return _compile("\n".join(lines) + "\n", "metric", env)


# Distinct metric field values whose attributes ``_cached_metric_function`` keeps.
_METRIC_KEYS_CACHED = 1024


def _cached_metric_function(
    metric: Sequence[Field], key_of: Callable[[CallRecord], Any], size: int = _METRIC_KEYS_CACHED
) -> Callable[..., Any]:
    """``key_of`` (a metric function) looked up by the metric fields' values as read
    (before the conversions, None tests and ``metric_with``): its result is a function
    of those values alone. One tuple of the values and one dict lookup per call, and
    the same key object each time (a series found by identity), where building the key
    made a tuple per attribute and compared them all. Values that compare equal give
    one key, as they give one series anyway; unhashable ones are not cached."""
    env: dict[str, Any] = dict(_EXPR_NAMES)
    reads = ", ".join(_read_expr(f, i, env) for i, f in enumerate(metric))
    env.update(_key_of=key_of, _keys={}, _SIZE=size)
    lines = [
        "def metric(r):",
        f"    v = ({reads},)",
        "    try:",
        "        return _keys[v]",
        "    except KeyError:",
        "        pass",
        "    except TypeError:",
        "        return _key_of(r)",
        "    k = _key_of(r)",
        "    if len(_keys) < _SIZE:",
        "        _keys[v] = k",
        "    return k",
    ]
    return _compile("\n".join(lines) + "\n", "metric", env)


def _read_expr(f: Field, i: int, env: dict[str, Any]) -> str:
    """The source reading field ``f`` of the record ``r``: an attribute (checked to be
    an identifier), its expression, or its reader, passed in ``env`` by name."""
    if f.expr is not None and f.get is None:
        return f"({f.expr})"
    if f.get is not None:
        env[f"_get{i}"] = f.get
        return f"_get{i}(r)"
    _check_name(f.attr, f)
    if f.within is not None:
        _check_name(f.within, f)
        return f"(r.{f.within}.{f.attr} if r.{f.within} else None)"
    return f"r.{f.attr}"


def _check_name(name: str | None, f: Field) -> None:
    """Only identifiers go into generated source as attribute names."""
    if name is None or not name.isidentifier():
        raise ValueError(f"field {f.record or f.span}: attr must be an attribute name")


def _compile(source: str, name: str, env: dict[str, Any]) -> Callable[..., dict[str, Any]]:
    exec(compile(source, f"<loopguard {name} projection>", "exec"), env)
    function: Callable[..., dict[str, Any]] = env[name.split()[0]]
    return function


class Projections:
    """The three projections of a field table, each built once as tuples."""

    def __init__(self, fields: Iterable[Field] = FIELDS) -> None:
        fields = tuple(fields)
        recorded = [f for f in fields if f.record is not None]
        names = [f.record for f in recorded if f.record is not None]
        self.record_fields: tuple[str, ...] = (*CALL_FIELDS, *names)
        if len(set(self.record_fields)) != len(self.record_fields):
            raise ValueError("a record key is declared twice")
        # ``record(call_record, session_hasher, *call)``: the durable record's fields in
        # ``record_fields`` order; ``call``: the values of ``CALL_FIELDS`` (the records
        # sink's), None where left out. No content, ever. The generated function itself
        # (no method around it: one call less per record).
        self.record: Callable[..., dict[str, Any]] = _record_function(recorded)

        spans = [f for f in fields if f.span is not None]
        # Semconv attributes first, then the guard's own (as they read in a backend).
        spans.sort(key=lambda f: (f.span or "").startswith("loopguard."))
        self._span = _span_function(spans)
        self._spans = tuple(spans)
        self.span_keys: tuple[str, ...] = tuple(f.span for f in spans if f.span)
        metric = [f for f in spans if f.metric]
        self.metric_keys: tuple[str, ...] = tuple(f.span for f in metric if f.span)
        if len(set(self.metric_keys)) != len(self.metric_keys):
            raise ValueError("a metric attribute is declared twice")
        # ``metric_key(record)``: the metric attributes as the items of ``metric``'s
        # dict, in its order (a series' key, built without the dict).
        self.metric_key: Callable[[CallRecord], tuple[tuple[str, Any], ...]] = _metric_function(
            metric
        )
        # ``operation_metric_key(record)``: ``metric_key``, or None when the call is not
        # a GenAI operation (no gen_ai.operation.name: the GenAI metrics skip it). Cached
        # by the fields' values: the metric sink's key per call.
        self.operation_metric_key: Callable[[CallRecord], tuple[tuple[str, Any], ...] | None] = (
            _cached_metric_function(metric, _metric_function(metric, ATTR_OPERATION))
            if ATTR_OPERATION in self.metric_keys else lambda record: None
        )  # fmt: skip

    def span(self, record: CallRecord) -> dict[str, Any]:
        """The span's attributes from the table (semconv, then loopguard.*)."""
        return self._span(record)

    def span_writer(self, writer: FieldWriter) -> Callable[[CallRecord], list[Any]]:
        """The span's attributes as ``span`` gives them, each already in its written
        form (an OTLP KeyValue field: ``otlp_wire``), in the same order, None left off:
        no attribute dict is built. ``writer(key, type)`` gives each field's lookup and
        writer once, here."""
        return _span_writer_function(self._spans, writer)

    def metric(self, record: CallRecord) -> dict[str, Any]:
        """Low-cardinality attributes only: never session, hashes, markers or ids."""
        return dict(self.metric_key(record))


PROJECTIONS = Projections(FIELDS)
RECORD_FIELDS = PROJECTIONS.record_fields
