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
import os
import shutil
import socket
import subprocess
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


# Sockets behind ``dead_port``: held open (never listening) until the process ends.
_DEAD: list[socket.socket] = []


def dead_port(host: str = "127.0.0.1") -> int:
    """A port where nothing listens, for as long as the test process runs.

    Bound without SO_REUSEADDR and never listening: a connection is refused, and no
    server a test starts later can be given the same port (a port that was merely free
    a moment ago can be, and then the "dead" upstream answers).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    _DEAD.append(sock)
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


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A real redis-server on a free loopback port (no persistence): the process and its URL.

    Skipped when the binary is missing on a developer's machine; under CI (``CI`` set)
    a missing binary fails instead, so a green CI always means Redis was tested.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        import pytest

        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed: .ci/run must install it")
        pytest.skip("redis-server binary not installed (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not _answers_ping(port):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield proc, f"redis://127.0.0.1:{port}/0"
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False
