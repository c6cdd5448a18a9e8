"""A lean Redis client for the session store: one pipelined connection, RESP2.

Measured against redis-py's asyncio client on the store's two scripts per call, most
of its CPU went to the connection pool (a connection taken and given back per
command), argument encoding, one ``send`` per command and its instrumentation hooks.
This client keeps one connection and writes each command at once (no pool, no lock):
replies come back in the order the commands were sent, so each waiting call is a
future in a FIFO. Many calls share the connection at a time (pipelining): Redis runs
one connection's commands in order, which is what lets a settle be sent without
waiting for its reply and still be seen by the next command of this process.

Only what the store needs: ``redis://`` and ``rediss://`` (host, port, user,
password, database number) and ``unix://`` URLs; replies are parsed by ``hiredis``
when it is installed, else by the small parser below.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

_HiredisReader: Any
try:  # the C reply parser, when installed (redis[hiredis])
    from hiredis import Reader as _HiredisReader
except ImportError:  # pragma: no cover - depends on the environment
    _HiredisReader = None


class RedisReplyError(Exception):
    """Redis answered with an error (``-ERR ...``, ``-NOSCRIPT ...``)."""


class _PyReader:
    """RESP2 replies from a byte stream: ``feed`` bytes, ``gets`` a reply or False."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def gets(self) -> Any:
        try:
            reply, end = self._parse(0)
        except IndexError:  # incomplete: wait for more bytes
            return False
        del self._buf[:end]
        return reply

    def _parse(self, pos: int) -> tuple[Any, int]:
        buf = self._buf
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            raise IndexError
        kind, line = buf[pos : pos + 1], bytes(buf[pos + 1 : eol])
        pos = eol + 2
        if kind == b"+":
            return line, pos
        if kind == b"-":
            return RedisReplyError(line.decode(errors="replace")), pos
        if kind == b":":
            return int(line), pos
        if kind == b"$":
            size = int(line)
            if size < 0:
                return None, pos
            if len(buf) < pos + size + 2:
                raise IndexError
            return bytes(buf[pos : pos + size]), pos + size + 2
        if kind == b"*":
            size = int(line)
            if size < 0:
                return None, pos
            items = []
            for _ in range(size):
                item, pos = self._parse(pos)
                items.append(item)
            return items, pos
        raise ValueError(f"bad RESP reply type {kind!r}")


def _reader() -> Any:
    if _HiredisReader is not None:
        return _HiredisReader(replyError=RedisReplyError)
    return _PyReader()


def encode_command(args: tuple[str | bytes | int, ...]) -> bytes:
    """One RESP command: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int):
            arg = b"%d" % arg
        parts.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(parts)


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.reader = _reader()
        self.lost: BaseException | None = None
        # Commands not written yet: the calls made in one turn of the event loop go out
        # in one write (a send is most of a command's CPU cost here).
        self.out: list[bytes] = []
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def queue(self, args: tuple[str | bytes | int, ...], now: bool) -> asyncio.Future[Any]:
        """The command's reply future; the command written at once (``now``) or at the
        end of this turn of the event loop, with the others queued meanwhile."""
        future = self.loop.create_future()
        self.waiting.append(future)
        out = self.out
        out.append(encode_command(args))
        if now:
            self.flush()
        elif len(out) == 1:
            self.loop.call_soon(self.flush)
        return future

    def flush(self) -> None:
        out = self.out
        if out and self.transport is not None and self.lost is None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        waiting = self.waiting
        while (reply := reader.gets()) is not False:
            future = waiting.popleft()
            if future.done():  # its caller gave up (timeout): the reply is dropped
                continue
            if isinstance(reply, RedisReplyError):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = exc or ConnectionResetError("redis closed the connection")
        self.out.clear()
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(ConnectionError(f"redis connection lost: {self.lost}"))


class RespClient:
    """``call`` a command and await its reply; ``send`` one and get its reply future."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 2.0,
        timeout: float | None = 2.0,
        scripts: tuple[str, ...] = (),
    ) -> None:
        """``scripts``: Lua sources loaded on every new connection (SCRIPT LOAD), so
        EVALSHA finds them even on a server that restarted."""
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"unsupported redis URL scheme {parts.scheme!r}: {url}")
        query = parse_qs(parts.query)
        self._scheme = parts.scheme
        self._host = parts.hostname or "localhost"
        self._port = parts.port or 6379
        self._path = unquote(parts.path)
        if parts.scheme == "unix":
            db = query.get("db", ["0"])[0]
        else:
            db = self._path.strip("/") or query.get("db", ["0"])[0]
        self._db = int(db)
        self._username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self._scripts = scripts
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout):
            if self._scheme == "unix":
                _, conn = await loop.create_unix_connection(_Connection, self._path)
            else:
                context = ssl.create_default_context() if self._scheme == "rediss" else None
                _, conn = await loop.create_connection(
                    _Connection, self._host, self._port, ssl=context
                )
            try:
                handshake = []
                if self._password is not None:
                    user = (self._username,) if self._username else ()
                    handshake.append(conn.queue(("AUTH", *user, self._password), True))
                if self._db:
                    handshake.append(conn.queue(("SELECT", self._db), True))
                handshake.extend(conn.queue(("SCRIPT", "LOAD", s), True) for s in self._scripts)
                for reply in handshake:
                    await reply
            except BaseException:  # refused (AUTH, SELECT) or timed out: not kept open
                assert conn.transport is not None
                conn.transport.close()
                raise
        return conn

    async def _connection(self) -> _Connection:
        connecting = self._connecting
        if connecting is None:
            # One connection attempt at a time; everyone waiting shares its outcome.
            connecting = self._connecting = asyncio.ensure_future(self._connect())
        try:
            conn = await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None
        self._conn = conn
        return conn

    def send(self, *args: str | bytes | int) -> asyncio.Future[Any] | None:
        """Queue the command as ``call`` does, for a caller that does not await the reply
        (a settle): its future, or None when not connected (then use ``call``). It goes
        out with the commands made in the same turn, the next call's check among them,
        in one write: measured in the proxy bench, a third less CPU in redis-server
        per call and a few percent less in the proxy than writing it at once."""
        conn = self._conn
        if conn is None or conn.lost is not None:
            return None
        return conn.queue(args, False)

    async def call(self, *args: str | bytes | int) -> Any:
        """The command's reply; the command written at the end of this turn of the event
        loop, with the others made meanwhile."""
        conn = self._conn
        if conn is None or conn.lost is not None:
            conn = await self._connection()
        future = conn.queue(args, False)
        if self.timeout is None:
            return await future
        async with asyncio.timeout(self.timeout):
            return await future

    async def aclose(self) -> None:
        """Close once the replies still due have come (commands sent without waiting,
        such as settles), for at most ``timeout`` seconds (or the connect timeout)."""
        conn, self._conn = self._conn, None
        if conn is None or conn.transport is None:
            return
        if conn.waiting and conn.lost is None:
            await asyncio.wait(list(conn.waiting), timeout=self.timeout or self.connect_timeout)
        conn.transport.close()


__all__ = ["RedisReplyError", "RespClient", "encode_command"]
