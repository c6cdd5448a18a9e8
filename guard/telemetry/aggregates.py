"""loopguard's own metric aggregation: totals on the request path, SDK points at collection.

An SDK ``Histogram.record`` costs several microseconds per value on the request path
(a ``Measurement``, the exemplar filter, attribute hashing and a lock per reader); a
call records several. Here a value is a dict lookup, a bisect and a few additions
under one uncontended lock, and the totals reach the OpenTelemetry SDK only when a
reader collects (an OTLP export, a Prometheus scrape, ``InMemoryMetricReader``).

The SDK (1.45) has no public hook that feeds pre-aggregated points to its readers
(no observable histogram, no metric producers). The least fragile way found: each
reader's collect callback -- the one the meter provider gave it -- is wrapped, and the
points built here (the SDK's own public point classes) are added to what the SDK
collected, under the same instrumentation scope. That leans on four SDK internals,
each checked once when the provider is attached (``supported``): the provider's
reader list, resource and views, and a reader's collect callback and per-instrument
temporality and aggregation. Where one of them is missing or would change the
result (views, a non-explicit-bucket histogram aggregation, a provider that is not
the SDK's), ``MetricSink`` records on plain SDK instruments instead, as before. A
reader added to the provider later (``add_metric_reader``) is attached then, and
starts from the values that come after, as its SDK storage would; it gets explicit
buckets whatever its own preferred aggregation.

Per reader: cumulative points carry the totals since the series' first value (what
Prometheus needs); delta points carry what came since that reader's last collection,
with that interval's min and max -- each reader keeps its own state, fed from the one
set of pending totals every collection drains. Exemplars follow the SDK's defaults:
the provider's exemplar filter (asked once per call), the last value per bucket for a
histogram, one uniform sample for a counter, emptied at each collection.
"""

from __future__ import annotations

import math
import threading
import weakref
from bisect import bisect_left
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from random import randrange
from time import time_ns
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context, get_current
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.sdk.metrics import (
    AlwaysOffExemplarFilter,
    Counter,
    Exemplar,
    Histogram,
    MeterProvider,
    TraceBasedExemplarFilter,
)
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    Metric,
    MetricReader,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.metrics.export import Histogram as HistogramData
