"""MCP over the streamable HTTP transport (the MCP spec, and the official ``mcp`` SDK).

What goes through the guard
    Only ``tools/call`` requests: tool = ``params.name``, params = ``params.arguments``,
    call id = the JSON-RPC ``id``. Everything else (``initialize``, ``tools/list``,
    notifications, the client's responses to server requests) is forwarded untouched
    and traced as operation ``mcp``; ``GET`` (the server's stream), ``DELETE`` (end of
    session) and non-JSON ``POST`` bodies (an OAuth form on the same route) pass
    through as operation ``passthrough``. ``Mcp-Session-Id`` and
    ``MCP-Protocol-Version`` are ordinary headers to the proxy: they pass both ways.

Batches
    A JSON array of messages (protocol 2025-03-26; later versions removed batches).
    The protocol version is the server's to police: every ``tools/call`` in an array
    is guarded whatever the ``MCP-Protocol-Version`` header says, so an array is never
    a way around the guard. The exchange stops a batch only when *every* call in it is
    blocked; then every ``tools/call`` gets its ``isError`` result, and any other
    request in the array a JSON-RPC error saying it was not run (it cannot be
    answered without the server; notifications in it are dropped). When only some
    calls are blocked the batch is forwarded unchanged and the would-be stop is
    recorded with route ``observe``: answering part of a batch locally would mean
    rewriting it and merging two responses, which a streamed (SSE) answer makes
    unsound.

Outcomes (for progress markers)
    The JSON-RPC response with the call's id, found in an ``application/json`` body or
    in the events of a ``text/event-stream`` answer (it may follow notifications).
    Outcome = ``{"content": result.content}`` plus ``"structuredContent"`` when present,
    so a ``progress_pointer`` reads e.g. ``/structuredContent/status``. Error =
    ``result.isError`` true, or a JSON-RPC error (outcome ``{"error": {code, message}}``).
    An explicit marker, when the tool gives one, wins: ``result._meta["loopguard/progress"]``
    per call, else the ``x-loopguard-progress`` response header (single calls only: a
    header cannot say which call of a batch it is for).

The stop answer
    HTTP 200 with a JSON-RPC result for the same id: ``isError: true``, one text
    content written for the model, and ``_meta["loopguard/stop"]`` (rule, repeats, tool,
    params_hash) for programs. As ``application/json`` whenever the client's ``Accept``
    allows it (the SDK client always sends ``application/json, text/event-stream``, and
    one JSON body is the simplest answer to read), else as a one-event SSE stream when
    the client accepts only ``text/event-stream``. ``Mcp-Session-Id`` is echoed and
    ``x-loopguard-route: stop_and_review`` added.
"""

from __future__ import annotations

import json
from typing import Any

from adapters.sse import SSEParser, encode_event
from guard.engine.calls import Route, Verdict
from guard.engine.config import RouteConfig
from guard.engine.contract import (
    NO_FIELDS,
    OFFLOAD_BYTES,
    Answer,
    Observation,
    Outcome,
    ParsedRequest,
    PassthroughObserver,
    ProtocolFields,
    RequestView,
    ResponseObserver,
    ToolInvocation,
)
from guard.engine.fingerprint import loads_json
from guard.engine.problem import ROUTE_HEADER, stop_text

SESSION_HEADER = "mcp-session-id"
# The explicit progress marker a tool server may set (the name guard.doors.exchange uses too).
PROGRESS_HEADER = "x-loopguard-progress"
PROGRESS_META_KEY = "loopguard/progress"
STOP_META_KEY = "loopguard/stop"
# A JSON answer is parsed whole at the end; past this size it is passed on unobserved.
MAX_JSON_BODY = 16 * 1024 * 1024
# JSON-RPC "server error" range: a batch member loopguard did not run.
NOT_RUN_CODE = -32001


