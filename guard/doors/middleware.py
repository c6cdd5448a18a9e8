"""GuardMiddleware: the guard embedded in the ASGI app it protects.

    app = GuardMiddleware(app, "loopguard.toml")          # or Config(...) / Config.from_mapping

A tool server (Starlette, FastAPI, the ``mcp`` SDK's ``streamable_http_app()``) guards
itself: an HTTP request whose path matches a configured route goes through the same
admission (``guard.doors.admission``) and ``Exchange`` as in the reverse proxy (same
adapters, detector, spans and records), with the wrapped app in the place of the
upstream. A stopped call is answered
here and never reaches the app. Everything else (paths with no route, lifespan,
websockets) passes straight through.

Pure ASGI, modelled on ``starlette.middleware.gzip``: ``send`` is wrapped, nothing that
need not be is buffered (only the request body, which the adapter must parse), and the
response streams through chunk by chunk.

Notes:

* A route's ``upstream`` is ignored here (the app is the upstream); ``RouteConfig``
  requires one, so any placeholder such as ``"http://app"`` does. Spans name the
  server the request actually reached (``scope["server"]``).
* Routes match the path the app sees, i.e. without ``root_path``.
* The step is recorded before the body's last bytes go out (the last message, or the
  one that completes a declared content-length: the Exchange's rule, as in the proxy),
  so an agent that has the whole answer never races its own next call past the record.
* A request the guard fails on (a bug) is served unguarded, as in the proxy.
* The engine is created once per middleware; it is closed at lifespan shutdown when the
  middleware created it, else by ``aclose()`` (an engine passed in belongs to its owner).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog

from guard.doors.admission import admit
from guard.doors.asgi import byte_pairs, send_answer, str_headers
from guard.doors.engines import door_engine
from guard.doors.exchange import Exchange
from guard.doors.routing import Router
from guard.engine.calls import FailureStage
from guard.engine.config import Config, RouteConfig
from guard.engine.contract import Answer
from guard.engine.core import Engine

log = structlog.get_logger("loopguard")

Scope = dict[str, Any]
Message = dict[str, Any]
# Server push of files bypasses http.response.body, which the adapter must see.
_BYPASS_EXTENSIONS = ("http.response.pathsend", "http.response.zerocopysend")


class GuardMiddleware:
    def __init__(
        self,
        app: Any,
        config: Config | str | Path | None = None,
        *,
        engine: Engine | None = None,
    ) -> None:
        if engine is not None and config is not None:
            raise TypeError("pass either config or engine, not both")
        self.app = app
        self._owns_engine = engine is None
        if engine is None:
            engine = door_engine(config)
        self.engine = engine
        if not engine.config.routes:
            log.warning(
                "guard_middleware_without_routes", hint="add [[routes]]: nothing is guarded"
            )
        self.router = Router(engine.config)
        # One adapter per configured route, as in the proxy.
        self.adapters = self.router.adapters
        self._routes: dict[tuple[str, str, int], RouteConfig] = {}
        self._closed = False

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if kind != "http":
            await self.app(scope, receive, send)
            return
        found = self.router.route_for(_app_path(scope))
        if found is None:
            await self.app(scope, receive, send)
            return
        route, rest = found
        await self._guard(scope, receive, send, route, rest)

    async def aclose(self) -> None:
        """Close the engine (store connections, exporters, record file). Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self.engine.aclose()

    # -- lifespan --------------------------------------------------------------------

    async def _lifespan(self, scope: Scope, receive: Any, send: Any) -> None:
        async def send_and_close(message: Message) -> None:
            # Close before the server hears "complete": it may exit right after.
            if message["type"].startswith("lifespan.shutdown") and self._owns_engine:
                await self.aclose()
            await send(message)

        await self.app(scope, receive, send_and_close)

    # -- a guarded request -----------------------------------------------------------

    async def _guard(
        self, scope: Scope, receive: Any, send: Any, route: RouteConfig, rest: str
    ) -> None:
        headers = str_headers(scope["headers"])
        query = scope.get("query_string", b"").decode("latin-1")
        route = self._served_route(route, scope)
        admitted = await admit(
            self.engine, self.router, route, receive, scope["method"], rest, query, headers
        )
        if admitted is None:
            return
        if isinstance(admitted, Answer):
            await send_answer(send, admitted)
            return
        ex, body = admitted.exchange, admitted.body
        try:
            forward = _forward_scope(
                scope,
                changed=body is not ex.request.body and body != ex.request.body,
                length=len(body),
                trace=ex.upstream_headers(),
            )
            await _Responder(self.app, ex)(forward, _Replay(body, receive), send)
        finally:
            admitted.release()  # the body the app had leaves the in-flight budget

    def _served_route(self, route: RouteConfig, scope: Scope) -> RouteConfig:
        """The route with the address this request reached, for server.address/port."""
        server = scope.get("server")
        if not server or server[1] is None:
            return route
        key = (route.prefix, str(server[0]), int(server[1]))
        served = self._routes.get(key)
        if served is None:
            host = f"[{server[0]}]" if ":" in str(server[0]) else server[0]
            served = route.model_copy(
                update={"upstream": f"{scope.get('scheme', 'http')}://{host}:{server[1]}"}
            )
            if len(self._routes) < 1024:  # one per (route, listening address): bounded
                self._routes[key] = served
        return served