from opentelemetry.sdk.metrics.view import (
    DefaultAggregation,
    ExplicitBucketHistogramAggregation,
    SumAggregation,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace.propagation import _SPAN_KEY
from opentelemetry.trace.span import INVALID_SPAN
from opentelemetry.util.types import Attributes


def _context_reader() -> Callable[[], Context]:
    """``context.get_current``, read from its context variable where the runtime
    context is the default one (the variable's own ``get``: no Python call between)."""
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    variable = getattr(runtime, "_current_context", None)
    if type(runtime) is ContextVarsRuntimeContext and isinstance(variable, ContextVar):
        return variable.get
    return get_current


_current_context = _context_reader()

# An attribute set as the request path builds it: its items, in insertion order.
AttrKey = tuple[tuple[str, Any], ...]
# An exemplar's (span id, trace id), None without a current span.
Ids = tuple[int | None, int | None]

# The SDK's default per-instrument cardinality limit, and its overflow attribute set.
CARDINALITY_LIMIT = 2000
_OVERFLOW: AttrKey = (("otel.metric.overflow", True),)


# An exemplar as offered: (value, time, span id, trace id); the ids None without a span.
_Offered = tuple[float, int, int | None, int | None]


def no_exemplar() -> None:
    """No exemplar (an always-off filter; SDK instruments keep their own)."""
    return None


def _current_span() -> trace.Span | None:
    """``trace.get_current_span()`` without the calls in between; None without one."""
    span = _current_context().get(_SPAN_KEY)
    if span is None or not isinstance(span, trace.Span) or span is INVALID_SPAN:
        return None
    return span


def _current_ids() -> Ids:
    span = _current_span()
    if span is None:
        return (None, None)
    ctx = span.get_span_context()
    return (ctx.span_id, ctx.trace_id)


def _trace_based_exemplar() -> Ids | None:
    """The SDK's default filter: an exemplar only within a sampled span."""
    if _SPAN_KEY not in _current_context():
        return None  # no span at all (a proxy's calls): no further call
    span = _current_span()
    if span is None:
        return None
    ctx = span.get_span_context()
    if not ctx.trace_flags.sampled:
        return None
    return (ctx.span_id, ctx.trace_id)


class _Totals:
    """One series: bucket counts (histograms; a one-slot list for a counter), sum,
    min, max, when its first value came, and the exemplars offered since the last
    collection (by bucket; a counter's one slot is a reservoir sample of ``offers``)."""

    __slots__ = ("buckets", "exemplars", "max", "min", "offers", "start", "sum")

    def __init__(self, width: int, start: int) -> None:
        self.buckets = [0] * width
        self.sum: float = 0
        self.min: float = math.inf
        self.max: float = -math.inf
        self.start = start
        self.exemplars: dict[int, _Offered] | None = None
        self.offers = 0

    def copy(self) -> _Totals:
        made = _Totals(0, self.start)
        made.buckets = list(self.buckets)
        made.sum, made.min, made.max = self.sum, self.min, self.max
        made.exemplars = dict(self.exemplars) if self.exemplars else None
        made.offers = self.offers
        return made

    def merge(self, other: _Totals) -> None:
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        if other.exemplars:
            if not other.offers:  # a histogram: the newer exemplar of each bucket
                self.exemplars = {**(self.exemplars or {}), **other.exemplars}
            elif not self.offers or randrange(self.offers + other.offers) < other.offers:
                self.exemplars = other.exemplars  # one uniform sample of both
            self.offers += other.offers

    def take_exemplars(self, attributes: Attributes) -> list[Exemplar]:
        """The exemplars since the last collection, as the SDK's reservoirs give them
        (then empty)."""
        if not self.exemplars:
            return []
        # The measurement's attributes not on the point: none (no views here).
        filtered: dict[str, Any] | None = {} if attributes else None
        out = [
            Exemplar(filtered, value, time, span_id, trace_id)
            for _, (value, time, span_id, trace_id) in sorted(self.exemplars.items())
        ]
        self.exemplars, self.offers = None, 0
        return out


class _Instrument:
    """What every instrument shares: its identity, its pending totals and their lock."""

    def __init__(
        self, lock: threading.Lock, name: str, unit: str, description: str, width: int
    ) -> None:
        self.name = name
        self.unit = unit
        self.description = description
        self._lock = lock
        self._width = width
        self._pending: dict[AttrKey, _Totals] = {}
        self._keys: set[AttrKey] = set()

    def _new(self, key: AttrKey) -> _Totals:
        """A series' first value since the last collection (called under the lock)."""
        if key not in self._keys:
            if len(self._keys) >= CARDINALITY_LIMIT:
                key = _OVERFLOW
                found = self._pending.get(key)
                if found is not None:
                    return found
            self._keys.add(key)
        totals = self._pending[key] = _Totals(self._width, time_ns())
        return totals

    def drain(self) -> dict[AttrKey, _Totals]:
        """The pending totals; new values start fresh ones (called under the lock)."""
        pending, self._pending = self._pending, {}
        return pending


def _fold(
    totals: _Totals, boundaries: tuple[float, ...], value: float, times: int, exemplar: Ids | None
) -> None:
    """Add ``value``, ``times`` over, to a histogram series (called under the lock)."""
    bucket = bisect_left(boundaries, value)
    totals.buckets[bucket] += times
    totals.sum += value * times if times != 1 else value
    if value < totals.min:
        totals.min = value
    if value > totals.max:
        totals.max = value
    if exemplar is not None:
        offered = (value, time_ns(), *exemplar)
        exemplars = totals.exemplars
        if exemplars is None:
            totals.exemplars = {bucket: offered}
        else:
            # In place: pending totals are folded only until drained, and a reader's
            # state never holds their dict (``copy`` and ``merge`` make their own).
            exemplars[bucket] = offered


class HistogramTotals(_Instrument):
    """A histogram with explicit buckets, aggregated as the SDK does (a value falls in
    the first bucket whose upper bound is >= the value)."""

    def __init__(
        self,
        lock: threading.Lock,
        name: str,
        unit: str,
        description: str,
        boundaries: Sequence[float],
    ) -> None:
        super().__init__(lock, name, unit, description, len(boundaries) + 1)
        self.boundaries = tuple(boundaries)

    def record(
        self, value: float, key: AttrKey, times: int = 1, exemplar: Ids | None = None
    ) -> None:
        """``times``: the same value recorded that many times (sum += value * times).
        ``exemplar``: the call's ids when an exemplar is to be kept (``exemplar_ids``)."""
        with self._lock:
            totals = self._pending.get(key) or self._new(key)
            _fold(totals, self.boundaries, value, times, exemplar)

    def record_each(
        self, values: Sequence[float], key: AttrKey, exemplar: Ids | None = None
    ) -> None:
        with self._lock:
            totals = self._pending.get(key) or self._new(key)
            for value in values:
                _fold(totals, self.boundaries, value, 1, exemplar)

    def points(
        self, series: dict[AttrKey, _Totals], start: Callable[[_Totals], int], now: int
    ) -> list[HistogramDataPoint]:
        return [
            HistogramDataPoint(
                attributes=(attributes := dict(key)),
                start_time_unix_nano=start(t),
                time_unix_nano=now,
                count=sum(t.buckets),
                sum=t.sum,
                bucket_counts=tuple(t.buckets),
                explicit_bounds=self.boundaries,
                min=t.min,
                max=t.max,
                exemplars=t.take_exemplars(attributes),
            )
            for key, t in series.items()
        ]


class CounterTotals(_Instrument):
    """A monotonic counter (the SDK's ``Counter``)."""

    def __init__(self, lock: threading.Lock, name: str, unit: str, description: str) -> None:
        super().__init__(lock, name, unit, description, 1)

    def add(self, amount: int, key: AttrKey, exemplar: Ids | None = None) -> None:
        with self._lock:
            totals = self._pending.get(key) or self._new(key)
            totals.sum += amount
            if exemplar is not None:  # a uniform sample of one, as the SDK's reservoir
                totals.offers += 1
                if totals.offers == 1 or randrange(totals.offers) == 0:
                    totals.exemplars = {0: (amount, time_ns(), *exemplar)}

    def points(
        self, series: dict[AttrKey, _Totals], start: Callable[[_Totals], int], now: int
    ) -> list[NumberDataPoint]:
        return [
            NumberDataPoint(
                attributes=(attributes := dict(key)),
                start_time_unix_nano=start(t),
                time_unix_nano=now,
                value=t.sum,
                exemplars=t.take_exemplars(attributes),
            )
            for key, t in series.items()
        ]


class _ReaderState:
    """One reader's view of the totals: cumulative ones, or those since its last
    collection."""

    def __init__(self, histogram: AggregationTemporality, counter: AggregationTemporality):
        self.temporality = {HistogramTotals: histogram, CounterTotals: counter}
        self.series: dict[_Instrument, dict[AttrKey, _Totals]] = {}
        self.last_collection: int | None = None

    def add(self, instrument: _Instrument, pending: dict[AttrKey, _Totals]) -> None:
        mine = self.series.setdefault(instrument, {})
        for key, totals in pending.items():
            found = mine.get(key)
            if found is None:
                mine[key] = totals.copy()
            else:
                found.merge(totals)


def _temporality(reader: MetricReader, kind: type) -> AggregationTemporality:
    by_class: dict[Any, AggregationTemporality] = dict(reader._instrument_class_temporality)
    for cls, temporality in by_class.items():
        if issubclass(cls, kind):
            return temporality
    raise LookupError(kind.__name__)


def _default_aggregations(reader: MetricReader) -> bool:
    """The reader aggregates histograms in the instrument's advised explicit buckets
    with min and max (the SDK's default, and the OTLP exporter's unless told
    otherwise), and counters as sums."""
    by_class: dict[Any, Any] = dict(reader._instrument_class_aggregation)
    for cls, aggregation in by_class.items():
        if issubclass(cls, Histogram) and not isinstance(aggregation, DefaultAggregation):
            if not isinstance(aggregation, ExplicitBucketHistogramAggregation):
                return False
            if aggregation._boundaries is not None or not aggregation._record_min_max:
                return False
        if issubclass(cls, Counter) and not isinstance(
            aggregation, DefaultAggregation | SumAggregation
        ):
            return False
    return True


def supported(provider: Any) -> bool:
    """Whether ``Aggregates`` can serve this provider's readers exactly as its own
    instruments would (else the sink records on SDK instruments)."""
    try:
        if not isinstance(provider, MeterProvider) or provider._sdk_config.views:
            return False
        readers = list(provider._metric_readers)
        for reader in readers:
            if reader._collect is None or not _default_aggregations(reader):
                return False
            _temporality(reader, Histogram)
            _temporality(reader, Counter)
            provider._sdk_config.resource  # noqa: B018 -- read at collection
            provider._sdk_config.exemplar_filter  # noqa: B018
        return True
    except (AttributeError, LookupError, TypeError):
        return False


class Aggregates:
    """The instruments of one meter provider and the collection hook on its readers.

    One per provider (``for_provider``): two telemetries on one provider share it, as
    they would share the SDK's instruments, so a metric is never reported twice."""

    def __init__(self, provider: MeterProvider, scope: InstrumentationScope) -> None:
        # Not the provider itself: ``for_provider``'s weak map would keep it alive.
        self._sdk_config = provider._sdk_config
        self._scope = scope
        self._exemplar_filter = provider._sdk_config.exemplar_filter
        # ``exemplar_ids()``: the ids an exemplar of this call's values carries (span
        # id, trace id: the current span's, None without one), or None when the
        # provider's exemplar filter keeps none. Asked once per call, not per value:
        # the SDK's filters look at the context only (a custom filter is asked without
        # a value). A function picked for the filter once, here.
        self.exemplar_ids: Callable[[], Ids | None] = self._exemplar_reader()
        # Taken on the request path (uncontended: once per value, or per batch of
        # chunk gaps) and by a collection to drain the pending totals.
        self._lock = threading.Lock()
        # One collection at a time (readers collect on their own threads).
        self._collect_lock = threading.Lock()
        self._instruments: dict[str, _Instrument] = {}
        self._readers: list[_ReaderState] = []
        self._attached: weakref.WeakSet[MetricReader] = weakref.WeakSet()
        for reader in provider._metric_readers:
            self._attach(reader)
        # A reader added later starts from what comes after, as its SDK storage does.
        add_metric_reader = provider.add_metric_reader

        def add_and_attach(reader: MetricReader) -> None:
            add_metric_reader(reader)
            with self._collect_lock:
                if reader not in self._attached and reader._collect is not None:
                    self._drain()  # what came before is the other readers' only
                    self._attach(reader)

        provider.add_metric_reader = add_and_attach  # type: ignore[method-assign,assignment]

    def _exemplar_reader(self) -> Callable[[], Ids | None]:
        """``exemplar_ids`` for this provider's filter: the SDK's two usual filters
        recognized here, once, not per call (each test an ABC instance check)."""
        exemplar_filter = self._exemplar_filter
        if isinstance(exemplar_filter, AlwaysOffExemplarFilter):
            return no_exemplar
        if isinstance(exemplar_filter, TraceBasedExemplarFilter):
            return _trace_based_exemplar
        should_sample = exemplar_filter.should_sample

        def filtered() -> Ids | None:
            if not should_sample(0, time_ns(), None, None):  # type: ignore[arg-type]
                return None
            return _current_ids()

        return filtered

    def histogram(
        self, name: str, unit: str, description: str, boundaries: Sequence[float]
    ) -> HistogramTotals:
        with self._collect_lock:
            found = self._instruments.get(name)
            if isinstance(found, HistogramTotals):
                return found
            made = HistogramTotals(self._lock, name, unit, description, boundaries)
            self._instruments[name] = made
            return made

    def counter(self, name: str, unit: str, description: str) -> CounterTotals:
        with self._collect_lock:
            found = self._instruments.get(name)
            if isinstance(found, CounterTotals):
                return found
            made = CounterTotals(self._lock, name, unit, description)
            self._instruments[name] = made
            return made

    # -- collection (a reader's thread) ------------------------------------------------

    def _attach(self, reader: MetricReader) -> None:
        state = _ReaderState(_temporality(reader, Histogram), _temporality(reader, Counter))
        self._attached.add(reader)
        self._readers.append(state)
        # Typed in the SDK as returning metrics; it returns MetricsData | None.
        sdk_collect: Any = reader._collect
        assert sdk_collect is not None  # checked by supported()

        def collect(reader: MetricReader, timeout_millis: float = 10_000) -> MetricsData | None:
            collected = sdk_collect(reader, timeout_millis=timeout_millis)
            return self._add_points(collected, state)

        reader._set_collect_callback(collect)  # type: ignore[arg-type]

    def _add_points(self, collected: MetricsData | None, state: _ReaderState) -> MetricsData | None:
        with self._collect_lock:
            self._drain()
            metrics = self._metrics(state, time_ns())
        return _merged(collected, metrics, self._scope, self._sdk_config.resource)

    def _drain(self) -> None:
        """Pending totals into every reader's state (called under the collect lock)."""
        with self._lock:
            drained = [(i, i.drain()) for i in self._instruments.values()]
        for instrument, pending in drained:
            if pending:
                for reader_state in self._readers:
                    reader_state.add(instrument, pending)

    def _metrics(self, state: _ReaderState, now: int) -> list[Metric]:
        previous, state.last_collection = state.last_collection, now
        metrics: list[Metric] = []
        for instrument in self._instruments.values():
            series = state.series.get(instrument)
            if not series:
                continue
            temporality = state.temporality[type(instrument)]
            if temporality is AggregationTemporality.DELTA:
                # The interval's own totals; the next interval starts empty.
                del state.series[instrument]

                def start(t: _Totals, since: int | None = previous) -> int:
                    return since if since is not None else t.start
            else:

                def start(t: _Totals, since: int | None = None) -> int:
                    return t.start

            if isinstance(instrument, HistogramTotals):
                data: HistogramData | Sum = HistogramData(
                    data_points=instrument.points(series, start, now),
                    aggregation_temporality=temporality,
                )
            else:
                assert isinstance(instrument, CounterTotals)
                data = Sum(
                    data_points=instrument.points(series, start, now),
                    aggregation_temporality=temporality,
                    is_monotonic=True,
                )
            metrics.append(Metric(instrument.name, instrument.description, instrument.unit, data))
        return metrics


def _merged(
    collected: MetricsData | None,
    metrics: list[Metric],
    scope: InstrumentationScope,
    resource: Resource,
) -> MetricsData | None:
    """The SDK's collection plus ``metrics`` under ``scope`` (beside the scope's own
    SDK instruments, if it has any)."""
    if not metrics:
        return collected
    if collected is None or not collected.resource_metrics:
        ours = ScopeMetrics(scope=scope, metrics=metrics, schema_url=scope.schema_url or "")
        return MetricsData(
            resource_metrics=[
                ResourceMetrics(
                    resource=resource, scope_metrics=[ours], schema_url=resource.schema_url
                )
            ]
        )
    first, *rest = collected.resource_metrics
    scopes = list(first.scope_metrics)
    for n, scope_metrics in enumerate(scopes):
        if scope_metrics.scope == scope:
            scopes[n] = ScopeMetrics(
                scope=scope,
                metrics=[*scope_metrics.metrics, *metrics],
                schema_url=scope_metrics.schema_url,
            )
            break
    else:
        scopes.append(ScopeMetrics(scope=scope, metrics=metrics, schema_url=scope.schema_url or ""))
    return MetricsData(
        resource_metrics=[
            ResourceMetrics(
                resource=first.resource, scope_metrics=scopes, schema_url=first.schema_url
            ),
            *rest,
        ]
    )


_BY_PROVIDER: weakref.WeakKeyDictionary[MeterProvider, Aggregates] = weakref.WeakKeyDictionary()
_BY_PROVIDER_LOCK = threading.Lock()


def for_provider(provider: MeterProvider, scope: InstrumentationScope) -> Aggregates | None:
    """The provider's ``Aggregates`` (made and attached on first use), or None when
    its readers cannot be served this way (``supported``)."""
    with _BY_PROVIDER_LOCK:
        found = _BY_PROVIDER.get(provider)
        if found is None:
            if not supported(provider):
                return None
            found = _BY_PROVIDER[provider] = Aggregates(provider, scope)
        return found
