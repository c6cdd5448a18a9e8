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

from collections.abc import Callable
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider

from guard.engine.calls import Route
from guard.telemetry import INSTRUMENTATION_NAME, LG_ROUTE, SCHEMA_URL, _version

METRIC_CALLS = "loopguard.calls"
METRIC_UNSAFE_SERVES = "loopguard.unsafe_serves"
LG_APP_ROUTE = "loopguard.app.route"
# An app route is the app's word: longer values are cut, not exported whole.
_APP_ROUTE_MAX = 64

RecordTest = Callable[[dict[str, Any]], bool]
RecordText = Callable[[dict[str, Any]], str | None]


class LiveMetrics:
    """``observe(record)`` once per durable record: thread-safe, a few dict lookups."""

    def __init__(
        self, meter_provider: MeterProvider, *, is_unsafe: RecordTest, app_route: RecordText
    ) -> None:
        meter = meter_provider.get_meter(INSTRUMENTATION_NAME, _version(), schema_url=SCHEMA_URL)
        self._calls = meter.create_counter(
            METRIC_CALLS,
            unit="{call}",
            description="Guarded calls, by loopguard's route and the app's own route.",
        )
        self._unsafe = meter.create_counter(
            METRIC_UNSAFE_SERVES,
            unit="{call}",
            description="Calls that served an unsafe answer: the app said an unsupported "
            "claim was served, or a stall was served anyway in observe mode.",
        )
        self._is_unsafe = is_unsafe
        self._app_route = app_route
        # Every route's series exists from the first scrape at 0: Prometheus' increase()
        # cannot see a series' first increment, so a first unsafe serve must be 0 -> 1.
        self._route_attrs = {str(route): {LG_ROUTE: str(route)} for route in Route}
        for attrs in self._route_attrs.values():
            self._unsafe.add(0, attrs)

    def observe(self, record: dict[str, Any]) -> None:
        route = record.get("route")
        attrs = self._route_attrs.get(route) if isinstance(route, str) else None
        if attrs is None:
            attrs = {LG_ROUTE: str(route)}
        app_route = self._app_route(record)
        if app_route:
            self._calls.add(1, {**attrs, LG_APP_ROUTE: app_route[:_APP_ROUTE_MAX]})
        else:
            self._calls.add(1, attrs)
        if self._is_unsafe(record):
            self._unsafe.add(1, attrs)
