"""``loopguard serve``: the reverse proxy on uvicorn (uvloop + httptools).

Client limits (``client_limits``): a deadline and a size bound on each request head
and a problem+json answer past the concurrency cap (``guard.doors.client_limits``),
uvicorn's keep-alive timeout, no WebSocket handling, no access log (it would write
every path and query); the body's read timeout is the body reader's (408).

One process by default. ``[server] workers = N`` (or ``--workers N``) runs N worker
processes on one listening socket under uvicorn's supervisor, which restarts a worker
that dies; the workers share sessions through the Redis store (the config refuses
workers > 1 with the memory store). Each worker builds its app from the configuration
the supervisor hands down in ``WORKER_CONFIG_ENV``.

Shutdown is graceful: on SIGINT/SIGTERM uvicorn stops accepting, lets open exchanges
finish (up to ``GRACEFUL_SHUTDOWN_S``), then the ASGI lifespan shutdown closes the
upstream client and the engine (session store, telemetry exporters, records file).

``[admin] listen`` adds the admin listener (``guard.doors.admin``): a second uvicorn
server on the same event loop, bound before the proxy starts (a taken port fails the
start). The proxy's server owns the signals; the admin server keeps answering while the
proxy drains and stops once it has, so the last scrape sees the last calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import uvicorn

from guard.doors.client_limits import HeadTimeoutProtocol
from guard.doors.proxy import ProxyApp
from guard.engine.config import Config, ConfigError

GRACEFUL_SHUTDOWN_S = 30
# The validated configuration as JSON, from the supervisor to its worker processes.
WORKER_CONFIG_ENV = "LOOPGUARD_WORKER_CONFIG"


def client_limits(config: Config) -> dict[str, Any]:
    """The uvicorn options that bound what clients may hold open ([server] keys)."""
    server = config.server
    HeadTimeoutProtocol.configure(server.head_timeout, server.max_header_bytes)
    return {
        "http": HeadTimeoutProtocol,
        "timeout_keep_alive": server.keep_alive_timeout,
        "limit_concurrency": server.limit_concurrency,
        # No WebSocket handling: an upgrade request is an ordinary HTTP request (and
        # never logged with its path and query by a WebSocket handshake).
        "ws": "none",
    }


def _options(config: Config, **overrides: object) -> dict[str, Any]:
    options: dict[str, Any] = {
        "host": config.server.host,
        "port": config.server.port,
        "loop": "uvloop",
        **client_limits(config),
        "lifespan": "on",
        # The upstream's own Server and Date headers pass through; no second pair.
        "server_header": False,
        "date_header": False,
        "access_log": False,
        "log_level": "info",
        "proxy_headers": False,
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
    }
    options.update(overrides)
    return options


def uvicorn_config(app: ProxyApp, config: Config, **overrides: object) -> uvicorn.Config:
    return uvicorn.Config(app, **_options(config, **overrides))


def freeze_startup_objects() -> None:
    """Move everything built at start-up out of the collector's way.

    The config, engine, compiled patterns and imported modules live as long as the
    process; frozen, they are no longer rescanned by every full collection, which
    the per-request garbage of a busy proxy triggers often.
    """
    gc.collect()
    gc.freeze()


def worker_app() -> ProxyApp:
    """The app factory each worker process runs (``workers`` > 1)."""
    raw = os.environ[WORKER_CONFIG_ENV]
    config = Config.from_mapping(json.loads(raw), source="loopguard serve (worker)")
    client_limits(config)  # this process's protocol class gets the head timeout too
    app = ProxyApp(config)
    freeze_startup_objects()
    return app


def serve(config: Config, **overrides: object) -> int:
    """Run the proxy until interrupted; the exit code for the CLI."""
    if config.server.workers > 1:
        return _serve_workers(config, **overrides)
    if config.admin.listen is not None:
        return _serve_with_admin(config, **overrides)
    app = ProxyApp(config)
    server = uvicorn.Server(uvicorn_config(app, config, **overrides))
    freeze_startup_objects()
    # Ctrl-C: uvicorn re-raises the signal after its graceful shutdown; exit cleanly.
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return 0 if server.started else 1


def _serve_workers(config: Config, **overrides: object) -> int:
    # Workers are spawned processes: they get the configuration, not this process's app.
    os.environ[WORKER_CONFIG_ENV] = json.dumps(config.model_dump(mode="json"))
    options = _options(config, **overrides)
    options.update(factory=True, workers=config.server.workers)
    # The supervisor exits the process itself when the socket cannot be bound.
    uvicorn.run("guard.doors.serve:worker_app", **options)
    return 0


class _AdminServer(uvicorn.Server):
    """The admin listener's server: the proxy's server owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _ProxyServer(uvicorn.Server):
    """The proxy's server, running the admin server beside it until it has stopped."""

    def __init__(self, config: uvicorn.Config, admin: _AdminServer, admin_socket: Any) -> None:
        super().__init__(config)
        self.admin = admin
        self.admin_socket = admin_socket

    async def serve(self, sockets: Any = None) -> None:
        admin = asyncio.create_task(self.admin.serve(sockets=[self.admin_socket]))
        try:
            await super().serve(sockets)
        finally:
            self.admin.should_exit = True
            await admin


def _serve_with_admin(config: Config, **overrides: object) -> int:
    from guard.doors.admin import Admin

    try:
        admin = Admin(config)
    except ConfigError as exc:
        print(f"loopguard: {exc}", file=sys.stderr)
        return 2
    admin_config = uvicorn.Config(
        admin.app,
        host=config.admin.host,
        port=config.admin.port,
        lifespan="off",
        access_log=False,
        log_level="info",
        timeout_graceful_shutdown=2,
    )
    try:
        admin_socket = admin_config.bind_socket()
    except SystemExit:  # uvicorn logged why (address in use, permission)
        print(f"loopguard: admin.listen: cannot listen on {config.admin.listen}", file=sys.stderr)
        return 1
    app = ProxyApp(config, engine=admin.engine)
    server = _ProxyServer(
        uvicorn_config(app, config, **overrides), _AdminServer(admin_config), admin_socket
    )
    freeze_startup_objects()
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return 0 if server.started else 1
