"""Issue 12 over real sockets: nothing served unguarded silently, atomic admission,
big bodies off the event loop, a hung or dead store, client limits, leaks.

loopguard and a tool server on uvicorn; each case counts what reached the tool.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from proxy_harness import ToolServer, guarded_proxy, proxy_config
from servers import run_server


@pytest.fixture
def tools() -> Iterator[tuple[ToolServer, str]]:
    server = ToolServer()
    with run_server(server.app()) as url:
        yield server, url


def _send_same(url: str, path: str, body: bytes, headers: dict[str, str], n: int) -> list[int]:
    statuses = []
    with httpx.Client(base_url=url, timeout=10) as client:
        for _ in range(n):
            statuses.append(client.post(path, content=body, headers=headers).status_code)
    return statuses


# -- rows 2 and 5: a body the guard cannot parse is still a call ------------------------

UNPARSEABLE = {
    "invalid_utf8": (b'{"q": "\xff\xfe caf\xe9"}', {}),
    "trailing_garbage": (b'{"q": "a"} trailing', {}),
    "huge_integer": (b'{"q": ' + b"7" * 5000 + b"}", {}),
    "nested_5000_deep": (b'{"q": ' + b"[" * 5000 + b"]" * 5000 + b"}", {}),
}


@pytest.mark.parametrize("case", sorted(UNPARSEABLE))
def test_an_unparseable_body_repeated_is_stopped(tools: tuple[ToolServer, str], case: str) -> None:
    server, upstream = tools
    body, extra = UNPARSEABLE[case]
    headers = {"content-type": "application/json", "x-loopguard-session": case, **extra}
    with guarded_proxy(proxy_config(upstream)) as (url, records):
        statuses = _send_same(url, "/tools/status/200", body, headers, 6)
    # max_repeats = 3: three identical answers, then the raw-hashed call is stopped.
    assert statuses == [200, 200, 200, 422, 422, 422]
    assert server.hits["status"] == 3
    assert [r["failure_stage"] for r in records] == ["request_admission"] * 3 + ["loop_guard"] * 3
    assert records[0]["error_type"] in ("malformed_request", "nested_too_deep")
    assert len({r["params_hash"] for r in records}) == 1


def test_gzip_json_is_decoded_and_judged_on_its_parameters(
    tools: tuple[ToolServer, str],
) -> None:
    server, upstream = tools
    headers = {
        "content-type": "application/json",
        "content-encoding": "gzip",
        "x-loopguard-session": "gz",
    }
    with guarded_proxy(proxy_config(upstream)) as (url, records):
        statuses = _send_same(url, "/tools/status/200", gzip.compress(b'{"q": "a"}'), headers, 5)
        # The same parameters sent plain are the same call (already stopped).
        plain = httpx.post(
            f"{url}/tools/status/200",
            content=b'{"q":"a"}',
            headers={"content-type": "application/json", "x-loopguard-session": "gz"},
        )
    assert statuses == [200, 200, 200, 422, 422]
    assert plain.status_code == 422
    assert server.hits["status"] == 3
    assert records[0]["failure_stage"] == "passed"


def _route(prefix: str, upstream: str, adapter: str) -> dict[str, Any]:
    return {"prefix": prefix, "upstream": upstream, "adapter": adapter}


def test_mcp_call_nested_too_deep_is_still_guarded(tools: tuple[ToolServer, str]) -> None:
    server, upstream = tools
    deep = "[" * 5000 + "]" * 5000
    body = (
        '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":'
        '{"x":' + deep + "}}}"
    ).encode()
    config = proxy_config(upstream, routes=[_route("/mcp", f"{upstream}/status/200", "mcp")])
    headers = {
        "content-type": "application/json",
        "accept": "application/json, text/event-stream",
        "mcp-session-id": "deep-mcp",
    }
    with guarded_proxy(config) as (url, records):
        statuses = _send_same(url, "/mcp", body, headers, 5)
    assert statuses == [200, 200, 200, 422, 422]
    assert server.hits["status"] == 3
    assert records[0]["failure_stage"] == "request_admission"
    assert records[-1]["failure_stage"] == "loop_guard"


def test_openai_history_nested_too_deep_is_still_guarded(tools: tuple[ToolServer, str]) -> None:
    server, upstream = tools
    deep = "[" * 5000 + "]" * 5000
    body = (
        '{"model":"gpt-4o","messages":[{"role":"user","content":"hi"},'
        '{"role":"tool","tool_call_id":"c1","content":' + deep + "}]}"
    ).encode()
    config = proxy_config(upstream, routes=[_route("/openai", f"{upstream}/fixed", "openai")])
    headers = {"content-type": "application/json", "x-loopguard-session": "deep-openai"}
    with guarded_proxy(config) as (url, records):
        statuses = _send_same(url, "/openai/v1/chat/completions", body, headers, 5)
    assert statuses == [200, 200, 200, 422, 422]
    assert server.hits["fixed"] == 3
    assert {r["failure_stage"] for r in records[:3]} == {"request_admission"}


def test_body_over_the_parse_cap_is_hashed_raw_and_recorded(
    tools: tuple[ToolServer, str],
) -> None:
    server, upstream = tools
    config = proxy_config(upstream, server={"max_parse_bytes": 1024})
    body = json.dumps({"q": "x" * 4096}).encode()
    headers = {"content-type": "application/json", "x-loopguard-session": "cap"}
    with guarded_proxy(config) as (url, records):
        statuses = _send_same(url, "/tools/status/200", body, headers, 5)
    assert statuses == [200, 200, 200, 422, 422]
    assert server.hits["status"] == 3
    assert records[0]["failure_stage"] == "request_admission"
    assert records[0]["error_type"] == "body_not_parsed"
