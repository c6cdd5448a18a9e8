"""The shared upstream HTTP client and the classification of its failures.

httpx is the API; aiohttp (through ``httpx_aiohttp.AiohttpTransport``) is the
transport, because httpx's own connection pool collapses under concurrency on this
machine (~590 req/s at 16 concurrent requests against ~3,100 with aiohttp).

One ``Upstream`` per process, shared by every route: the proxy, the benchmark's bare
passthrough baseline and anything else that forwards requests. Timeouts: connect and
read come from ``[server]``; neither library has a total timeout that covers a
streamed body, so the proxy enforces ``total_timeout`` itself: its sweeper cancels a
relay found past its deadline (``guard.doors.proxy._Relay``; none for long-lived streams).
"""

from __future__ import annotations

import asyncio

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from guard.engine.calls import FailureStage
from guard.engine.config import ServerConfig

# Below the 5 s idle timeout of uvicorn, node and most app servers: reusing a
# connection the upstream is about to close would fail a non-idempotent request.
KEEPALIVE_EXPIRY_S = 4.0
# Headers aiohttp would add to a request (Accept: */*, its own Accept-Encoding and
# User-Agent, a Content-Type for a body sent without one): the upstream sees the
# agent's headers, or none, as it would without loopguard.
_AUTO_HEADERS = ("Accept", "Accept-Encoding", "Content-Type", "User-Agent")


class Upstream:
    """The pooled transport the proxy forwards through, in httpx's Request/Response types.

    The proxy calls the transport directly rather than ``AsyncClient.send``: a reverse
    proxy wants none of the client's per-request work (auth and redirect flows, and a
    cookie jar that would collect every agent's ``Set-Cookie`` in one place), and
    skipping it is a measurable share of the proxy's CPU per request.
    """

    def __init__(self, server: ServerConfig | None = None) -> None:
        server = server or ServerConfig()
        self.limits = httpx.Limits(
            max_connections=server.max_connections,
            max_keepalive_connections=server.max_connections,
            keepalive_expiry=KEEPALIVE_EXPIRY_S,
        )
        self.timeout = httpx.Timeout(
            connect=server.connect_timeout,
            read=server.read_timeout,
            write=server.read_timeout,
            # aiohttp's "connect" timeout covers waiting for a pooled connection too.
            pool=server.connect_timeout + server.read_timeout,
        )
        self._extensions = {"timeout": self.timeout.as_dict()}
        self._long_lived_extensions = {"timeout": {**self.timeout.as_dict(), "read": None}}
        self._ssl_context = httpx.create_ssl_context(trust_env=False)
        # A factory: the transport makes the session on first use, inside the running loop.
        self.transport = AiohttpTransport(client=self._session, trust_env=False)

    def _session(self) -> aiohttp.ClientSession:
        """The aiohttp session under the transport: pooled as ``[server]`` says, and
        adding no request header of its own (a reverse proxy forwards the agent's)."""
        connector = aiohttp.TCPConnector(
            limit=self.limits.max_connections or 0,
            keepalive_timeout=self.limits.keepalive_expiry,
            ssl=self._ssl_context,
        )
        return aiohttp.ClientSession(
            connector=connector, skip_auto_headers=_AUTO_HEADERS, trust_env=False
        )

    def request(
        self,
        method: str,
        url: str,
        headers: list[tuple[str, str]] | list[tuple[bytes, bytes]],
        content: bytes,
        *,
        long_lived: bool = False,
    ) -> httpx.Request:
        """A request exactly as given: httpx adds only Host and Content-Length.

        ``long_lived``: a stream that may be idle for as long as the session lasts, so
        no read timeout applies (connect still does).
        """
        extensions = self._long_lived_extensions if long_lived else self._extensions
        return httpx.Request(method, url, headers=headers, content=content, extensions=extensions)

    async def send(self, request: httpx.Request) -> httpx.Response:
        """Send; the response body is not read (``aiter_raw`` it, then ``aclose``)."""
        response = await self.transport.handle_async_request(request)
        response.request = request
        return response

    async def aclose(self) -> None:
        await self.transport.aclose()


def classify(exc: BaseException, *, response_started: bool) -> tuple[FailureStage, str]:
    """The failure stage and ``error.type`` for an exception from the upstream exchange.

    httpx_aiohttp maps every ``aiohttp.ClientConnectionError`` to ``httpx.ConnectTimeout``
    (a refused connection included), so the original aiohttp error in ``__cause__``
    decides where there is one.
    """
    cause = exc.__cause__ if isinstance(exc, httpx.HTTPError) else None
    original = cause if cause is not None else exc
    if isinstance(original, (TimeoutError, asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return FailureStage.UPSTREAM_TIMEOUT, _timeout_type(original, exc)
    if cause is None and isinstance(exc, httpx.TimeoutException):
        return FailureStage.UPSTREAM_TIMEOUT, type(exc).__name__
    if response_started:
        return FailureStage.STREAM, _error_type(original)
    return FailureStage.UPSTREAM_CONNECT, _error_type(original)


def _timeout_type(original: BaseException, exc: BaseException) -> str:
    if isinstance(original, aiohttp.ConnectionTimeoutError):
        return "ConnectTimeout"
    if isinstance(original, aiohttp.SocketTimeoutError):
        return "ReadTimeout"
    if isinstance(exc, httpx.TimeoutException) and exc is not original:
        return type(exc).__name__
    return "TotalTimeout" if isinstance(original, TimeoutError) else type(original).__name__


def _error_type(original: BaseException) -> str:
    if isinstance(original, aiohttp.ClientConnectorError):
        return "ConnectError"
    if isinstance(original, aiohttp.ServerDisconnectedError):
        return "ServerDisconnected"
    if isinstance(original, aiohttp.ClientPayloadError):
        return "IncompleteBody"
    return type(original).__name__
