"""The reverse proxy: a pure-ASGI app that puts the guard in front of configured upstreams.

One request: match a route by longest path prefix (``guard.doors.routing``), admit it
(``guard.doors.admission``, shared with the middleware: the body read once, bounded,
and the ``Exchange``'s decision; a stop answer never reaches upstream), forward it to
the route's upstream, and relay the response chunk by chunk as it arrives, every
chunk passing the adapter's observer on its way.

Safety rules it keeps:

- only configured upstreams are contacted: the URL is ``route.upstream + rest``, never
  built from the Host header or an absolute-form target (rejected with 400 where the
  server hands it over; uvicorn's httptools parser drops the authority itself, so
  such a request is simply routed by its path);
- the upstream sees its own Host (the client sets it from the URL);
- hop-by-hop headers are dropped both ways; ``content-length`` is recomputed;
- ``accept-encoding: identity`` is sent upstream so the observers can read outcomes,
  usage and stream events (content-encoding is passed through untouched if an
  upstream compresses anyway; the observer then hashes the bytes);
- the response is never buffered: a client that stops reading stops the relay (ASGI
  ``send`` waits under uvicorn's flow control), a client that goes away closes the
  upstream response (noticed within two ``WATCH_AFTER_S`` sweeps);
- the call's step is recorded before the client gets the response's last byte, so
  an agent's next call always sees it.

Failures and what the client sees (failure stage in the record):

- upstream refused / unreachable: 502 problem+json (``upstream_connect``);
- upstream timeout (read or total): 504 problem+json (``upstream_timeout``);
- upstream 5xx: passed through unchanged (``upstream_status``); a tool's 4xx is the
  tool's answer, an error outcome for the stall rules, not a failure;
- upstream dies mid-stream: the client's stream is cut (the ASGI call returns
  without completing the response, uvicorn closes the connection and logs one
  line) (``stream``); a client that goes away: ``stream`` / ``client_disconnected``.

Statuses loopguard writes itself are never ones that SDKs retry on their own (408,
409, 429, 5xx) -- except 502 and 504, which report a real upstream failure, as the
caller would have seen it without loopguard in between.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import structlog

from guard.doors.admission import admit
from guard.doors.asgi import HOP_BY_HOP, connection_tokens, remember, send_answer
from guard.doors.engines import door_engine
from guard.doors.exchange import Exchange, exception_fields
from guard.doors.routing import Router
from guard.doors.upstream import Headers, Upstream, UpstreamResponse, classify
from guard.engine.calls import FailureStage, Route
from guard.engine.config import Config, RouteConfig
from guard.engine.contract import Answer
from guard.engine.core import Engine
from guard.engine.problem import ROUTE_HEADER, problem

log = structlog.get_logger("loopguard")

Scope = dict[str, Any]

# Request headers not forwarded as received: the upstream gets its own Host, a
# recomputed length, and an identity encoding the observers can read.
_REQUEST_DROP = HOP_BY_HOP | {b"host", b"content-length", b"expect", b"accept-encoding"}
_ROUTE_HEADER_B = ROUTE_HEADER.encode()
_SERVE_B = Route.SERVE.value.encode()
_HEALTH_BODY = b'{"status":"ok"}'
_IDENTITY = ("accept-encoding", "identity")
_TRACE_HEADERS = frozenset({"traceparent", "tracestate"})
# The sweep period: calls found running on two sweeps get a task watching for the
# client leaving; total timeouts are checked on every sweep.
WATCH_AFTER_S = 0.05


class ProxyApp:
    """``app = ProxyApp(config)``; serve it with uvicorn (see ``guard.doors.serve``)."""

    def __init__(
        self,
        config: Config,
        *,
        engine: Engine | None = None,
        upstream: Upstream | None = None,
    ) -> None:
        self.config = config
        self.engine = engine if engine is not None else door_engine(config)
        self.upstream = upstream or Upstream(config.server)
        self.max_body = config.server.max_body_bytes
        self.total_timeout = config.server.total_timeout
        self.router = Router(config)
        # The route prefix -> adapter map (one adapter per route, built once).
        self.adapters = self.router.adapters
        self._sweeper = _Sweeper()

    async def _other(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})

    async def aclose(self) -> None:
        """Close the upstream client and the engine (store, telemetry)."""
        try:
            await self.upstream.aclose()
        finally:
            await self.engine.aclose()

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._announce_routes()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await self.aclose()
                except Exception as exc:
                    log.warning("shutdown_failed", error=type(exc).__name__)
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _announce_routes(self) -> None:
        """Say at start-up what is guarded where: a proxy with no routes answers only 404."""
        if not self.config.routes:
            log.warning("no_routes", hint="add [[routes]] to the config: every path is a 404")
        for route in self.config.routes:
            upstream = _without_userinfo(route.upstream)
            log.info("route", prefix=route.prefix, upstream=upstream, adapter=route.adapter)

    # -- one request -----------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        # The request path is this coroutine, admission's and the relay's, no deeper:
        # every level of awaiting coroutines is paid again on each resume, a measurable
        # share per call.
        if scope["type"] != "http":
            return await self._other(scope, receive, send)
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        if raw_path[:1] != b"/":
            # Absolute-form ("GET http://host/x"): a forward-proxy request; refused.
            return await send_answer(send, _problem_bad_target())
        path = raw_path.decode("latin-1")
        method: str = scope["method"]
        if path == "/healthz" and method in ("GET", "HEAD"):
            return await _send_simple(send, 200, b"application/json", _HEALTH_BODY)
        found = self.router.route_for(path)
        if found is None:
            return await send_answer(send, _problem_not_found(path))
        route, rest = found
        if _has_dot_segment(scope["path"]):
            return await send_answer(send, _problem_dot_segments())

        view_headers, forward = _split_headers(scope["headers"])
        query_b: bytes = scope.get("query_string", b"")
        query = query_b.decode("latin-1")
        admitted = await admit(
            self.engine, self.router, route, receive, method, _unquote(rest), query, view_headers
        )
        if admitted is None:
            return None
        if isinstance(admitted, Answer):
            return await send_answer(send, admitted)
        try:
            exchange = admitted.exchange
            url = route.upstream + rest + ("?" + query if query else "")
            trace = exchange.upstream_headers()
            if trace:
                if "traceparent" in view_headers or "tracestate" in view_headers:
                    # The agent's own trace headers give way to loopguard's span.
                    forward = [h for h in forward if h[0] not in _TRACE_HEADERS]
                forward.extend(trace.items())
            forward.append(_IDENTITY)
            relay = _Relay(self.upstream, exchange, route, send, receive)
            await relay.run(method, url, forward, admitted.body, self.total_timeout, self._sweeper)
        finally:
            admitted.release()  # the body sent upstream leaves the in-flight budget


class _Relay:
    """Forward one admitted request and relay its response; always ends the exchange.

    Two things can interrupt it: the client going away and the total timeout. Both are
    checked by the proxy's ``_Sweeper`` every ``WATCH_AFTER_S``: a call that is over
    before a sweep finds it (most tool calls) costs no timer and no watcher task; a
    longer one gets a task watching ``receive()`` for ``http.disconnect``, so a
    departed client closes the upstream within two sweeps plus a loop turn, and the
    total timeout fires within one sweep of its deadline. Either interruption cancels
    the relay task and is told apart from any other cancellation by ``interrupted``.
    """

    __slots__ = (
        "deadline",
        "done",
        "exchange",
        "interrupted",
        "receive",
        "route",
        "seen",
        "send",
        "started",
        "task",
        "upstream",
        "watcher",
    )

    def __init__(
        self,
        upstream: Upstream,
        exchange: Exchange,
        route: RouteConfig,
        send: Any,
        receive: Any,
    ) -> None:
        self.upstream = upstream
        self.exchange = exchange
        self.route = route
        self.send = send
        self.receive = receive
        self.started = False  # response headers sent to the client
        self.done = False  # no more interruptions wanted
        self.interrupted: str | None = None  # "disconnect" | "timeout"
        self.watcher: asyncio.Future[None] | None = None
        self.seen = False  # a sweep has found it running (the next one starts a watcher)

    async def run(
        self,
        method: str,
        url: str,
        headers: Headers,
        body: bytes,
        total_timeout: float,
        sweeper: _Sweeper,
    ) -> None:
        """Forward and relay; no total timeout for a long-lived stream."""
        exchange = self.exchange
        long_lived = exchange.long_lived
        loop = asyncio.get_running_loop()
        self.task = asyncio.current_task(loop)
        sweeper.add(self, loop)
        self.deadline = None if long_lived else loop.time() + total_timeout
        response: UpstreamResponse | None = None
        send = self.send
        try:
            exchange.mark_sent()
            response = await self.upstream.open(method, url, headers, body, long_lived=long_lived)
            status = response.status
            start = exchange.response_start(status, response.raw_headers, relayed=True)
            await send({"type": "http.response.start", "status": status, "headers": start})
            self.started = True
            read = response.content.readany
            while chunk := await read():
                if exchange.done:
                    continue  # past a declared length: nothing more goes to the client
                out = await exchange.response_chunk(chunk)
                if exchange.done:
                    # The exchange finished (the step recorded) before these bytes
                    # complete the body: the agent's next call always sees this one.
                    self.done = True
                    await send({"type": "http.response.body", "body": out, "more_body": False})
                elif out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
            if not exchange.done:
                # No declared length: the upstream's end is the body's end.
                self.done = True
                await exchange.finish()
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if self.interrupted is None:
                raise
            assert self.task is not None
            self.task.uncancel()
            if self.interrupted == "disconnect":
                self.done = True
                if exchange.settled:
                    # The client had every answer and hung up on the rest: not a failure.
                    await exchange.finish()
                else:
                    await exchange.finish(FailureStage.STREAM, "client_disconnected")
            else:
                await self._failed(TimeoutError())
        except Exception as exc:
            await self._failed(exc)
        finally:
            self.done = True
            sweeper.discard(self)
            if self.watcher is not None:
                self.watcher.cancel()
            if response is not None:
                # Closes the upstream connection unless the body was read to the end.
                # (try, not contextlib.suppress: three Python calls fewer per request.)
                try:  # noqa: SIM105
                    response.release()
                except Exception:
                    pass

    def tick(self, now: float) -> bool:
        """A sweep: start the disconnect watcher on the second sweep that finds the call
        running (so it is at least ``WATCH_AFTER_S`` old); fire the total timeout.
        False when no later sweep has anything to do (done, or watched with no deadline:
        a long-lived stream then costs no wake-ups for as long as it stays open)."""
        if self.done:
            return False
        if self.watcher is None:
            if self.seen:
                self.watcher = asyncio.ensure_future(self._watch_disconnect())
            self.seen = True
        if self.deadline is None:
            return self.watcher is None
        if now >= self.deadline:
            self._interrupt("timeout")
            return False
        return True

    def _interrupt(self, why: str) -> None:
        # An exchange that is finishing records its steps and sends its last bytes
        # uninterrupted: the client has (or is about to have) its whole answer.
        if self.done or self.interrupted is not None or self.exchange.done:
            return
        self.interrupted = why
        assert self.task is not None
        self.task.cancel()

    async def _watch_disconnect(self) -> None:
        receive = self.receive
        while (await receive())["type"] != "http.disconnect":
            pass
        self._interrupt("disconnect")

    async def _failed(self, exc: Exception) -> None:
        self.done = True  # a late disconnect must not cancel the answer below
        exchange = self.exchange
        stage, error_type = classify(exc, response_started=self.started)
        if not isinstance(exc, (aiohttp.ClientError, OSError, TimeoutError)):
            log.error("proxy_error", route=self.route.prefix, **exception_fields(exc))
        else:
            log.warning(
                "upstream_failed", route=self.route.prefix, stage=stage.value, error=error_type
            )
        if self.started:
            # Mid-stream: end the exchange and return without completing the response;
            # the server then closes the connection, so the client sees a cut body.
            await exchange.finish(stage, error_type)
            return
        if stage is FailureStage.UPSTREAM_TIMEOUT:
            answer = problem(
                504,
                "upstream-timeout",
                "Upstream timed out",
                f"The upstream of route {self.route.prefix} did not answer in time ({error_type}).",
            )
        else:
            answer = problem(
                502,
                "upstream-unavailable",
                "Upstream unavailable",
                f"The upstream of route {self.route.prefix} could not be reached ({error_type}).",
            )
        exchange.record.status_code = answer.status
        await exchange.finish(stage, error_type)
        await send_answer(self.send, answer, exchange.record.route)


class _Sweeper:
    """One timer for every relay in flight, ticking every ``WATCH_AFTER_S`` while any is.

    A timer per request (``call_later`` then ``cancel``) was a measurable share of the
    proxy's CPU per call; a set add and discard is not. The timer belongs to the loop it
    was armed on, and is armed again on another loop (tests run several loops in turn).
    """

    __slots__ = ("handle", "loop", "relays")

    def __init__(self) -> None:
        self.relays: set[_Relay] = set()
        self.handle: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def add(self, relay: _Relay, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Track a relay (``loop``: the running loop, when the caller has it)."""
        if loop is None:
            loop = asyncio.get_running_loop()
        self.relays.add(relay)
        if self.handle is None or self.loop is not loop:
            self.loop = loop
            self.handle = loop.call_later(WATCH_AFTER_S, self._sweep)

    def discard(self, relay: _Relay) -> None:
        self.relays.discard(relay)

    def _sweep(self) -> None:
        loop = self.loop
        assert loop is not None
        now = loop.time()
        for relay in list(self.relays):
            if not relay.tick(now):
                self.relays.discard(relay)
        # Disarmed when idle: an idle proxy wakes for nothing.
        self.handle = loop.call_later(WATCH_AFTER_S, self._sweep) if self.relays else None


