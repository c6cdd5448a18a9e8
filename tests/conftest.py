"""Shared fixtures. Server helpers live in ``tests/servers.py`` (importable as ``servers``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from servers import free_port, run_server


@pytest.fixture
def serve_app() -> Iterator[Callable[..., str]]:
    """``base_url = serve_app(app, **uvicorn_options)``: a real server, stopped at teardown."""
    with contextlib.ExitStack() as stack:

        def start(app: Any, **options: Any) -> str:
            return stack.enter_context(run_server(app, **options))

        yield start


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server on a free loopback port for the whole run.

    Skipped when the binary is missing on a developer's machine; under CI (``CI`` set)
    a missing binary fails instead, so a green CI always means Redis was tested.
    """
    binary = shutil.which("redis-server")
    if binary is None:
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
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
