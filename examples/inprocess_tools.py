"""The in-process ``Guard`` around plain Python tool functions: no HTTP, no proxy.

Run it:

    python examples/inprocess_tools.py

A scripted "model" keeps asking for the same tracking lookup. The guard lets the
call run three times; the fourth raises ``StalledRepeatError`` before the tool runs.
The agent loop does what a real one should: it hands the error text to the model as
the tool's result (the text is written for a model), and the model changes course.
Every guarded call also emits an ``execute_tool {name}`` OpenTelemetry span.
"""

from __future__ import annotations

import asyncio
from typing import Any

from guard import Guard, StalledRepeatError
from guard.engine.config import Config

# Config in code (or Guard("loopguard.toml")); records off to keep the example tidy.
guard = Guard(Config.from_mapping({"loop": {"max_repeats": 3}, "telemetry": {"records": ""}}))
SESSION = "run-42"  # loop detection is per session: one per agent run

calls_made: list[str] = []


@guard.tool(session=SESSION)
def lookup_tracking(order_id: str) -> dict[str, str]:
    """A sync tool: the same scan every time."""
    calls_made.append("lookup_tracking")
    return {"order_id": order_id, "status": "in transit", "last_scan": "Memphis TN hub"}


@guard.tool(session=SESSION)
async def contact_carrier(order_id: str, question: str) -> str:
    """An async tool works the same way."""
    calls_made.append("contact_carrier")
    await asyncio.sleep(0)
    return f"Carrier: {order_id} is delayed by weather, new ETA in 2 days."


TOOLS: dict[str, Any] = {"lookup_tracking": lookup_tracking, "contact_carrier": contact_carrier}


def scripted_model(transcript: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Stands in for the model: loops on lookup_tracking until it is told to stop."""
    if any(turn.get("stopped") for turn in transcript):
        if not any(turn["tool"] == "contact_carrier" for turn in transcript):
            question = "Why has FS-1001 not moved?"
            return {
                "tool": "contact_carrier",
                "args": {"order_id": "FS-1001", "question": question},
            }
        return None  # done: the model answers the user
    return {"tool": "lookup_tracking", "args": {"order_id": "FS-1001"}}


async def run_agent() -> list[dict[str, Any]]:
    transcript: list[dict[str, Any]] = []
    while (call := scripted_model(transcript)) is not None:
        fn = TOOLS[call["tool"]]
        try:
            result = fn(**call["args"])
            if asyncio.iscoroutine(result):
                result = await result
            transcript.append({"tool": call["tool"], "result": result})
        except StalledRepeatError as err:
            # Not a crash: tell the model, in the tool result, why the call did not run.
            transcript.append({"tool": call["tool"], "result": str(err), "stopped": True})
            print(f"stopped: {err.tool} (rule {err.rule.value}, {err.repeats} repeats)")
    return transcript


def main() -> int:
    try:
        transcript = asyncio.run(run_agent())
    finally:
        guard.close()
    for n, turn in enumerate(transcript, 1):
        print(f"{n}. {turn['tool']}: {turn['result']}")
    print(f"tool functions actually run: {len(calls_made)} of {len(transcript)} calls")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
