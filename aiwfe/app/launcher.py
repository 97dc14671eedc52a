"""`aiwfe up`: the whole suite on one machine, `services.<name>.processes` per service
(one by default; several share the service's port with SO_REUSEPORT).

PostgreSQL and Redis come from the configuration when given; otherwise the local servers
on their standard ports, otherwise embedded ones under the aiwfe home. Qdrant runs as its
engine in process unless `qdrant.url` is set. Secrets nobody configured are generated once
and kept (0600) in the home, so tokens survive restarts. Ctrl-C/SIGTERM stops everything.

It supervises every process alone: a child that dies is restarted with backoff while the
others keep serving (`launcher.*` settings), each restart logged; while one of a service's
processes is down the kernel gives its port's new connections to the others. A child that
crash-loops stops the suite with its last stderr lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import json
import os
import secrets
import signal
import sys
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiwfe.app.embedded import Provisioned, provision_postgres, provision_redis
from aiwfe.app.suite import SERVICE_ORDER
from aiwfe.runtime.config import (
    CONFIG_ENV,
    PROCESS_INDEX_ENV,
    LauncherSettings,
    ServiceEndpoint,
    Settings,
    load_settings,
)

READY_TIMEOUT = 60.0
_PR_SET_PDEATHSIG = 1
STOP_TIMEOUT = 15.0


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM (a graceful stop) if the launcher dies, even by SIGKILL,
    so no service outlives `aiwfe up`."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _persistent_secrets(home: Path) -> dict[str, str]:
    """Loads or creates the generated secrets file (owner-only permissions)."""
    path = home / "secrets.json"
    if path.exists():
        return json.loads(path.read_text())
    generated = {
        "jwt_secret_key": secrets.token_urlsafe(48),
        "internal_secret_key": secrets.token_urlsafe(48),
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(generated, f)
    return generated


def child_environment(settings: Settings, pg: Provisioned, redis: Provisioned) -> dict[str, str]:
    """What the services need beyond the shared config file: generated or found values."""
    env = dict(os.environ)
    home = settings.home_path
    generated = _persistent_secrets(home)
    auth = settings.authentication
    if not auth.jwt.secret_key:
        env["AIWFE_AUTHENTICATION__JWT__SECRET_KEY"] = generated["jwt_secret_key"]
    if not auth.internal.secret_key:
        env["AIWFE_AUTHENTICATION__INTERNAL__SECRET_KEY"] = generated["internal_secret_key"]
    if pg.url:
        env["AIWFE_DATABASE__POSTGRES__DSN"] = pg.url
    if redis.url:
        env["AIWFE_REDIS__URL"] = redis.url
    env["AIWFE_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def banner(settings: Settings, pg: Provisioned, redis: Provisioned, embedding: str = "") -> str:
    s = settings.services
    admin = settings.authentication.admin.username
    gw = s.gateway.address
    qdrant = f"server {settings.qdrant.url}" if settings.qdrant.url else "embedded engine"
    redis_kind = redis.kind if redis.url else "none (single-node mode)"
    curl = "buf curl --protocol grpc --http2-prior-knowledge"
    login_body = f'{{"username":"{admin}","password":"\'"$AIWFE_ADMIN_PASSWORD"\'"}}'
    lines = [
        "aiwfe is up",
        *(f"{name}: {_described(getattr(s, name))}" for name in reversed(SERVICE_ORDER)),
        f"postgres: {pg.kind}   redis: {redis_kind}   qdrant: {qdrant}",
        *([embedding] if embedding else []),
        f"admin login: {admin} (password: $AIWFE_ADMIN_PASSWORD, or printed on first start)",
        "try it:",
        f"  TOKEN=$({curl} -d '{login_body}' http://{gw}/aiwfe.auth.v1.AuthService/Login"
        " | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"accessToken\"])')",
        f'  {curl} -H "authorization: Bearer $TOKEN" -d \'{{"texts":["hello world"]}}\''
        f" http://{gw}/aiwfe.cognitive.v1.CognitiveService/Embed",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


def _described(endpoint: ServiceEndpoint) -> str:
    """`127.0.0.1:50051`, plus `(2 processes)` when several share the port."""
    n = endpoint.processes
    return endpoint.address + (f" ({n} processes)" if n > 1 else "")


def _describe_exit(code: int) -> str:
    """A return code as an operator reads it: `exit code 2`, `signal SIGKILL`."""
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"


@dataclass
class Child:
    """One process of a service under supervision: its current process, and what outlives
    restarts."""

    service: str  # the module run (`python -m <service>`), which names its readiness line
    index: int  # which of the service's processes (its PROCESS_INDEX_ENV)
    name: str  # in logs: the service, or `service.index` when it runs several processes
    tail: deque[str]  # its last stderr lines, shown when it crash-loops
    proc: asyncio.subprocess.Process | None = None
    ready: asyncio.Future[str] | None = None
    started: float = 0.0
    backoff_step: int = 0  # consecutive quick restarts: the next delay doubles per step
    restarts: deque[float] = field(default_factory=deque)  # when it was restarted (monotonic)
    pumps: list[asyncio.Task[None]] = field(default_factory=list)


async def _pump_stdout(
    child: Child, stream: asyncio.StreamReader, ready: asyncio.Future[str]
) -> None:
    """Echoes a child's stdout, resolving `ready` on its readiness line."""
    name, prefix = child.name, f"{child.service}: "
    while line := await stream.readline():
        text = line.decode(errors="replace").rstrip("\n")
        if not ready.done() and text.startswith(prefix):
            ready.set_result(text[len(prefix) :])
            continue
        print(f"[{name}] {text}", flush=True)
    if not ready.done():
        ready.set_exception(RuntimeError(f"{name} exited before it was ready"))


