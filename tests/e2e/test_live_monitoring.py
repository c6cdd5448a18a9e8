"""Live monitoring end to end: ``loopguard serve`` with its admin listener, real traffic,
``/metrics`` and ``/status`` scraped, the generated alert rules checked by ``promtool``
and a real Prometheus paging on them.

The proxy runs as ``loopguard serve`` in its own process; the fake model (answering with
the app's ``x-loopguard-app-*`` decision headers) and the tool server run in this one.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from monitor_seed import BAD, policy_toml
from prometheus_harness import api, poll, require_binary, run_prometheus, samples
from proxy_harness import ToolServer, loopguard_serve
from servers import free_port, run_server

from guard.devtools.fakes import FakeModels

# What the app decided, by the test's x-test-decision request header.
DECISIONS: dict[bytes, dict[str, str]] = {
    b"safe": {"route": "serve", "unsafe-claim-served": "false", "template": "tracking-answerer-v1"},
    b"abstain": {
        "route": "abstain",
        "unsafe-claim-served": "false",
        "failure-stage": "claim_generation",
    },
    b"unsafe": {
        "route": "serve",
        "unsafe-claim-served": "true",
        "template": BAD,
        "evidence-version": "fastship@v17",
        "failure-stage": "serving_gate",
    },
}


class AppDecisions:
    """The fake model, answering with the app decision headers the request names."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        decision = DECISIONS.get(dict(scope["headers"]).get(b"x-test-decision", b""), {})
        extra = [(f"x-loopguard-app-{k}".encode(), v.encode()) for k, v in decision.items()]

        async def send_with(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with)


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[str, str]]:
    """(fake model URL, tool server URL)."""
    with (
        run_server(AppDecisions(FakeModels().app())) as model,
        run_server(ToolServer().app()) as tools,
    ):
        yield model, tools


def _write_config(tmp: Path, upstreams: tuple[str, str], window: str) -> tuple[Path, int, int]:
    port, admin = free_port(), free_port()
    policy = tmp / "policy.toml"
    policy.write_text(policy_toml(window))
    config = tmp / "loopguard.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\n'
        f'[admin]\nlisten = "127.0.0.1:{admin}"\npolicy = "{policy}"\n'
        f'[telemetry]\nrecords = "{tmp / "records.jsonl"}"\n'
        f'[[routes]]\nprefix = "/openai"\nupstream = "{upstreams[0]}"\nadapter = "openai"\n'
        f'[[routes]]\nprefix = "/tools"\nupstream = "{upstreams[1]}"\nadapter = "http-tool"\n'
    )
    return config, port, admin


def _chat(client: httpx.Client, decision: str) -> None:
    body = {
        "model": "gpt-fixture-1",
        "stream": True,
        "messages": [{"role": "user", "content": f"Where is order A10234? ({decision})"}],
    }
    with client.stream(
        "POST", "/openai/v1/chat/completions", json=body, headers={"x-test-decision": decision}
    ) as response:
        assert response.status_code == 200
        response.read()


