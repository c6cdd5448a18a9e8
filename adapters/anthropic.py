"""Anthropic Messages (``/v1/messages``), streamed and not.

The guard message goes at the end of the top-level ``system`` (a string gets a
paragraph appended, a list of blocks gets one more text block): the Messages API has
no system role inside the conversation. Appending after existing blocks keeps any
``cache_control`` breakpoint on them valid.

Usage: ``input_tokens`` is reported as all input tokens, cached or not
(Anthropic's ``input_tokens`` + ``cache_read_input_tokens`` +
``cache_creation_input_tokens``, as the GenAI conventions ask); cached is
``cache_read_input_tokens``. ``message_start`` carries the input side, the
``message_delta`` the final (cumulative) output count.
"""

from __future__ import annotations

import re
from typing import Any

from adapters.model_common import (
    BodyError,
    ModelObserver,
    conversation_fields,
    dig,
    dump_object,
    json_answer,
    load_object,
    new_id,
    sse_answer,
    start_chat,
    usage_of,
)
from adapters.sse import SSEEvent
from adapters.trajectory import (
    history_from_anthropic,
    text_tail_anthropic,
    with_stopped_tools,
)
from guard.engine.calls import Usage, Verdict
from guard.engine.config import RouteConfig
from guard.engine.contract import Answer, ParsedRequest, PassthroughObserver, RequestView
from guard.engine.problem import nudge_text, stop_text


def is_messages(method: str, path: str) -> bool:
    path = path.rstrip("/")
    return method.upper() == "POST" and (path.endswith("/messages") or path == "messages")


