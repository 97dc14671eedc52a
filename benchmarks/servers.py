"""The benchmark's server process: the whole suite in one process, on loopback.

    python -m benchmarks.servers --database aiwfe_bench_<random>

Creates that database on the local PostgreSQL, starts the four services in-process with
`aiwfe.app.suite.start_suite` (free ports), plus gateway variants wired to the same back ends
(auth off, asyncio loop, relay off: the "gateway-*" scenarios), prints the addresses as
one JSON line on stdout, runs until SIGTERM/SIGINT (or until its parent goes away) and then
stops the services and drops the database.

Secrets come from the environment so they never show in `ps`: AIWFE_BENCH_JWT_SECRET,
AIWFE_BENCH_INTERNAL_SECRET and AIWFE_BENCH_ADMIN_PASSWORD.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import sys
import tempfile
import uuid
from collections.abc import Awaitable
from typing import Any

import psycopg

from aiwfe.app.embedded import free_port
from aiwfe.app.suite import SERVICE_ORDER
from aiwfe.runtime.config import LoggingSettings
from aiwfe.runtime.logs import configure_logging

DEFAULT_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
ADMIN_DSN_ENV = "AIWFE_BENCH_PG_ADMIN_DSN"
JWT_SECRET_ENV = "AIWFE_BENCH_JWT_SECRET"
INTERNAL_SECRET_ENV = "AIWFE_BENCH_INTERNAL_SECRET"
ADMIN_PASSWORD_ENV = "AIWFE_BENCH_ADMIN_PASSWORD"
ADMIN_USERNAME = "admin"
GATEWAY_WRAPPER_ENV = "AIWFE_BENCH_GATEWAY_WRAPPER"
_DB_NAME = re.compile(r"aiwfe_bench_[a-z0-9_]{1,40}")


def database_dsn(admin_dsn: str, name: str) -> str:
    """The DSN of database `name` on the server `admin_dsn` points at."""
    return admin_dsn.rsplit("/", 1)[0] + f"/{name}"


def create_database(admin_dsn: str, name: str) -> None:
    if not _DB_NAME.fullmatch(name):
        raise ValueError(f"refusing database name {name!r} (must match {_DB_NAME.pattern})")
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')


def drop_database(admin_dsn: str, name: str) -> None:
    """Drops `name` if it exists; FORCE ends sessions a killed server may have left."""
    if not _DB_NAME.fullmatch(name):
        raise ValueError(f"refusing database name {name!r}")
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _overrides(home: str, dsn: str) -> dict[str, Any]:
    """Like the tests' base overrides: small pools, random secrets, quiet logs."""
    return {
        "home": home,
        "authentication": {
            "jwt": {"secret_key": os.environ[JWT_SECRET_ENV]},
            "internal": {"secret_key": os.environ[INTERNAL_SECRET_ENV]},
            "admin": {"username": ADMIN_USERNAME, "password": os.environ[ADMIN_PASSWORD_ENV]},
            # The limiter stays on (its cost is measured) with a quota the load cannot reach.
            "rate_limiting": {"api_requests": 1_000_000_000, "login_attempts": 1_000},
        },
        "database": {"postgres": {"dsn": dsn, "pool_size": 2, "max_overflow": 8}},
        "redis": {
            "url": os.environ.get("AIWFE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
            "key_prefix": f"aiwfe-bench:{uuid.uuid4().hex[:8]}:",
        },
        "grpc": {"shutdown_grace_seconds": 0.5},
        "logging": {"json_format": False, "level": "WARNING"},
    }


async def _watch_parent(stop: asyncio.Event, parent: int) -> None:
    """Stops the servers when the harness dies without stopping us (re-parented)."""
    while not stop.is_set():
        if os.getppid() != parent:
            stop.set()
            return
        await asyncio.sleep(1.0)


def _service_env(
    overrides: dict[str, Any], ports: dict[str, int], dsn: str, home: str
) -> dict[str, str]:
    """Environment shared by the four `python -m <service>` processes (as `aiwfe up`)."""
    a = overrides["authentication"]
    env = {
        **os.environ,
        "AIWFE_HOME": home,
        "JWT_SECRET_KEY": a["jwt"]["secret_key"],
        "AIWFE_INTERNAL_SECRET_KEY": a["internal"]["secret_key"],
        "AIWFE_ADMIN_PASSWORD": a["admin"]["password"],
        "AIWFE_AUTHENTICATION__RATE_LIMITING__API_REQUESTS": str(
            a["rate_limiting"]["api_requests"]
        ),
        "AIWFE_AUTHENTICATION__RATE_LIMITING__LOGIN_ATTEMPTS": str(
            a["rate_limiting"]["login_attempts"]
        ),
        "AIWFE_DATABASE__POSTGRES__DSN": dsn,
        "AIWFE_DATABASE__POSTGRES__POOL_SIZE": "4",
        "AIWFE_REDIS__URL": overrides["redis"]["url"] or "",
        "AIWFE_REDIS__KEY_PREFIX": overrides["redis"]["key_prefix"],
        "AIWFE_TELEMETRY__ENABLED": "true" if overrides["telemetry"]["enabled"] else "false",
        "AIWFE_GRPC__SHUTDOWN_GRACE_SECONDS": "0.5",
        "AIWFE_LOGGING__LEVEL": "WARNING",
    }
    for name, port in ports.items():
        env[f"AIWFE_SERVICES__{name.upper()}__PORT"] = str(port)
        env[f"AIWFE_SERVICES__{name.upper()}__METRICS_PORT"] = "null"
    return env


async def _start_service(
    name: str, env: dict[str, str], wrapper: list[str] | None = None
) -> asyncio.subprocess.Process:
    """`python -m <name>` (under `wrapper`, e.g. valgrind, if given), waiting for its
    readiness line; one retry, then its stderr."""
    last = ""
    for _ in range(2):
        proc = await asyncio.create_subprocess_exec(
            *(wrapper or ()), sys.executable, "-m", name, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None
        ready = 60 if wrapper is None else 900
        line = (await asyncio.wait_for(proc.stdout.readline(), ready)).decode().strip()
        if line.startswith(f"{name}: "):
            # Keep draining both pipes so the service never blocks on a full one; its log
            # (stderr, WARNING and up) goes to $AIWFE_BENCH_LOG_DIR/<name>.log if that is set.
            log_dir = os.environ.get(LOG_DIR_ENV)
            log = f"{log_dir}/{name}.log" if log_dir else None
            _DRAINS.update(
                asyncio.create_task(_drain(stream, to))
                for stream, to in ((proc.stdout, None), (proc.stderr, log))
            )
            return proc
        last = (await proc.stderr.read()).decode(errors="replace")[-2000:]
        await proc.wait()
    raise RuntimeError(f"{name} did not start: {last}")


LOG_DIR_ENV = "AIWFE_BENCH_LOG_DIR"
_DRAINS: set[asyncio.Task[None]] = set()  # references keep the drain tasks alive


async def _drain(stream: asyncio.StreamReader, path: str | None = None) -> None:
    # A few warning lines a run, written as they come: blocking is harmless here.
    with open(path, "ab") if path else contextlib.nullcontext() as out:  # noqa: ASYNC230
        while data := await stream.read(65536):
            if out is not None:
                out.write(data)
                out.flush()


async def serve(home: str, dsn: str, database: str) -> None:
    """Starts each service in a process of its own, as `aiwfe up` and production run them
    (so no service shares an interpreter with another), plus three more gateways — auth
    off, the asyncio event loop, and the relay off (grpc-python proxies every call) — on
    the same back ends; announces them; waits for a stop signal; stops them."""
    overrides = _overrides(home, dsn)
    # The telemetry scenario starts this process twice: tracing exported over OTLP (the
    # standard OTEL_* variables it passes) and the telemetry interceptor off.
    overrides["telemetry"] = {"enabled": os.environ.get(TELEMETRY_ENV, "1") != "0"}
    ports = {name: free_port() for name in SERVICE_ORDER}
    env = _service_env(overrides, ports, dsn, home)
    procs: dict[str, asyncio.subprocess.Process] = {}
    try:
        # benchmarks.hopcost runs the (main) gateway under callgrind this way.
        wrapper = shlex.split(os.environ.get(GATEWAY_WRAPPER_ENV, "")) or None
        for name in SERVICE_ORDER:
            procs[name] = await _start_service(name, env, wrapper if name == "gateway" else None)
        for name, extra in (
            ("gateway_noauth", {"AIWFE_AUTHENTICATION__ENABLED": "false"}),
            ("gateway_asyncio", {"AIWFE_GRPC__EVENT_LOOP": "asyncio"}),  # the uvloop lever
            ("gateway_grpc", {"AIWFE_GATEWAY__RELAY": "false"}),  # the relay lever
        ):
            port = free_port()
            procs[name] = await _start_service(
                "gateway", {**env, **extra, "AIWFE_SERVICES__GATEWAY__PORT": str(port)}
            )
            ports[name] = port

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        watcher = asyncio.create_task(_watch_parent(stop, os.getppid()))
        announcement = {
            "pid": os.getpid(),
            "service_pids": {name: proc.pid for name, proc in procs.items()},
            "database": database,
            "addresses": {name: f"127.0.0.1:{port}" for name, port in ports.items()},
            "in_process": [],
            "event_loop": type(loop).__module__.split(".")[0],
        }
        print(json.dumps(announcement), flush=True)
        await stop.wait()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    finally:
        for proc in reversed(procs.values()):
            if proc.returncode is None:
                proc.terminate()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 15)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


TELEMETRY_ENV = "AIWFE_BENCH_TELEMETRY"


def _runner() -> Any:
    """uvloop when installed, as `aiwfe` services run in production (server.main)."""
    try:
        import uvloop

        return uvloop.run
    except ImportError:  # pragma: no cover
        return asyncio.run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the aiwfe suite for the benchmarks.")
    parser.add_argument("--database", required=True, help="database to create (aiwfe_bench_*)")
    parser.add_argument(
        "--admin-dsn",
        default=os.environ.get(ADMIN_DSN_ENV, DEFAULT_ADMIN_DSN),
        help="PostgreSQL maintenance DSN used to create and drop the database",
    )
    args = parser.parse_args(argv)
    missing = [
        name
        for name in (JWT_SECRET_ENV, INTERNAL_SECRET_ENV, ADMIN_PASSWORD_ENV)
        if not os.environ.get(name)
    ]
    if missing:
        print(f"benchmarks.servers: set {', '.join(missing)}", file=sys.stderr)
        raise SystemExit(2)
    configure_logging("bench-servers", LoggingSettings(level="WARNING", json_format=False))

    create_database(args.admin_dsn, args.database)
    try:
        with tempfile.TemporaryDirectory(prefix="aiwfe-bench-home-") as home:
            coro: Awaitable[None] = serve(
                home, database_dsn(args.admin_dsn, args.database), args.database
            )
            _runner()(coro)
    finally:
        drop_database(args.admin_dsn, args.database)


if __name__ == "__main__":
    main()