class McpAdapter:
    name = "mcp"
    provider: str | None = None

    def __init__(self, route: RouteConfig | None = None) -> None:
        self.route = route
        # The route's wording for the isError text of a stopped call (None: loopguard's).
        self._stop_message = route.stop_message if route is not None else None

    # -- request ---------------------------------------------------------------------

    def parse(self, request: RequestView) -> ParsedRequest:
        session_id = request.headers.get(SESSION_HEADER) or None
        fields = ProtocolFields(mcp_session_id=session_id) if session_id else NO_FIELDS
        if request.method == "GET":
            # The server's own stream (notifications, server requests): open for the session.
            return ParsedRequest("passthrough", span_name="GET", fields=fields, long_lived=True)
        if request.method != "POST" or not _is_json_type(request.headers.get("content-type")):
            return ParsedRequest("passthrough", span_name=request.method, fields=fields)
        try:
            decoded = loads_json(request.body)
        except ValueError as exc:
            where = (
                f" ({exc.msg} at byte {exc.pos})" if isinstance(exc, json.JSONDecodeError) else ""
            )
            return _bad(f"the body is not valid JSON{where}", fields)
        messages, problem = _messages(decoded)
        if problem is not None:
            return _bad(problem, fields)

        invocations: list[ToolInvocation] = []
        first_method: str | None = None
        first_id: Any = None
        for message in messages:
            method = message.get("method")
            if not isinstance(method, str):
                continue  # a response to a server request
            if first_method is None:
                first_method, first_id = method, message.get("id")
            if method != "tools/call" or not _is_id(message.get("id")):
                continue
            params = message.get("params")
            if not isinstance(params, dict) or not isinstance(params.get("name"), str):
                return _bad("a tools/call request without params.name", fields)
            arguments = params.get("arguments")
            invocations.append(
                ToolInvocation(
                    params["name"], arguments if arguments is not None else {}, message["id"]
                )
            )

        if invocations:
            return ParsedRequest(
                "execute_tool",
                invocations=invocations,
                span_name=f"tools/call {invocations[0].tool}",
                fields=ProtocolFields(
                    mcp_method="tools/call",
                    mcp_session_id=session_id,
                    jsonrpc_request_id=str(invocations[0].call_id),
                ),
            )
        if first_method is not None:
            fields = ProtocolFields(
                mcp_method=first_method,
                mcp_session_id=session_id,
                jsonrpc_request_id=str(first_id) if _is_id(first_id) else None,
            )
        return ParsedRequest("mcp", span_name=first_method or "response", fields=fields)

    # -- answers ---------------------------------------------------------------------

    def stop_answer(self, request: RequestView, parsed: ParsedRequest, verdict: Verdict) -> Answer:
        decoded = json.loads(request.body)
        replies = [
            reply
            for message in _listed(decoded)
            if (reply := _stop_reply(message, verdict, self._stop_message))
        ]
        headers: list[tuple[str, str]] = []
        if _wants_json(request.headers.get("accept")):
            body = replies if isinstance(decoded, list) else replies[0]
            headers.append(("content-type", "application/json"))
            chunks = [json.dumps(body, separators=(",", ":")).encode()]
        else:
            headers += [("content-type", "text/event-stream"), ("cache-control", "no-cache")]
            chunks = [b"".join(encode_event(_dumps(reply), "message") for reply in replies)]
        session_id = request.headers.get(SESSION_HEADER)
        if session_id:
            headers.append(("mcp-session-id", session_id))
        headers.append((ROUTE_HEADER, Route.STOP_AND_REVIEW.value))
        return Answer(status=200, headers=headers, chunks=chunks)

    def nudge(self, request: RequestView, parsed: ParsedRequest, verdict: Verdict) -> bytes:
        return request.body  # tool calls are stopped, never nudged

    # -- response --------------------------------------------------------------------

    def observer(
        self, parsed: ParsedRequest, status: int, headers: dict[str, str]
    ) -> ResponseObserver:
        if not parsed.invocations:
            return PassthroughObserver()
        return McpObserver(parsed.invocations, status, headers)


