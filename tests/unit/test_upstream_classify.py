"""How an upstream failure is named in the record: its stage and ``error.type``.

The names are part of the records' contract (dashboards and alerts count them), so
they stay the same whatever client raises them.
"""

from __future__ import annotations

import types

import aiohttp
import pytest

from guard.doors.upstream import classify
from guard.engine.calls import FailureStage

_KEY = types.SimpleNamespace(host="tools.internal", port=8080, ssl=None)


@pytest.mark.parametrize(
    ("exc", "started", "stage", "name"),
    [
        (aiohttp.ConnectionTimeoutError(), False, FailureStage.UPSTREAM_TIMEOUT, "ConnectTimeout"),
        (aiohttp.SocketTimeoutError(), False, FailureStage.UPSTREAM_TIMEOUT, "ReadTimeout"),
        (aiohttp.SocketTimeoutError(), True, FailureStage.UPSTREAM_TIMEOUT, "ReadTimeout"),
        # The proxy's own total timeout (its sweeper cancels the relay).
        (TimeoutError(), True, FailureStage.UPSTREAM_TIMEOUT, "TotalTimeout"),
        (
            aiohttp.ClientConnectorError(_KEY, ConnectionRefusedError(111, "refused")),  # type: ignore[arg-type]
            False,
            FailureStage.UPSTREAM_CONNECT,
            "ConnectError",
        ),
        (
            aiohttp.ServerDisconnectedError(),
            False,
            FailureStage.UPSTREAM_CONNECT,
            "ServerDisconnected",
        ),
        (aiohttp.ServerDisconnectedError(), True, FailureStage.STREAM, "ServerDisconnected"),
        (aiohttp.ClientPayloadError("cut"), True, FailureStage.STREAM, "IncompleteBody"),
        (aiohttp.ClientOSError(104, "reset"), True, FailureStage.STREAM, "ClientOSError"),
    ],
)
def test_an_upstream_failure_keeps_its_stage_and_name(
    exc: BaseException, started: bool, stage: FailureStage, name: str
) -> None:
    assert classify(exc, response_started=started) == (stage, name)
