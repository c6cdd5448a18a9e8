"""MCP without a session: the credential fallback, and a warning naming the route.

The SDK's high-level ``Client`` on protocol 2026-07-28 sends no ``Mcp-Session-Id``;
without ``x-loopguard-session`` its calls cannot be tied to an agent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_servers import TrackingServer
from servers import run_server
from structlog.testing import capture_logs

from guard.doors.proxy import ProxyApp
from guard.doors.untracked import UNTRACKED_EVENT
from guard.engine.config import Config

REPEATS = 3


@contextmanager
def stack(**session: Any) -> Iterator[tuple[TrackingServer, str]]:
    tracking = TrackingServer()
    with run_server(tracking.app(json_response=True)) as upstream:
        tracking.allow_host(upstream)
        config = Config.from_mapping(
            {
                "session": session,
                "loop": {"max_repeats": REPEATS},
                "telemetry": {"records": ""},
                "routes": [{"prefix": "/mcp", "upstream": f"{upstream}/mcp", "adapter": "mcp"}],
            }
        )
        with run_server(ProxyApp(config)) as guard:
            yield tracking, f"{guard}/mcp"


@asynccontextmanager
async def client(url: str, headers: dict[str, str] | None = None) -> AsyncIterator[Client]:
    async with (
        httpx2.AsyncClient(headers=headers, timeout=30) as http,
        Client(streamable_http_client(url, http_client=http)) as mcp_client,
    ):
        yield mcp_client


async def test_untracked_guarded_calls_are_warned_about_once_naming_the_route() -> None:
    with stack() as (tracking, url), capture_logs() as logs:
        async with client(url) as mcp_client:
            for _ in range(REPEATS + 2):
                result = await mcp_client.call_tool("lookup_tracking", {"order_id": "FS-6"})
                assert not result.is_error
    assert tracking.calls["lookup_tracking"] == REPEATS + 2  # served: nothing to key them by
    warnings = [entry for entry in logs if entry["event"] == UNTRACKED_EVENT]
    assert len(warnings) == 1  # rate-limited
    assert warnings[0]["route"] == "/mcp" and warnings[0]["log_level"] == "warning"
    assert "x-loopguard-session" in warnings[0]["fix"]


async def test_credential_fallback_keys_the_agent_by_its_credential() -> None:
    with stack(fallback="credential") as (tracking, url), capture_logs() as logs:
        async with client(url, {"authorization": "Bearer agent-one-key"}) as mcp_client:
            for _ in range(REPEATS):
                assert not (
                    await mcp_client.call_tool("lookup_tracking", {"order_id": "A"})
                ).is_error
            stopped = await mcp_client.call_tool("lookup_tracking", {"order_id": "A"})
            assert stopped.is_error and "loopguard stopped this call" in stopped.content[0].text
        # Another credential is another agent.
        async with client(url, {"authorization": "Bearer agent-two-key"}) as other:
            assert not (await other.call_tool("lookup_tracking", {"order_id": "A"})).is_error
    assert tracking.calls["lookup_tracking"] == REPEATS + 1
    assert not [entry for entry in logs if entry["event"] == UNTRACKED_EVENT]
    assert "agent-one-key" not in repr(logs)
