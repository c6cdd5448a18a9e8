"""Executed tool calls rebuilt from OpenAI and Anthropic conversations."""

from __future__ import annotations

import json

from adapters.trajectory import (
    history_from_anthropic,
    history_from_openai_chat,
    history_from_openai_responses,
    looks_like_error,
)
from guard.engine.contract import HistoryStep


def _call(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def test_openai_chat_pairs_calls_and_results() -> None:
    messages = [
        {"role": "system", "content": "You track parcels."},
        {"role": "user", "content": "Where is #A10234?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                _call("c1", "lookup_tracking", '{"order": "#A10234"}'),
                _call("c2", "think", '{"thought": "hm"}'),
            ],
        },
        {"role": "tool", "tool_call_id": "c2", "content": "ok"},
        {"role": "tool", "tool_call_id": "c1", "content": '{"status": "in transit"}'},
        {"role": "assistant", "tool_calls": [_call("c3", "lookup_tracking", "not json")]},
        {"role": "tool", "tool_call_id": "c3", "content": [{"type": "text", "text": "Error: 500"}]},
        # The model just asked for this one: no result yet, so not executed.
        {"role": "assistant", "tool_calls": [_call("c4", "lookup_tracking", "{}")]},
    ]
    assert history_from_openai_chat(messages) == [
        HistoryStep("lookup_tracking", {"order": "#A10234"}, '{"status": "in transit"}', False),
        HistoryStep("think", {"thought": "hm"}, "ok", False),
        HistoryStep("lookup_tracking", "not json", "Error: 500", True),
    ]


def test_openai_error_heuristic() -> None:
    assert looks_like_error("Error: file not found")
    assert looks_like_error("error: boom")
    assert looks_like_error('{"error": "quota"}')
    assert looks_like_error({"error": {"code": 1}})
    assert looks_like_error("Traceback (most recent call last):\n ...")
    assert not looks_like_error("Errors: none found")
    assert not looks_like_error('{"error": null, "ok": true}')
    assert not looks_like_error("all good")


def test_openai_responses_items() -> None:
    items = [
        {"role": "user", "content": "go"},
        {
            "type": "function_call",
            "call_id": "a",
            "name": "read_file",
            "arguments": '{"path": "x.py", "offset": 0}',
        },
        {"type": "function_call_output", "call_id": "a", "output": "print(1)"},
        {"type": "function_call", "call_id": "b", "name": "read_file", "arguments": "{}"},
    ]
    assert history_from_openai_responses(items) == [
        HistoryStep("read_file", {"path": "x.py", "offset": 0}, "print(1)", False)
    ]


def test_anthropic_tool_use_and_results() -> None:
    messages = [
        {"role": "user", "content": "Where is my order?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {
                    "type": "tool_use",
                    "id": "tu1",
                    "name": "lookup_tracking",
                    "input": {"order": "#A10234"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "tu1",
                    "content": [{"type": "text", "text": "carrier timeout"}],
                    "is_error": True,
                },
            ],
        },
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "tu2", "name": "lookup_tracking", "input": {}}],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "tu2", "content": "in transit"}],
        },
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "tu3", "name": "lookup_tracking", "input": {}}],
        },
    ]
    assert history_from_anthropic(messages) == [
        HistoryStep("lookup_tracking", {"order": "#A10234"}, "carrier timeout", True),
        HistoryStep("lookup_tracking", {}, "in transit", False),
    ]


def test_tolerates_junk() -> None:
    assert history_from_openai_chat([{"role": "assistant", "tool_calls": [{"id": "x"}]}, 3]) == []
    assert history_from_anthropic([{"role": "user", "content": "text"}, None]) == []
    assert history_from_openai_responses([]) == []


def test_swe_agent_model_history_pairs_by_tool_call_ids() -> None:
    from adapters.trajectory import history_from_swe_agent

    def call(call_id: str, command: str) -> dict:
        return _call(call_id, "bash", json.dumps({"command": command}))

    history = [
        {"role": "system", "content": "SETTING: ..."},
        {"role": "assistant", "tool_calls": [call("a", "ls"), call("b", "pwd")]},
        # One tool message answers both calls of the turn.
        {"role": "tool", "content": "out", "tool_call_ids": ["a", "b"]},
        {"role": "assistant", "tool_calls": [call("c", "false")]},  # not executed yet
    ]
    # An empty trajectory is no run: the model history is read.
    assert history_from_swe_agent({"trajectory": [], "history": history}) == [
        HistoryStep("bash", {"command": "ls"}, "out", False),
        HistoryStep("bash", {"command": "pwd"}, "out", False),
    ]
