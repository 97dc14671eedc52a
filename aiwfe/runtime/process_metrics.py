"""One scrape endpoint for a service run as several processes (`services.<name>.processes`).

Why one port rather than one per process: the services' metrics ports are consecutive by
default (9464-9467), so a port per process would collide with the next service's, and
Prometheus would need every process as a target of its own. Process 0 serves
`metrics_port`; every other process answers its exposition on an abstract Unix socket
named after the service's address and its index (same user only), which process 0 reads
at each scrape and merges, each sample labelled `process="<index>"` (sum them away in
queries). A process that is down, restarting, is missing from that scrape alone.
"""

from __future__ import annotations

import os
import socket
import socketserver
import struct
import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from aiwfe.runtime.config import ServiceEndpoint
from aiwfe.runtime.metrics import REGISTRY, serve_metrics

_READ_TIMEOUT = 2.0


def socket_name(endpoint: ServiceEndpoint, index: int) -> str:
    """Process `index`'s exposition socket (Linux abstract namespace: no file to clean up)."""
    return f"\0aiwfe-metrics-{endpoint.host}:{endpoint.port}-{index}"


def _same_user(conn: socket.socket) -> bool:
    """Abstract sockets have no file permissions: the peer's uid is checked instead."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1] == os.getuid()


class _Exposition(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        if _same_user(self.request):
            self.request.sendall(generate_latest(REGISTRY))


def _read(name: str) -> str | None:
    """Another process's exposition, or None while it is not answering."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(_READ_TIMEOUT)
            conn.connect(name)
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
    except OSError:
        return None
    return b"".join(chunks).decode()


class ProcessesCollector(Collector):
    """Every process's metrics, merged per family, each sample labelled with its process."""

    def __init__(self, endpoint: ServiceEndpoint) -> None:
        self._names = [socket_name(endpoint, i) for i in range(1, endpoint.processes)]

    def collect(self) -> Iterator[Metric]:
        texts = [("0", generate_latest(REGISTRY).decode())]
        texts += [(str(i), t) for i, n in enumerate(self._names, 1) if (t := _read(n))]
        families: dict[str, Metric] = {}
        for index, text in texts:
            for family in text_string_to_metric_families(text):
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                merged.samples.extend(
                    s._replace(labels={**s.labels, "process": index}) for s in family.samples
                )
        yield from families.values()


def serve(endpoint: ServiceEndpoint, index: int) -> str | None:
    """Starts this process's part of the service's metrics; returns where they are served
    (None: metrics are off)."""
    if endpoint.metrics_port is None:
        return None
    if endpoint.processes == 1:
        return f"{endpoint.host}:{serve_metrics(endpoint.metrics_port, endpoint.host)}"
    if index == 0:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ProcessesCollector(endpoint))
        port = serve_metrics(endpoint.metrics_port, endpoint.host, registry)
        return f"{endpoint.host}:{port} (all {endpoint.processes} processes)"
    server = socketserver.ThreadingUnixStreamServer(socket_name(endpoint, index), _Exposition)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return f"process 0's port {endpoint.metrics_port}"
