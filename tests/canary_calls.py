"""Requests that carry canary secrets in the fields a leak test must watch, shared by
the canary suites (in-process servers and a real ``loopguard serve`` process)."""

from __future__ import annotations

from typing import Any


def mcp_call_with_canaries(api_key: str, email: str) -> tuple[dict[str, Any], dict[str, str]]:
    """An MCP ``tools/call`` whose JSON-RPC id and session id hold the canaries: the
    body and its headers."""
    call = {
        "jsonrpc": "2.0",
        "id": f"{email}-{api_key}",
        "method": "tools/call",
        "params": {"name": "lookup", "arguments": {"q": "x"}},
    }
    headers = {
        "accept": "application/json, text/event-stream",
        "mcp-session-id": f"sess-{api_key}",
    }
    return call, headers
