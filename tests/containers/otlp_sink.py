"""Stand-in for the OpenTelemetry Collector in the compose test (no collector image or
Debian package exists offline): a real OTLP/gRPC trace receiver on :4317 that counts the
spans per service.name and exposes the counts on :8888/metrics, where the collector's own
telemetry is, so Prometheus scrapes it like the real one. Runs in the aiwfe image."""

from __future__ import annotations

from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as trace_pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as trace_grpc
from prometheus_client import Counter, start_http_server

SPANS = Counter("otlp_sink_spans", "Spans received over OTLP/gRPC", ["service_name"])


class TraceSink(trace_grpc.TraceServiceServicer):
    def Export(self, request, context):  # the OTLP method name
        for resource_spans in request.resource_spans:
            name = next(
                (
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ),
                "unknown",
            )
            count = sum(len(scope.spans) for scope in resource_spans.scope_spans)
            SPANS.labels(service_name=name).inc(count)
        return trace_pb.ExportTraceServiceResponse()


def main() -> None:
    start_http_server(8888)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_grpc.add_TraceServiceServicer_to_server(TraceSink(), server)
    server.add_insecure_port("0.0.0.0:4317")
    server.start()
    print("otlp sink: OTLP/gRPC on :4317, metrics on :8888", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
