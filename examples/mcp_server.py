"""An MCP server (the official ``mcp`` SDK, streamable HTTP) that guards itself.

Run it (from the repository root):

    uvicorn examples.mcp_server:app --port 8000
    # or: python examples/mcp_server.py        (PORT=8000 by default)

and connect any MCP client to ``http://127.0.0.1:8000/mcp``. An agent that calls
``lookup_tracking`` with the same order again and again gets the scan three times;
the fourth call never reaches the tool: it is answered with an MCP tool error
(``isError: true``) whose text tells the model why and what to do instead. MCP
reports tool errors in-band, so the client and the session carry on normally.

Loop detection is per session: MCP clients on protocol 2025-11-25 send
``Mcp-Session-Id`` on their own. The stateless protocol (2026-07-28, which
``mcp.Client`` may choose) has no session id: have that client send
``x-loopguard-session`` (headers on the ``httpx2.AsyncClient`` passed as
``http_client``), see ``proxy/README.md``.

Durable records (one redacted JSON line per call) go to ./loopguard-records.jsonl;
``RECORDS=path`` moves them, ``RECORDS=`` turns them off.
"""

from __future__ import annotations

import os

from mcp.server.mcpserver import MCPServer

from guard import GuardMiddleware
from guard.engine.config import Config

mcp = MCPServer("fastship-tracking")


@mcp.tool()
def lookup_tracking(order_id: str) -> str:
    """Look up the tracking status of an order."""
    # The same scan every time: an agent waiting for it to change is looping.
    return f"Order {order_id}: in transit, last scan Memphis TN hub."


@mcp.tool()
def create_return_label(order_id: str, reason: str) -> str:
    """Create a return label for an order."""
    return f"Return label for {order_id} created ({reason})."


# Guard the MCP endpoint: tools/call requests under /mcp go through loopguard; all
# other MCP traffic (initialize, tools/list, notifications) passes through unchanged.
# With the middleware the app itself is the upstream, so `upstream` is a placeholder.
# Durable records: one redacted JSON line per call (RECORDS="" turns them off).
RECORDS = os.environ.get("RECORDS", "loopguard-records.jsonl")

config = Config.from_mapping(
    {
        "loop": {"max_repeats": 3},
        "telemetry": {"records": RECORDS},
        "routes": [{"prefix": "/mcp", "upstream": "http://app", "adapter": "mcp"}],
    }
)

# The SDK's Starlette app serves /mcp; its lifespan (which starts the MCP session
# manager) passes through the middleware.
app = GuardMiddleware(mcp.streamable_http_app(), config)


def main() -> None:
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))


if __name__ == "__main__":
    main()
