"""Runs the scenarios: starts the server process (and nginx), drives the load, stops both.

Topology (all on loopback, see benchmarks.servers):

    harness process (grpc.aio load) ──► server process: gateway, gateway (auth off),
                                          cognitive, taskproc, dataplatform ──► PostgreSQL
                               └──► nginx (grpc_pass) ──► cognitive        [when installed]
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import select
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as trace_pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as trace_grpc

from aiwfe.auth.v1 import auth_service_pb2 as auth_pb
from aiwfe.auth.v1 import auth_service_pb2_grpc as auth_grpc
from aiwfe.runtime.identity import IDENTITY_METADATA_KEY, InternalIdentity
from benchmarks import load, nginx, procstat, servers

REPO_ROOT = Path(__file__).resolve().parents[1]
RPC_SCENARIOS = (
    "direct", "gateway", "gateway-cached", "gateway-noauth", "gateway-asyncio", "gateway-grpc",
    "python-proxy", "nginx", "before",
)  # fmt: skip
OTHER_SCENARIOS = ("memory", "telemetry", "overload", "embedder", "vector-search")
ALL_SCENARIOS = RPC_SCENARIOS + OTHER_SCENARIOS


@dataclass(frozen=True)
class Options:
    """What to run and for how long."""

    scenarios: tuple[str, ...]
    seconds: float = 3.0
    warmup_seconds: float = 0.5
    concurrency: int = 32
    latency_concurrency: int = 1
    latency_slice_seconds: float = 0.25  # latency slices alternate between the targets
    max_requests: int = 1_000_000
    vector_n: int = 20_000
    embedder_seconds: float = 3.0
    admin_dsn: str = servers.DEFAULT_ADMIN_DSN


class ServerProcess:
    """`python -m benchmarks.servers` in its own process group, with its own database."""

    def __init__(self, admin_dsn: str, extra_env: dict[str, str] | None = None) -> None:
        self.admin_dsn = admin_dsn
        self.extra_env = extra_env or {}
        self.database = f"aiwfe_bench_{secrets.token_hex(6)}"
        self.jwt_secret = secrets.token_urlsafe(32)
        self.internal_secret = secrets.token_urlsafe(32)
        self.admin_password = secrets.token_urlsafe(18)
        self.process: subprocess.Popen[str] | None = None
        self.info: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def address(self, name: str) -> str:
        return self.info["addresses"][name]

    def start(self, timeout: float = 90.0) -> dict[str, Any]:
        """Starts the process and returns its announcement (addresses, pid, database)."""
        env = {
            **os.environ,
            servers.JWT_SECRET_ENV: self.jwt_secret,
            servers.INTERNAL_SECRET_ENV: self.internal_secret,
            servers.ADMIN_PASSWORD_ENV: self.admin_password,
            **self.extra_env,
        }
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.servers",
                "--database",
                self.database,
                "--admin-dsn",
                self.admin_dsn,
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
            # Own group: on failure the whole group is killed, whatever it spawned.
            start_new_session=True,
        )
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"server process did not announce itself within {timeout} s")
            ready, _, _ = select.select([self.process.stdout], [], [], remaining)
            if not ready:
                continue
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"server process exited with {self.process.wait()}")
            try:
                info = json.loads(line)
            except json.JSONDecodeError:
                print(f"[server] {line.rstrip()}", file=sys.stderr)
                continue
            if isinstance(info, dict) and "addresses" in info:
                self.info = info
                return info

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (the server drops its database), SIGKILL to the group if it hangs, and
        drop the database here too in case the server could not."""
        try:
            if self.process is not None:
                if self.process.poll() is None:
                    self.process.send_signal(signal.SIGTERM)
                    try:
                        self.process.wait(timeout=timeout)
                    except subprocess.TimeoutExpired:
                        print("server process did not stop; killing it", file=sys.stderr)
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait()
                if self.process.stdout:
                    self.process.stdout.close()
        finally:
            servers.drop_database(self.admin_dsn, self.database)


async def _login(address: str, password: str) -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await auth_grpc.AuthServiceStub(channel).Login(
            auth_pb.LoginRequest(username=servers.ADMIN_USERNAME, password=password), timeout=30
        )
    return reply.access_token


Metadata = tuple[tuple[str, str], ...]


@dataclass
class _Target:
    """One RPC scenario's address, with what each call carries there."""

    name: str
    address: str
    metadata: Callable[[], Metadata]
    proxy_pids: list[int] | None = None  # the hop's own processes: CPU counted apart
    extra: dict[str, Any] = field(default_factory=dict)  # added to its result


def _failed(name: str, exc: BaseException) -> dict[str, Any]:
    detail = (
        f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
    )
    return {"name": name, "failed": detail, "requests": 0, "errors": 1}


