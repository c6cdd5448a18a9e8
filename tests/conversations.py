"""Agent conversations in each model API's own form, built from (tool, args, result) steps.

Shared by the unit tests of the stall analysis and the SDK tests through the proxy.
"""

from __future__ import annotations

import json
from typing import Any

Step = tuple[str, dict[str, Any], str]

THINK: Step = ("think", {"thought": "let me look again"}, "ok")
SEARCH: Step = ("search", {"query": "flight AB123 status"}, "no results")
LOOP = [THINK, SEARCH, THINK, SEARCH, THINK, SEARCH]
PROGRESS = [("search", {"query": "flight AB123 status"}, f"page {n}") for n in range(5)]


# -- conversations in each API's own form ----------------------------------------------------


def chat_messages(steps: list[Step]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a travel agent."},
        {"role": "user", "content": "Is flight AB123 on time?"},
    ]
    for n, (tool, args, result) in enumerate(steps):
        call = {"id": f"call_{n}", "type": "function"}
        call["function"] = {"name": tool, "arguments": json.dumps(args)}
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        messages.append({"role": "tool", "tool_call_id": f"call_{n}", "content": result})
    return messages


def responses_input(steps: list[Step]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = [{"role": "user", "content": "Is flight AB123 on time?"}]
    for n, (tool, args, result) in enumerate(steps):
        items.append(
            {
                "type": "function_call",
                "call_id": f"call_{n}",
                "name": tool,
                "arguments": json.dumps(args),
            }
        )
        items.append({"type": "function_call_output", "call_id": f"call_{n}", "output": result})
    return items


def anthropic_messages(steps: list[Step]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Is flight AB123 on time?"}]
    for n, (tool, args, result) in enumerate(steps):
        use = {"type": "tool_use", "id": f"toolu_{n}", "name": tool, "input": args}
        messages.append({"role": "assistant", "content": [use]})
        tool_result = {"type": "tool_result", "tool_use_id": f"toolu_{n}", "content": result}
        messages.append({"role": "user", "content": [tool_result]})
    return messages
