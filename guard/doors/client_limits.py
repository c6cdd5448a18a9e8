"""Limits on what a client may hold open: loopguard's own where uvicorn has none.

uvicorn closes an idle keep-alive connection (``timeout_keep_alive``) and caps
concurrency (``limit_concurrency``), but starts no timer on a fresh connection and
cancels its keep-alive timer on the first byte of a request: a client that connects
and sends nothing, or sends its request head a byte a second, holds the connection
(and a file descriptor) forever. ``HeadTimeoutProtocol`` closes a connection whose
request head is not complete ``head_timeout`` seconds after it was opened or its last
response ended, as nginx's ``client_header_timeout`` does.

It also bounds the request head's size, which neither uvicorn nor llhttp (under
httptools) does: past ``max_header_bytes`` of a head not yet complete, the client gets
431 problem+json and the connection is closed (nginx's ``large_client_header_buffers``,
32 KiB by default there too). The bytes are counted as they arrive, before the parser
buffers an endless header that never reaches a callback.

Past the concurrency cap (connections or requests at once, as uvicorn counts them)
the answer is 503 problem+json with ``Retry-After`` (overload: an SDK retrying is
right), not uvicorn's plain-text 503. The body's pace is the body reader's
(``guard.doors.asgi.read_body``: 408). The protocol also passes an absolute-form
target on as ``raw_path``, so the proxy can refuse it (httptools itself hands the app
only the path).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from guard.doors.asgi import overload, send_answer
from guard.engine.contract import Answer
from guard.engine.problem import problem

DEFAULT_HEAD_TIMEOUT_S = 10.0
DEFAULT_MAX_HEADER_BYTES = 32 * 1024
# After a 431, how long the client's further bytes are read and dropped before the
# connection is closed: closing with unread bytes would reset it, and the client could
# lose the answer (nginx's lingering close).
LINGER_S = 2.0

_LINGERING = -2  # _head_bytes after a 431: the rest is read and dropped
_REASONS = {431: b"Request Header Fields Too Large"}


def _raw_response(answer: Answer) -> bytes:
    """An answer as the bytes of a whole HTTP/1.1 response that closes the connection
    (for a request no ASGI app will see)."""
    body = b"".join(answer.chunks)
    head = [b"HTTP/1.1 %d %s" % (answer.status, _REASONS[answer.status])]
    head += [f"{name}: {value}".encode("latin-1") for name, value in answer.headers]
    head += [b"content-length: %d" % len(body), b"connection: close"]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def _head_too_large(limit: int) -> bytes:
    return _raw_response(
        problem(
            431,
            "header-too-large",
            "Request header fields too large",
            f"The request head exceeds loopguard's limit of {limit} bytes "
            "([server] max_header_bytes).",
        )
    )


async def _overloaded(scope: Any, receive: Any, send: Any) -> None:
    """The app a request past the concurrency cap gets instead of loopguard's."""
    answer = overload(
        "Too many connections",
        "loopguard is at its limit of connections and requests at once "
        "([server] limit_concurrency); retry shortly.",
    )
    answer.headers.append(("connection", "close"))
    await send_answer(send, answer)


class HeadTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size bound for each request
    head, and a problem+json answer past the concurrency cap."""

    # Set from [server] by the serve module (class attributes, so the class stays
    # importable by name for worker processes).
    head_timeout = DEFAULT_HEAD_TIMEOUT_S
    max_header_bytes = DEFAULT_MAX_HEADER_BYTES
    _head_refusal = _head_too_large(DEFAULT_MAX_HEADER_BYTES)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        # The cap is checked here, so the answer is ours; uvicorn's check stays off.
        self._cap: int | None = self.limit_concurrency
        self.limit_concurrency = None
        # Bytes received of the request head being read; -1 while a body is.
        self._head_bytes = 0

    @classmethod
    def configure(cls, head_timeout: float, max_header_bytes: int) -> None:
        cls.head_timeout = head_timeout
        if max_header_bytes != cls.max_header_bytes:
            cls.max_header_bytes = max_header_bytes
            cls._head_refusal = _head_too_large(max_header_bytes)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._head_bytes == _LINGERING:
            return  # refused: what the client still sends is dropped
        if self._head_bytes >= 0:
            self._head_bytes += len(data)
        super().data_received(data)
        # Checked after parsing: bytes past a head completed in this read are a body's.
        if self._head_bytes > self.max_header_bytes and not self.transport.is_closing():
            self._refuse_head()

    def _refuse_head(self) -> None:
        # A response still being sent for a pipelined request ahead: just close.
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()
            return
        self._disarm_head_timer()
        self._head_bytes = _LINGERING
        self.transport.write(self._head_refusal)
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        # The answer, then end of stream; closed when the client ends its side too
        # (uvicorn's eof_received lets the transport close) or after LINGER_S.
        self.transport.write_eof()
        self._head_timer = self.loop.call_later(LINGER_S, self.transport.close)

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()
        self._head_bytes = -1
        target = self.url
        cap = self._cap
        if cap is not None and (len(self.connections) >= cap or len(self.tasks) >= cap):
            # This request only (uvicorn takes the app from self.app as it starts it).
            self.app = _overloaded
            try:
                super().on_headers_complete()
            finally:
                self.app = self.config.loaded_app
        else:
            super().on_headers_complete()
        if target[:1] not in (b"/", b"*"):
            # Absolute-form ("GET http://host/x"): httptools hands the app only the
            # path; the raw target goes in instead, so the proxy refuses it (400).
            self.scope["raw_path"] = target

    def on_message_complete(self) -> None:
        self._head_bytes = 0  # what follows is the next request's head
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            self._arm_head_timer()  # the next request's head is due in time too

    def _head_timed_out(self) -> None:
        self._head_timer = None
        # Only between requests: a request being answered is the exchange's business.
        if (self.cycle is None or self.cycle.response_complete) and not (
            self.transport.is_closing()
        ):
            self.transport.close()

    def _unsupported_upgrade_warning(self) -> None:
        # No WebSocket handling on purpose (ws="none"): the upgrade is served as plain
        # HTTP. uvicorn's two warnings per such request (one advising to install a
        # WebSocket library) would let any client fill the log.
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)


__all__ = ["DEFAULT_HEAD_TIMEOUT_S", "DEFAULT_MAX_HEADER_BYTES", "HeadTimeoutProtocol"]
