"""The span exporter's HTTP transport: one persistent ``http.client`` connection.

The SDK's OTLP/HTTP client (``_OTLPHTTPClient``: headers, compression, timeout,
retries with backoff on retryable statuses, one immediate retry on a connection
error) posts through a transport, by default ``requests`` over ``urllib3``. Per post
those two cost about four times the Python work of ``http.client`` on one kept-open
connection, all of it under the GIL the event loop needs. This transport keeps one
connection per endpoint, reopened on the next post after an error (the client's
immediate retry makes a collector restart cost nothing).

Used only where it sends what ``requests`` would: a plain ``http`` endpoint (a local
collector or agent; ``https`` keeps the SDK's transport and its certificate handling),
no proxy for it in the environment (``requests`` honours ``HTTP_PROXY``), no netrc
file (``requests`` would add its credentials), no credential provider session.
"""

from __future__ import annotations

import http.client
import os
import socket
import threading
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

from opentelemetry.exporter.http.transport._base import BaseHTTPResult, BaseHTTPTransport
from opentelemetry.sdk.environment_variables import (
    _OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER,
)

# What ends a connection rather than answering on it (the client retries those once).
_CONNECTION_ERRORS = (ConnectionError, http.client.HTTPException, socket.gaierror)


@dataclass(frozen=True, slots=True)
class _Result(BaseHTTPResult):
    body: bytes = b""
    response_headers: http.client.HTTPMessage | None = None

    def content(self) -> bytes:
        return self.body

    def headers(self) -> Mapping[str, str]:
        if self.response_headers is None:
            return {}
        # An HTTPMessage: looked up case-insensitively, as the client needs.
        return cast(Mapping[str, str], self.response_headers)


class PersistentTransport(BaseHTTPTransport):
    """One kept-open connection per endpoint, reopened after an error."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # one post at a time on a connection
        self._connections: dict[tuple[str, int | None], http.client.HTTPConnection] = {}

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
        data: bytes | None = None,
    ) -> BaseHTTPResult:
        parts = urlsplit(url)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        key = (parts.hostname or "", parts.port)
        with self._lock:
            conn = self._connections.get(key)
            if conn is None:
                conn = self._connections[key] = http.client.HTTPConnection(*key)
            try:
                conn.timeout = timeout
                if conn.sock is not None:
                    conn.sock.settimeout(timeout)
                conn.request(method, target, body=data, headers=headers or {})
                response = conn.getresponse()
                body = response.read()
            except Exception as error:
                conn.close()  # the next request opens a new one
                return _Result(error=error)
            if response.will_close:
                conn.close()
        return _Result(
            status_code=response.status,
            reason=response.reason,
            body=body,
            response_headers=response.msg,
        )

    def is_connection_error(self, exception: Exception | None) -> bool:
        return isinstance(exception, _CONNECTION_ERRORS)

    def close(self) -> None:
        with self._lock:
            for conn in self._connections.values():
                conn.close()
            self._connections.clear()


def persistent_transport(endpoint: str) -> PersistentTransport | None:
    """The transport for ``endpoint`` (the exporter's resolved traces endpoint), None
    where ``requests`` might not send the same."""
    parts = urlsplit(endpoint)
    if parts.scheme != "http" or not parts.hostname:
        return None
    if os.environ.get(_OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER):
        return None
    if os.environ.get("NETRC") or os.path.exists(os.path.expanduser("~/.netrc")):
        return None
    proxies = urllib.request.getproxies()
    if ("http" in proxies or "all" in proxies) and not urllib.request.proxy_bypass(parts.hostname):
        return None
    return PersistentTransport()
