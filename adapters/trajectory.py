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

import re
from collections.abc import Callable, Iterator
from typing import Any

from guard.engine.contract import HistoryStep
from guard.engine.conversation import retry_after_stop
from guard.engine.fingerprint import loads_json

_ERROR_TEXT = re.compile(
    r"\s*(?:error\b|exception\b|traceback \(most recent call last\))", re.IGNORECASE
)


def _parse_arguments(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return loads_json(arguments) if arguments.strip() else {}
        except ValueError:  # JSONTooDeep too: never a RecursionError
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
                parsed = loads_json(outcome)
            except ValueError:
                return False
            return isinstance(parsed, dict) and bool(parsed.get("error"))
    return False


def _get(obj: Any, name: str, default: Any = None) -> Any:
    return obj.get(name, default) if isinstance(obj, dict) else default


def pairing_id(obj: Any, name: str) -> Any:
    """A call id that can pair a call with its result: an object or array (unhashable,
    never an id an API sends) counts as missing, so the call is not history."""
    value = _get(obj, name)
    return None if isinstance(value, dict | list) else value


def history_from_openai_chat(messages: list[Any]) -> list[HistoryStep]:
    """Chat Completions: assistant ``tool_calls`` paired with ``tool`` messages by id."""
    calls: list[tuple[str, str, Any]] = []  # (id, name, params) in call order
    results: dict[str, Any] = {}
    for message in messages or ():
        role = _get(message, "role")
        if role == "assistant":
            tool_calls = _get(message, "tool_calls")
            for call in tool_calls if isinstance(tool_calls, list) else ():
                function = _get(call, "function") or {}
                call_id = pairing_id(call, "id")
                name = _get(function, "name")
                if call_id is None or not isinstance(name, str):
                    continue
                calls.append((call_id, name, _parse_arguments(_get(function, "arguments"))))
        elif role == "tool":
            call_id = pairing_id(message, "tool_call_id")
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
            call_id, name = pairing_id(item, "call_id"), _get(item, "name")
            if call_id is None or not isinstance(name, str):
                continue
            raw = _get(item, "arguments") if kind == "function_call" else _get(item, "input")
            params = _parse_arguments(raw) if kind == "function_call" else raw
            calls.append((call_id, name, params))
        elif kind in ("function_call_output", "custom_tool_call_output"):
            call_id = pairing_id(item, "call_id")
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
                call_id, name = pairing_id(block, "id"), _get(block, "name")
                if call_id is not None and isinstance(name, str):
                    calls.append((call_id, name, _get(block, "input", {})))
            elif kind == "tool_result":
                call_id = pairing_id(block, "tool_use_id")
                if call_id is not None:
                    outcome = _content_text(_get(block, "content", ""))
                    results[call_id] = (outcome, bool(_get(block, "is_error", False)))
    steps = []
    for call_id, name, params in calls:
        if call_id in results:
            outcome, error = results[call_id]
            steps.append(HistoryStep(name, params, outcome, error))
    return steps


# -- the text tail: assistant and user turns after the last tool call ----------------------

# Turns read back from the end of a request at most (the text-loop rule needs a few).
MAX_TEXT_TURNS = 64


def _text_of(content: Any) -> str | None:
    """The text of a turn's content: a string, or its text parts joined (None: none)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        ]
        return "\n".join(texts) if texts else None
    return None


def _text_tail(turns: Iterator[tuple[str, str | None]]) -> list[HistoryStep]:
    """(kind, text) read lazily from the end ("tool" ends the tail) -> the tail, oldest
    first. Empty unless the request asks for an assistant turn after a user turn."""
    tail: list[HistoryStep] = []
    for kind, text in turns:
        if kind == "tool" or len(tail) >= MAX_TEXT_TURNS or (not tail and kind != "user"):
            break
        if text is not None:
            tail.append(HistoryStep("", None, text, kind=kind))
    tail.reverse()
    return tail


def _chat_turn(message: Any) -> tuple[str, str | None]:
    role = _get(message, "role")
    if role == "tool" or _get(message, "tool_calls"):
        return "tool", None
    if role in ("user", "assistant"):
        return "user" if role == "user" else "text", _text_of(_get(message, "content"))
    return "", None  # system / developer messages are not turns


def text_tail_openai_chat(messages: list[Any]) -> list[HistoryStep]:
    """Chat Completions: the assistant turns without tool calls, and the user turns,
    after the last tool call (``HistoryStep.kind`` "text" / "user")."""
    return _text_tail(map(_chat_turn, _last(messages)))


def _responses_turn(item: Any) -> tuple[str, str | None]:
    kind = _get(item, "type", "message")
    if kind != "message":
        return ("", None) if kind == "reasoning" else ("tool", None)
    role = _get(item, "role")
    if role in ("user", "assistant"):
        return "user" if role == "user" else "text", _text_of(_get(item, "content"))
    return "", None


def text_tail_openai_responses(input_items: Any) -> list[HistoryStep]:
    """Responses API: the same tail, from ``message`` items (a string input: none)."""
    if not isinstance(input_items, list):
        return []
    return _text_tail(map(_responses_turn, _last(input_items)))


def _anthropic_turn(message: Any) -> tuple[str, str | None]:
    role, content = _get(message, "role"), _get(message, "content")
    if isinstance(content, list) and any(
        _get(block, "type") in ("tool_use", "tool_result") for block in content
    ):
        return "tool", None
    if role in ("user", "assistant"):
        return "user" if role == "user" else "text", _text_of(content)
    return "", None


def text_tail_anthropic(messages: list[Any]) -> list[HistoryStep]:
    """Messages API: the same tail (a turn with tool_use or tool_result blocks ends it)."""
    return _text_tail(map(_anthropic_turn, _last(messages)))


def with_stopped_tools(
    tail: list[HistoryStep], tools: Callable[[list[Any]], list[HistoryStep]], items: list[Any]
) -> list[HistoryStep]:
    """The text tail, with the request's tool history before it when the tail is a
    framework's retry of a stopped request (the engine judges that on the tool history)."""
    if tail and retry_after_stop(tail):
        return tools(items) + tail
    return tail


def _last(items: list[Any]) -> Iterator[Any]:
    """The items newest first, lazily: the tail is read only as far as it goes."""
    return reversed(items) if isinstance(items, list) else iter(())


__all__ = [
    "MAX_TEXT_TURNS",
    "history_from_anthropic",
    "history_from_openai_chat",
    "history_from_openai_responses",
    "looks_like_error",
    "pairing_id",
    "text_tail_anthropic",
    "text_tail_openai_chat",
    "text_tail_openai_responses",
    "with_stopped_tools",
]


def _paired(calls: list[tuple[Any, str, Any]], results: dict[Any, Any]) -> list[HistoryStep]:
    """Calls that have their result, in call order; unanswered calls are not history yet."""
    steps = []
    for call_id, name, params in calls:
        if call_id in results:
            outcome = results[call_id]
            steps.append(HistoryStep(name, params, outcome, looks_like_error(outcome)))
    return steps


# -- recorded runs of other agents (``loopguard replay``) ----------------------------------


def history_from_swe_agent(doc: dict[str, Any]) -> list[HistoryStep]:
    """A SWE-agent ``.traj`` file: ``{"trajectory": [{"action", "observation", ...}], ...}``.

    Each entry is one command the agent ran in its shell (``"find_file x.py"``,
    ``"python reproduce.py"``, ``"edit 10:12 ..."``): the tool is the command's first
    word, the call the whole command. The file has no error flag; the result's text
    decides (``looks_like_error``). A file without trajectory entries (a
    function-calling run saved as its model history only) is read from ``history``.
    """
    steps = []
    for entry in _get(doc, "trajectory") or ():
        action = _get(entry, "action")
        if not isinstance(action, str) or not action.strip():
            continue
        command = action.strip()
        outcome = _get(entry, "observation")
        tool = command.split(None, 1)[0]
        steps.append(HistoryStep(tool, {"command": command}, outcome, looks_like_error(outcome)))
    if steps:
        return steps
    return history_from_swe_agent_messages(_get(doc, "history") or [])


def history_from_swe_agent_messages(messages: list[Any]) -> list[HistoryStep]:
    """A SWE-agent model history: OpenAI chat messages, except that a ``tool`` message
    names the calls it answers in a list, ``tool_call_ids``. The tool is the function
    the model called, the call its arguments (as on a live model route)."""
    chat: list[Any] = []
    for message in messages:
        ids = _get(message, "tool_call_ids")
        if _get(message, "role") == "tool" and isinstance(ids, list):
            chat.extend({**message, "tool_call_id": call_id} for call_id in ids)
        else:
            chat.append(message)
    return history_from_openai_chat(chat)


def is_swe_agent_traj(value: Any) -> bool:
    return isinstance(value, dict) and (
        isinstance(value.get("trajectory"), list) or isinstance(value.get("history"), list)
    )


# OpenHands action args that describe the call, not what it does.
_OPENHANDS_NOISE = frozenset(
    {"thought", "impl_source", "translated_ipython_code", "confirmation_state", "security_risk"}
)
_OPENHANDS_SKIP = frozenset({"finish", "change_agent_state", "recall", "system", "reject"})


def history_from_openhands(events: list[Any]) -> list[HistoryStep]:
    """An OpenHands event log (its saved trajectory: a list of events, each an action
    ``{"id", "source", "action", "args", "tool_call_metadata"?}`` or an observation
    ``{"cause": action id, "observation", "content", "extras"}``).

    Actions paired with their observations by ``cause``; the tool is the function the
    model called (``tool_call_metadata.function_name``) or else the action type. A user
    ``message`` is a human turn (``kind`` "user"); the agent's own messages and state
    changes are not calls. An error is an ``error`` observation or a command's non-zero
    exit code.
    """
    results: dict[Any, Any] = {}
    for event in events or ():
        cause = _get(event, "cause")
        if cause is not None and _get(event, "observation") not in (None, "null"):
            results.setdefault(cause, event)
    steps = []
    for event in events or ():
        action = _get(event, "action")
        if not isinstance(action, str) or action in _OPENHANDS_SKIP:
            continue
        args = _get(event, "args") or {}
        if action == "message":
            if _get(event, "source") == "user":
                steps.append(HistoryStep("", None, _get(args, "content"), kind="user"))
            continue
        observation = results.get(_get(event, "id"))
        if observation is None:
            continue  # never executed
        name = _get(_get(event, "tool_call_metadata"), "function_name")
        tool = name if isinstance(name, str) and name else action
        params = {k: v for k, v in args.items() if k not in _OPENHANDS_NOISE}
        exit_code = _get(_get(_get(observation, "extras"), "metadata"), "exit_code")
        error = _get(observation, "observation") == "error" or (
            isinstance(exit_code, int) and exit_code not in (0, -1)
        )
        steps.append(HistoryStep(tool, params, _get(observation, "content"), error))
    return steps


def is_openhands_event(value: Any) -> bool:
    return (
        isinstance(value, dict) and "id" in value and ("action" in value or "observation" in value)
    )


__all__ += [
    "history_from_openhands",
    "history_from_swe_agent",
    "history_from_swe_agent_messages",
    "is_openhands_event",
    "is_swe_agent_traj",
]