_SCENARIO_ERRORS = (load.PreflightError, grpc.aio.AioRpcError, RuntimeError)


async def _measure(
    targets: list[_Target], opts: Options, server_pids: list[int], results: dict[str, Any]
) -> None:
    """Every target's phases. Latency at `latency_concurrency` comes first, in short slices
    that alternate between the targets (all up at once, idle while another is measured), so
    the machine's drift during the run hits every scenario alike: the hop overheads are
    differences of a tenth of a millisecond. Throughput and the open loop follow, one target
    after the other."""
    async with contextlib.AsyncExitStack() as stack:
        live: list[tuple[_Target, grpc.aio.Channel, Any]] = []
        for target in targets:
            channel = grpc.aio.insecure_channel(target.address)
            stack.push_async_callback(channel.close)
            try:
                first = await load.preflight(channel, target.metadata())
                await load.warm_up(
                    channel,
                    target.metadata(),
                    opts.latency_concurrency,
                    opts.warmup_seconds,
                    opts.max_requests,
                )
            except _SCENARIO_ERRORS as exc:
                results[target.name] = _failed(target.name, exc)
                continue
            live.append((target, channel, first))
        if not live:
            return
        latency = {target.name: load.Samples() for target, _, _ in live}
        # Each target's own processes are counted apart from the suite's ("proxy CPU").
        suite = {
            target.name: [p for p in server_pids if p not in (target.proxy_pids or ())]
            for target, _, _ in live
        }
        rounds = max(1, round(opts.seconds / opts.latency_slice_seconds))
        print(f"latency: {rounds} alternating rounds ...", file=sys.stderr, flush=True)
        for r in range(rounds):
            turn = r % len(live)  # who goes first rotates
            for target, channel, _ in live[turn:] + live[:turn]:
                # A fresh assertion per slice: internal assertions live 60 s.
                await load.measure(
                    channel, target.metadata(), opts.latency_concurrency,
                    opts.seconds / rounds, opts.max_requests, suite[target.name],
                    target.proxy_pids, latency[target.name],
                )  # fmt: skip
        for target, channel, first in live:
            print(f"running {target.name} ...", file=sys.stderr, flush=True)
            try:
                thr = await load.run_phase(
                    channel, target.metadata(), opts.concurrency, opts.seconds,
                    opts.warmup_seconds, opts.max_requests, suite[target.name], target.proxy_pids,
                )  # fmt: skip
                phases = {"latency": latency[target.name].result(opts.latency_concurrency)}
                phases["throughput"] = thr
                if thr.rps:
                    # Latency at half of the maximum throughput just measured (open loop).
                    phases["half_load"] = await load.run_rate(
                        channel, target.metadata(), thr.rps / 2, opts.seconds
                    )
                check = await load.preflight(channel, target.metadata())
            except _SCENARIO_ERRORS as exc:
                results[target.name] = _failed(target.name, exc)
                continue
            lat = phases["latency"]
            results[target.name] = {
                "name": target.name,
                "address": target.address,
                # Headline figures: latency at 1 in flight, throughput and CPU at full load.
                "requests": lat.requests + thr.requests,
                "errors": lat.errors + thr.errors,
                "p50_ms": lat.p50_ms,
                "p95_ms": lat.p95_ms,
                "p99_ms": lat.p99_ms,
                "latency_slice_p50_ms": [round(v, 4) for v in latency[target.name].slice_p50_ms],
                "rps": thr.rps,
                "server_cpu_us_per_request": thr.server_cpu_us_per_request,
                "proxy_cpu_us_per_request": thr.proxy_cpu_us_per_request,
                "client_cpu_us_per_request": thr.client_cpu_us_per_request,
                "first_reply_cached": first.cached_count == 1,
                "measured_reply_cached": check.cached_count == 1,
                "phases": {k: v.as_dict() for k, v in phases.items()},
                **target.extra,
            }


