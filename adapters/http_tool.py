"""Plain HTTP tool endpoints: ``POST /tools/lookup_tracking {"order_id": "A1"}``.

- tool: the path segment ``route.tool_segment`` after the route prefix (first by default);
- params: the JSON body; for a request without a body (GET, DELETE...) the query string
  as a dict; both when both are present;
- outcome: the response body (JSON when it parses, else text); error: status >= 400;
  an ``x-loopguard-progress`` response header is an explicit progress marker.

The observer keeps at most ``MAX_OUTCOME_BYTES`` of a response for the outcome: a
tool that answers with a huge body is hashed on its prefix plus its length, and the
outcome says it was truncated.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

import xxhash

from guard.engine.bodies import DECODED_LIMIT, NotParsed, decode_content, raw_params
from guard.engine.calls import Verdict
from guard.engine.config import RouteConfig
from guard.engine.contract import (
    Answer,
    Observation,
    Outcome,
    ParsedRequest,
    PassthroughObserver,
    RequestView,
    ToolInvocation,
)
from guard.engine.fingerprint import loads_json
from guard.engine.problem import stall_problem

MAX_OUTCOME_BYTES = 1024 * 1024
PROGRESS_HEADER = "x-loopguard-progress"
_BODYLESS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})


class HttpToolAdapter:
    name = "http-tool"
    provider: str | None = None

    def __init__(self, route: RouteConfig) -> None:
        self.route = route
        self.tool_segment = route.tool_segment

    # -- request ---------------------------------------------------------------------

    def parse(self, request: RequestView) -> ParsedRequest:
        segments = request.path.strip("/").split("/")
        if "" in segments:  # "//" inside the path, or no path at all: non-empty segments only
            segments = [segment for segment in segments if segment]
        index = self.tool_segment
        if len(segments) <= index:
            # The route's root or a path without a tool segment: served, not guarded.
            return ParsedRequest(operation="passthrough", span_name=request.method)
        tool = segments[index]
        params, error = _params(request)
        if len(segments) > index + 1:
            # /tools/orders/A1 and /tools/orders/B2 are two calls: the path after the
            # tool segment is part of the call.
            params = {"path": "/".join(segments[index + 1 :]), "params": params}
        return ParsedRequest(
            operation="execute_tool",
            invocations=[ToolInvocation(tool=tool, params=params)],
            admission_error=error,
            span_name=f"execute_tool {tool}",
        )

    # -- answers ---------------------------------------------------------------------

    def stop_answer(self, request: RequestView, parsed: ParsedRequest, verdict: Verdict) -> Answer:
        """422 problem+json written for the model, ``x-loopguard-route: stop_and_review``."""
        # The session the front door resolved with the configured [session] headers.
        return stall_problem(verdict, request.session, self.route.stop_message)

    def nudge(self, request: RequestView, parsed: ParsedRequest, verdict: Verdict) -> bytes:
        # Tools have no conversation to add a message to: the request goes as it came.
        return request.body

    # -- response --------------------------------------------------------------------

    def observer(
        self, parsed: ParsedRequest, status: int, headers: dict[str, str]
    ) -> ToolResponseObserver | PassthroughObserver:
        if not parsed.invocations:
            return PassthroughObserver()
        return ToolResponseObserver(status, headers)


class ToolResponseObserver:
    """Keeps the first ``MAX_OUTCOME_BYTES`` of the body; passes every chunk on as is."""

    __slots__ = ("_chunks", "_encoding", "_explicit", "_kept", "_seen", "error", "status")
    # A tool's answer is complete only when its body ends (the front door records then).
    settled = False
    backlog = False  # read at the end (``finish``), never as it goes

    def __init__(self, status: int, headers: dict[str, str]) -> None:
        self.status = status
        self.error = status >= 400
        self._explicit = headers.get(PROGRESS_HEADER) or None
        encoding = headers.get("content-encoding", "identity").strip().lower()
        self._encoding = None if encoding in ("", "identity") else encoding
        self._chunks: list[bytes] = []
        self._kept = 0
        self._seen = 0

    def read_backlog(self) -> None:
        pass  # never left any

    def feed(self, chunk: bytes, now: float) -> bytes:
        self._seen += len(chunk)
        room = MAX_OUTCOME_BYTES - self._kept
        if room > 0:
            piece = chunk if len(chunk) <= room else chunk[:room]
            self._chunks.append(piece)
            self._kept += len(piece)
        return chunk

    def finish(self) -> Observation:
        body = b"".join(self._chunks)  # one chunk (a small body): that very object
        value = self._value(body)
        # A body read whole and parsed as it is: its marker is a function of its bytes.
        plain = self._encoding is None and self._seen == self._kept
        outcome = Outcome(value, self.error, self._explicit, body if plain else None)
        return Observation(outcomes=[outcome])

    def _value(self, body: bytes) -> Any:
        if self._encoding is not None:
            # Compressed despite "accept-encoding: identity": hash the bytes we saw.
            return {
                "content_encoding": self._encoding,
                "body_xxh3": xxhash.xxh3_128_hexdigest(body),
                "length": self._seen,
            }
        if self._seen > self._kept:
            return {
                "truncated": True,
                "length": self._seen,
                "prefix": body.decode("utf-8", "replace"),
            }
        if not body:
            return ""
        try:
            return loads_json(body)
        except ValueError:
            return body.decode("utf-8", "replace")


def _params(request: RequestView) -> tuple[Any, str | None]:
    """The call's parameters, and why they could not be read (None if fine).

    A body that cannot be read is still a call: its raw bytes stand for it
    (``raw_params``), so a repeated one is seen. (Bodies over ``[server]
    max_parse_bytes`` never get here: the exchange hashes them raw.)"""
    query = _query_dict(request.query) if request.query else None
    body = request.body
    if not body or (request.method in _BODYLESS and not body.strip()):
        return (query or {}), None
    headers = request.headers
    content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    error: str | None = None
    try:
        encoding = headers.get("content-encoding")
        decoded = body if encoding is None else decode_content(body, encoding, DECODED_LIMIT)
        if content_type == "application/x-www-form-urlencoded":
            data: Any = _query_dict(decoded.decode("latin-1"))
        elif content_type in ("", "application/json", "text/json") or content_type.endswith(
            "+json"
        ):
            try:
                data = loads_json(decoded)
            except ValueError as exc:
                raise NotParsed(f"request body is not valid JSON: {exc}") from exc
        elif content_type.startswith("text/"):
            data = decoded.decode("utf-8", "replace")
        else:
            # Binary uploads: the bytes' hash stands for them.
            data = {"content_type": content_type, "body_xxh3": xxhash.xxh3_128_hexdigest(decoded)}
    except NotParsed as exc:
        # Still a call: the raw bytes are hashed, so a repeated unreadable call is seen.
        data, error = raw_params(body, exc.reason.split(":", 1)[0]), exc.reason
    if query:
        return {"query": query, "body": data}, error
    return data, error


def _query_dict(query: str) -> dict[str, Any]:
    parsed = parse_qs(query, keep_blank_values=True)
    return {key: values[0] if len(values) == 1 else values for key, values in parsed.items()}
