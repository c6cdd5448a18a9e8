"""The shared upstream HTTP client and the classification of its failures.

aiohttp, called directly: the proxy forwards bytes it already has (a method, a URL, a
header list, a body) and relays the bytes it gets back, so it needs no request or
response objects of its own. Building httpx ``Request``/``Response`` objects over an
aiohttp transport cost about half of what loopguard lost against a plain aiohttp
passthrough (``benchmarks/bench_proxy.py``, the ``floor`` target); httpx stays the
client of the tests and of the users' own code.

One ``Upstream`` per process, shared by every route: the proxy and anything else that
forwards requests. What a reverse proxy needs of the client, and aiohttp's setting
for it: no header of its own (``skip_auto_headers``; Host and Content-Length only),
no cookie jar (one jar would collect every agent's ``Set-Cookie``), no redirects
followed, no decompression (encoded bytes pass through as the upstream sent them),
no re-quoting of the path (``URL(..., encoded=True)``), pooled connections dropped
before the upstream's idle timeout. Timeouts: connect and read come from
``[server]``; aiohttp's total timeout would not cover a body streamed after the
headers, so the proxy enforces ``total_timeout`` itself: its sweeper cancels a relay
found past its deadline (``guard.doors.proxy._Relay``; none for long-lived streams).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol

import aiohttp
import httpx
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload
from yarl import URL

from guard.engine.calls import FailureStage
from guard.engine.config import ServerConfig

# Below the 5 s idle timeout of uvicorn, node and most app servers: reusing a
# connection the upstream is about to close would fail a non-idempotent request.
KEEPALIVE_EXPIRY_S = 4.0
# Headers aiohttp would add to a request (Accept: */*, its own Accept-Encoding and
# User-Agent, a Content-Type for a body sent without one): the upstream sees the
# agent's headers, or none, as it would without loopguard.
_AUTO_HEADERS = ("Accept", "Accept-Encoding", "Content-Type", "User-Agent")
# A body over this is handed to aiohttp in slices of this size (``SlicedBody``).
BODY_SLICE = 256 * 1024

Headers = list[tuple[str, str]]


class SlicedBody(Payload):
    """A large request body written a slice at a time, each after the last drained.

    Given bytes, aiohttp writes the body in one call, and its first write joins the
    request head to the body (on Python before 3.12.9, always): an 8 MB upload became
    a second 8 MB copy, and what the socket did not take at once was buffered by the
    transport. In slices the head is joined to the first slice only, the transport
    holds one slice at most, and nothing of the body is copied whole. The bytes and
    headers sent are those of a bytes body (Content-Length from ``size``; no
    Content-Type added, as ``skip_auto_headers`` says)."""

    def __init__(self, body: bytes) -> None:
        super().__init__(body)
        self._body = body

    @property
    def size(self) -> int:
        return len(self._body)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self._body.decode(encoding, errors)

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        view = memoryview(self._body)
        end = len(view) if content_length is None else min(content_length, len(view))
        for start in range(0, end, BODY_SLICE):
            # Each write waits for the transport to drain below aiohttp's limit.
            await writer.write(view[start : min(start + BODY_SLICE, end)])


class Body(Protocol):
    """A response body as it arrives (aiohttp's ``StreamReader``)."""

    async def readany(self) -> bytes:
        """The bytes received so far, at least one; b"" at the end of the body."""
        ...


class UpstreamResponse(Protocol):
    """What the proxy reads of a response (aiohttp's ``ClientResponse``)."""

    @property
    def status(self) -> int: ...

    @property
    def raw_headers(self) -> tuple[tuple[bytes, bytes], ...]: ...

    @property
    def content(self) -> Body: ...

    def release(self) -> object:
        """Done with it: the connection goes back to the pool if the body was read to
        its end, else it is closed (an abandoned body)."""
        ...


class Upstream:
    """The pooled aiohttp session the proxy forwards through."""

    def __init__(self, server: ServerConfig | None = None) -> None:
        server = server or ServerConfig()
        self.max_connections = server.max_connections
        # aiohttp's "connect" timeout covers waiting for a pooled connection too.
        self.timeout = aiohttp.ClientTimeout(
            total=None,
            connect=server.connect_timeout + server.read_timeout,
            sock_connect=server.connect_timeout,
            sock_read=server.read_timeout,
        )
        self.long_lived_timeout = aiohttp.ClientTimeout(
            total=None,
            connect=self.timeout.connect,
            sock_connect=self.timeout.sock_connect,
            sock_read=None,
        )
        # The same trust store as httpx (certifi), read once at start-up.
        self._ssl_context = httpx.create_ssl_context(trust_env=False)
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        """The session, made on first use (inside the running loop)."""
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self.max_connections,
                keepalive_timeout=KEEPALIVE_EXPIRY_S,
                ssl=self._ssl_context,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                skip_auto_headers=_AUTO_HEADERS,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                trust_env=False,
                timeout=self.timeout,
            )
        return self._session

    def open(
        self, method: str, url: str, headers: Headers, body: bytes, *, long_lived: bool = False
    ) -> Awaitable[UpstreamResponse]:
        """Send the request exactly as given (aiohttp adds only Host and Content-Length);
        await it for the response with its body not read yet: read ``content`` (to its
        end, or not), then ``release`` it.

        ``url``: already percent-encoded, sent as it is. ``long_lived``: a stream that
        may be idle for as long as the session lasts, so no read timeout applies
        (connect still does). Not a coroutine itself: the caller awaits aiohttp's, one
        coroutine level less on every resume while the upstream answers.
        """
        session = self._session if self._session is not None else self.session()
        return session.request(
            method,
            URL(url, encoded=True),
            headers=headers,
            data=SlicedBody(body) if len(body) > BODY_SLICE else body or None,
            allow_redirects=False,
            timeout=self.long_lived_timeout if long_lived else self.timeout,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def classify(exc: BaseException, *, response_started: bool) -> tuple[FailureStage, str]:
    """The failure stage and ``error.type`` for an exception from the upstream exchange."""
    if isinstance(exc, TimeoutError):  # asyncio's and aiohttp's timeouts included
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return FailureStage.UPSTREAM_TIMEOUT, "ConnectTimeout"
        if isinstance(exc, aiohttp.SocketTimeoutError):
            return FailureStage.UPSTREAM_TIMEOUT, "ReadTimeout"
        if isinstance(exc, aiohttp.ServerTimeoutError):
            return FailureStage.UPSTREAM_TIMEOUT, type(exc).__name__
        # The proxy's own: the relay went past ``total_timeout``.
        return FailureStage.UPSTREAM_TIMEOUT, "TotalTimeout"
    stage = FailureStage.STREAM if response_started else FailureStage.UPSTREAM_CONNECT
    return stage, _error_type(exc)


def _error_type(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "ConnectError"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "ServerDisconnected"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "IncompleteBody"
    return type(exc).__name__
