"""Rebuild the executed tool calls (call + result) from a model conversation.

Used by ``loopguard replay`` and by the OpenAI/Anthropic adapters to see a stall in
the history a model request carries. Calls without a result yet (the model just asked
for them) are omitted: they have not been executed. Steps come in call order.

Errors: Anthropic marks them (``tool_result.is_error``). OpenAI has no error flag on
a tool result, so a result counts as an error when its text starts with ``Error``/
``error:``/``Exception``/``Traceback (most recent call last)`` or it is a JSON object
with a non-empty ``"error"`` key. This is a heuristic; it only feeds the identical
errors rule, and the stalled-repeat rule does not depend on it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from guard.engine.contract import HistoryStep

_ERROR_TEXT = re.compile(
    r"\s*(?:error\b|exception\b|traceback \(most recent call last\))", re.IGNORECASE
)


def _parse_arguments(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return arguments  # malformed arguments are still a call, fingerprinted as text
    return arguments if arguments is not None else {}


def _content_text(content: Any) -> Any:
    """Text of a result: a string, or the text parts of a content list joined."""
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                return content  # images or other blocks: keep the structure
        return "\n".join(texts)
    return content


def looks_like_error(outcome: Any) -> bool:
    if isinstance(outcome, dict):
        return bool(outcome.get("error"))
    if isinstance(outcome, str):
        if _ERROR_TEXT.match(outcome):
            return True
        head = outcome.lstrip()[:1]
        if head == "{":
            try:
                parsed = json.loads(outcome)
            except ValueError:
                return False
            return isinstance(parsed, dict) and bool(parsed.get("error"))
    return False


def _get(obj: Any, name: str, default: Any = None) -> Any:
    return obj.get(name, default) if isinstance(obj, dict) else default


def history_from_openai_chat(messages: list[Any]) -> list[HistoryStep]:
    """Chat Completions: assistant ``tool_calls`` paired with ``tool`` messages by id."""
    calls: list[tuple[str, str, Any]] = []  # (id, name, params) in call order
    results: dict[str, Any] = {}
    for message in messages or ():
        role = _get(message, "role")
        if role == "assistant":
            for call in _get(message, "tool_calls") or ():
                function = _get(call, "function") or {}
                call_id = _get(call, "id")
                name = _get(function, "name")
                if call_id is None or not isinstance(name, str):
                    continue
                calls.append((call_id, name, _parse_arguments(_get(function, "arguments"))))
        elif role == "tool":
            call_id = _get(message, "tool_call_id")
            if call_id is not None:
                results[call_id] = _content_text(_get(message, "content"))
    return _paired(calls, results)


def history_from_openai_responses(input_items: list[Any]) -> list[HistoryStep]:
    """Responses API: ``function_call`` items paired with ``function_call_output`` by call_id."""
    calls: list[tuple[str, str, Any]] = []
    results: dict[str, Any] = {}
    for item in input_items or ():
        kind = _get(item, "type")
        if kind in ("function_call", "custom_tool_call"):
            call_id, name = _get(item, "call_id"), _get(item, "name")
            if call_id is None or not isinstance(name, str):
                continue
            raw = _get(item, "arguments") if kind == "function_call" else _get(item, "input")
            params = _parse_arguments(raw) if kind == "function_call" else raw
            calls.append((call_id, name, params))
        elif kind in ("function_call_output", "custom_tool_call_output"):
            call_id = _get(item, "call_id")
            if call_id is not None:
                results[call_id] = _content_text(_get(item, "output"))
    return _paired(calls, results)


def history_from_anthropic(messages: list[Any]) -> list[HistoryStep]:
    """Messages API: ``tool_use`` blocks paired with ``tool_result`` blocks by id."""
    calls: list[tuple[str, str, Any]] = []
    results: dict[str, tuple[Any, bool]] = {}
    for message in messages or ():
        content = _get(message, "content")
        if not isinstance(content, list):
            continue
        for block in content:
            kind = _get(block, "type")
            if kind == "tool_use":
                call_id, name = _get(block, "id"), _get(block, "name")
                if call_id is not None and isinstance(name, str):
                    calls.append((call_id, name, _get(block, "input", {})))
            elif kind == "tool_result":
                call_id = _get(block, "tool_use_id")
                if call_id is not None:
                    outcome = _content_text(_get(block, "content", ""))
                    results[call_id] = (outcome, bool(_get(block, "is_error", False)))
    steps = []
    for call_id, name, params in calls:
        if call_id in results:
            outcome, error = results[call_id]
            steps.append(HistoryStep(name, params, outcome, error))
    return steps


__all__ = [
    "history_from_anthropic",
    "history_from_openai_chat",
    "history_from_openai_responses",
    "looks_like_error",
]


def _paired(calls: list[tuple[Any, str, Any]], results: dict[Any, Any]) -> list[HistoryStep]:
    """Calls that have their result, in call order; unanswered calls are not history yet."""
    steps = []
    for call_id, name, params in calls:
        if call_id in results:
            outcome = results[call_id]
            steps.append(HistoryStep(name, params, outcome, looks_like_error(outcome)))
    return steps