def _records(path: Path, n: int) -> list[dict[str, Any]]:
    def written() -> list[dict[str, Any]] | None:
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(line) for line in lines] if len(lines) >= n else None

    return poll(written, deadline_s=15, every_s=0.05)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_admin_listener_serves_metrics_and_status_of_real_traffic(
    upstreams: tuple[str, str], tmp_path: Path
) -> None:
    # A one-day window: the whole test falls in the current one.
    config, port, admin_port = _write_config(tmp_path, upstreams, "1d")
    admin = f"http://127.0.0.1:{admin_port}"
    with loopguard_serve(config, port) as (proc, url):
        with httpx.Client(base_url=url, timeout=10) as client:
            for decision in ("safe", "abstain", "unsafe", "unsafe"):
                _chat(client, decision)
            order = {"order_id": "A10234"}
            session = {"x-loopguard-session": "agent-1"}
            codes = [
                client.post("/tools/lookup_tracking", json=order, headers=session).status_code
                for _ in range(4)
            ]
            assert codes == [200, 200, 200, 422]  # the fourth identical call is stopped
            # The admin endpoints are not on the proxy's port.
            assert client.get("/metrics").status_code == 404
        records = _records(tmp_path / "records.jsonl", 8)

        with httpx.Client(base_url=admin, timeout=10) as client:
            assert client.get("/healthz").json() == {"status": "ok"}
            scrape = client.get("/metrics")
            status = client.get("/status").json()
        assert scrape.headers["content-type"].startswith("text/plain")
        got = samples(scrape.text)

        serve = ("loopguard_route", "serve")
        calls = "loopguard_calls_total"
        assert got[(calls, frozenset({serve, ("loopguard_app_route", "serve")}))] == 3
        assert got[(calls, frozenset({serve, ("loopguard_app_route", "abstain")}))] == 1
        assert got[(calls, frozenset({serve}))] == 3  # the tool calls: no app route
        assert got[(calls, frozenset({("loopguard_route", "stop_and_review")}))] == 1
        assert got[("loopguard_unsafe_serves_total", frozenset({serve}))] == 2
        stop = frozenset(
            {
                ("loopguard_route", "stop_and_review"),
                ("loopguard_stall_rule", "stalled_repeat"),
                ("gen_ai_tool_name", "lookup_tracking"),
            }
        )
        assert got[("loopguard_stops_total", stop)] == 1
        ttft = {
            labels: value
            for (name, labels), value in got.items()
            if name == "gen_ai_client_operation_time_to_first_chunk_seconds_count"
        }
        assert sum(ttft.values()) == 4  # the four streamed chat calls

        # /status: the live monitor over the same records, with the PAGE and its exemplar.
        assert status["policy_id"] == "delivery-grounding-slo-v1"
        assert status["rate_card"] == "internal-fixture-2026-05-27"
        window = status["window_current"]
        assert window["requests"] == 8
        assert window["unsafe_serves"] == 2 and window["abstentions"] == 1
        assert window["app_routes"] == {"serve": 3, "abstain": 1}
        assert window["failure_stages"]["serving_gate"] == 2
        assert window["loops"]["stops"] == 1
        page = [f for f in status["findings"] if f["severity"] == "PAGE"]
        assert [f["metric"] for f in page] == ["unsafe_claim_served"]
        first_unsafe = next(r for r in records if r["app"].get("unsafe_claim_served") == "true")
        exemplar = page[0]["exemplar"]
        assert exemplar["request_id"] == first_unsafe["request_id"]
        assert exemplar["trace_id"] == first_unsafe["trace_id"]
        assert exemplar["template"] == BAD and exemplar["evidence_version"] == "fastship@v17"
        assert page[0]["first_check"].startswith("Compare serving-gate template")

        # Ctrl-C stops both listeners and exits cleanly.
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    assert not _listening(admin_port) and not _listening(port)


