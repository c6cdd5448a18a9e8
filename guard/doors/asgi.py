"""Small ASGI helpers shared by the front doors (reverse proxy, embedded middleware).

Protocol-free: reading a bounded request body, converting headers between ASGI byte
pairs and the ``str`` pairs the exchange speaks, and sending an ``Answer``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

from guard.engine.calls import Route
from guard.engine.contract import OFFLOAD_BYTES, Answer
from guard.engine.problem import ROUTE_HEADER, problem

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_ROUTE_HEADER_B = ROUTE_HEADER.encode()
# Headers meant for one connection (RFC 9110 7.6.1), never relayed by a proxy; nor are
# the ones a ``Connection`` header names, nor ``Proxy-*``.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)


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
    budget: BodyBudget | None = None,
) -> bytes:
    """The whole request body, refusing more than ``limit`` bytes.

    A declared ``content-length`` over the limit is refused before anything is read;
    a chunked body is counted as it comes, and charged to ``budget`` (if given) as it
    comes: 503 past the budget (overload), 413 past ``limit``. On success the caller
    holds the charge (the body's length) and gives it back; on failure it is given back
    here. A client that sends nothing for
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
    charged = 0  # chunked bytes charged to ``budget`` so far
    task: asyncio.Task[Any] | None = None
    watch: _BodyWatch | None = None
    entry: list[float] | None = None
    if read_timeout is not None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
    if task is not None and read_timeout is not None:
        # Watched, not wrapped in a timeout per read (which costs more than the rest
        # of a small request's read): a sweeper cancels a read that made no progress.
        watch = _watch(loop)
        entry = [time.monotonic(), read_timeout, 0.0]  # last progress, timeout, cut
        watch.add(task, entry)
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            chunk: bytes = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise BodyRefused(too_large(limit))
                if budget is not None:
                    budget.take(len(chunk))
                    charged = size
                parts.append(chunk)
            if not message.get("more_body", False):
                if len(parts) == 1:
                    body = parts[0]
                elif size > OFFLOAD_BYTES:
                    # A large body's copy off the event loop: bytes.join copies without
                    # the GIL past 1 MB, so it runs beside the other requests.
                    body = await asyncio.to_thread(join_parts, parts)
                else:
                    body = join_parts(parts)
                charged = 0  # the caller's to give back now
                return body
            if entry is not None:
                entry[0] = time.monotonic()  # progress: the next read's clock restarts
    except asyncio.CancelledError:
        if entry is None or not entry[2] or task is None:
            raise
        task.uncancel()  # our own cancellation: answered, not propagated
        raise BodyRefused(body_timeout(entry[1])) from None
    finally:
        if charged and budget is not None:
            budget.give(charged)
        if watch is not None and task is not None:
            watch.readers.pop(task, None)


# The body's parts joined (a name of its own: tests watch which thread runs it).
join_parts = b"".join


class _BodyWatch:
    """The body reads in progress on one event loop, and the task that cuts those
    that made no progress within their timeout. It runs only while reads are
    registered (so it never outlives the traffic), waking a few times per timeout."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.readers: dict[asyncio.Task[Any], list[float]] = {}
        self.tick = 1.0
        self._sweeper: asyncio.Task[None] | None = None

    def add(self, task: asyncio.Task[Any], entry: list[float]) -> None:
        self.readers[task] = entry
        if entry[1] / 4 < self.tick:
            self.tick = entry[1] / 4
        if self._sweeper is None:
            self._sweeper = self.loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        try:
            while self.readers:
                await asyncio.sleep(self.tick)
                now = time.monotonic()
                for task, entry in list(self.readers.items()):
                    if not entry[2] and now - entry[0] > entry[1]:
                        entry[2] = 1.0
                        task.cancel()
        finally:
            self._sweeper = None


# One watch per event loop; a thread runs at most one loop at a time.
_local = threading.local()


def _watch(loop: asyncio.AbstractEventLoop) -> _BodyWatch:
    watch: _BodyWatch | None = getattr(_local, "watch", None)
    if watch is None or watch.loop is not loop:
        watch = _local.watch = _BodyWatch(loop)
    return watch


class BodyBudget:
    """Request body bytes in flight at once, bounded: past the bound a request is
    refused with 503 problem+json and ``Retry-After`` (overload, where an SDK retrying
    is right), as Envoy's overload manager sheds load. A declared length is taken whole
    before reading, a chunked body as it comes (``read_body``); either is held until the
    forwarded copy is done with (the upstream request or the wrapped app finished)."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> None:
        if size and self.used + size > self.limit:
            raise BodyRefused(overloaded(self.limit))
        self.used += size

    def give(self, size: int) -> None:
        self.used -= size


def overloaded(limit: int) -> Answer:
    return overload(
        "Too many request bytes in flight",
        f"loopguard is reading and admitting {limit} bytes of request bodies already "
        "([server] max_bytes_in_flight); retry shortly.",
    )


def overload(title: str, detail: str) -> Answer:
    """503 problem+json with ``Retry-After``: loopguard is overloaded, retrying is right
    (never used for a stop, which a retry would only repeat)."""
    answer = problem(503, "overloaded", title, detail)
    answer.headers.append(("retry-after", "1"))
    return answer


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


def connection_tokens(value: bytes, into: set[bytes] | None) -> set[bytes]:
    """The header names a ``Connection`` header's value lists (lower-cased), added to
    ``into``."""
    tokens = into if into is not None else set()
    tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


_K = TypeVar("_K")
_V = TypeVar("_V")
# How many header names a door remembers what to do with (the same few come on every
# call; past this, new names are worked out each time). Names are client and upstream
# input, hence the bound.
NAME_CACHE_MAX = 1024


def remember(cache: dict[_K, _V], key: _K, value: _V) -> _V:
    """``value``, kept in ``cache`` under ``key`` while it holds fewer than
    ``NAME_CACHE_MAX`` entries."""
    if len(cache) < NAME_CACHE_MAX:
        cache[key] = value
    return value
