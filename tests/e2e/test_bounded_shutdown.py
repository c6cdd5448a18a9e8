"""Issue 12 row 11 over real sockets: a collector that accepts and never answers does
not hold ``loopguard serve`` at shutdown, and a dead Redis costs a warning, not one
per call.

* ``loopguard serve`` exports OTLP to a TCP server that accepts connections and never
  answers, with the exporter's own timeout far longer than the telemetry shutdown
  timeout; after some traffic, SIGTERM: the process exits within the shutdown timeout
  plus a generous margin, and the records file holds every call, complete.
* Redis down (nothing listening): many calls, all served (fail open), and the store
  warning is logged once with a count, not once per call.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from proxy_harness import ToolServer, guarded_proxy, loopguard_serve, proxy_config
from servers import dead_port, free_port, run_server

SHUTDOWN_TIMEOUT_S = 2.0
# Far beyond what the bound allows: without it, each export waits this long.
EXPORTER_TIMEOUT_S = 60
CALLS = 20


class SilentCollector:
    """Accepts every connection and never answers (nor closes) it."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self.accepted = 0
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            self._held.append(conn)
            self.accepted += 1

    def __enter__(self) -> SilentCollector:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()
        for conn in self._held:
            conn.close()


@pytest.fixture()
def silent_collector() -> Iterator[SilentCollector]:
    with SilentCollector() as collector:
        yield collector


def test_serve_exits_within_the_shutdown_timeout_with_a_collector_that_never_answers(
    tmp_path: Path, silent_collector: SilentCollector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", str(EXPORTER_TIMEOUT_S))
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # an export is under way at SIGTERM
    records = tmp_path / "records.jsonl"
    port = free_port()
    tools = ToolServer()
    with run_server(tools.app()) as upstream:
        config = tmp_path / "loopguard.toml"
        config.write_text(
            f'[server]\nlisten = "127.0.0.1:{port}"\n'
            f'[telemetry]\nexporter = "otlp"\nrecords = "{records}"\n'
            f'otlp_endpoint = "http://127.0.0.1:{silent_collector.port}/v1/traces"\n'
            f"shutdown_timeout_seconds = {SHUTDOWN_TIMEOUT_S}\n"
            f'[[routes]]\nprefix = "/tools"\nupstream = "{upstream}"\nadapter = "http-tool"\n'
        )
        with loopguard_serve(config, port) as (proc, url), httpx.Client(timeout=10) as client:
            for n in range(CALLS):
                r = client.post(
                    f"{url}/tools/lookup_tracking",
                    json={"order_id": f"A{n}"},
                    headers={"x-loopguard-session": f"s-{n}"},
                )
                assert r.status_code == 200
            assert tools.hits["lookup_tracking"] == CALLS
            proc.send_signal(signal.SIGTERM)
            try:
                # Generous: the bound is SHUTDOWN_TIMEOUT_S; without it, at least one
                # EXPORTER_TIMEOUT_S per signal.
                proc.wait(timeout=SHUTDOWN_TIMEOUT_S + 10)
            except subprocess.TimeoutExpired:
                pytest.fail("loopguard serve still running after SIGTERM")
            output = proc.communicate()[0].decode()  # structlog writes to stdout
    assert silent_collector.accepted >= 1  # the exporter did reach the collector
    assert "telemetry flush timed out" in output
    lines = records.read_text().splitlines()
    assert len(lines) == CALLS
    assert all(json.loads(line)["event"] == "call" for line in lines)


def test_a_dead_redis_costs_one_warning_not_one_per_call(capsys: pytest.CaptureFixture) -> None:
    tools = ToolServer()
    dead = f"redis://127.0.0.1:{dead_port()}/0"  # nothing listens there
    calls = 200
    with run_server(tools.app()) as upstream:
        config = proxy_config(upstream, store={"backend": "redis", "url": dead})
        with guarded_proxy(config) as (proxy, records), httpx.Client(base_url=proxy) as client:
            statuses = [
                client.post(
                    "/tools/echo",
                    content=b'{"n": %d}' % n,
                    headers={"content-type": "application/json", "x-loopguard-session": "down"},
                ).status_code
                for n in range(calls)
            ]
    assert statuses == [200] * calls  # fail open
    assert tools.hits["echo"] == calls
    assert len(records) == calls and all(r["failure_stage"] == "store" for r in records)
    out = capsys.readouterr().out
    # One warning (with a count of those held back), not one per call.
    assert 1 <= out.count("session_store_unavailable") <= 2
