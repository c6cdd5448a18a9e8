"""Small ASGI helpers shared by the front doors (reverse proxy, embedded middleware).

Protocol-free: reading a bounded request body, converting headers between ASGI byte
pairs and the ``str`` pairs the exchange speaks, and sending an ``Answer``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from guard.engine.calls import Route
from guard.engine.contract import Answer
from guard.engine.problem import ROUTE_HEADER, problem

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_ROUTE_HEADER_B = ROUTE_HEADER.encode()


class BodyRefused(Exception):
    """The request body cannot be taken (too large, bad length); ``answer`` says why."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(answer.status)
        self.answer = answer


class ClientDisconnected(Exception):
    """The client went away before its request body was read."""


async def read_body(
    receive: Receive,
    limit: int,
    content_length: str | None = None,
    read_timeout: float | None = None,
) -> bytes:
    """The whole request body, refusing more than ``limit`` bytes.

    A declared ``content-length`` over the limit is refused before anything is read;
    a chunked body is counted as it comes. A client that sends nothing for
    ``read_timeout`` seconds between two reads is cut off with 408 (the client is the
    slow party, as nginx's ``client_body_timeout``). Raises ``BodyRefused`` (413, 408,
    or 400 for a length that is not a number) or ``ClientDisconnected``.
    """
    if content_length is not None:
        if not content_length.isdigit():
            raise BodyRefused(
                problem(
                    400,
                    "bad-content-length",
                    "Bad Content-Length",
                    "Content-Length is not a number.",
                )
            )
        if int(content_length) > limit:
            raise BodyRefused(too_large(limit))
    parts: list[bytes] = []
    size = 0
    while True:
        if read_timeout is None:
            message = await receive()
        else:
            try:
                async with asyncio.timeout(read_timeout):
                    message = await receive()
            except TimeoutError:
                raise BodyRefused(body_timeout(read_timeout)) from None
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk: bytes = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise BodyRefused(too_large(limit))
            parts.append(chunk)
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


def body_timeout(seconds: float) -> Answer:
    return problem(
        408,
        "body-timeout",
        "Request body too slow",
        f"The request body sent nothing for {seconds:g} s ([server] body_read_timeout).",
    )


def too_large(limit: int) -> Answer:
    return problem(
        413,
        "body-too-large",
        "Request body too large",
        f"The request body exceeds loopguard's limit of {limit} bytes ([server] max_body_bytes).",
    )


def str_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """ASGI headers as a dict with lower-cased names; repeated fields joined by ", "."""
    headers: dict[str, str] = {}
    for name, value in raw:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        previous = headers.get(key)
        headers[key] = text if previous is None else f"{previous}, {text}"
    return headers


def byte_pairs(pairs: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """``str`` header pairs as ASGI byte pairs."""
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in pairs]


async def send_answer(send: Send, answer: Answer, route: Route = Route.SERVE) -> None:
    """Send one of loopguard's own answers, whole, with its length and route header."""
    headers = byte_pairs(answer.headers)
    if not any(n.lower() == _ROUTE_HEADER_B for n, _ in headers):
        headers.append((_ROUTE_HEADER_B, route.value.encode()))
    if not any(n.lower() == b"content-type" for n, _ in headers):
        headers.append((b"content-type", b"application/octet-stream"))
    body = b"".join(answer.chunks)
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