# -- helpers -------------------------------------------------------------------------


# A header name as received -> what the proxy does with it, learnt once per name (the
# same few names come on every call; ``remember`` bounds it).
_PASS, _DROP, _CONNECTION = 0, 1, 2
_request_names: dict[bytes, tuple[str, int]] = {}


def _request_name(name_b: bytes) -> tuple[str, int]:
    """A request header name (lower-cased by the server), decoded, and its fate."""
    if name_b in _REQUEST_DROP or name_b.startswith(b"proxy-"):
        fate = _CONNECTION if name_b == b"connection" else _DROP
    else:
        fate = _PASS
    return remember(_request_names, name_b, (name_b.decode("latin-1"), fate))


def _split_headers(raw: list[tuple[bytes, bytes]]) -> tuple[dict[str, str], Headers]:
    """Request headers as a lower-cased dict for the guard, and the list to forward.

    uvicorn hands header names over lower-cased; both come out decoded once, as str
    (what the upstream client takes).
    """
    view: dict[str, str] = {}
    forward: Headers = []
    named: set[bytes] | None = None
    names = _request_names
    for name_b, value_b in raw:
        known = names.get(name_b)
        name, fate = known if known is not None else _request_name(name_b)
        value = value_b.decode("latin-1")
        previous = view.get(name)
        view[name] = value if previous is None else f"{previous}, {value}"
        if fate:
            if fate == _CONNECTION:
                named = connection_tokens(value_b, named)
            continue
        forward.append((name, value))
    if named:
        forward = [h for h in forward if h[0].encode("latin-1") not in named]
    return view, forward