async def _pump_stderr(stream: asyncio.StreamReader, tail: deque[str]) -> None:
    """Passes a child's stderr (its logs) through unchanged, keeping the last lines."""
    while line := await stream.readline():
        text = line.decode(errors="replace")
        tail.append(text.rstrip("\n"))
        sys.stderr.write(text)
        sys.stderr.flush()


class Supervisor:
    """Starts the children and restarts one that dies, with backoff, until `stop` is set or
    a child crash-loops."""

    def __init__(self, settings: LauncherSettings, env: dict[str, str], stop: asyncio.Event):
        self.settings = settings
        self.env = env
        self.stop = stop
        self.children: list[Child] = []

    async def spawn(self, child: Child) -> asyncio.Future[Any]:
        """Starts `child`'s process; returns `child.ready`, which resolves with its address
        once serving."""
        # A session of its own: Ctrl-C reaches only the launcher, which stops in order.
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            child.service,
            env={**self.env, PROCESS_INDEX_ENV: str(child.index)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        if proc.stdout is None or proc.stderr is None:  # both asked for as PIPE above
            raise RuntimeError(f"{child.name}: started without its output pipes")
        child.proc, child.started = proc, time.monotonic()
        child.ready = ready = asyncio.get_running_loop().create_future()
        child.pumps = [p for p in child.pumps if not p.done()]
        child.pumps.append(asyncio.create_task(_pump_stdout(child, proc.stdout, ready)))
        child.pumps.append(asyncio.create_task(_pump_stderr(proc.stderr, child.tail)))
        return ready

    async def start(self, service: str, processes: int = 1) -> bool:
        """Starts a service's processes together and waits until every one is ready;
        False if `stop` came first."""
        started = []
        for index in range(processes):
            name = f"{service}.{index}" if processes > 1 else service
            child = Child(service, index, name, deque(maxlen=self.settings.stderr_lines))
            self.children.append(child)
            started.append(await self.spawn(child))
        all_ready: asyncio.Future[list[str]] = asyncio.gather(*started)
        waiter = asyncio.create_task(self.stop.wait())
        ready_or_stop: set[asyncio.Future[Any]] = {all_ready, waiter}
        done, _ = await asyncio.wait(
            ready_or_stop, timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        waiter.cancel()
        if self.stop.is_set() or all_ready not in done:
            all_ready.cancel()
            with contextlib.suppress(BaseException):
                await all_ready
        if self.stop.is_set():
            return False
        if all_ready not in done:
            raise RuntimeError(f"{service} was not ready within {READY_TIMEOUT:.0f} s")
        all_ready.result()
        return True

    async def _stopping_within(self, seconds: float | None, *aws: Awaitable[Any]) -> bool:
        """Waits `seconds` (None: no limit) or until one of `aws` completes; True when the
        launcher is stopping by then."""
        stopper = asyncio.create_task(self.stop.wait())
        others = [asyncio.ensure_future(a) for a in aws]
        await asyncio.wait({stopper, *others}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        for task in (stopper, *others):
            task.cancel()
        return self.stop.is_set()

    async def watch(self, child: Child) -> str | None:
        """Restarts `child` whenever it dies until the launcher stops (None), or returns the
        crash-loop message that should stop the suite."""
        cfg = self.settings
        while True:
            proc = child.proc
            if proc is None:  # spawn() sets it before watch() is started
                raise RuntimeError(f"{child.name}: watched before it was spawned")
            if await self._stopping_within(None, proc.wait()):
                return None  # a death during shutdown is expected, never restarted
            died = time.monotonic()
            exit_text = _describe_exit(proc.returncode if proc.returncode is not None else 0)
            uptime = died - child.started
            if uptime >= cfg.backoff_reset_after:
                child.backoff_step = 0
            while child.restarts and child.restarts[0] < died - cfg.crash_loop_window:
                child.restarts.popleft()
            if len(child.restarts) >= cfg.crash_loop_restarts:
                lines = "\n".join(f"    {line}" for line in child.tail) or "    (none)"
                return (
                    f"aiwfe: {child.name} is crash-looping ({exit_text} after"
                    f" {len(child.restarts)} restarts within {cfg.crash_loop_window:.0f} s);"
                    f" stopping the suite. Its last stderr lines:\n{lines}"
                )
            doublings = min(child.backoff_step, 32)  # past the cap anyway; no float overflow
            delay = min(cfg.restart_backoff * 2**doublings, cfg.restart_backoff_max)
            child.backoff_step += 1
            attempt = len(child.restarts) + 1
            print(
                f"aiwfe: {child.name} (pid {proc.pid}) died ({exit_text}) after {uptime:.1f} s;"
                f" restart attempt {attempt} in {delay:g} s",
                flush=True,
            )
            if await self._stopping_within(delay):
                return None
            child.restarts.append(time.monotonic())
            ready = await self.spawn(child)
            pid = child.proc.pid if child.proc is not None else 0
            ready.add_done_callback(
                functools.partial(_report_restart, child.name, pid, attempt, died)
            )


def _report_restart(
    name: str, pid: int, attempt: int, died: float, ready: asyncio.Future[str]
) -> None:
    """Logs a restarted child serving again."""
    if ready.cancelled() or ready.exception() is not None:
        return  # its death is logged as such by the watcher
    took = time.monotonic() - died
    print(
        f"aiwfe: {name} restarted (pid {pid}, attempt {attempt}), serving on"
        f" {ready.result()} {took:.1f} s after it died",
        flush=True,
    )


async def stop_children(children: list[Child]) -> None:
    """Stops the services one after the other, front door first (the reverse of the start
    order), each service's processes together: a service drains while the ones its calls
    in flight need still serve them. (Stopped all at once, a call the gateway had passed on
    but the back end had not yet taken was cancelled by the back end's shutdown.)"""
    tiers: dict[str, list[Child]] = {}
    for child in reversed(children):
        if child.proc is not None:
            tiers.setdefault(child.service, []).append(child)
    for tier in tiers.values():
        await asyncio.gather(*(_stop(c.name, c.proc) for c in tier if c.proc is not None))


async def _stop(name: str, proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
    except TimeoutError:
        print(f"aiwfe: {name} did not stop in {STOP_TIMEOUT:.0f} s; killing it", flush=True)
        proc.kill()
        await proc.wait()


async def run_up(settings: Settings) -> int:
    """Starts everything, prints the banner, and runs until a signal, restarting a child
    that dies; a child that crash-loops stops the suite (exit code 1)."""
    home = settings.home_path
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    pg = await asyncio.to_thread(provision_postgres, home, settings.database.postgres.dsn)
    redis = await asyncio.to_thread(provision_redis, home, settings.redis.url)
    # First use: the embedding model's weights, with a progress bar, before cognitive starts.
    from cognitive.models_command import prefetch

    embedding = await asyncio.to_thread(prefetch, settings)
    supervisor = Supervisor(settings.launcher, child_environment(settings, pg, redis), stop)
    code = 0
    watchers: list[asyncio.Task[str | None]] = []
    try:
        for name in SERVICE_ORDER:
            if not await supervisor.start(name, getattr(settings.services, name).processes):
                return 0
        print(banner(settings, pg, redis, embedding), flush=True)
        watchers = [asyncio.create_task(supervisor.watch(c)) for c in supervisor.children]
        stopper = asyncio.create_task(stop.wait())
        ended, _ = await asyncio.wait({*watchers, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        for task in ended - {stopper}:
            if (message := task.result()) is not None:
                print(message, file=sys.stderr, flush=True)
                code = 1
    except RuntimeError as exc:
        print(f"aiwfe: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        stop.set()  # no restarts from here on
        if watchers:
            await asyncio.wait(watchers, timeout=5)
        await stop_children(supervisor.children)
        for child in supervisor.children:
            for pump in child.pumps:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pump, 2)
        redis.stop()
        pg.stop()
    print("aiwfe: stopped", flush=True)
    return code


def up(config: str | None) -> int:
    if config:  # the services read the same file: child_environment copies os.environ
        os.environ[CONFIG_ENV] = str(Path(config).resolve())
    settings = load_settings(config)
    return asyncio.run(run_up(settings))