def _alerts_file(tmp: Path, window: str) -> Path:
    policy = tmp / "alert-policy.toml"
    policy.write_text(policy_toml(window))
    rules = tmp / "rules.yml"
    done = subprocess.run(
        [sys.executable, "-m", "guard.cli", "alerts", "--policy", str(policy), "-o", str(rules)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return rules


def test_promtool_accepts_the_rules_and_they_page_on_one_unsafe_serve(tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    rules = _alerts_file(tmp_path, "5m")
    checked = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert b"SUCCESS: 2 rules found" in checked.stdout
    # promtool's own rule unit test: one replica serves one unsafe answer at minute 3
    # (its series started at 0), another serves none. The PAGE fires, then clears once
    # the window has passed. Every streamed call lands in the 0.32-0.64 s TTFT bucket:
    # the p95 estimate is 0.32 + 0.95 * 0.32 s = 624 ms, over the 500 ms budget: WARN.
    loaded = yaml.safe_load(rules.read_text())["groups"][0]["rules"]
    notes = {rule["alert"]: rule["annotations"] for rule in loaded}
    bucket = "gen_ai_client_operation_time_to_first_chunk_seconds_bucket"
    unsafe = "loopguard_unsafe_serves_total{{instance={!r},loopguard_route='serve'}}"
    labels = {"policy_id": "delivery-grounding-slo-v1"}
    page = {
        "exp_labels": {"severity": "page", **labels},
        "exp_annotations": {
            **notes["LoopguardUnsafeServes"],
            "summary": "PAGE unsafe_claim_served: 1 unsafe serves in the last 5m (max 0)",
        },
    }
    warn = {
        "exp_labels": {"severity": "warn", **labels},
        "exp_annotations": {
            **notes["LoopguardP95TimeToFirstChunk"],
            "summary": "WARN p95_ttft_ms: 624 ms over the last 5m (budget 500 ms; bucket estimate)",
        },
    }
    suite = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": unsafe.format("a"), "values": "0 0 0 1 1 1 1 1 1 1 1 1 1 1"},
                    {"series": unsafe.format("b"), "values": "0x13"},
                    {"series": f'{bucket}{{le="0.32"}}', "values": "0x13"},
                    {"series": f'{bucket}{{le="0.64"}}', "values": "0+10x13"},
                    {"series": f'{bucket}{{le="+Inf"}}', "values": "0+10x13"},
                ],
                "alert_rule_test": [
                    {"alertname": "LoopguardUnsafeServes", "eval_time": "2m", "exp_alerts": []},
                    {"alertname": "LoopguardUnsafeServes", "eval_time": "4m", "exp_alerts": [page]},
                    {"alertname": "LoopguardUnsafeServes", "eval_time": "12m", "exp_alerts": []},
                    {
                        "alertname": "LoopguardP95TimeToFirstChunk",
                        "eval_time": "6m",
                        "exp_alerts": [warn],
                    },
                ],
            }
        ],
    }
    unit = tmp_path / "rules_test.yml"
    unit.write_text(yaml.safe_dump(suite))
    tested = subprocess.run([promtool, "test", "rules", str(unit)], capture_output=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_a_real_prometheus_pages_on_the_first_unsafe_serve(
    upstreams: tuple[str, str], tmp_path: Path
) -> None:
    require_binary("prometheus")
    rules = _alerts_file(tmp_path, "5m")
    config, port, admin_port = _write_config(tmp_path, upstreams, "5m")
    with (
        loopguard_serve(config, port) as (_proc, url),
        run_prometheus(f"127.0.0.1:{admin_port}", rules, tmp_path) as prometheus,
        httpx.Client(base_url=url, timeout=10) as client,
    ):
        _chat(client, "safe")

        # Prometheus has scraped the replica (its unsafe series at 0) and evaluated the
        # rules against it: the PAGE is not firing on safe traffic.
        def scraped_at_zero() -> bool | None:
            result = api(prometheus, "query", query="sum(loopguard_unsafe_serves_total)")["result"]
            return True if result and float(result[0]["value"][1]) == 0 else None

        poll(scraped_at_zero)

        def rules_evaluated() -> list[dict[str, Any]] | None:
            [group] = api(prometheus, "rules")["groups"]
            # lastEvaluation is Go's zero time until the first evaluation.
            done = all(
                r["health"] == "ok" and not r["lastEvaluation"].startswith("0001-")
                for r in group["rules"]
            )
            return group["rules"] if done else None

        evaluated = poll(rules_evaluated)
        assert {r["name"] for r in evaluated} == {
            "LoopguardUnsafeServes",
            "LoopguardP95TimeToFirstChunk",
        }
        assert api(prometheus, "alerts")["alerts"] == []

        _chat(client, "unsafe")

        def page_firing() -> dict[str, Any] | None:
            for alert in api(prometheus, "alerts")["alerts"]:
                if alert["labels"]["alertname"] == "LoopguardUnsafeServes":
                    return alert if alert["state"] == "firing" else None
            return None

        alert = poll(page_firing, deadline_s=60)
    assert alert["labels"]["severity"] == "page"
    assert alert["labels"]["policy_id"] == "delivery-grounding-slo-v1"
    assert alert["annotations"]["first_check"].startswith("Compare serving-gate template")
    assert float(alert["value"]) >= 1
