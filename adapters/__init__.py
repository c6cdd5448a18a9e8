"""Protocol adapters: the only code that knows OpenAI, Anthropic, MCP or plain HTTP tools.

Each adapter is one module implementing ``guard.engine.contract.Adapter``; ``ADAPTERS``
names them. Adding one: the module, its line here, and its name in the config schema
(``AdapterName`` in ``guard/engine/config.py``; a test keeps the two in step).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from guard.engine.config import RouteConfig
    from guard.engine.contract import Adapter

# Route adapter name -> "module:class", imported on first use so a deployment with only
# tool routes never imports the model code.
ADAPTERS: dict[str, str] = {
    "http-tool": "adapters.http_tool:HttpToolAdapter",
    "mcp": "adapters.mcp:McpAdapter",
    "openai": "adapters.openai:OpenAIAdapter",
    "anthropic": "adapters.anthropic:AnthropicAdapter",
}


def get_adapter(route: RouteConfig) -> Adapter:
    """The adapter a route names, configured for that route."""
    target = ADAPTERS.get(route.adapter)
    if target is None:
        raise ValueError(f"unknown adapter {route.adapter!r}")
    module, _, name = target.partition(":")
    adapter: Adapter = getattr(importlib.import_module(module), name)(route)
    return adapter