class McpObserver:
    """Finds the JSON-RPC responses for the guarded calls as the response passes.

    SSE: events are parsed as they complete, and only responses for our ids are kept
    (notifications and other events are dropped once read). JSON: the body is one
    message (or a batch array) and is parsed at the end, up to ``MAX_JSON_BODY``.
    """

    def __init__(
        self, invocations: list[ToolInvocation], status: int, headers: dict[str, str]
    ) -> None:
        self._index: dict[tuple[bool, Any], int] = {}
        for i, invocation in enumerate(invocations):
            self._index.setdefault(_id_key(invocation.call_id), i)
        self._outcomes: list[Outcome | None] = [None] * len(invocations)
        self._header_marker = headers.get(PROGRESS_HEADER) if len(invocations) == 1 else None
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        self._sse = SSEParser(MAX_JSON_BODY) if media == "text/event-stream" else None
        self._json: bytearray | None = bytearray() if _is_json_type(media) else None
        self._overflow = False
        # SSE events too large to parse on the event loop, until ``read_backlog``.
        self._backlog: list[str] = []
        # A 2xx JSON or SSE answer is expected to carry every response we wait for.
        self._expects = 200 <= status < 300 and (self._sse is not None or self._json is not None)

    def feed(self, chunk: bytes, now: float) -> bytes:
        if self._sse is not None:
            for event in self._sse.feed(chunk):
                if len(event.data) > OFFLOAD_BYTES:
                    self._backlog.append(event.data)  # parsed off the event loop
                else:
                    self._take_text(event.data)
        elif self._json is not None and not self._overflow:
            if len(self._json) + len(chunk) > MAX_JSON_BODY:
                self._overflow = True
                self._json = bytearray()
            else:
                self._json += chunk
        return chunk

    @property
    def backlog(self) -> bool:
        return bool(self._backlog)

    def read_backlog(self) -> None:
        """Parse the large events ``feed`` left, in the order they came."""
        backlog, self._backlog = self._backlog, []
        for text in backlog:
            self._take_text(text)

    @property
    def settled(self) -> bool:
        """Every guarded call has its response: the outcomes are final.

        On an SSE answer this can be true before the stream ends (a server may keep it
        open after the response); a front door may record the steps at that point so
        the agent's next call, sent as soon as it reads the response, sees them.
        """
        return all(o is not None for o in self._outcomes)

    def finish(self) -> Observation:
        self.read_backlog()
        if self._json and not self._overflow:
            self._take_text(self._json)
            self._json = bytearray()
        unread = self._sse.skipped if self._sse is not None else 0
        # Too large to read is not cut short: the record says which (sse_event_too_large).
        complete = (
            not self._expects
            or self._overflow
            or unread > 0
            or all(o is not None for o in self._outcomes)
        )
        return Observation(outcomes=list(self._outcomes), complete=complete, unread_events=unread)

    def _take_text(self, text: str | bytes | bytearray) -> None:
        try:
            decoded = loads_json(text)
        except ValueError:
            return  # a priming event, a ping, or a body that is not JSON-RPC
        for message in _listed(decoded):
            self._take(message)

    def _take(self, message: Any) -> None:
        if not isinstance(message, dict) or "method" in message or not _is_id(message.get("id")):
            return
        index = self._index.get(_id_key(message["id"]))
        if index is None or self._outcomes[index] is not None:
            return
        result = message.get("result")
        if isinstance(result, dict):
            value: dict[str, Any] = {"content": result.get("content")}
            if "structuredContent" in result:
                value["structuredContent"] = result["structuredContent"]
            self._outcomes[index] = Outcome(
                value, error=result.get("isError") is True, explicit_marker=self._marker(result)
            )
        elif isinstance(message.get("error"), dict):
            error = message["error"]
            value = {"error": {"code": error.get("code"), "message": error.get("message")}}
            self._outcomes[index] = Outcome(value, error=True, explicit_marker=self._header_marker)

    def _marker(self, result: dict[str, Any]) -> str | None:
        meta = result.get("_meta")
        if isinstance(meta, dict) and meta.get(PROGRESS_META_KEY) is not None:
            explicit = meta[PROGRESS_META_KEY]
            return explicit if isinstance(explicit, str) else _dumps(explicit)
        return self._header_marker


