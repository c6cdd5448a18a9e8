"""OpenAI: Chat Completions (``/v1/chat/completions``) and Responses (``/v1/responses``).

One adapter per route, dispatching on the path's last segments so that a route may be
mounted as ``/openai`` (rest ``/v1/chat/completions``) or ``/v1`` (rest
``/chat/completions``). Other paths (``GET /v1/models``, ``GET /v1/responses/{id}``)
pass through, observed only for timing.

Guard messages:
- Chat Completions: a ``{"role": "system"}`` message appended after the last tool
  result. "system" rather than "developer": every OpenAI-compatible server accepts it,
  and OpenAI maps it to the developer role for the models that use one.
- Responses: an input item ``{"type": "message", "role": "developer"}`` appended
  (the Responses API's own instruction role; ``instructions`` is left untouched so
  the cached prompt prefix stays valid).

With ``previous_response_id`` the earlier turns live on OpenAI's side: the adapter
names the response continued (``ParsedRequest.continues``) and the tool results whose
calls are in it (``open_results``); the Exchange puts the turns it kept back
(``guard/doors/chain.py``). With ``conversation`` (the Conversations API) the same
holds per conversation: the adapter names it (``ParsedRequest.conversation``) and the
Exchange keeps the turns per conversation instead of per response.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from adapters.model_common import (
    BodyError,
    ModelObserver,
    conversation_fields,
    dig,
    dump_object,
    json_answer,
    load_object,
    new_id,
    now_s,
    sse_answer,
    start_chat,
    usage_of,
)
from adapters.sse import SSEEvent
from adapters.trajectory import (
    history_from_openai_chat,
    history_from_openai_responses,
    looks_like_error,
    pairing_id,
    text_tail_openai_chat,
    text_tail_openai_responses,
    with_stopped_tools,
)
from guard.engine.calls import Usage, Verdict
from guard.engine.config import RouteConfig
from guard.engine.contract import Answer, ParsedRequest, PassthroughObserver, RequestView
from guard.engine.problem import nudge_text, stop_text

Api = Literal["chat", "responses"]


def api_of(method: str, path: str) -> Api | None:
    if method.upper() != "POST":
        return None
    path = path.rstrip("/")
    if path.endswith("/chat/completions") or path == "chat/completions":
        return "chat"
    if path.endswith("/responses") or path == "responses":
        return "responses"
    return None


class OpenAIAdapter:
    name = "openai"
    provider = "openai"

    def __init__(self, route: RouteConfig) -> None:
        self.route = route

    # -- request -----------------------------------------------------------------------

    def parse(self, request: RequestView) -> ParsedRequest:
        api = api_of(request.method, request.path)
        if api is None:
            return ParsedRequest("passthrough", span_name=request.method)
        parsed, body = start_chat(request)
        if body is None:
            return parsed
        if api == "chat":
            self._parse_chat(request, body, parsed)
        else:
            self._parse_responses(request, body, parsed)
        return parsed

    def _parse_chat(
        self, request: RequestView, body: dict[str, Any], parsed: ParsedRequest
    ) -> None:
        messages = body.get("messages")
        if not isinstance(messages, list):
            parsed.admission_error = "'messages' must be an array"
            return
        # Only a request that continues after tool results is an agent in a tool loop;
        # a new user turn (a human answering) is never nudged or stopped.
        ends_in_tool = bool(messages) and _role(messages[-1]) == "tool"
        parsed.history = (
            history_from_openai_chat(messages)
            if ends_in_tool
            else with_stopped_tools(
                text_tail_openai_chat(messages), history_from_openai_chat, messages
            )
        )
        parsed.fields = conversation_fields(
            request.headers,
            _first(messages, ("system", "developer")),
            _first(messages, ("user",)),
        )
        if (
            parsed.stream
            and self.route.inject_stream_usage
            and dig(body, "stream_options", "include_usage") is not True
        ):
            # The usage chunk this asks for is the guard's, not the client's: the
            # observer hides it (injected_stream_usage).
            options = body.get("stream_options")
            options = dict(options) if isinstance(options, dict) else {}
            options["include_usage"] = True
            parsed.forward_body = dump_object({**body, "stream_options": options})
            parsed.injected_stream_usage = True

    def _parse_responses(
        self, request: RequestView, body: dict[str, Any], parsed: ParsedRequest
    ) -> None:
        items = body.get("input")
        parsed.history = text_tail_openai_responses(items)
        if isinstance(items, list):
            parsed.history = with_stopped_tools(
                parsed.history, history_from_openai_responses, items
            )
        parsed.open_results = {}
        previous = body.get("previous_response_id")
        parsed.continues = previous if isinstance(previous, str) and previous else None
        conversation = body.get("conversation")
        if isinstance(conversation, dict):
            conversation = conversation.get("id")
        if parsed.continues is None and isinstance(conversation, str) and conversation:
            parsed.conversation = conversation
        if (
            isinstance(items, list)
            and items
            and isinstance(items[-1], dict)
            and items[-1].get("type") == "function_call_output"
        ):
            parsed.history = history_from_openai_responses(items)
            if parsed.continues is not None or parsed.conversation is not None:
                parsed.open_results = _open_results(items)
        first_user = items if isinstance(items, str) else None
        if isinstance(items, list):
            first_user = _first(items, ("user",))
        parsed.fields = conversation_fields(
            request.headers,
            body.get("instructions"),
            first_user,
            explicit=conversation if isinstance(conversation, str) else None,
        )

    def nudge(self, request: RequestView, parsed: ParsedRequest, verdict: Verdict) -> bytes:
        body = load_object(parsed.forward_body or request.body)
        text = nudge_text(verdict)
        if api_of(request.method, request.path) == "chat":
            body["messages"] = [*body["messages"], {"role": "system", "content": text}]
        else:
            items = body.get("input")
            if isinstance(items, str):
                items = [{"role": "user", "content": items}]
            elif not isinstance(items, list):
                items = []
            body["input"] = [*items, {"type": "message", "role": "developer", "content": text}]
        return dump_object(body)

    # -- stop answer -------------------------------------------------------------------

    def stop_answer(self, request: RequestView, parsed: ParsedRequest, verdict: Verdict) -> Answer:
        text = stop_text(verdict, self.route.stop_message)
        model = parsed.model or "loopguard"
        chat = api_of(request.method, request.path) == "chat"
        refuse = _wants_structured(request.body, chat)
        if chat:
            include_usage = _client_asked_usage(request.body)
            return _chat_stop(model, text, parsed.stream, include_usage, refuse)
        return _responses_stop(model, text, parsed.stream, refuse)

    # -- response ----------------------------------------------------------------------

    def observer(
        self, parsed: ParsedRequest, status: int, headers: dict[str, str]
    ) -> ModelObserver | PassthroughObserver:
        if parsed.operation != "chat":
            return PassthroughObserver()
        return OpenAIObserver(status, headers, hide_usage=parsed.injected_stream_usage)


def _first(items: list[Any], roles: tuple[str, ...]) -> Any:
    """Content of the first message with one of ``roles`` (None if there is none)."""
    for item in items:
        if isinstance(item, dict) and item.get("role") in roles:
            return item.get("content")
    return None


def _open_results(items: list[Any]) -> dict[Any, tuple[Any, bool]]:
    """Tool results in ``items`` whose call is not there (it is in the response the
    request continues): call id -> (result, looks like an error)."""
    called = {
        pairing_id(item, "call_id")
        for item in items
        if isinstance(item, dict) and item.get("type") == "function_call"
    }
    results: dict[Any, tuple[Any, bool]] = {}
    for item in items:
        if isinstance(item, dict) and item.get("type") == "function_call_output":
            call_id = pairing_id(item, "call_id")
            if call_id is not None and call_id not in called:
                output = item.get("output")
                results[call_id] = (output, looks_like_error(output))
    return results


def _wants_structured(raw: bytes, chat: bool) -> bool:
    """The request asks for structured output (a JSON schema, or a forced tool call): a
    stop must then come in the API's refusal form, which SDKs and frameworks report as
    a refusal (with its text) instead of failing to parse the text as the output."""
    try:
        body = load_object(raw)
    except BodyError:
        return False
    schema = dig(body, "response_format", "type") if chat else dig(body, "text", "format", "type")
    choice = body.get("tool_choice")
    forced = choice == "required" or (isinstance(choice, dict) and choice.get("type") != "auto")
    return schema == "json_schema" or forced


def _client_asked_usage(raw: bytes) -> bool:
    try:
        return dig(load_object(raw), "stream_options", "include_usage") is True
    except BodyError:
        return False


# -- observers -----------------------------------------------------------------------------


_RESPONSES_OUTPUT_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
    }
)
_RESPONSES_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})


# A chat chunk whose finish_reason or usage is set, or that reports an error: decode it.
_CHAT_SPECIAL = re.compile(r'"(?:finish_reason|usage)"\s*:\s*[^n\s]|"tool_calls"|"error"')
# A chat chunk carrying output: a non-empty text field in its delta.
_CHAT_OUTPUT = re.compile(r'"(?:content|refusal|reasoning_content|reasoning)"\s*:\s*"[^"]')
_RESPONSES_TEXT_DELTAS = _RESPONSES_OUTPUT_DELTAS - {"response.function_call_arguments.delta"}


class OpenAIObserver(ModelObserver):
    """Chat Completions (``chat.completion`` JSON, or chunks ending with ``[DONE]``) and
    Responses (a ``response`` object, or typed events ending with ``response.completed``).

    The two are told apart by the response itself (typed ``response.*`` events, or
    ``"object": "response"``), so the observer needs no request path.
    """

    # The one event hidden: the usage chunk, whose usage is an object, never null.
    may_hide = re.compile(rb'"usage"\s*:\s*[^n\s]')

    def __init__(self, status: int, headers: dict[str, str], *, hide_usage: bool) -> None:
        super().__init__(status, headers)
        self.hiding = hide_usage and self._sse

    def quick(self, event: SSEEvent, now: float) -> bool:
        if event.event in _RESPONSES_TEXT_DELTAS:
            self.output(now)
            return True
        data = event.data
        # A plain chat text chunk after the first: count it, nothing else to learn.
        if (
            self.first_output_at is None
            or event.event
            or not data.startswith("{")
            or _CHAT_SPECIAL.search(data)
        ):
            return False
        if _CHAT_OUTPUT.search(data):
            self.output(now)
        return True

    def on_event(self, event: SSEEvent, data: Any, now: float) -> bool:
        if not isinstance(data, dict):
            if data == "[DONE]":
                self.terminal = True
            return False
        kind = data.get("type") or event.event
        if isinstance(kind, str) and kind.startswith("response."):
            self._responses_event(kind, data, now)
            return False
        return self._chat_chunk(data, now)

    def on_json(self, body: dict[str, Any]) -> None:
        if body.get("object") == "response":
            self._response(body, with_tools=True)
            return
        self.response_id = body.get("id")
        self.response_model = body.get("model")
        for choice in body.get("choices") or ():
            if choice.get("finish_reason"):
                self.finished(choice["finish_reason"])
            for n, call in enumerate(dig(choice, "message", "tool_calls") or ()):
                function = call.get("function") or {}
                self.tools.start(
                    (choice.get("index", 0), n),
                    function.get("name"),
                    call.get("id"),
                    function.get("arguments") or "",
                )
        if isinstance(body.get("usage"), dict):
            self.usage = _chat_usage(body["usage"])

    # -- Chat Completions ------------------------------------------------------------------

    def _chat_chunk(self, data: dict[str, Any], now: float) -> bool:
        if self.response_id is None:
            self.response_id = data.get("id")
            self.response_model = data.get("model")
        choices = data.get("choices")
        carried = False
        if isinstance(choices, list):
            for choice in choices:
                delta = choice.get("delta") or {}
                # Not the role-only first chunk: only deltas that carry output count.
                if (
                    delta.get("content")
                    or delta.get("tool_calls")
                    or delta.get("refusal")
                    or delta.get("reasoning_content")
                    or delta.get("reasoning")
                ):
                    carried = True
                for call in delta.get("tool_calls") or ():
                    function = call.get("function") or {}
                    self.tools.start(
                        (choice.get("index", 0), call.get("index", 0)),
                        function.get("name"),
                        call.get("id"),
                        function.get("arguments") or "",
                    )
                if choice.get("finish_reason"):
                    self.finished(choice["finish_reason"])
        if carried:
            self.output(now)
        usage = data.get("usage")
        if isinstance(usage, dict):
            self.usage = _chat_usage(usage)
            # The usage-only chunk (no choices) loopguard asked for: not the client's to see.
            return self.hiding and not choices
        return False

    # -- Responses -------------------------------------------------------------------------

    def _responses_event(self, kind: str, data: dict[str, Any], now: float) -> None:
        if kind in _RESPONSES_OUTPUT_DELTAS:
            self.output(now)
            if kind == "response.function_call_arguments.delta":
                self.tools.add(data.get("output_index"), data.get("delta") or "")
        elif kind in ("response.output_item.added", "response.output_item.done"):
            item = data.get("item") or {}
            if item.get("type") == "function_call":
                key = data.get("output_index")
                self.tools.start(key, item.get("name"), item.get("call_id"))
                if kind == "response.output_item.done" and isinstance(item.get("arguments"), str):
                    self.tools.replace(key, item["arguments"])
        elif kind in _RESPONSES_TERMINAL:
            self.terminal = True
            self._response(data.get("response") or {}, with_tools=False)
        elif kind in ("response.created", "response.in_progress"):
            response = data.get("response") or {}
            self.response_id = self.response_id or response.get("id")
            self.response_model = self.response_model or response.get("model")

    def _response(self, response: dict[str, Any], *, with_tools: bool) -> None:
        self.response_id = response.get("id") or self.response_id
        self.response_model = response.get("model") or self.response_model
        reason = dig(response, "incomplete_details", "reason") or response.get("status")
        if reason:
            self.finished(reason)
        usage = response.get("usage")
        if isinstance(usage, dict):
            self.usage = usage_of(
                usage.get("input_tokens"),
                usage.get("output_tokens"),
                dig(usage, "input_tokens_details", "cached_tokens"),
            )
        if with_tools:
            for n, item in enumerate(response.get("output") or ()):
                if isinstance(item, dict) and item.get("type") == "function_call":
                    self.tools.start(
                        n, item.get("name"), item.get("call_id"), item.get("arguments") or ""
                    )


def _chat_usage(usage: dict[str, Any]) -> Usage:
    return usage_of(
        usage.get("prompt_tokens"),
        usage.get("completion_tokens"),
        dig(usage, "prompt_tokens_details", "cached_tokens"),
    )


# -- synthetic stop answers ----------------------------------------------------------------


def _chat_stop(model: str, text: str, stream: bool, include_usage: bool, refuse: bool) -> Answer:
    # A refusal: content null, the text under "refusal" (as the API declines).
    said = {"content": None, "refusal": text} if refuse else {"content": text, "refusal": None}
    cid, created = new_id("chatcmpl-loopguard-"), now_s()
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    if not stream:
        return json_answer(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", **said},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
        )

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            body["usage"] = None
        return body

    events: list[tuple[str | None, Any]] = [
        (None, chunk({"role": "assistant", "refusal" if refuse else "content": ""}, None)),
        (None, chunk({"refusal" if refuse else "content": text}, None)),
        (None, chunk({}, "stop")),
    ]
    if include_usage:
        events.append(
            (
                None,
                {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                },
            )
        )
    events.append((None, "[DONE]"))
    return sse_answer(events)


def _responses_stop(model: str, text: str, stream: bool, refuse: bool) -> Answer:
    rid, mid, created = new_id("resp_loopguard_"), new_id("msg_loopguard_"), now_s()
    part: dict[str, Any] = (
        {"type": "refusal", "refusal": text}
        if refuse
        else {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    )
    message = {
        "type": "message",
        "id": mid,
        "status": "completed",
        "role": "assistant",
        "content": [part],
    }

    def response(status: str, output: list[Any]) -> dict[str, Any]:
        return {
            "id": rid,
            "object": "response",
            "created_at": created,
            "status": status,
            "model": model,
            "output": output,
            "error": None,
            "incomplete_details": None,
            "instructions": None,
            "metadata": {},
            "parallel_tool_calls": True,
            "temperature": None,
            "tool_choice": "auto",
            "tools": [],
            "top_p": None,
            "usage": {
                "input_tokens": 0,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": 0,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": 0,
            }
            if status == "completed"
            else None,
        }

    if not stream:
        answer = json_answer(response("completed", [message]))
        answer.response_id = rid
        return answer
    at = {"item_id": mid, "output_index": 0, "content_index": 0}
    steps: list[dict[str, Any]] = [
        {"type": "response.created", "response": response("in_progress", [])},
        {"type": "response.in_progress", "response": response("in_progress", [])},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {**message, "status": "in_progress", "content": []},
        },
        *_responses_deltas(at, part, text, refuse),
        {"type": "response.content_part.done", **at, "part": part},
        {"type": "response.output_item.done", "output_index": 0, "item": message},
        {"type": "response.completed", "response": response("completed", [message])},
    ]
    answer = sse_answer(
        (step["type"], {**step, "sequence_number": n}) for n, step in enumerate(steps)
    )
    answer.response_id = rid
    return answer


def _responses_deltas(
    at: dict[str, Any], part: dict[str, Any], text: str, refuse: bool
) -> list[dict[str, Any]]:
    if refuse:
        return [
            {"type": "response.content_part.added", **at, "part": {**part, "refusal": ""}},
            {"type": "response.refusal.delta", **at, "delta": text},
            {"type": "response.refusal.done", **at, "refusal": text},
        ]
    return [
        {"type": "response.content_part.added", **at, "part": {**part, "text": ""}},
        {"type": "response.output_text.delta", **at, "delta": text, "logprobs": []},
        {"type": "response.output_text.done", **at, "text": text, "logprobs": []},
    ]


def _role(message: Any) -> str | None:
    return message.get("role") if isinstance(message, dict) else None