class AnthropicAdapter:
    name = "anthropic"
    provider = "anthropic"

    def __init__(self, route: RouteConfig) -> None:
        self.route = route

    def parse(self, request: RequestView) -> ParsedRequest:
        if not is_messages(request.method, request.path):
            # count_tokens, models, batches: passed through, timed only.
            return ParsedRequest("passthrough", span_name=request.method)
        parsed, body = start_chat(request)
        if body is None:
            return parsed
        messages = body.get("messages")
        if not isinstance(messages, list):
            parsed.admission_error = "'messages' must be an array"
            return parsed
        # Only a request that continues after tool results is an agent in a tool loop;
        # a new user turn (a human answering) is never nudged or stopped.
        parsed.history = (
            history_from_anthropic(messages)
            if _ends_in_tool_result(messages)
            else with_stopped_tools(text_tail_anthropic(messages), history_from_anthropic, messages)
        )
        first_user = next(
            (m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"),
            None,
        )
        parsed.fields = conversation_fields(request.headers, body.get("system"), first_user)
        return parsed

    def nudge(self, request: RequestView, parsed: ParsedRequest, verdict: Verdict) -> bytes:
        body = load_object(parsed.forward_body or request.body)
        text = nudge_text(verdict)
        system = body.get("system")
        if isinstance(system, list):
            body["system"] = [*system, {"type": "text", "text": text}]
        elif isinstance(system, str) and system:
            body["system"] = f"{system}\n\n{text}"
        else:
            body["system"] = text
        return dump_object(body)

    def stop_answer(self, request: RequestView, parsed: ParsedRequest, verdict: Verdict) -> Answer:
        text = stop_text(verdict, self.route.stop_message)
        # Forced tool use or a JSON output format: answer as the API declines
        # (stop_reason "refusal"), which SDKs and frameworks report with its text.
        reason = "refusal" if _wants_structured(request.body) else "end_turn"
        return _message_stop(parsed.model or "loopguard", text, parsed.stream, reason)

    def observer(
        self, parsed: ParsedRequest, status: int, headers: dict[str, str]
    ) -> ModelObserver | PassthroughObserver:
        if parsed.operation != "chat":
            return PassthroughObserver()
        return AnthropicObserver(status, headers)


_EMPTY_TEXT = re.compile(r'"text"\s*:\s*""')


class AnthropicObserver(ModelObserver):
    """A ``message`` object, or ``message_start`` ... ``message_stop`` events (and pings)."""

    def quick(self, event: SSEEvent, now: float) -> bool:
        # Text deltas are most of a stream: no need to decode them to count them.
        if event.event == "content_block_delta" and '"text_delta"' in event.data:
            if not _EMPTY_TEXT.search(event.data):
                self.output(now)
            return True
        return event.event == "ping"

    def on_event(self, event: SSEEvent, data: Any, now: float) -> bool:
        if not isinstance(data, dict):
            return False
        kind = data.get("type") or event.event
        if kind == "content_block_delta":
            delta = data.get("delta") or {}
            fragment = delta.get("text") or delta.get("partial_json") or delta.get("thinking")
            if fragment:
                self.output(now)
                if delta.get("type") == "input_json_delta":
                    self.tools.add(data.get("index"), fragment)
        elif kind == "content_block_start":
            block = data.get("content_block") or {}
            if block.get("type") == "tool_use":
                self.tools.start(data.get("index"), block.get("name"), block.get("id"))
        elif kind == "message_start":
            message = data.get("message") or {}
            self.response_id = message.get("id")
            self.response_model = message.get("model")
            self._usage(message.get("usage"))
        elif kind == "message_delta":
            stop_reason = (data.get("delta") or {}).get("stop_reason")
            if stop_reason:
                self.finished(stop_reason)
            self._usage(data.get("usage"))
        elif kind == "message_stop":
            self.terminal = True
        return False

    def on_json(self, body: dict[str, Any]) -> None:
        if body.get("type") != "message":
            return
        self.response_id = body.get("id")
        self.response_model = body.get("model")
        if body.get("stop_reason"):
            self.finished(body["stop_reason"])
        for n, block in enumerate(body.get("content") or ()):
            if isinstance(block, dict) and block.get("type") == "tool_use":
                self.tools.start(n, block.get("name"), block.get("id"))
                self.tools.replace(n, dump_object(block.get("input") or {}).decode())
        self._usage(body.get("usage"))

    def _usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        previous: Usage | None = self.usage
        total_input = None
        if isinstance(usage.get("input_tokens"), int):
            total_input = (
                usage["input_tokens"]
                + (usage.get("cache_read_input_tokens") or 0)
                + (usage.get("cache_creation_input_tokens") or 0)
            )
        self.usage = usage_of(
            total_input,
            usage.get("output_tokens"),
            usage.get("cache_read_input_tokens"),
            previous=previous,
        )


def _wants_structured(raw: bytes) -> bool:
    try:
        body = load_object(raw)
    except BodyError:
        return False
    choice = body.get("tool_choice")
    forced = isinstance(choice, dict) and choice.get("type") in ("tool", "any")
    return forced or bool(body.get("output_format") or dig(body, "output_config", "format"))


def _message_stop(model: str, text: str, stream: bool, reason: str = "end_turn") -> Answer:
    mid = new_id("msg_loopguard_")
    usage = {"input_tokens": 0, "output_tokens": 0}
    message: dict[str, Any] = {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": reason,
        "stop_sequence": None,
        "usage": usage,
    }
    if not stream:
        return json_answer(message)
    events: list[dict[str, Any]] = [
        {
            "type": "message_start",
            "message": {**message, "content": [], "stop_reason": None},
        },
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": None},
            "usage": {"output_tokens": 0},
        },
        {"type": "message_stop"},
    ]
    return sse_answer((event["type"], event) for event in events)


def _ends_in_tool_result(messages: list[Any]) -> bool:
    last = messages[-1] if messages else None
    if not isinstance(last, dict) or last.get("role") != "user":
        return False
    content = last.get("content")
    return isinstance(content, list) and any(
        isinstance(block, dict) and block.get("type") == "tool_result" for block in content
    )