async def _rpc_scenarios(
    server: ServerProcess, opts: Options, results: dict[str, Any], notes: list[str]
) -> None:
    identity = InternalIdentity(server.internal_secret)

    def internal() -> Metadata:
        return ((IDENTITY_METADATA_KEY, identity.assertion(None, "bench")),)

    # The back ends' process plus each gateway process (idle ones add nothing).
    pids = [server.pid, *server.info.get("service_pids", {}).values()]
    targets: list[_Target] = []
    async with contextlib.AsyncExitStack() as stack:
        for name in RPC_SCENARIOS:
            if name not in opts.scenarios:
                continue
            print(f"starting {name} ...", file=sys.stderr, flush=True)
            try:
                if name == "direct":
                    targets.append(_Target(name, server.address("cognitive"), internal))
                elif name in ("gateway", "gateway-cached", "gateway-asyncio", "gateway-grpc"):
                    token = await _login(server.address("gateway"), server.admin_password)
                    bearer: Metadata = (("authorization", f"Bearer {token}"),)
                    if name != "gateway-cached":
                        # The hop itself: proxied to cognitive, not answered by the gateway's
                        # response cache (Embed declares a cache TTL in its contract).
                        bearer += (("cache-control", "no-store"),)
                    process = {
                        "gateway-asyncio": "gateway_asyncio",
                        "gateway-grpc": "gateway_grpc",
                    }.get(name, "gateway")
                    targets.append(
                        _Target(
                            name,
                            server.address(process),
                            lambda b=bearer: b,  # type: ignore[misc]
                            [server.info["service_pids"][process]],
                        )
                    )
                elif name == "gateway-noauth":
                    targets.append(
                        _Target(
                            name,
                            server.address("gateway_noauth"),
                            lambda: (),
                            [server.info["service_pids"]["gateway_noauth"]],
                        )
                    )
                elif name == "nginx":
                    target = await _nginx_target(server, internal, stack, notes)
                    if target is None:
                        results[name] = {"name": name, "skipped": "nginx not installed"}
                    else:
                        targets.append(target)
                elif name in ("before", "python-proxy"):
                    targets.append(await _legacy_target(name, server, internal, stack))
            except _SCENARIO_ERRORS as exc:
                results[name] = _failed(name, exc)
        await _measure(targets, opts, pids, results)


async def _nginx_target(
    server: ServerProcess,
    internal: Callable[[], Metadata],
    stack: contextlib.AsyncExitStack,
    notes: list[str],
) -> _Target | None:
    """nginx in front of cognitive, stopped when `stack` closes; None if not installed."""
    binary = nginx.available()
    if binary is None:
        return None
    proxy = nginx.Nginx(binary, server.address("cognitive"))

    def stop() -> None:
        log = proxy.error_log().strip()
        if log:  # empty unless something went wrong (nginx logs warnings and errors)
            notes.append(f"nginx error log:\n{log}")
        proxy.stop()

    stack.callback(stop)
    await asyncio.to_thread(proxy.start)  # polls the port with blocking sleeps
    version = await asyncio.to_thread(nginx.version, binary)
    return _Target("nginx", proxy.address, internal, proxy.pids(), extra={"nginx_version": version})


async def _legacy_target(
    name: str,
    server: ServerProcess,
    internal: Callable[[], Metadata],
    stack: contextlib.AsyncExitStack,
) -> _Target:
    """benchmarks.legacy in its own process, stopped when `stack` closes: the seed's
    before-topology (`before`, with a Bearer token) or a bare Python byte proxy
    (`python-proxy`, with an internal identity)."""
    env = {
        **os.environ,
        servers.JWT_SECRET_ENV: server.jwt_secret,
        servers.INTERNAL_SECRET_ENV: server.internal_secret,
    }
    dsn = servers.database_dsn(server.admin_dsn, server.database)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.legacy", "--cognitive", server.address("cognitive"),
        "--dsn", dsn, cwd=REPO_ROOT, env=env, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip

    async def stop() -> None:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()

    stack.push_async_callback(stop)
    assert proc.stdout is not None
    info = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
    if name == "before":
        token = await _login(server.address("gateway"), server.admin_password)
        bearer = (("authorization", f"Bearer {token}"),)
        return _Target(name, info["edge"], lambda: bearer, [proc.pid])
    return _Target(name, info["naive"], internal, [proc.pid])


