"""The one bootstrap shared by all four services.

settings → logging → `grpc.aio.server` with the interceptor chain → servicers → health
(grpc.health.v1, per full service name) → reflection → start. On SIGTERM/SIGINT: health
NOT_SERVING first, drain in-flight calls for the configured grace, then release resources.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aiwfe.runtime import process_metrics
from aiwfe.runtime.channels import server_credentials, server_options
from aiwfe.runtime.config import PROCESS_INDEX_ENV, ConfigError, Settings, load_settings
from aiwfe.runtime.health import NOT_SERVING, SERVING, HealthServicer
from aiwfe.runtime.interceptors import ErrorMappingInterceptor, LoadSheddingInterceptor
from aiwfe.runtime.logs import configure_logging
from aiwfe.runtime.reflection import enable_reflection
from aiwfe.runtime.resilience.limiter import ConcurrencyLimiter
from aiwfe.runtime.system_service import LocalSystemServicer
from aiwfe.runtime.telemetry import (
    TelemetryInterceptor,
    configure_tracing,
    flush_telemetry,
    quiet,
)
from aiwfe.system.v1 import system_service_pb2
from aiwfe.system.v1 import system_service_pb2_grpc as system_grpc

log = logging.getLogger("aiwfe.server")


class Front(Protocol):
    """A listener that owns the service's port and passes calls on to its gRPC server,
    which then listens on a private Unix socket only (the gateway's relay)."""

    async def start(self, host: str, port: int, server_socket: str, reuse_port: bool) -> int:
        """Listens on host:port (0: a free port; with `reuse_port`, shared with the
        service's other processes), passing calls on to the gRPC server at
        `server_socket`; returns the port."""
        ...

    async def stop(self, grace: float) -> None:
        """Stops taking calls; those in flight get `grace` seconds to finish."""
        ...


class Service:
    """What a service plugs into the bootstrap. Subclasses override what they need."""

    name = "service"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def start(self) -> None:
        """Opens pools and clients before the port accepts calls."""

    def register(self, server: grpc.aio.Server) -> list[str]:
        """Adds servicers; returns their full service names (from descriptors)."""
        return []

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """Service-specific interceptors, run inside error mapping."""
        return []

    def front(self) -> Front | None:
        """A Front that takes the port from the gRPC server (None: no front)."""
        return None

    def system_servicer(self) -> system_grpc.SystemServiceServicer:
        """Reports this service's circuit breakers (the gateway aggregates every service's)."""
        return LocalSystemServicer(self.name)

    def reflection_names(self, registered: list[str]) -> list[str]:
        """Services listed over reflection; the gateway adds the ones it proxies."""
        return registered

    async def healthy(self) -> bool:
        """Periodic readiness probe (e.g. the database answers)."""
        return True

    async def routed_health(self) -> dict[str, bool]:
        """Health of the services this one answers for besides its own, per full service
        name, probed with `healthy` (the gateway: each back end it routes to)."""
        return {}

    async def stop(self) -> None:
        """Releases pools and clients after the server has drained."""


class RunningService:
    """A started server: its bound port, health servicer and the service behind it."""

    def __init__(
        self,
        service: Service,
        server: grpc.aio.Server,
        port: int,
        health_servicer: HealthServicer,
        names: Sequence[str],
        host: str,
        front: Front | None = None,
        socket_dir: str | None = None,
    ) -> None:
        self.service = service
        self.server = server
        self.front = front
        self._socket_dir = socket_dir
        self.port = port
        self.host = host
        self.health = health_servicer
        self.names = list(names)
        self._probe_task: asyncio.Task[None] | None = None
        self._serving: bool | None = None
        self._routed: dict[str, bool] = {}
        self._routed_status: dict[str, int] = {}
        self.limiter: ConcurrencyLimiter | None = None  # load shedding (None: off)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def set_serving(self, serving: bool) -> None:
        if serving == self._serving:
            return
        self._serving = serving
        status = SERVING if serving else NOT_SERVING
        for name in ("", *self.names):
            await self.health.set(name, status)
        log.info("health %s", "SERVING" if serving else "NOT_SERVING")
        await self.set_routed(self._routed)

    async def set_routed(self, routed: dict[str, bool]) -> None:
        """Health of the services answered for elsewhere: SERVING while both this process
        and the service are (watchers hear each change)."""
        self._routed = dict(routed)
        for name, up in routed.items():
            status = SERVING if up and self._serving else NOT_SERVING
            if self._routed_status.get(name) != status:
                self._routed_status[name] = status
                await self.health.set(name, status)
                log.info("health %s %s", name, "SERVING" if status == SERVING else "NOT_SERVING")

    async def _probe_loop(self, interval: float) -> None:
        while True:
            try:
                ok = await self.service.healthy()
            except Exception:
                ok = False
            await self.set_serving(ok)
            try:
                routed = await self.service.routed_health()
            except Exception:
                routed = dict.fromkeys(self._routed, False)
            await self.set_routed(routed)
            await asyncio.sleep(interval if ok else min(interval, 1.0))

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: NOT_SERVING first, drain with grace, then release resources."""
        if self._probe_task:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe_task
        await self.health.enter_graceful_shutdown()
        grace = self.service.settings.grpc.shutdown_grace_seconds if grace is None else grace
        if self.front is not None:
            await self.front.stop(grace)
        await self.server.stop(grace)
        await self.service.stop()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
        flush_telemetry()


async def start_service(
    service: Service, host: str | None = None, port: int | None = None, probe_interval: float = 2.0
) -> RunningService:
    """Starts `service` on host:port (port 0 picks a free one) and returns once it serves."""
    settings = service.settings
    endpoint = getattr(settings.services, service.name)
    host = host or endpoint.host
    port = endpoint.port if port is None else port
    # N processes of one service listen on one port; the kernel spreads connections. Off
    # with one process, so a second copy started by mistake fails to bind.
    shared = endpoint.processes > 1
    # Read before start(): an unreadable certificate is a config error, not a leaked pool.
    credentials = server_credentials(settings.tls) if settings.tls.server_enabled else None
    try:
        await service.start()
    except BaseException:
        # Half-started resources (a pool reconnecting in the background) would otherwise
        # keep the process alive after the failure is reported.
        with contextlib.suppress(Exception):
            await service.stop()
        raise
    shedding = settings.load_shedding
    # Refusing over the limit here, with RetryInfo, rather than grpc's own
    # maximum_concurrent_rpcs: that one answers RESOURCE_EXHAUSTED without any detail and
    # counts streams, which live for minutes.
    limiter = ConcurrencyLimiter(shedding) if shedding.enabled else None
    server = grpc.aio.server(
        interceptors=[
            *([TelemetryInterceptor(service.name)] if settings.telemetry.enabled else []),
            ErrorMappingInterceptor(),
            *([LoadSheddingInterceptor(limiter, service.name)] if limiter is not None else []),
            *service.interceptors(),
        ],
        options=[
            *server_options(settings),
            ("grpc.max_concurrent_streams", settings.grpc.max_concurrent_streams),
            ("grpc.so_reuseport", int(shared)),
        ],
        maximum_concurrent_rpcs=None,
    )
    names = service.register(server)
    system_grpc.add_SystemServiceServicer_to_server(service.system_servicer(), server)
    names.append(system_service_pb2.DESCRIPTOR.services_by_name["SystemService"].full_name)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(
        [
            *service.reflection_names(names),
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        ],
        server,
    )
    # With a front, the gRPC server listens on a Unix socket in a directory only this
    # user can enter, and the front takes the port.
    front = service.front()
    socket_dir = tempfile.mkdtemp(prefix=f"aiwfe-{service.name}-") if front else None
    socket = os.path.join(socket_dir, "grpc.sock") if socket_dir else ""
    try:
        if front is not None:
            server.add_insecure_port(f"unix:{socket}")
        elif credentials is not None:
            bound = server.add_secure_port(f"{host}:{port}", credentials)
        else:
            bound = server.add_insecure_port(f"{host}:{port}")
        await server.start()
        if front is not None:
            bound = await front.start(host, port, socket, shared)
    except (RuntimeError, OSError) as exc:
        await server.stop(0)
        await service.stop()
        if socket_dir is not None:
            shutil.rmtree(socket_dir, ignore_errors=True)
        raise ConfigError(
            f"configuration key 'services.{service.name}.port': cannot bind {host}:{port}"
        ) from exc
    running = RunningService(
        service, server, bound, health_servicer, names, host, front, socket_dir
    )
    running.limiter = limiter
    await running.set_serving(await service.healthy())
    await running.set_routed(await service.routed_health())
    with quiet(not settings.telemetry.trace_polling):  # health probes: untraced
        running._probe_task = asyncio.create_task(running._probe_loop(probe_interval))
    log.info("%s listening on %s", service.name, running.address)
    return running


def process_index(processes: int) -> int:
    """Which of the service's `processes` this one is (`aiwfe up` sets it; 0 alone)."""
    raw = os.environ.get(PROCESS_INDEX_ENV, "0")
    if not raw.isdigit() or int(raw) >= processes:
        raise ConfigError(f"{PROCESS_INDEX_ENV}={raw!r}: not an index below processes={processes}")
    return int(raw)


async def serve(service_cls: type[Service], settings: Settings) -> None:
    """Runs the service until SIGTERM/SIGINT, then shuts down gracefully.

    The service is built inside the running loop: gRPC aio channels bind to the loop
    that exists when they are created.
    """
    endpoint = getattr(settings.services, service_cls.name)
    index = process_index(endpoint.processes)
    service = service_cls(settings)
    running = await start_service(service)
    if (metrics_at := process_metrics.serve(endpoint, index)) is not None:
        log.info("%s metrics on %s/metrics", service.name, metrics_at)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # What start-up built (modules, settings, models, pools) lives as long as the process:
    # moved out of the collector's sight, so a full collection walks only what serving
    # allocated. Measured under the benchmark's load: each service ran one or two full
    # collections of 34-47 ms (a pause every call in flight waited out); frozen, 0.1-0.7 ms.
    gc.collect()
    gc.freeze()
    # A readiness line on stdout lets launchers (aiwfe up) wait without polling the port.
    print(f"{service.name}: {running.address}", flush=True)
    await stop.wait()
    log.info("%s shutting down", service.name)
    await running.stop()


def main(service_cls: type[Service]) -> None:
    """Console entry for `python -m <service>`: load settings, run, exit 2 on bad config."""
    try:
        settings = load_settings()
        configure_logging(service_cls.name, settings.logging)
        configure_tracing(service_cls.name)
    except ConfigError as exc:
        print(f"{service_cls.name}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    runner: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run
    if settings.grpc.event_loop == "uvloop":
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
            pass
    try:
        runner(serve(service_cls, settings))
    except ConfigError as exc:
        print(f"{service_cls.name}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
