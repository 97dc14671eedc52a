"""`aiwfe up`: the whole suite on one machine, one process per service.

PostgreSQL and Redis come from the configuration when given; otherwise the local servers
on their standard ports, otherwise embedded ones under the aiwfe home. Qdrant runs as its
engine in process unless `qdrant.url` is set. Secrets nobody configured are generated once
and kept (0600) in the home, so tokens survive restarts. Ctrl-C/SIGTERM stops everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

from aiwfe.config import Settings, load_settings
from aiwfe.embedded import Provisioned, provision_postgres, provision_redis
from aiwfe.suite import SERVICE_ORDER

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


def banner(settings: Settings, pg: Provisioned, redis: Provisioned) -> str:
    s = settings.services
    admin = settings.authentication.admin.username
    gw = s.gateway.address
    qdrant = f"server {settings.qdrant.url}" if settings.qdrant.url else "embedded engine"
    redis_kind = redis.kind if redis.url else "none (single-node mode)"
    curl = "buf curl --protocol grpc --http2-prior-knowledge"
    login_body = f'{{"username":"{admin}","password":"\'"$AIWFE_ADMIN_PASSWORD"\'"}}'
    lines = [
        "aiwfe is up",
        *(f"{name}: {getattr(s, name).address}" for name in reversed(SERVICE_ORDER)),
        f"postgres: {pg.kind}   redis: {redis_kind}   qdrant: {qdrant}",
        f"admin login: {admin} (password: $AIWFE_ADMIN_PASSWORD, or printed on first start)",
        "try it:",
        f"  TOKEN=$({curl} -d '{login_body}' http://{gw}/aiwfe.auth.v1.AuthService/Login"
        " | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"accessToken\"])')",
        f'  {curl} -H "authorization: Bearer $TOKEN" -d \'{{"texts":["hello world"]}}\''
        f" http://{gw}/aiwfe.cognitive.v1.CognitiveService/Embed",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


async def _pump(name: str, stream: asyncio.StreamReader, ready: asyncio.Future[str]) -> None:
    """Echoes a child's stdout, resolving `ready` on its readiness line."""
    prefix = f"{name}: "
    while line := await stream.readline():
        text = line.decode(errors="replace").rstrip("\n")
        if not ready.done() and text.startswith(prefix):
            ready.set_result(text[len(prefix) :])
            continue
        print(f"[{name}] {text}", flush=True)
    if not ready.done():
        ready.set_exception(RuntimeError(f"{name} exited before it was ready"))


async def _stop_children(children: list[tuple[str, asyncio.subprocess.Process]]) -> None:
    for _, proc in reversed(children):
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
    for name, proc in reversed(children):
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            print(f"aiwfe: {name} did not stop in {STOP_TIMEOUT:.0f} s; killing it", flush=True)
            proc.kill()
            await proc.wait()


async def run_up(settings: Settings) -> int:
    """Starts everything, prints the banner, and runs until a signal or a child exits."""
    home = settings.home_path
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    pg = await asyncio.to_thread(provision_postgres, home, settings.database.postgres.dsn)
    redis = await asyncio.to_thread(provision_redis, home, settings.redis.url)
    env = child_environment(settings, pg, redis)
    children: list[tuple[str, asyncio.subprocess.Process]] = []
    pumps = []
    code = 0
    try:
        for name in SERVICE_ORDER:
            # A session of its own: Ctrl-C reaches only the launcher, which stops in order.
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                name,
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            children.append((name, proc))
            ready: asyncio.Future[str] = loop.create_future()
            assert proc.stdout is not None
            pumps.append(asyncio.create_task(_pump(name, proc.stdout, ready)))
            waiter = asyncio.create_task(stop.wait())
            ready_or_stop: set[asyncio.Future[Any]] = {ready, waiter}
            done, _ = await asyncio.wait(
                ready_or_stop, timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
            waiter.cancel()
            if stop.is_set():
                return 0
            if ready not in done:
                raise RuntimeError(f"{name} was not ready within {READY_TIMEOUT:.0f} s")
            ready.result()
        print(banner(settings, pg, redis), flush=True)
        exits = [asyncio.create_task(p.wait()) for _, p in children]
        stopper = asyncio.create_task(stop.wait())
        exited, _ = await asyncio.wait({*exits, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        for (name, proc), task in zip(children, exits, strict=True):
            if task in exited:
                print(f"aiwfe: {name} exited with code {proc.returncode}; stopping", flush=True)
                code = 1
            task.cancel()
    except RuntimeError as exc:
        print(f"aiwfe: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        await _stop_children(children)
        for pump in pumps:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pump, 2)
        redis.stop()
        pg.stop()
    print("aiwfe: stopped", flush=True)
    return code


def up(config: str | None) -> int:
    settings = load_settings(config)
    return asyncio.run(run_up(settings))
