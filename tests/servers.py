"""Real servers for the tests: any ASGI app on uvicorn, on a free loopback port.

    with run_server(app) as base_url:        # "http://127.0.0.1:PORT"
        ...

Each server runs in its own thread with its own event loop, so it works from sync
tests, async tests and sync SDK clients alike (a sync client in an async test would
deadlock a server sharing the test's loop). The socket is bound before the thread
starts, so the URL is known at once and nothing races for the port.

Defaults are the production ones (uvloop + httptools); pass ``http="h11"`` or any
other ``uvicorn.Config`` keyword to change them. The ``serve_app`` fixture in
``conftest.py`` wraps this for tests that want teardown handled for them.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

STARTUP_TIMEOUT_S = 10.0


def free_socket(host: str = "127.0.0.1") -> socket.socket:
    """A bound (not yet listening) TCP socket on a free port, ready for uvicorn."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    return sock


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for code that must bind it itself)."""
    with contextlib.closing(free_socket(host)) as sock:
        return sock.getsockname()[1]


class _ThreadServer(uvicorn.Server):
    # Signals belong to the test runner's main thread, not to an in-test server.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.contextmanager
def run_server(app: Any, *, host: str = "127.0.0.1", **config: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread; yield its base URL."""
    options: dict[str, Any] = {
        "loop": "uvloop",
        "http": "httptools",
        "lifespan": "auto",
        "log_level": "warning",
        "access_log": False,
        # Open streams must not hold the test's teardown for long.
        "timeout_graceful_shutdown": 2,
    }
    options.update(config)
    sock = free_socket(host)
    port = sock.getsockname()[1]
    server = _ThreadServer(uvicorn.Config(app, **options))
    errors: list[BaseException] = []

    def target() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # surfaced to the test below
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"uvicorn:{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not server.started:
        if errors or not thread.is_alive():
            sock.close()
            raise RuntimeError(f"server on port {port} failed to start") from (
                errors[0] if errors else None
            )
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError(f"server on port {port} did not start in {STARTUP_TIMEOUT_S}s")
        time.sleep(0.005)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=STARTUP_TIMEOUT_S)
        if thread.is_alive():  # a connection that will not close: stop waiting for it
            server.force_exit = True
            thread.join(timeout=STARTUP_TIMEOUT_S)
        sock.close()
