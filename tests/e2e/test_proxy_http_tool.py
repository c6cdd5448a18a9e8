"""The reverse proxy guarding plain HTTP tools, end to end over real sockets.

loopguard (``guard.doors.proxy.ProxyApp``) and a Starlette tool server each run on uvicorn;
the agent is an httpx client.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from proxy_harness import ToolServer, guarded_proxy, loopguard_serve, proxy_config
from servers import free_port, run_server

ORDER = {"order_id": "A10234"}


@pytest.fixture
def tools() -> Iterator[tuple[ToolServer, str]]:
    server = ToolServer()
    with run_server(server.app()) as url:
        yield server, url


@pytest.fixture
def proxy(tools: tuple[ToolServer, str]) -> Iterator[tuple[str, list[dict]]]:
    with guarded_proxy(proxy_config(tools[1], loop={"max_repeats": 3})) as running:
        yield running


def call(client: httpx.Client, session: str | None, body: object = ORDER) -> httpx.Response:
    headers = {"x-loopguard-session": session} if session else {}
    return client.post("/tools/lookup_tracking", json=body, headers=headers)


def test_looping_agent_is_stopped_after_max_repeats_and_tool_never_sees_the_stop(
    tools: tuple[ToolServer, str], proxy: tuple[str, list[dict]]
) -> None:
    server, _ = tools
    url, records = proxy
    with httpx.Client(base_url=url, timeout=5) as client:
        served = [call(client, "agent-1") for _ in range(3)]
        assert [r.status_code for r in served] == [200, 200, 200]
        assert all(r.headers["x-loopguard-route"] == "serve" for r in served)
        assert served[0].json()["last_scan"] == "Memphis TN hub"

        stopped = call(client, "agent-1")
    assert stopped.status_code == 422
    assert stopped.headers["content-type"] == "application/problem+json"
    assert stopped.headers["x-loopguard-route"] == "stop_and_review"
    problem = stopped.json()
    assert problem["type"].startswith("https://loopguard.dev/problems/")
    assert problem["status"] == 422
    assert problem["tool"] == "lookup_tracking"
    assert problem["rule"] == "stalled_repeat"
    assert problem["repeats"] == 3
    assert problem["session"] == "agent-1"
    assert len(problem["params_hash"]) == 32
    assert "lookup_tracking" in problem["detail"] and "3 times" in problem["detail"]
    # The stopped call never reached the tool server.
    assert server.hits["lookup_tracking"] == 3
    assert records[-1]["failure_stage"] == "loop_guard"
    assert records[-1]["route"] == "stop_and_review"


def test_other_sessions_are_unaffected(
    tools: tuple[ToolServer, str], proxy: tuple[str, list[dict]]
) -> None:
    server, _ = tools
    url, _ = proxy
    with httpx.Client(base_url=url, timeout=5) as client:
        for _ in range(3):
            call(client, "looper")
        assert call(client, "looper").status_code == 422
        other = [call(client, "other").status_code for _ in range(3)]
        # A different order in the looping session is a different call.
        different = call(client, "looper", {"order_id": "B77"})
    assert other == [200, 200, 200]
    assert different.status_code == 200
    assert server.hits["lookup_tracking"] == 3 + 3 + 1


def test_request_without_session_is_served_but_not_tracked(
    tools: tuple[ToolServer, str], proxy: tuple[str, list[dict]]
) -> None:
    server, _ = tools
    url, records = proxy
    with httpx.Client(base_url=url, timeout=5) as client:
        statuses = [call(client, None).status_code for _ in range(6)]
    assert statuses == [200] * 6
    assert server.hits["lookup_tracking"] == 6
    assert len(records) == 6
    assert all(r["session_tracked"] is False and r["route"] == "serve" for r in records)
    assert all(r["session"] is None for r in records)


def test_polling_that_progresses_is_never_stopped(
    tools: tuple[ToolServer, str], proxy: tuple[str, list[dict]]
) -> None:
    url, _ = proxy
    with httpx.Client(base_url=url, timeout=5) as client:
        statuses = [
            client.post("/tools/poll", json={"job": 1}, headers={"x-loopguard-session": "p"})
            for _ in range(8)
        ]
    assert [r.status_code for r in statuses] == [200] * 8


def test_get_tool_params_come_from_the_query_string(
    tools: tuple[ToolServer, str], proxy: tuple[str, list[dict]]
) -> None:
    server, _ = tools
    url, records = proxy
    session = {"x-loopguard-session": "q"}
    with httpx.Client(base_url=url, timeout=5) as client:
        same = [client.get("/tools/search?q=tracking", headers=session) for _ in range(4)]
        other = client.get("/tools/search?q=label", headers=session)
    assert [r.status_code for r in same] == [200, 200, 200, 422]
    assert same[0].json() == {"results": [], "q": "tracking"}
    assert other.status_code == 200
    assert server.hits["search"] == 4
    assert records[0]["tool"] == "search" and records[0]["operation"] == "execute_tool"


def test_identical_tool_errors_are_stopped(
    tools: tuple[ToolServer, str], proxy: tuple[str, list[dict]]
) -> None:
    server, _ = tools
    url, records = proxy
    session = {"x-loopguard-session": "e"}
    with httpx.Client(base_url=url, timeout=5) as client:
        answers = [client.post("/tools/status/404", json={}, headers=session) for _ in range(4)]
    assert [r.status_code for r in answers] == [404, 404, 404, 422]
    assert answers[-1].json()["rule"] in ("identical_errors", "stalled_repeat")
    assert server.hits["status"] == 3
    # A tool's 4xx is the tool's answer, not an upstream failure.
    assert records[0]["failure_stage"] == "passed"


def test_tool_segment_is_configurable(tools: tuple[ToolServer, str]) -> None:
    _, upstream = tools
    config = proxy_config(
        upstream,
        routes=[{"prefix": "/v1", "upstream": upstream, "adapter": "http-tool", "tool_segment": 1}],
    )
    with guarded_proxy(config) as (url, records), httpx.Client(base_url=url) as client:
        # Segment 0 after the prefix is "poll"; segment 1, the tool here, is "extra".
        response = client.post("/v1/poll/extra", json={})
    assert response.status_code == 404  # the tool server has no /poll/extra
    assert records[0]["tool"] == "extra"


def test_loopguard_serve_runs_the_proxy_and_shuts_down_cleanly(
    tools: tuple[ToolServer, str], tmp_path: Path
) -> None:
    """``loopguard serve --config FILE``: uvicorn in its own process, SIGTERM ends it."""
    server, upstream = tools
    port = free_port()
    records = tmp_path / "records.jsonl"
    config = tmp_path / "loopguard.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\n'
        f'[telemetry]\nrecords = "{records}"\n'
        f'[[routes]]\nprefix = "/tools"\nupstream = "{upstream}"\nadapter = "http-tool"\n'
    )
    with loopguard_serve(config, port) as (proc, url):
        with httpx.Client(base_url=url, timeout=5) as client:
            assert call(client, "served").status_code == 200
            assert call(client, "served").status_code == 200
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught.
        assert proc.wait(timeout=15) in (0, -signal.SIGTERM)
        assert b"Finished server process" in proc.communicate()[1]
    assert server.hits["lookup_tracking"] == 2
    # The engine was closed on the way out: both records are on disk.
    lines = records.read_text().splitlines()
    assert len(lines) == 2
    assert all(json.loads(line)["route"] == "serve" for line in lines)


# -- the adapter on its own ------------------------------------------------------------


def _view(method: str, path: str, body: bytes = b"", query: str = "", **headers: str):
    from guard.engine.contract import RequestView

    return RequestView(
        method, path, query, {k.replace("_", "-"): v for k, v in headers.items()}, body
    )


def _adapter():
    from adapters.http_tool import HttpToolAdapter
    from guard.engine.config import RouteConfig

    return HttpToolAdapter(RouteConfig(prefix="/tools", upstream="http://t", adapter="http-tool"))


def test_adapter_reads_params_from_json_query_form_and_binary_bodies() -> None:
    adapter = _adapter()
    parsed = adapter.parse(_view("POST", "/lookup", b'{"a": 1}'))
    assert parsed.operation == "execute_tool"
    assert parsed.span_name == "execute_tool lookup"
    assert parsed.invocations[0].params == {"a": 1}
    assert adapter.parse(_view("GET", "/search", query="q=x&tag=a&tag=b")).invocations[
        0
    ].params == {"q": "x", "tag": ["a", "b"]}
    form = adapter.parse(
        _view("POST", "/f", b"a=1&b=2", content_type="application/x-www-form-urlencoded")
    )
    assert form.invocations[0].params == {"a": "1", "b": "2"}
    both = adapter.parse(_view("POST", "/f", b'{"a": 1}', query="page=2"))
    assert both.invocations[0].params == {"query": {"page": "2"}, "body": {"a": 1}}
    binary = adapter.parse(_view("PUT", "/u", b"\x00\x01", content_type="image/png"))
    assert binary.invocations[0].params["content_type"] == "image/png"
    assert adapter.parse(_view("GET", "")).operation == "passthrough"


def test_adapter_marks_malformed_json_and_still_names_the_call() -> None:
    parsed = _adapter().parse(_view("POST", "/lookup", b'{"a":', content_type="application/json"))
    assert parsed.admission_error is not None and "not valid JSON" in parsed.admission_error
    assert parsed.invocations[0].tool == "lookup"
    # Still a call: the raw bytes' hash stands for the parameters.
    from guard.engine.bodies import raw_params

    assert parsed.invocations[0].params == raw_params(b'{"a":', "request body is not valid JSON")


def test_observer_keeps_a_bounded_prefix_and_reads_explicit_markers() -> None:
    from adapters.http_tool import MAX_OUTCOME_BYTES

    adapter = _adapter()
    parsed = adapter.parse(_view("POST", "/lookup", b"{}"))
    small = adapter.observer(parsed, 404, {"x-loopguard-progress": "scan:v17"})
    assert small.feed(b'{"error": ', 0.0) == b'{"error": '
    small.feed(b'"nope"}', 0.0)
    outcome = small.finish().outcomes[0]
    assert (outcome.value, outcome.error, outcome.explicit_marker) == (
        {"error": "nope"},
        True,
        "scan:v17",
    )
    # The value is the whole body parsed: the body stands for it (markers cached by it).
    assert outcome.source == b'{"error": "nope"}'

    big = adapter.observer(parsed, 200, {})
    chunk = b"x" * (256 * 1024)
    for _ in range(8):  # 2 MiB through, 1 MiB kept
        assert big.feed(chunk, 0.0) is chunk
    outcome = big.finish().outcomes[0]
    value = outcome.value
    assert value["truncated"] is True and value["length"] == 8 * len(chunk)
    assert len(value["prefix"]) == MAX_OUTCOME_BYTES
    assert outcome.source is None  # the length seen is part of the value too

    gzipped = adapter.observer(parsed, 200, {"content-encoding": "gzip"})
    gzipped.feed(b"\x1f\x8b\x08", 0.0)
    outcome = gzipped.finish().outcomes[0]
    assert outcome.value["content_encoding"] == "gzip"
    assert outcome.source is None
