"""A tiny OTLP/HTTP receiver for tests: what a collector would have received.

A Starlette app served by uvicorn on a thread, on 127.0.0.1 and a free port.
``POST /v1/traces`` and ``POST /v1/metrics`` decode the protobuf export
requests (gzip or deflate bodies too) and keep them.

    with OtlpReceiver() as receiver:
        Telemetry(TelemetryConfig(exporter="otlp", otlp_endpoint=receiver.traces_url), ...)
        ...
        receiver.spans()            # [ReceivedSpan(name, kind, attributes, ...)]
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import threading
import zlib
from dataclasses import dataclass
from typing import Any

import uvicorn
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

PROTOBUF = "application/x-protobuf"


def any_value(value: AnyValue) -> Any:
    """An OTLP AnyValue as a Python value (arrays as tuples)."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return tuple(any_value(v) for v in value.array_value.values)
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind)


@dataclass
class ReceivedSpan:
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    scope_name: str
    schema_url: str
    status_code: int


class OtlpReceiver:
    """``port``: 0 for a free one; a stopped receiver's port for "the collector came
    back"."""

    def __init__(self, port: int = 0) -> None:
        self.trace_requests: list[ExportTraceServiceRequest] = []
        self.metric_requests: list[ExportMetricsServiceRequest] = []
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self.port: int = self._sock.getsockname()[1]
        app = Starlette(
            routes=[
                Route("/v1/traces", self._traces, methods=["POST"]),
                Route("/v1/metrics", self._metrics, methods=["POST"]),
            ]
        )
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="otlp-receiver", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def traces_url(self) -> str:
        return f"{self.base_url}/v1/traces"

    def _run(self) -> None:
        asyncio.run(self._server.serve(sockets=[self._sock]))

    @staticmethod
    async def _body(request: Request) -> bytes:
        body = await request.body()
        encoding = request.headers.get("content-encoding", "")
        if encoding == "gzip":
            return gzip.decompress(body)
        if encoding == "deflate":
            return zlib.decompress(body)
        return body

    async def _traces(self, request: Request) -> Response:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await self._body(request))
        with self._lock:
            self.trace_requests.append(message)
        return Response(ExportTraceServiceResponse().SerializeToString(), media_type=PROTOBUF)

    async def _metrics(self, request: Request) -> Response:
        message = ExportMetricsServiceRequest()
        message.ParseFromString(await self._body(request))
        with self._lock:
            self.metric_requests.append(message)
        return Response(ExportMetricsServiceResponse().SerializeToString(), media_type=PROTOBUF)

    def spans(self) -> list[ReceivedSpan]:
        out: list[ReceivedSpan] = []
        with self._lock:
            requests = list(self.trace_requests)
        for req in requests:
            for rs in req.resource_spans:
                resource = {kv.key: any_value(kv.value) for kv in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        out.append(
                            ReceivedSpan(
                                name=span.name,
                                kind=span.kind,
                                trace_id=span.trace_id.hex(),
                                span_id=span.span_id.hex(),
                                parent_span_id=span.parent_span_id.hex(),
                                attributes={kv.key: any_value(kv.value) for kv in span.attributes},
                                resource=resource,
                                scope_name=ss.scope.name,
                                schema_url=ss.schema_url,
                                status_code=span.status.code,
                            )
                        )
        return out

    def metric_names(self) -> set[str]:
        with self._lock:
            requests = list(self.metric_requests)
        return {
            metric.name
            for req in requests
            for rm in req.resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
        }

    def start(self) -> OtlpReceiver:
        self._thread.start()
        for _ in range(500):
            if self._server.started:
                return self
            threading.Event().wait(0.01)
        raise RuntimeError("OTLP receiver did not start")

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)
        self._sock.close()

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
