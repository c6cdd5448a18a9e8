"""The contract between the engine and the protocol adapters.

Adapters are the only protocol-aware code (OpenAI, Anthropic, MCP, plain HTTP
tools). Like mitmproxy addons they are called at fixed points of one exchange:

1. ``parse(request)``            -> ParsedRequest: the tool calls to guard, or the
                                     conversation history for model APIs;
2. ``stop_answer(...)``          -> the answer sent instead of calling upstream;
   ``nudge(...)``                -> (model APIs) the request body with a guard message;
3. ``observer(...)``             -> a ResponseObserver fed every response chunk as it
                                     passes through, which finds outcomes, first token,
                                     usage, and whether the stream ended properly.

The engine (``guard.doors.exchange``) knows nothing of the protocols; the front doors
(``guard.doors.proxy``, ``guard.doors.middleware``) know nothing of the adapters beyond this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from guard.engine.calls import Usage, Verdict


@dataclass(slots=True)
class RequestView:
    """An incoming request with its body already read (it must be parsed)."""

    method: str
    # The path after the route prefix, e.g. "/lookup" for "/tools/lookup"; "" for the prefix itself.
    path: str
    query: str
    # Lower-cased header names; values as received.
    headers: dict[str, str]
    body: bytes
    # The session the front door resolved (``[session] headers``), None when untracked.
    # Adapters name it in their answers; they never look for it themselves.
    session: str | None = None


@dataclass(slots=True)
class ToolInvocation:
    """One tool call the request asks for (HTTP tool: one; MCP tools/call: one per message)."""

    tool: str
    params: Any
    # JSON-RPC id (MCP) or tool_call_id (model transcripts); None for plain HTTP tools.
    call_id: str | int | None = None


@dataclass(slots=True)
class HistoryStep:
    """One executed tool call found in a model conversation: call and its result.

    Or, in the text tail of a request that does not end in tool results, one turn:
    ``kind`` "text" (an assistant turn that called no tool) or "user", its text in
    ``outcome`` (the text-loop rule reads them; see guard.engine.rules.text_loop).
    """

    tool: str
    params: Any
    outcome: Any
    error: bool = False
    kind: str = "tool"
    # Already hashed (a step kept from an earlier request: the raw values are not kept).
    params_hash: str | None = None
    marker: str | None = None


@dataclass(frozen=True, slots=True)
class ProtocolFields:
    """Protocol attributes an adapter found in a request, for the call's record.

    ``conversation_digest`` is derived from content: it never leaves as is, the
    Exchange records a keyed pseudonym of it as ``conversation_id``.
    """

    mcp_method: str | None = None
    mcp_session_id: str | None = None
    jsonrpc_request_id: str | None = None
    conversation_id: str | None = None
    conversation_digest: str | None = None


# What most requests carry: shared, never allocated per request.
NO_FIELDS = ProtocolFields()


@dataclass(slots=True)
class ParsedRequest:
    operation: Literal["chat", "execute_tool", "mcp", "passthrough"]
    # Guarded tool calls (empty for model requests and for unguarded MCP methods).
    invocations: list[ToolInvocation] = field(default_factory=list)
    # Model requests: the trajectory rebuilt from the conversation, oldest first.
    history: list[HistoryStep] | None = None
    model: str | None = None
    stream: bool = False
    # Why the body could not be understood (malformed JSON, wrong shape); None if fine.
    admission_error: str | None = None
    # Span name, e.g. "chat gpt-4o", "execute_tool lookup", "tools/call lookup".
    span_name: str = "loopguard"
    # Protocol attributes for the record (MCP method and ids, the conversation).
    fields: ProtocolFields = NO_FIELDS
    # The body to forward when the adapter had to change it; None: the body as received.
    forward_body: bytes | None = None
    # forward_body asks a streamed chat for its usage although the client did not: the
    # observer must hide that usage chunk from the client.
    injected_stream_usage: bool = False
    # A stream meant to stay open until either side closes it (the MCP server stream):
    # no read or total timeout applies.
    long_lived: bool = False
    # Server-side state (OpenAI Responses ``previous_response_id``): the response this
    # request continues, and the tool results in it whose calls are in that response
    # (call id -> (result text, error)). The Exchange rebuilds the history from the
    # state it kept for the responses it relayed.
    continues: str | None = None
    open_results: dict[Any, tuple[Any, bool]] | None = None
    # The server-side conversation (Responses ``conversation``) the request adds to: the
    # history is kept per conversation, under a keyed pseudonym of its id.
    conversation: str | None = None


@dataclass(slots=True)
class Answer:
    """A response loopguard produces itself (stop answers, admission errors)."""

    status: int
    headers: list[tuple[str, str]]
    # One bytes object, or several for a synthetic SSE stream.
    chunks: list[bytes]
    # The id of the response loopguard wrote (a Responses stop): a client may continue
    # it by ``previous_response_id``, so the conversation's state is kept under it.
    response_id: str | None = None


@dataclass(slots=True)
class Outcome:
    """What one guarded tool call returned, for its progress marker."""

    value: Any
    error: bool = False
    # An explicit marker the tool gave (x-loopguard-progress header, or protocol field).
    explicit_marker: str | None = None
    # The bytes ``value`` was read from, when it is a function of them alone (a tool's
    # whole response body): the progress marker of the same bytes is then reused.
    source: bytes | None = None


@dataclass(slots=True)
class Observation:
    """What an observer learned from a whole response."""

    # One per ParsedRequest.invocations entry, same order; None where no result was seen.
    outcomes: list[Outcome | None] = field(default_factory=list)
    # monotonic time (the clock passed to feed) of the first chunk carrying output.
    first_output_at: float | None = None
    output_chunks: int = 0
    usage: Usage | None = None
    response_id: str | None = None
    response_model: str | None = None
    finish_reasons: tuple[str, ...] = ()
    # False when a stream ended without its terminal event ([DONE], message_stop...).
    complete: bool = True
    # Tool calls the model asked for in this response (model adapters).
    requested_tools: list[ToolInvocation] = field(default_factory=list)
    # Stream events too large to read (over the SSE parser's bound): passed on unread,
    # so what they carried is missing from the rest.
    unread_events: int = 0


# CPU work on more bytes than this (parsing, redacting, hashing, marking) runs in a worker
# thread, so one large request or answer never stalls the event loop.
OFFLOAD_BYTES = 256 * 1024


class ResponseObserver(Protocol):
    @property
    def backlog(self) -> bool:
        """True when ``feed`` left a large part unread (over ``OFFLOAD_BYTES``): the
        front door has ``read_backlog`` run in a worker thread before it asks
        ``settled``. Observers that read little as they go keep it False (a class
        attribute will do)."""
        ...

    def read_backlog(self) -> None: ...

    @property
    def settled(self) -> bool:
        """True once every guarded call's outcome has been seen, so the steps can be
        recorded before the response ends (an MCP server may hold its SSE answer open).
        Observers that only know at the end keep it False (a class attribute will do)."""
        ...

    def feed(self, chunk: bytes, now: float) -> bytes:
        """Read one chunk as it passes; return the bytes to send on (usually ``chunk``).

        Returning different bytes is only for hiding what loopguard itself added
        (the injected usage chunk); an observer never buffers a whole response.
        """
        ...

    def finish(self) -> Observation: ...


class Adapter(Protocol):
    # Read-only members: an adapter declares them as plain class attributes, and a
    # class attribute ``provider = "openai"`` (a str) satisfies ``str | None`` only
    # when the protocol does not also promise that it can be assigned None.
    @property
    def name(self) -> str: ...

    @property
    def provider(self) -> str | None:
        """gen_ai.provider.name for model adapters ("openai", "anthropic"); None for tools."""
        ...

    def parse(self, request: RequestView) -> ParsedRequest: ...

    def stop_answer(self, request: RequestView, parsed: ParsedRequest, verdict: Verdict) -> Answer:
        """The answer to a stopped call, written for the model to act on."""
        ...

    def nudge(self, request: RequestView, parsed: ParsedRequest, verdict: Verdict) -> bytes:
        """Model adapters: the request body with a guard message added. Tools: unused."""
        ...

    def observer(
        self, parsed: ParsedRequest, status: int, headers: dict[str, str]
    ) -> ResponseObserver: ...


class PassthroughObserver:
    """For responses nothing is learnt from (not a guarded call): bytes pass as they are."""

    __slots__ = ()
    settled = False
    backlog = False

    def feed(self, chunk: bytes, now: float) -> bytes:
        return chunk

    def read_backlog(self) -> None:
        pass  # never left any

    def finish(self) -> Observation:
        return Observation()


class PassthroughAdapter:
    """The adapter of a request that is forwarded unguarded (the guard failed on it):
    nothing is parsed, nothing observed."""

    name = "passthrough"
    provider: str | None = None

    def parse(self, request: RequestView) -> ParsedRequest:
        return ParsedRequest("passthrough", span_name=request.method)

    def stop_answer(self, request: RequestView, parsed: ParsedRequest, verdict: Verdict) -> Answer:
        raise AssertionError("a passthrough request has no calls to stop")

    def nudge(self, request: RequestView, parsed: ParsedRequest, verdict: Verdict) -> bytes:
        return request.body

    def observer(
        self, parsed: ParsedRequest, status: int, headers: dict[str, str]
    ) -> PassthroughObserver:
        return PassthroughObserver()