def _has_dot_segment(path: str) -> bool:
    """A "." or ".." segment in the (once decoded) path, counting a backslash as a
    separator and decoding once more (``%252e`` is ``%2e`` here): servers behind the
    proxy that do either must not be walked out of the route's path."""
    if "." not in path and "%" not in path and "\\" not in path:
        return False
    candidate = _unquote(path).replace("\\", "/")
    return any(seg in (".", "..") for seg in candidate.split("/"))


def _unquote(path: str) -> str:
    if "%" not in path:
        return path
    from urllib.parse import unquote

    return unquote(path)


async def _send_simple(send: Any, status: int, content_type: bytes, body: bytes) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (_ROUTE_HEADER_B, _SERVE_B),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _problem_not_found(path: str) -> Answer:
    return problem(
        404,
        "no-route",
        "No route",
        f"No loopguard route matches {path[:200]!r}; configured routes are [[routes]] prefixes.",
    )


def _problem_bad_target() -> Answer:
    return problem(
        400,
        "absolute-form-target",
        "Absolute-form request target refused",
        "loopguard is a reverse proxy for its configured routes, not a forward proxy: "
        "send origin-form requests (a path starting with '/').",
    )


def _problem_dot_segments() -> Answer:
    return problem(
        400,
        "dot-segments",
        "Path with dot segments refused",
        "Paths with '.' or '..' segments could leave the route's upstream path; send a "
        "normalized path.",
    )


def _without_userinfo(url: str) -> str:
    """A URL fit for a log line: credentials in it (user:password@) are dropped."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))
