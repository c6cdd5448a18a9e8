"""Shared fixtures. Server helpers live in ``tests/servers.py`` (importable as ``servers``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from servers import redis_server, run_server


@pytest.fixture
def serve_app() -> Iterator[Callable[..., str]]:
    """``base_url = serve_app(app, **uvicorn_options)``: a real server, stopped at teardown."""
    with contextlib.ExitStack() as stack:

        def start(app: Any, **options: Any) -> str:
            return stack.enter_context(run_server(app, **options))

        yield start


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server for the whole run (``servers.redis_server``: skipped where
    missing, a failure under CI)."""
    with redis_server() as (_proc, url):
        yield url
