"""An upstream answered in memory, for driving the proxy without sockets.

    upstream = MemoryUpstream(b'{"ok":true}', headers=[(b"content-type", b"application/json")])
    app = ProxyApp(config, upstream=upstream)

Every request gets the same status, headers and body (one chunk, with its
content-length); each one forwarded is kept in ``requests`` when ``keep`` is set. The
in-process benchmark and the unit tests use it where the upstream's answer is not
what is under test.
"""

from __future__ import annotations

from dataclasses import dataclass

from guard.doors.upstream import Headers, Upstream


@dataclass(frozen=True)
class Forwarded:
    """One request as the proxy handed it to the upstream client."""

    method: str
    url: str
    headers: Headers
    body: bytes


class _OneChunk:
    __slots__ = ("body",)

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def readany(self) -> bytes:
        body, self.body = self.body, b""
        return body


class MemoryResponse:
    __slots__ = ("content", "raw_headers", "status")

    def __init__(self, status: int, headers: tuple[tuple[bytes, bytes], ...], body: bytes):
        self.status = status
        self.raw_headers = headers
        self.content = _OneChunk(body)

    def release(self) -> None:
        pass


class MemoryUpstream(Upstream):
    def __init__(
        self,
        body: bytes,
        *,
        status: int = 200,
        headers: list[tuple[bytes, bytes]] | None = None,
        keep: bool = False,
    ) -> None:
        super().__init__()
        self.status = status
        self.body = body
        self.headers = (*(headers or ()), (b"content-length", str(len(body)).encode()))
        self.keep = keep
        self.requests: list[Forwarded] = []

    async def open(
        self, method: str, url: str, headers: Headers, body: bytes, *, long_lived: bool = False
    ) -> MemoryResponse:
        if self.keep:
            self.requests.append(Forwarded(method, url, list(headers), body))
        return MemoryResponse(self.status, self.headers, self.body)