class _Responder:
    """Calls the app once, teeing its response through the exchange."""

    def __init__(self, app: Any, ex: Exchange) -> None:
        self.app = app
        self.ex = ex
        self.send: Any = None
        self.started = False

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        self.send = send
        ex = self.ex
        ex.mark_sent()
        try:
            await self.app(scope, receive, self.send_through)
        except BaseException as exc:
            # Recorded, then re-raised: before a response, the server's own 500 applies.
            stage = FailureStage.STREAM if self.started else FailureStage.UPSTREAM_STATUS
            await ex.finish(stage, type(exc).__name__)
            raise
        if not ex.done:
            # The app returned without (finishing) a response.
            stage = FailureStage.STREAM if self.started else FailureStage.UPSTREAM_STATUS
            await ex.finish(stage, "incomplete_response" if self.started else "no_response")

    async def send_through(self, message: Message) -> None:
        kind = message["type"]
        ex = self.ex
        if kind == "http.response.start":
            self.started = True
            headers = ex.response_start(message["status"], list(message.get("headers", ())))
            message = {**message, "headers": headers}
        elif kind == "http.response.body" and not ex.done:
            # The message that completes the body (the last one, or the one that reaches a
            # declared content-length) goes out only once the exchange has recorded it.
            body = bytes(message.get("body", b""))
            last = not message.get("more_body", False)
            message = {**message, "body": await ex.response_chunk(body, last)}
        await self.send(message)


class _Replay:
    """``receive`` for the app: the body already read, then the client's own messages
    (``http.disconnect`` and whatever else the server sends later)."""

    __slots__ = ("body", "receive")

    def __init__(self, body: bytes, receive: Any) -> None:
        self.body: bytes | None = body
        self.receive = receive

    async def __call__(self) -> Message:
        if self.body is None:
            return await self.receive()
        body, self.body = self.body, None
        return {"type": "http.request", "body": body, "more_body": False}


def _app_path(scope: Scope) -> str:
    """The path as the app sees it: ``root_path`` (a mount point, --root-path) removed."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


def _forward_scope(scope: Scope, *, changed: bool, length: int, trace: dict[str, str]) -> Scope:
    """The scope the app gets: loopguard's span as the trace parent, the body's length
    if the adapter changed the body, and no file-push extensions."""
    drop = {name.lower().encode("latin-1") for name in trace}
    if changed:
        drop |= {b"content-length", b"transfer-encoding"}
    headers = [(k, v) for k, v in scope["headers"] if k.lower() not in drop]
    headers.extend(byte_pairs(trace.items()))
    if changed:
        headers.append((b"content-length", str(length).encode()))
    forward = {**scope, "headers": headers}
    extensions = scope.get("extensions")
    if extensions and any(name in extensions for name in _BYPASS_EXTENSIONS):
        forward["extensions"] = {k: v for k, v in extensions.items() if k not in _BYPASS_EXTENSIONS}
    return forward
