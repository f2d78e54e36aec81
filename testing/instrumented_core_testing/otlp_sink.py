"""A minimal OTLP/HTTP trace receiver on loopback, for tests, benchmarks and local debugging.

It decodes real ``ExportTraceServiceRequest`` protobufs, exactly what a Collector receives, and
keeps the spans in memory. ``BlackholeServer`` accepts connections and never answers: the worst
collector there is, for proving that an unresponsive exporter never slows a rank.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict
    events: tuple[str, ...]
    resource: dict


def _value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class _SpanStore:
    """Keeps the spans of every export request received."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self._lock = threading.Lock()

    def _store(self, request: ExportTraceServiceRequest) -> None:
        spans = []
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(ReceivedSpan(
                        s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                        {a.key: _value(a.value) for a in s.attributes},
                        tuple(e.name for e in s.events), resource))
        with self._lock:
            self.requests += 1
            self.spans.extend(spans)


class OtlpSink(_SpanStore):
    """OTLP/HTTP (protobuf) receiver."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                sink._store(request)
                payload = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class OtlpGrpcSink(_SpanStore):
    """The same receiver over OTLP/gRPC (``OTEL_EXPORTER_OTLP_PROTOCOL=grpc``), on loopback."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        from concurrent import futures

        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

        super().__init__()
        sink = self

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802 - gRPC method name
                sink._store(request)
                return ExportTraceServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self._server)
        port = self._server.add_insecure_port(f"{host}:0")
        self._server.start()
        self.endpoint = f"http://{host}:{port}"

    def close(self) -> None:
        self._server.stop(grace=None)


class BlackholeServer:
    """Listens on loopback and never reads or replies."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._sock = socket.socket()
        self._sock.bind((host, 0))
        self._sock.listen(128)
        self.endpoint = f"http://{host}:{self._sock.getsockname()[1]}"

    def close(self) -> None:
        self._sock.close()
