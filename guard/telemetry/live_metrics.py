"""Per-call counters for live dashboards and alert rules, from the durable records.

Two counters on the telemetry's own meter provider, so they leave by the same readers
as the GenAI histograms and ``loopguard.stops`` (the admin listener's ``/metrics``,
OTLP):

- ``loopguard.calls``: every guarded call, by ``loopguard.route`` (serve | nudge |
  stop_and_review | observe) and ``loopguard.app.route`` (the app's own route from
  ``x-loopguard-app-route``, absent when it gave none);
- ``loopguard.unsafe_serves``: calls that served an unsafe answer, by
  ``loopguard.route``.

They are fed one durable record at a time (the telemetry's record sink), so they count
exactly what the records hold. What "unsafe" and "app route" mean is the monitor's
definition, passed in by whoever builds this (the telemetry layer does not import the
monitor): a live counter and ``loopguard report`` over the same records agree.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider

from guard.engine.calls import Route
from guard.telemetry.exporters import version as _version
from guard.telemetry.semconv import INSTRUMENTATION_NAME, LG_ROUTE, SCHEMA_URL

METRIC_CALLS = "loopguard.calls"
METRIC_UNSAFE_SERVES = "loopguard.unsafe_serves"
LG_APP_ROUTE = "loopguard.app.route"
# An app route is the app's word: longer values are cut, and past this many distinct
# (route, app route) pairs new ones are counted as app route "other".
_APP_ROUTE_MAX = 64
_MAX_SERIES = 1000
_OTHER = "other"

RecordTest = Callable[[dict[str, Any]], bool]
RecordText = Callable[[dict[str, Any]], str | None]


class LiveMetrics:
    """``observe(record)`` once per durable record: thread-safe, a dict increment.

    The counts are plain integers read by observable counters when a reader collects
    (a scrape), not synchronous OTel counters: an SDK ``Counter.add`` costs several
    microseconds per call on the request path, a scrape comes once every few seconds.
    """

    def __init__(
        self, meter_provider: MeterProvider, *, is_unsafe: RecordTest, app_route: RecordText
    ) -> None:
        self._is_unsafe = is_unsafe
        self._app_route = app_route
        self._lock = threading.Lock()
        self._calls: dict[tuple[str, str | None], int] = {}
        # Every route's series exists from the first scrape at 0: Prometheus' increase()
        # cannot see a series' first increment, so a first unsafe serve must be 0 -> 1.
        self._unsafe: dict[str, int] = {str(route): 0 for route in Route}
        meter = meter_provider.get_meter(INSTRUMENTATION_NAME, _version(), schema_url=SCHEMA_URL)
        meter.create_observable_counter(
            METRIC_CALLS,
            callbacks=[self._observe_calls],
            unit="{call}",
            description="Guarded calls, by loopguard's route and the app's own route.",
        )
        meter.create_observable_counter(
            METRIC_UNSAFE_SERVES,
            callbacks=[self._observe_unsafe],
            unit="{call}",
            description="Calls that served an unsafe answer: the app said an unsupported "
            "claim was served, or a stall was served anyway in observe mode.",
        )

    def observe(self, record: dict[str, Any]) -> None:
        route = record.get("route")
        route = route if isinstance(route, str) else str(route)
        app = self._app_route(record)
        key = (route, app[:_APP_ROUTE_MAX] if app else None)
        unsafe = self._is_unsafe(record)
        with self._lock:
            calls = self._calls
            if key not in calls and len(calls) >= _MAX_SERIES:
                key = (route, _OTHER)
            calls[key] = calls.get(key, 0) + 1
            if unsafe:
                self._unsafe[route] = self._unsafe.get(route, 0) + 1

    def _observe_calls(self, _options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            counts = list(self._calls.items())
        for (route, app), n in counts:
            attrs = {LG_ROUTE: route} if app is None else {LG_ROUTE: route, LG_APP_ROUTE: app}
            yield Observation(n, attrs)

    def _observe_unsafe(self, _options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            counts = list(self._unsafe.items())
        for route, n in counts:
            yield Observation(n, {LG_ROUTE: route})