# -- helpers -------------------------------------------------------------------------


def _bad(problem: str, fields: ProtocolFields) -> ParsedRequest:
    return ParsedRequest("mcp", admission_error=problem, span_name="POST", fields=fields)


def _messages(decoded: Any) -> tuple[list[dict[str, Any]], str | None]:
    """The messages of a body (one, or a batch array), or why it is not JSON-RPC."""
    if isinstance(decoded, dict):
        return [decoded], None
    if not isinstance(decoded, list):
        return [], "the body is not a JSON-RPC message (an object) or batch (an array)"
    if not decoded:
        return [], "an empty JSON-RPC batch"
    for i, message in enumerate(decoded):
        if not isinstance(message, dict):
            return [], f"batch element {i} is not a JSON-RPC message object"
    return decoded, None


def _listed(decoded: Any) -> list[Any]:
    return decoded if isinstance(decoded, list) else [decoded]


def _is_id(value: Any) -> bool:
    """A JSON-RPC id loopguard can match: a string or an integer (not null, not bool)."""
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _id_key(value: Any) -> tuple[bool, Any]:
    # "1" and 1 are different JSON-RPC ids.
    return isinstance(value, str), value


def _is_json_type(content_type: str | None) -> bool:
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def _wants_json(accept: str | None) -> bool:
    """JSON unless the client accepts only an event stream (no Accept at all: JSON)."""
    if not accept:
        return True
    types = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    return bool(types & {"application/json", "application/*", "*/*"}) or not (
        types & {"text/event-stream", "text/*"}
    )


def _stop_reply(
    message: Any, verdict: Verdict, stop_message: str | None = None
) -> dict[str, Any] | None:
    """The reply loopguard gives to one message of a stopped request (None: no reply)."""
    if not isinstance(message, dict) or not isinstance(message.get("method"), str):
        return None
    if not _is_id(message.get("id")):
        return None  # a notification: nothing to answer
    if message["method"] != "tools/call":
        error = {
            "code": NOT_RUN_CODE,
            "message": "Not run: loopguard stopped a repeated tools/call in this batch. "
            "Send this request again on its own.",
        }
        return {"jsonrpc": "2.0", "id": message["id"], "error": error}
    params = message.get("params") or {}
    tool = params.get("name") if isinstance(params, dict) else None
    stop: dict[str, Any] = {"tool": tool}
    if tool == verdict.tool:
        text = stop_text(verdict, stop_message)
        stop.update(
            rule=str(verdict.rule) if verdict.rule else None,
            repeats=verdict.repeats,
            params_hash=verdict.params_hash,
        )
    else:
        # A batch of several blocked calls: the exchange hands us the first verdict only.
        text = (
            f"loopguard stopped this call: `{tool}` with these same arguments has been "
            "repeated with nothing new in between, so calling it again will not give you "
            "anything new. Do not repeat it. Use the result you already have, try a "
            "different tool or different arguments, or tell the user what is blocking you."
        )
    result = {
        "content": [{"type": "text", "text": text}],
        "isError": True,
        # Required from protocol 2026-07-28 on (the SDK rejects a result without it there);
        # earlier protocol versions ignore unknown fields.
        "resultType": "complete",
        "_meta": {STOP_META_KEY: stop},
    }
    return {"jsonrpc": "2.0", "id": message["id"], "result": result}


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
