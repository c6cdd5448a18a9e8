"""What the OpenAI and Anthropic adapters share.

- reading the request body (JSON or an admission error) and naming the conversation;
- ``ModelObserver``: the response tee. SSE bodies go through ``adapters.sse`` one chunk
  at a time (never buffered whole); JSON bodies are kept up to a cap and parsed at
  the end. Subclasses only say what one event / one JSON body means;
- tool calls assembled from deltas split across chunks;
- synthetic answers (the stop completion) as JSON or as an SSE stream.

The stall analysis itself lives in ``guard.engine.conversation`` (the Exchange calls it);
the nudge and stop wording in ``guard.engine.problem``, shared with the tool adapters.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import uuid
from collections.abc import Iterable
from typing import Any

import xxhash

from adapters.sse import SSEEvent, SSEParser, encode_event
from guard.engine.calls import Route, Usage
from guard.engine.contract import (
    NO_FIELDS,
    Answer,
    Observation,
    ParsedRequest,
    ProtocolFields,
    RequestView,
    ToolInvocation,
)
from guard.engine.fingerprint import loads_json
from guard.engine.problem import ROUTE_HEADER

# A non-streamed answer bigger than this is passed on but not parsed (no usage, no tools).
MAX_JSON_OBSERVE_BYTES = 8 * 1024 * 1024
# Tool calls kept from one model response (parallel calls; far above what APIs send).
MAX_TOOL_CALLS = 128
# Finish reasons kept from one response (one per choice; ``n`` is at most 128).
MAX_FINISH_REASONS = 128
# Explicit conversation id a client may send; otherwise one is derived from the content.
CONVERSATION_HEADER = "x-loopguard-conversation"


class BodyError(ValueError):
    """The request body is not the JSON object the API expects."""


def load_object(body: bytes) -> dict[str, Any]:
    try:
        value = loads_json(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BodyError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BodyError("request body must be a JSON object")
    return value


def start_chat(request: RequestView) -> tuple[ParsedRequest, dict[str, Any] | None]:
    """The start every model adapter's parse shares: the JSON body, model, stream, span.

    The body is None when it could not be read; the ParsedRequest then says why.
    """
    try:
        body = load_object(request.body)
    except BodyError as exc:
        return ParsedRequest("chat", span_name="chat", admission_error=str(exc)), None
    model = body.get("model") if isinstance(body.get("model"), str) else None
    parsed = ParsedRequest(
        "chat",
        model=model,
        stream=body.get("stream") is True,
        span_name=f"chat {model}" if model else "chat",
    )
    return parsed, body


def dump_object(value: dict[str, Any]) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def conversation_fields(
    headers: dict[str, str], *anchors: Any, explicit: str | None = None
) -> ProtocolFields:
    """What identifies one conversation across its requests, for ``ParsedRequest.fields``.

    An explicit id wins: the ``x-loopguard-conversation`` header, then one the API
    itself names (``explicit``). Otherwise a digest of the conversation's anchors (its
    system prompt / instructions and first user message), which an agent resends
    unchanged on every turn. The digest is derived from content, so it never leaves
    as is: the exchange turns it into a keyed pseudonym (``conversation_digest``).
    Two runs of the same agent on the same task share it: send the header to tell
    them apart.
    """
    named = headers.get(CONVERSATION_HEADER) or explicit
    if named:
        return ProtocolFields(conversation_id=named)
    if all(anchor is None for anchor in anchors):
        return NO_FIELDS
    blob = json.dumps(anchors, sort_keys=True, separators=(",", ":"), default=str)
    return ProtocolFields(conversation_digest=xxhash.xxh3_128_hexdigest(blob.encode()))


def parse_arguments(arguments: Any) -> Any:
    """Tool arguments as JSON when they parse (they arrive as a string), else as given."""
    if isinstance(arguments, str):
        try:
            return loads_json(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


class ToolCallAssembler:
    """Tool calls streamed as fragments: name and id first, arguments in pieces.

    Bounded: past ``MAX_TOOL_CALLS`` calls or ``MAX_JSON_OBSERVE_BYTES`` characters of
    arguments in one response, it gives up and keeps nothing (``result()`` is empty: a
    conversation continued from this response is then untracked, never guessed).
    """

    __slots__ = ("_calls", "_size", "overflowed")

    def __init__(self) -> None:
        self._calls: dict[Any, list[Any]] = {}  # key -> [name, call_id, [fragments]]
        self._size = 0  # characters of arguments kept
        self.overflowed = False

    def start(self, key: Any, name: str | None, call_id: Any = None, arguments: str = "") -> None:
        entry = self._entry(key)
        if entry is None:
            return
        if name:
            entry[0] = name
        if call_id is not None:
            entry[1] = call_id
        if arguments:
            self._keep(entry, arguments)

    def add(self, key: Any, fragment: str) -> None:
        if fragment:
            entry = self._entry(key)
            if entry is not None:
                self._keep(entry, fragment)

    def replace(self, key: Any, arguments: str) -> None:
        """The full arguments, when the API repeats them at the end of a call."""
        entry = self._entry(key)
        if entry is not None:
            self._size -= sum(map(len, entry[2]))
            entry[2] = []
            self._keep(entry, arguments)

    def result(self) -> list[ToolInvocation]:
        return [
            ToolInvocation(name or "", parse_arguments("".join(parts)), call_id)
            for name, call_id, parts in self._calls.values()
        ]

    def _entry(self, key: Any) -> list[Any] | None:
        if self.overflowed:
            return None
        entry = self._calls.get(key)
        if entry is None:
            if len(self._calls) >= MAX_TOOL_CALLS:
                self._overflow()
                return None
            entry = self._calls[key] = [None, None, []]
        return entry

    def _keep(self, entry: list[Any], fragment: str) -> None:
        self._size += len(fragment)
        if self._size > MAX_JSON_OBSERVE_BYTES:
            self._overflow()
        else:
            entry[2].append(fragment)

    def _overflow(self) -> None:
        self.overflowed = True
        self._calls.clear()
        self._size = 0


class ModelObserver:
    """Tee for one model response: pass bytes on at once, learn from them on the way.

    Subclasses implement ``on_event`` (one SSE event; return True to hide it from the
    client) and ``on_json`` (a whole non-streamed body), and set ``terminal`` when
    the stream's closing event arrives. A subclass that hides events names them in
    ``may_hide``: a bytes pattern every event it could hide matches.
    """

    # Hiding: stream bytes in which this finds nothing hold no event to hide, so they
    # pass on unread (read one step late, like a stream nothing is hidden from). None:
    # any event might be hidden, and every event is read before it passes.
    may_hide: re.Pattern[bytes] | None = None

    # Model responses carry no guarded tool outcomes: nothing to record early.
    settled = False
    # Read one step late, a chunk at a time (a JSON answer at the end): nothing left.
    backlog = False

    def __init__(self, status: int, headers: dict[str, str]) -> None:
        content_type = headers.get("content-type", "")
        encoding = headers.get("content-encoding", "identity").lower()
        # Error bodies pass through unread; a compressed body cannot be read incrementally.
        self._active = status < 400 and encoding in ("identity", "")
        self._sse = self._active and content_type.startswith("text/event-stream")
        self._parser = SSEParser() if self._sse else None
        self._json = bytearray()
        self._json_overflow = False
        # Set by subclasses (Chat Completions with injected usage): hide chosen events.
        self.hiding = False
        self._held = bytearray()  # received, not yet passed on
        self._held_at = 0  # absolute stream offset of self._held[0]
        # Hiding, and every byte so far was passed on unread or read: False once a
        # block that may be hidden (or a "\r", which only the parser can split on)
        # has arrived; from then on every block is read before it passes.
        self._passing_unread = True
        # Where a hidden event ended in "\r" (its "\n", if one comes next, is its own).
        self._cut_cr_end: int | None = None
        self._deferred: tuple[bytes, float] | None = None
        # What is learned.
        self.first_output_at: float | None = None
        self.output_chunks = 0
        self.usage: Usage | None = None
        self.response_id: str | None = None
        self.response_model: str | None = None
        self.finish_reasons: list[str] = []
        self.tools = ToolCallAssembler()
        self.terminal = False

    # -- the contract ------------------------------------------------------------------

    def feed(self, chunk: bytes, now: float) -> bytes:
        parser = self._parser
        if parser is None:
            if self._active and not self._json_overflow:
                if len(self._json) + len(chunk) > MAX_JSON_OBSERVE_BYTES:
                    self._json_overflow = True
                    self._json.clear()
                else:
                    self._json += chunk
            return chunk
        if self.hiding:
            return self._feed_hiding(chunk, now)
        self._read_late(chunk, now)
        return chunk

    def _read_late(self, passed: bytes, now: float) -> None:
        """Read ``passed`` one step late, after it has gone on: when the next bytes
        pass (or at the end). A chunk carrying the first token often carries dozens of
        events behind it, and reading them first would delay the token by as much.
        Each keeps its arrival time."""
        deferred = self._deferred
        self._deferred = (passed, now)
        if deferred is not None:
            self._read(*deferred)

    def _read_deferred(self) -> None:
        """Read now what waits to be read late."""
        deferred = self._deferred
        if deferred is not None:
            self._deferred = None
            self._read(*deferred)

    def _read(self, chunk: bytes, at: float) -> None:
        assert self._parser is not None
        for event in self._parser.feed(chunk):
            self._event(event, at)

    def read_backlog(self) -> None:
        pass  # never left any

    def finish(self) -> Observation:
        complete = True
        if self._parser is not None:
            self._read_deferred()
            complete = self.terminal
        elif self._active and not self._json_overflow and self._json:
            try:
                body = loads_json(self._json)
            except (UnicodeDecodeError, json.JSONDecodeError):
                complete = False  # a truncated body
            else:
                if isinstance(body, dict):
                    self.on_json(body)
            self._json = bytearray()
        return Observation(
            first_output_at=self.first_output_at,
            output_chunks=self.output_chunks,
            usage=self.usage or Usage(source="absent"),
            response_id=self.response_id,
            response_model=self.response_model,
            finish_reasons=tuple(self.finish_reasons),
            complete=complete,
            requested_tools=self.tools.result(),
            unread_events=self._parser.skipped if self._parser is not None else 0,
        )

    # -- for subclasses ----------------------------------------------------------------

    def on_event(self, event: SSEEvent, data: Any, now: float) -> bool:
        """One parsed SSE event (``data`` is its JSON, or the raw string); True hides it."""
        raise NotImplementedError

    def on_json(self, body: dict[str, Any]) -> None:
        raise NotImplementedError

    def quick(self, event: SSEEvent, now: float) -> bool:
        """Handle an event without decoding its JSON, when its text says enough (the
        bulk of a stream: plain text deltas). False: decode it and call ``on_event``."""
        return False

    def finished(self, reason: Any) -> None:
        """A choice's (or the response's) finish reason. Upstream input, so bounded:
        strings only, at most ``MAX_FINISH_REASONS`` of them, each cut to 64 characters."""
        if isinstance(reason, str) and len(self.finish_reasons) < MAX_FINISH_REASONS:
            self.finish_reasons.append(reason[:64])

    def output(self, now: float) -> None:
        """This event carried output (a text or tool-call delta): first token, chunk count."""
        if self.first_output_at is None:
            self.first_output_at = now
        self.output_chunks += 1

    # -- internals ---------------------------------------------------------------------

    def _event(self, event: SSEEvent, now: float) -> bool:
        if self.quick(event, now):
            return False
        data: Any = event.data
        if data and data[0] in "{[":
            with contextlib.suppress(json.JSONDecodeError):
                data = loads_json(data)
        return self.on_event(event, data, now)

    def _feed_hiding(self, chunk: bytes, now: float) -> bytes:
        # Complete blocks go on at once; only the unfinished tail (at most one event) is
        # held until its blank line shows whether it is the one to hide. A tail still held
        # when the stream breaks is an event no client would dispatch anyway.
        held = self._held
        held += chunk
        if self._passing_unread:
            passed = self._pass_unread(chunk, now)
            if passed is not None:
                return passed
            # From here on every block is read before it passes: the parser first
            # catches up with what went on unread, then reads what is held.
            self._passing_unread = False
            self._read_deferred()
            chunk = bytes(held)
        assert self._parser is not None
        events = self._parser.feed(chunk)
        out = bytearray()
        at = self._held_at
        if self._cut_cr_end is not None and held:
            if self._cut_cr_end == at and held[0] == 0x0A:
                # The event cut out ended in a "\r\n" the network split: its "\n" too.
                del held[:1]
                at += 1
            self._cut_cr_end = None
        for event in events:
            if self._event(event, now):
                out += held[: event.start - at]
                if held[event.end - at - 1] == 0x0D:  # "\r": a "\n" may follow
                    self._cut_cr_end = event.end
                del held[: event.end - at]
                at = event.end
        safe = self._parser.boundary
        if safe > at:
            out += held[: safe - at]
            del held[: safe - at]
            at = safe
        self._held_at = at
        return bytes(out)

    def _pass_unread(self, chunk: bytes, now: float) -> bytes | None:
        """Pass the held complete blocks on unread, when ``may_hide`` finds nothing in
        them; None when it does, or the stream has a ``\\r`` (blocks may then end in
        ways only the parser tells). Unread blocks are read one step late, at the next
        chunk (or at the end)."""
        if b"\r" in chunk or self.may_hide is None:
            return None
        held = self._held
        # With "\n" line endings only, blocks end exactly where "\n\n" does: everything
        # up to the last one is complete blocks.
        end = held.rfind(b"\n\n") + 2
        if end < 2:
            # No block complete yet. One past the parser's bound goes to the parser,
            # which skips it (and lets it pass): never held without limit.
            assert self._parser is not None
            return b"" if len(held) <= self._parser.max_block else None
        if self.may_hide.search(held, 0, end):
            return None
        out = bytes(held[:end])
        del held[:end]
        self._held_at += end
        self._read_late(out, now)
        return out


def usage_of(
    input_tokens: Any, output_tokens: Any, cached: Any = None, *, previous: Usage | None = None
) -> Usage:
    """A reported usage; fields the API left out stay None (or keep a previous value)."""
    usage = previous or Usage()
    if isinstance(input_tokens, int):
        usage.input_tokens = input_tokens
    if isinstance(output_tokens, int):
        usage.output_tokens = output_tokens
    if isinstance(cached, int):
        usage.cached_input_tokens = cached
    usage.source = "response"
    return usage


def dig(value: Any, *keys: str) -> Any:
    """``value[k1][k2]...`` or None when any level is missing or not an object."""
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


# -- synthetic answers -------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


def now_s() -> int:
    return int(time.time())


def stop_headers(content_type: str) -> list[tuple[str, str]]:
    headers = [("content-type", content_type), (ROUTE_HEADER, Route.STOP_AND_REVIEW.value)]
    if content_type.startswith("text/event-stream"):
        headers.append(("cache-control", "no-cache"))
    return headers


def json_answer(body: dict[str, Any]) -> Answer:
    return Answer(200, stop_headers("application/json"), [dump_object(body)])


def sse_answer(events: Iterable[tuple[str | None, Any]]) -> Answer:
    """An SSE stream, one chunk per event: ``(event name or None, JSON value or raw str)``."""
    chunks = [
        encode_event(data if isinstance(data, str) else json.dumps(data), name)
        for name, data in events
    ]
    return Answer(200, stop_headers("text/event-stream; charset=utf-8"), chunks)
