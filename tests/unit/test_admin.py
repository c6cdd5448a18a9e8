"""The admin listener in-process: its configuration, /metrics, /status, /healthz.

Records go in through the telemetry's record sink (``Admin.add_record``), as the proxy
writes them; the app is driven with httpx over ASGI.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_harness import samples

from guard.cli import main
from guard.doors.admin import Admin
from guard.engine.config import Config, ConfigError, TelemetryConfig
from guard.telemetry import Telemetry
from guard.telemetry.metrics import MetricSink

POLICY = """\
[monitor]
policy_id = "admin-unit-v1"
window = "1h"
max_unsafe_serves = 0
first_check = "Look at the serving gate."
"""


def _error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        Config.from_mapping(data, source="t.toml")
    return str(info.value)


# -- configuration -----------------------------------------------------------------------


def test_admin_is_off_by_default_and_takes_host_port() -> None:
    assert Config().admin.listen is None
    admin = Config.from_mapping({"admin": {"listen": "127.0.0.1:9464"}}).admin
    assert (admin.host, admin.port) == ("127.0.0.1", 9464)
    message = _error({"admin": {"listen": "9464"}})
    assert "admin.listen" in message and "host:port" in message
    assert "admin.listen" in _error({"admin": {"listen": "127.0.0.1:0"}})
    assert "admin.nope" in _error({"admin": {"nope": 1}})


def test_admin_is_never_on_the_proxys_port() -> None:
    message = _error({"server": {"listen": "127.0.0.1:8787"}, "admin": {"listen": "0.0.0.0:8787"}})
    assert message.startswith("t.toml:") and "admin.listen" in message
    assert "proxy's port" in message
    # Another port on the same host is fine.
    Config.from_mapping({"server": {"listen": "127.0.0.1:8787"}, "admin": {"listen": "::1:9464"}})


def test_admin_refuses_several_workers_with_a_way_out() -> None:
    message = _error(
        {
            "server": {"workers": 2},
            "store": {"backend": "redis"},
            "admin": {"listen": "127.0.0.1:9464"},
        }
    )
    assert "admin.listen" in message and "workers = 2" in message
    assert "each replica" in message and "otlp" in message


def test_serve_listen_override_onto_the_admin_port_is_refused(tmp_path: Path, capsys) -> None:
    config = tmp_path / "lg.toml"
    config.write_text('[admin]\nlisten = "127.0.0.1:9464"\n')
    assert main(["serve", "--config", str(config), "--listen", "127.0.0.1:9464"]) == 2
    assert "proxy's port" in capsys.readouterr().err


def test_a_bad_policy_file_stops_serve_before_it_listens(tmp_path: Path, capsys) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[monitor]\npolicy_id = "x"\nmax_unsafe_serves = -1\n')
    config = tmp_path / "lg.toml"
    config.write_text(f'[admin]\nlisten = "127.0.0.1:9464"\npolicy = "{policy}"\n')
    assert main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "admin.policy" in err and "max_unsafe_serves" in err


# -- telemetry: an extra reader turns metric recording on ----------------------------------


def test_metrics_are_recorded_with_exporter_none_when_a_reader_is_given() -> None:
    from guard.engine.calls import CallRecord, Route, StallRule

    reader = InMemoryMetricReader()
    telemetry = Telemetry(TelemetryConfig(records=""), "p", metric_readers=[reader])
    record = CallRecord(
        operation="execute_tool",
        span_name="execute_tool lookup",
        tool="lookup",
        route=Route.STOP_AND_REVIEW,
        stall_rule=StallRule.STALLED_REPEAT,
    )
    telemetry.finish(telemetry.start("x", {}), record)
    names = {
        m.name
        for rm in reader.get_metrics_data().resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert "loopguard.stops" in names
    # Without a reader (and exporter "none") nothing is recorded, as before.
    unread = Telemetry(TelemetryConfig(records=""), "p")
    assert not any(isinstance(s, MetricSink) for s in unread._sinks)
    with pytest.raises(ValueError):
        Telemetry(
            TelemetryConfig(records=""),
            "p",
            meter_provider=MeterProvider(),
            metric_readers=[reader],
        )


# -- the admin app -------------------------------------------------------------------------


def _record(i: int, *, unsafe: bool = False, app_route: str | None = "serve", **extra: Any):
    app: dict[str, str] = {"unsafe_claim_served": "true" if unsafe else "false"}
    if app_route:
        app["route"] = app_route
    return {
        "ts": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "event": "call",
        "request_id": f"req-{i}",
        "trace_id": f"{i:032x}",
        "route": "serve",
        "failure_stage": "passed",
        "model": "m",
        "stream": True,
        "ttft_ms": 100.0 + i,
        "total_ms": 300.0 + i,
        "output_tokens": 10,
        "app": app,
        **extra,
    }


@pytest.fixture
def admin(tmp_path: Path) -> Admin:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    config = Config.from_mapping(
        {
            "admin": {"listen": "127.0.0.1:9464", "policy": str(policy)},
            "telemetry": {"records": str(tmp_path / "records.jsonl")},
        }
    )
    return Admin(config)


def _get(admin: Admin, path: str, **headers: str) -> httpx.Response:
    import asyncio

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=admin.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
            return await client.get(path, headers=headers)

    return asyncio.run(get())


def test_metrics_count_routes_and_unsafe_serves_by_the_monitors_definitions(
    admin: Admin,
) -> None:
    admin.add_record(_record(1))
    admin.add_record(_record(2, app_route="abstain"))
    admin.add_record(_record(3, unsafe=True))
    admin.add_record(_record(4, unsafe=True))
    admin.add_record(_record(5, app_route=None))
    # A stall served anyway in observe mode is an unsafe serve too (the monitor's word).
    admin.add_record({**_record(6, app_route=None), "route": "observe"})
    response = _get(admin, "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    got = samples(response.text)
    route = ("loopguard_route", "serve")
    calls = "loopguard_calls_total"
    assert got[(calls, frozenset({route, ("loopguard_app_route", "serve")}))] == 3
    assert got[(calls, frozenset({route, ("loopguard_app_route", "abstain")}))] == 1
    assert got[(calls, frozenset({route}))] == 1
    assert got[(calls, frozenset({("loopguard_route", "observe")}))] == 1
    unsafe = "loopguard_unsafe_serves_total"
    assert got[(unsafe, frozenset({route}))] == 2
    assert got[(unsafe, frozenset({("loopguard_route", "observe")}))] == 1
    # Every route's series exists at 0 (Prometheus' increase() needs the 0 to see a 1).
    assert got[(unsafe, frozenset({("loopguard_route", "nudge")}))] == 0


def test_metrics_speak_openmetrics_when_asked(admin: Admin) -> None:
    admin.add_record(_record(1, unsafe=True))
    accept = "application/openmetrics-text; version=1.0.0"
    response = _get(admin, "/metrics", accept=accept)
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")
    assert "loopguard_unsafe_serves_total{" in response.text


def test_status_is_the_live_monitors_window_with_findings(admin: Admin) -> None:
    admin.add_record(_record(1))
    admin.add_record(_record(2, unsafe=True, session="s_two"))
    admin.add_record(_record(3, unsafe=True))
    response = _get(admin, "/status")
    assert response.headers["content-type"] == "application/json"
    status = response.json()
    assert status["policy_id"] == "admin-unit-v1" and status["window"] == "1h"
    window = status["window_current"]
    assert window["requests"] == 3 and window["unsafe_serves"] == 2
    [finding] = status["findings"]
    assert finding["severity"] == "PAGE" and finding["metric"] == "unsafe_claim_served"
    assert finding["exemplar"]["request_id"] == "req-2"
    assert finding["exemplar"]["trace_id"] == f"{2:032x}"
    assert finding["first_check"] == "Look at the serving gate."


def test_healthz_and_unknown_paths(admin: Admin) -> None:
    assert _get(admin, "/healthz").json() == {"status": "ok"}
    assert _get(admin, "/nope").status_code == 404


def test_a_failing_live_monitor_never_costs_the_record_line(admin: Admin, tmp_path: Path) -> None:
    def broken(record: dict[str, Any]) -> None:
        raise RuntimeError("boom")

    admin.monitor.add = broken  # type: ignore[method-assign]
    from guard.engine.calls import CallRecord

    telemetry = admin.engine.telemetry
    record = CallRecord(operation="execute_tool", span_name="execute_tool lookup", tool="lookup")
    telemetry.finish(telemetry.start("x", {}), record)
    telemetry.shutdown()
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert len(lines) == 1
