"""The admin listener of ``loopguard serve``: ``/metrics``, ``/status``, ``/healthz``.

Off by default; ``[admin] listen = "127.0.0.1:9464"`` turns it on, on a port of its
own (the configuration refuses the proxy's port, and ``server.workers > 1``: one
process, one registry, one live window). ``guard.doors.serve`` runs it beside the
proxy on the same event loop.

- ``GET /metrics``: the proxy's OpenTelemetry metrics in Prometheus text (or
  OpenMetrics when the scraper asks for it), read by a ``PrometheusMetricReader`` on
  the telemetry's own meter provider: the GenAI histograms, ``loopguard.stops`` and the
  live counters (``guard.telemetry.live_metrics``). Each ``Admin`` has its own
  collector registry, never prometheus_client's global one.
- ``GET /status``: ``LiveMonitor.status()`` as JSON: the current window's figures and
  its firing findings with exemplars, under the ``[admin] policy`` file's rules.
- ``GET /healthz``: ``{"status": "ok"}``.

The live monitor and the counters are fed once per durable record through the
telemetry's record sink: both count exactly what the records hold, with the monitor's
own definitions (``guard.monitor.definitions``). Building a scrape or a status can
take a while on a busy window (percentiles sort the window's values), so both run in
a worker thread, never on the proxy's event loop.
"""

from __future__ import annotations

from typing import Any

import orjson
import structlog
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from guard.engine.config import Config, ConfigError
from guard.engine.core import Engine
from guard.engine.pseudonym import SessionHasher
from guard.monitor import LiveMonitor, Policy, PolicyError, definitions, load_policy
from guard.telemetry import Telemetry
from guard.telemetry.live_metrics import LiveMetrics

_log = structlog.get_logger("loopguard.admin")

_JSON = "application/json"
_HEALTH = b'{"status":"ok"}'


class Admin:
    """The proxy's engine with live metrics and a live monitor, and the admin app."""

    def __init__(self, config: Config) -> None:
        self.policy = _policy(config)
        self.monitor = LiveMonitor(self.policy)
        self.registry = CollectorRegistry(auto_describe=False)
        reader = PrometheusMetricReader(registry=self.registry)

        def make_telemetry(config: Config, session_hasher: SessionHasher) -> Telemetry:
            # The engine's own session pseudonyms, the record feed into the live
            # monitor and counters, and the Prometheus reader on the same meters.
            return Telemetry(
                config.telemetry,
                scrub_policy=config.redaction.policy_id,
                session_hasher=session_hasher,
                record_sink=self.add_record,
                metric_readers=[reader],
            )

        self.engine = Engine(config, make_telemetry=make_telemetry)
        telemetry = self.engine.telemetry
        assert isinstance(telemetry, Telemetry)
        self.metrics = LiveMetrics(
            telemetry.meter_provider,
            is_unsafe=definitions.is_unsafe,
            app_route=definitions.app_route,
        )
        self.app = Starlette(
            routes=[
                Route("/metrics", self._metrics, methods=["GET"]),
                Route("/status", self._status, methods=["GET"]),
                Route("/healthz", self._healthz, methods=["GET"]),
            ]
        )

    def add_record(self, record: dict[str, Any]) -> None:
        """The telemetry's record sink: one durable record into the monitor and counters."""
        # A failing sink would cost the record line itself (the writer's chain stops).
        try:
            self.monitor.add(record)
            self.metrics.observe(record)
        except Exception as exc:
            _log.warning("live monitor failed", error=type(exc).__name__)

    async def _metrics(self, request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        body = await run_in_threadpool(encoder, self.registry)
        return Response(body, headers={"content-type": content_type})

    async def _status(self, request: Request) -> Response:
        body = await run_in_threadpool(lambda: orjson.dumps(self.monitor.status()))
        return Response(body, media_type=_JSON)

    async def _healthz(self, request: Request) -> Response:
        return Response(_HEALTH, media_type=_JSON)


def _policy(config: Config) -> Policy | None:
    """The ``[admin] policy`` file, validated at start-up (a bad one stops serve)."""
    if config.admin.policy is None:
        return None
    try:
        return load_policy(config.admin.policy)
    except PolicyError as exc:
        raise ConfigError(f"admin.policy: {exc}") from None
