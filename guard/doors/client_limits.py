"""Limits on what a client may hold open: loopguard's own where uvicorn has none.

uvicorn closes an idle keep-alive connection (``timeout_keep_alive``) and caps
concurrency (``limit_concurrency``: 503 past it), but starts no timer on a fresh
connection and cancels its keep-alive timer on the first byte of a request: a
client that connects and sends nothing, or sends its request head a byte a second,
holds the connection (and a file descriptor) forever. ``HeadTimeoutProtocol`` closes
a connection whose request head is not complete ``head_timeout`` seconds after it
was opened or its last response ended, as nginx's ``client_header_timeout`` does.
The body's pace is the body reader's (``guard.doors.asgi.read_body``: 408). The
protocol also passes an absolute-form target on as ``raw_path``, so the proxy can
refuse it (httptools itself hands the app only the path).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

DEFAULT_HEAD_TIMEOUT_S = 10.0


class HeadTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline for each complete request head."""

    # Set from [server] head_timeout by the serve module (a class attribute, so the
    # class stays importable by name for worker processes).
    head_timeout = DEFAULT_HEAD_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

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
        target = self.url
        super().on_headers_complete()
        if target[:1] not in (b"/", b"*"):
            # Absolute-form ("GET http://host/x"): httptools hands the app only the
            # path; the raw target goes in instead, so the proxy refuses it (400).
            self.scope["raw_path"] = target

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

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)


__all__ = ["DEFAULT_HEAD_TIMEOUT_S", "HeadTimeoutProtocol"]
