"""``loopguard serve``: the reverse proxy on uvicorn (uvloop + httptools, one process).

Shutdown is graceful: on SIGINT/SIGTERM uvicorn stops accepting, lets open exchanges
finish (up to ``GRACEFUL_SHUTDOWN_S``), then the ASGI lifespan shutdown closes the
upstream client and the engine (session store, telemetry exporters, records file).
"""

from __future__ import annotations

import contextlib
import gc

import uvicorn

from guard.config import Config
from guard.proxy import ProxyApp

GRACEFUL_SHUTDOWN_S = 30


def uvicorn_config(app: ProxyApp, config: Config, **overrides: object) -> uvicorn.Config:
    options: dict[str, object] = {
        "host": config.server.host,
        "port": config.server.port,
        "loop": "uvloop",
        "http": "httptools",
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
    return uvicorn.Config(app, **options)  # type: ignore[arg-type]


def freeze_startup_objects() -> None:
    """Move everything built at start-up out of the collector's way.

    The config, engine, compiled patterns and imported modules live as long as the
    process; frozen, they are no longer rescanned by every full collection, which
    the per-request garbage of a busy proxy triggers often.
    """
    gc.collect()
    gc.freeze()


def serve(config: Config, **overrides: object) -> int:
    """Run the proxy until interrupted; the exit code for the CLI."""
    app = ProxyApp(config)
    server = uvicorn.Server(uvicorn_config(app, config, **overrides))
    freeze_startup_objects()
    # Ctrl-C: uvicorn re-raises the signal after its graceful shutdown; exit cleanly.
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return 0 if server.started else 1
