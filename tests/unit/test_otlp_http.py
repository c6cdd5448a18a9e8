"""The span exporter's kept-open connection (``otlp_http``): where it is used, that it
reconnects after the collector restarts, and that the SDK's client retries a
retryable status over it, sending its headers and gzip body each time."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from guard.telemetry.otlp_http import PersistentTransport, persistent_transport
from guard.telemetry.otlp_wire import WireSpanExporter

try:
    from tests.otlp_receiver import OtlpReceiver
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from otlp_receiver import OtlpReceiver

SCOPE = InstrumentationScope("loopguard", "1", "")
URL = "http://127.0.0.1:4318/v1/traces"


@pytest.fixture()
def plain_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc


def test_used_for_plain_http_only_where_requests_would_send_the_same(
    plain_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    assert isinstance(persistent_transport(URL), PersistentTransport)
    assert persistent_transport("https://collector.example/v1/traces") is None
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    assert persistent_transport("http://collector.example/v1/traces") is None
    monkeypatch.setenv("NO_PROXY", "collector.example")
    assert persistent_transport("http://collector.example/v1/traces") is not None
    monkeypatch.delenv("HTTP_PROXY")
    (tmp_path / ".netrc").write_text("machine collector.example login a password b\n")
    assert persistent_transport(URL) is None


def test_reconnects_after_the_collector_restarts(plain_env: None) -> None:
    with OtlpReceiver() as first:
        port = first.port
        exporter = WireSpanExporter(Resource.create({}), SCOPE, endpoint=first.traces_url)
        transport = exporter._client._transport
        assert isinstance(transport, PersistentTransport)
        assert exporter.export([b""]) is SpanExportResult.SUCCESS
        assert len(first.trace_requests) == 1
    # The collector is gone: a connection error (the client's kind to retry at once).
    result = transport.request("POST", first.traces_url, data=b"", timeout=2)
    assert result.status_code is None and transport.is_connection_error(result.error)
    with OtlpReceiver(port) as second:
        assert exporter.export([b""]) is SpanExportResult.SUCCESS
        assert len(second.trace_requests) == 1
    # Restarted between two posts: the kept connection is stale, the post goes through.
    with OtlpReceiver(port) as third:
        assert exporter.export([b""]) is SpanExportResult.SUCCESS
        assert len(third.trace_requests) == 1
    exporter.shutdown()


class Flaky(BaseHTTPRequestHandler):
    """503 with Retry-After 0 on the first post, then 200; keeps what it was sent."""

    protocol_version = "HTTP/1.1"  # keep-alive, as a collector

    def do_POST(self) -> None:
        server = self.server
        body = self.rfile.read(int(self.headers["content-length"]))
        server.posts.append((dict(self.headers), body))  # type: ignore[attr-defined]
        first = len(server.posts) == 1  # type: ignore[attr-defined]
        self.send_response(503 if first else 200)
        if first:
            self.send_header("Retry-After", "0")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def flaky() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    server.posts = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_retryable_status_is_retried_with_the_same_headers_and_body(
    plain_env: None, monkeypatch: pytest.MonkeyPatch, flaky: ThreadingHTTPServer
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-team=guards")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip")
    url = f"http://127.0.0.1:{flaky.server_address[1]}/v1/traces"
    exporter = WireSpanExporter(Resource.create({}), SCOPE, endpoint=url, timeout=5)
    assert isinstance(exporter._client._transport, PersistentTransport)
    assert exporter.export([b"\x12\x00"]) is SpanExportResult.SUCCESS
    posts = flaky.posts  # type: ignore[attr-defined]
    assert len(posts) == 2  # the 503, then the retry
    for headers, body in posts:
        lowered = {k.lower(): v for k, v in headers.items()}
        assert lowered["x-team"] == "guards"
        assert lowered["content-type"] == "application/x-protobuf"
        assert lowered["content-encoding"] == "gzip"
        assert gzip.decompress(body) == exporter.encode([b"\x12\x00"])
    exporter.shutdown()