class _Collector(trace_grpc.TraceServiceServicer):
    """A stand-in OpenTelemetry Collector: accepts OTLP/gRPC span exports, counts spans."""

    def __init__(self) -> None:
        self.spans = 0

    async def Export(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        return trace_pb.ExportTraceServiceResponse()


async def _telemetry_scenario(opts: Options) -> dict[str, Any]:
    """Gateway Embed (proxied) with telemetry on — server spans in every service exported
    over OTLP to a local collector, RPC metrics — vs the telemetry interceptor off."""
    collector = _Collector()
    server = grpc.aio.server()
    trace_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    variants = {
        "on": {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            servers.TELEMETRY_ENV: "1",
        },
        "off": {"OTEL_TRACES_EXPORTER": "none", servers.TELEMETRY_ENV: "0"},
    }
    # The same, sampling 10% of traces (standard OTEL_TRACES_SAMPLER variables).
    variants["on_sampled"] = {
        **variants["on"],
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.1",
    }
    out: dict[str, Any] = {}
    procs: dict[str, ServerProcess] = {}
    rounds = 5
    try:
        # All variants run side by side (idle while another is measured), and short latency
        # rounds alternate between them: slow drift of the machine hits every variant alike,
        # unlike measuring one server set after the other.
        for name, env in variants.items():
            procs[name] = ServerProcess(opts.admin_dsn, env)
            await asyncio.to_thread(procs[name].start)
        metadata = {}
        for name, proc in procs.items():
            token = await _login(proc.address("gateway"), proc.admin_password)
            metadata[name] = (("authorization", f"Bearer {token}"), ("cache-control", "no-store"))
        p50s: dict[str, list[float]] = {name: [] for name in procs}
        cpu: dict[str, list[float]] = {name: [] for name in procs}
        channels = {n: grpc.aio.insecure_channel(p.address("gateway")) for n, p in procs.items()}
        try:
            for name, channel in channels.items():
                await load.preflight(channel, metadata[name])
            for _ in range(rounds):
                for name, channel in channels.items():
                    proc = procs[name]
                    phase = await load.run_phase(
                        channel, metadata[name], opts.latency_concurrency,
                        max(0.5, opts.seconds / 2), opts.warmup_seconds, opts.max_requests,
                        [proc.pid, *proc.info.get("service_pids", {}).values()],
                    )  # fmt: skip
                    if phase.p50_ms:
                        p50s[name].append(phase.p50_ms)
                    if phase.server_cpu_us_per_request:
                        cpu[name].append(phase.server_cpu_us_per_request)
        finally:
            for channel in channels.values():
                await channel.close()
        for name in procs:
            out[name] = {
                "p50_ms": statistics.median(p50s[name]),
                "p50_ms_rounds": [round(v, 4) for v in p50s[name]],
                "server_cpu_us_per_request": statistics.median(cpu[name]) if cpu[name] else None,
            }
        out["rounds"] = rounds
        out["spans_exported"] = collector.spans
        out["p50_ratio_on_off"] = round(out["on"]["p50_ms"] / out["off"]["p50_ms"], 3)
        out["p50_ratio_sampled_off"] = round(out["on_sampled"]["p50_ms"] / out["off"]["p50_ms"], 3)
        if out["on"]["server_cpu_us_per_request"] and out["off"]["server_cpu_us_per_request"]:
            out["cpu_ratio_on_off"] = round(
                out["on"]["server_cpu_us_per_request"] / out["off"]["server_cpu_us_per_request"],
                3,
            )
    finally:
        for proc in procs.values():
            await asyncio.to_thread(proc.stop)
        await server.stop(0)
    return out


def run(opts: Options) -> dict[str, Any]:
    """Runs the selected scenarios; returns the raw results (see benchmarks.report)."""
    results: dict[str, Any] = {}
    notes: list[str] = []
    server_info: dict[str, Any] = {}
    if any(name in RPC_SCENARIOS for name in opts.scenarios):
        server = ServerProcess(opts.admin_dsn)
        try:
            print("starting the server process ...", file=sys.stderr, flush=True)
            info = server.start()
            time.sleep(0.5)  # let start-up garbage settle before reading the idle RSS
            server_info = {
                "pid": info["pid"],
                "idle_rss_mb": {
                    name: round(procstat.rss_mb(pid), 1)
                    for name, pid in info["service_pids"].items()
                },
                "event_loop": info["event_loop"],
                "database": info["database"],
            }
            _run_loop(_rpc_scenarios(server, opts, results, notes))
        finally:
            server.stop()
    if "memory" in opts.scenarios:
        print("running memory (aiwfe up, idle RSS per service) ...", file=sys.stderr, flush=True)
        from benchmarks import memory

        results["memory"] = memory.run(opts.admin_dsn)
    if "telemetry" in opts.scenarios:
        print("running telemetry (on vs off) ...", file=sys.stderr, flush=True)
        results["telemetry"] = _run_loop(_telemetry_scenario(opts))
    if "overload" in opts.scenarios:
        from benchmarks import overload

        def start(env: dict[str, str]) -> ServerProcess:
            server = ServerProcess(opts.admin_dsn, env)
            try:
                server.start()
            except BaseException:
                server.stop()
                raise
            return server

        results["overload"] = _run_loop(
            overload.run(start, _login, opts.concurrency, opts.seconds, opts.warmup_seconds)
        )
    if "embedder" in opts.scenarios:
        print("running embedder ...", file=sys.stderr, flush=True)
        from benchmarks import embedder

        results["embedder"] = embedder.run(opts.embedder_seconds)
    if "vector-search" in opts.scenarios:
        print(f"running vector-search (n={opts.vector_n}) ...", file=sys.stderr, flush=True)
        from benchmarks import vector_search

        results["vector-search"] = vector_search.run(n=opts.vector_n)
    return {"server": server_info, "scenarios": results, "notes": notes}


def _run_loop(coro: Any) -> Any:
    """uvloop when installed, like the server process, so both sides use the same loop."""
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
