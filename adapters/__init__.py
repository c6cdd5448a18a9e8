"""Protocol adapters: the only code that knows OpenAI, Anthropic, MCP or plain HTTP tools."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from guard.engine.config import RouteConfig
    from guard.engine.contract import Adapter


def get_adapter(route: RouteConfig) -> Adapter:
    """The adapter a route names, configured for that route."""
    # Imported lazily so a deployment with only tool routes never imports the model code.
    if route.adapter == "http-tool":
        from adapters.http_tool import HttpToolAdapter

        return HttpToolAdapter(route)
    if route.adapter == "mcp":
        from adapters.mcp import McpAdapter

        return McpAdapter(route)
    if route.adapter == "openai":
        from adapters.openai import OpenAIAdapter

        return OpenAIAdapter(route)
    if route.adapter == "anthropic":
        from adapters.anthropic import AnthropicAdapter

        return AnthropicAdapter(route)
    raise ValueError(f"unknown adapter {route.adapter!r}")
