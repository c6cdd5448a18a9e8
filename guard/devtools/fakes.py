"""Fake model upstreams speaking each API's real wire format.

Shipped with loopguard for ``loopguard demo``, its tests, and users who want to try a
guard configuration without a real model behind it.

    fake = FakeModels()
    fake.reply = Reply(text="hi")                     # or Reply(tool=("search", {"q": "x"}))
    fake.behaviour = Behaviour(first_delay=0.2, chunks=100)
    app = fake.app()                                  # Starlette: the three endpoints

- ``POST /v1/chat/completions``: ``chat.completion`` JSON, or SSE: a role-only first
  chunk, content deltas, tool-call deltas with the arguments split over chunks, a
  finish chunk, a usage-only chunk when ``stream_options.include_usage``, ``[DONE]``.
- ``POST /v1/responses``: a ``response`` object, or typed events (``response.created``
  ... ``response.output_text.delta`` / ``response.function_call_arguments.delta`` ...
  ``response.completed`` with usage).
- ``POST /v1/messages``: a ``message``, or ``message_start``, ``content_block_*``
  (``text_delta``, ``input_json_delta``), ``ping``, ``message_delta`` (usage,
  stop_reason), ``message_stop``.

``Behaviour``: delay before the first content chunk, delay between chunks, number of
content chunks, events cut in two across body writes, dying mid-stream (no terminal
event), an error status with the API's own error body. Every request body received is
kept in ``fake.requests`` (path, JSON) so tests can see what loopguard forwarded.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

INPUT_TOKENS = 50
CACHED_TOKENS = 10


@dataclass
class Reply:
    text: str = "The answer is 42."
    # A tool call (name, arguments) instead of text.
    tool: tuple[str, dict[str, Any]] | None = None


@dataclass
class Behaviour:
    first_delay: float = 0.0
    chunk_delay: float = 0.0
    # Content chunks the text is cut into (at least 1).
    chunks: int = 4
    # Write each event in two pieces, cut in the middle (and "\r\n" endings on chat).
    split_events: bool = False
    # Stop after half the content, without the terminal event.
    die_mid_stream: bool = False
    error_status: int | None = None


@dataclass
class FakeModels:
    reply: Reply = field(default_factory=Reply)
    behaviour: Behaviour = field(default_factory=Behaviour)
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/responses", self._responses, methods=["POST"]),
                Route("/v1/messages", self._messages, methods=["POST"]),
            ]
        )

    # -- shared ----------------------------------------------------------------------------

    async def _read(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        self.requests.append((request.url.path, body))
        return body

    def _pieces(self) -> list[str]:
        """The text cut into exactly ``chunks`` pieces (padded with spaces if too short)."""
        text, n = self.reply.text, max(1, self.behaviour.chunks)
        text = text.ljust(n)
        return [text[i * len(text) // n : (i + 1) * len(text) // n] for i in range(n)]

    def _args(self) -> list[str]:
        """The tool arguments as JSON text, cut into three fragments."""
        assert self.reply.tool is not None
        raw = json.dumps(self.reply.tool[1])
        third = max(1, len(raw) // 3)
        return [raw[:third], raw[third : 2 * third], raw[2 * third :]]

    def _stream(self, events: AsyncIterator[bytes], crlf: bool = False) -> StreamingResponse:
        behaviour = self.behaviour

        async def body() -> AsyncIterator[bytes]:
            async for event in events:
                if crlf:
                    event = event.replace(b"\n", b"\r\n")
                if behaviour.split_events and len(event) > 1:
                    cut = len(event) // 2
                    yield event[:cut]
                    await asyncio.sleep(0)
                    yield event[cut:]
                else:
                    yield event

        return StreamingResponse(body(), media_type="text/event-stream")

    async def _content(self, emit: Any, delayed: bool = False) -> AsyncIterator[Any]:
        """Yield the content pieces with the configured delays; stop early if dying.

        ``delayed``: the caller already waited the first-token delay (it sent output first).
        """
        behaviour = self.behaviour
        pieces = self._args() if self.reply.tool else self._pieces()
        if behaviour.first_delay and not delayed:
            await asyncio.sleep(behaviour.first_delay)
        for n, piece in enumerate(pieces):
            if behaviour.die_mid_stream and n >= max(1, len(pieces) // 2):
                return
            if n and behaviour.chunk_delay:
                await asyncio.sleep(behaviour.chunk_delay)
            yield emit(piece)

    # -- Chat Completions ------------------------------------------------------------------

    async def _chat(self, request: Request) -> Response:
        body = await self._read(request)
        if self.behaviour.error_status:
            return _openai_error(self.behaviour.error_status)
        model, output = body.get("model", "fake"), len(self._pieces())
        usage = {
            "prompt_tokens": INPUT_TOKENS,
            "completion_tokens": output,
            "total_tokens": INPUT_TOKENS + output,
            "prompt_tokens_details": {"cached_tokens": CACHED_TOKENS},
        }
        cid = "chatcmpl-fake123"
        tool = self.reply.tool
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": self.reply.text}
            if tool:
                message = {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_fake1",
                            "type": "function",
                            "function": {"name": tool[0], "arguments": json.dumps(tool[1])},
                        }
                    ],
                }
            return JSONResponse(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": 1700000000,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": message,
                            "logprobs": None,
                            "finish_reason": "tool_calls" if tool else "stop",
                        }
                    ],
                    "usage": usage,
                }
            )
        include_usage = (body.get("stream_options") or {}).get("include_usage") is True

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            data: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": 1700000000,
                "model": model,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }
            if include_usage:
                data["usage"] = None
            return _sse(data)

        def piece(text: str) -> bytes:
            if tool:
                return chunk({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
            return chunk({"content": text})

        async def events() -> AsyncIterator[bytes]:
            yield chunk({"role": "assistant", "content": "" if not tool else None})
            yield b": keep-alive\n\n"
            if tool:
                # The tool call's first delta is output: the first-token delay comes before it.
                if self.behaviour.first_delay:
                    await asyncio.sleep(self.behaviour.first_delay)
                start = {"index": 0, "id": "call_fake1", "type": "function"}
                start["function"] = {"name": tool[0], "arguments": ""}
                yield chunk({"tool_calls": [start]})
            async for event in self._content(piece, delayed=bool(tool)):
                yield event
            if self.behaviour.die_mid_stream:
                return
            yield chunk({}, "tool_calls" if tool else "stop")
            if include_usage:
                yield _sse(
                    {
                        "id": cid,
                        "object": "chat.completion.chunk",
                        "created": 1700000000,
                        "model": model,
                        "choices": [],
                        "usage": usage,
                    }
                )
            yield b"data: [DONE]\n\n"

        return self._stream(events(), crlf=self.behaviour.split_events)

    # -- Responses -------------------------------------------------------------------------

    async def _responses(self, request: Request) -> Response:
        body = await self._read(request)
        if self.behaviour.error_status:
            return _openai_error(self.behaviour.error_status)
        model, tool = body.get("model", "fake"), self.reply.tool
        usage = {
            "input_tokens": INPUT_TOKENS,
            "input_tokens_details": {"cached_tokens": CACHED_TOKENS},
            "output_tokens": len(self._pieces()),
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": INPUT_TOKENS + len(self._pieces()),
        }
        if tool:
            item: dict[str, Any] = {
                "type": "function_call",
                "id": "fc_fake1",
                "call_id": "call_fake1",
                "name": tool[0],
                "arguments": json.dumps(tool[1]),
                "status": "completed",
            }
        else:
            item = {
                "type": "message",
                "id": "msg_fake1",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": self.reply.text, "annotations": []}],
            }

        def response(status: str, output: list[Any]) -> dict[str, Any]:
            return {
                "id": "resp_fake1",
                "object": "response",
                "created_at": 1700000000,
                "status": status,
                "model": model,
                "output": output,
                "parallel_tool_calls": True,
                "tool_choice": "auto",
                "tools": [],
                "usage": usage if status == "completed" else None,
            }

        if not body.get("stream"):
            return JSONResponse(response("completed", [item]))
        seq = iter(range(1_000_000))

        def event(data: dict[str, Any]) -> bytes:
            return _sse({**data, "sequence_number": next(seq)}, data["type"])

        at = {"item_id": item["id"], "output_index": 0}

        def piece(text: str) -> bytes:
            if tool:
                return event(
                    {"type": "response.function_call_arguments.delta", **at, "delta": text}
                )
            return event(
                {"type": "response.output_text.delta", **at, "content_index": 0, "delta": text}
            )

        async def events() -> AsyncIterator[bytes]:
            yield event({"type": "response.created", "response": response("in_progress", [])})
            yield event({"type": "response.in_progress", "response": response("in_progress", [])})
            empty: dict[str, Any] = {**item, "status": "in_progress"}
            if tool:
                empty["arguments"] = ""
            else:
                empty["content"] = []
            yield event({"type": "response.output_item.added", "output_index": 0, "item": empty})
            part = {"type": "output_text", "text": "", "annotations": []}
            if not tool:
                yield event(
                    {"type": "response.content_part.added", **at, "content_index": 0, "part": part}
                )
            async for data in self._content(piece):
                yield data
            if self.behaviour.die_mid_stream:
                return
            if tool:
                yield event(
                    {
                        "type": "response.function_call_arguments.done",
                        **at,
                        "arguments": item["arguments"],
                    }
                )
            else:
                text = self.reply.text
                yield event(
                    {"type": "response.output_text.done", **at, "content_index": 0, "text": text}
                )
                yield event(
                    {
                        "type": "response.content_part.done",
                        **at,
                        "content_index": 0,
                        "part": {**part, "text": text},
                    }
                )
            yield event({"type": "response.output_item.done", "output_index": 0, "item": item})
            yield event({"type": "response.completed", "response": response("completed", [item])})

        return self._stream(events())

    # -- Anthropic Messages ----------------------------------------------------------------

    async def _messages(self, request: Request) -> Response:
        body = await self._read(request)
        if self.behaviour.error_status:
            return JSONResponse(
                {
                    "type": "error",
                    "error": {"type": "invalid_request_error", "message": "fake failure"},
                },
                status_code=self.behaviour.error_status,
            )
        model, tool = body.get("model", "fake"), self.reply.tool
        usage_in = {
            "input_tokens": INPUT_TOKENS - CACHED_TOKENS,
            "cache_read_input_tokens": CACHED_TOKENS,
            "cache_creation_input_tokens": 0,
        }
        output_tokens = len(self._pieces())
        if tool:
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": "toolu_fake1",
                "name": tool[0],
                "input": tool[1],
            }
        else:
            block = {"type": "text", "text": self.reply.text}
        stop_reason = "tool_use" if tool else "end_turn"
        message = {
            "id": "msg_fake1",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [block],
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {**usage_in, "output_tokens": output_tokens},
        }
        if not body.get("stream"):
            return JSONResponse(message)

        def event(data: dict[str, Any]) -> bytes:
            return _sse(data, data["type"])

        def piece(text: str) -> bytes:
            delta = (
                {"type": "input_json_delta", "partial_json": text}
                if tool
                else {"type": "text_delta", "text": text}
            )
            return event({"type": "content_block_delta", "index": 0, "delta": delta})

        async def events() -> AsyncIterator[bytes]:
            start = {**message, "content": [], "stop_reason": None}
            start["usage"] = {**usage_in, "output_tokens": 1}
            yield event({"type": "message_start", "message": start})
            empty = {**block, "input": {}} if tool else {"type": "text", "text": ""}
            yield event({"type": "content_block_start", "index": 0, "content_block": empty})
            yield event({"type": "ping"})
            async for data in self._content(piece):
                yield data
            if self.behaviour.die_mid_stream:
                return
            yield event({"type": "content_block_stop", "index": 0})
            yield event(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                    "usage": {"output_tokens": output_tokens},
                }
            )
            yield event({"type": "message_stop"})

        return self._stream(events())


def _sse(data: dict[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()


def _openai_error(status: int) -> JSONResponse:
    return JSONResponse(
        {
            "error": {
                "message": "fake failure",
                "type": "invalid_request_error",
                "param": None,
                "code": "fake_error",
            }
        },
        status_code=status,
    )
