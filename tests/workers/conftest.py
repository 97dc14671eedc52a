"""Fixtures for the external-worker tests: the suite with a `worker` role (worker:queue:*),
a worker user's token, and SDK workers run in process or as `aiwfe worker run`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from aiwfe.app.suite import Suite, start_suite
from aiwfe.runtime.config import RbacSettings
from aiwfe.sdk import Worker
from tests.conftest import login
from tests.taskproc.helpers import new_user

ROOT = Path(__file__).resolve().parents[2]
WORKER_PERMISSIONS = ("worker:queue:*",)


def worker_overrides(base: dict[str, Any]) -> dict[str, Any]:
    """base_overrides plus the seed roles and a `worker` role (worker:queue:*), and rate
    limits out of the way of tight polling loops."""
    roles = {name: {"permissions": list(r.permissions)} for name, r in RbacSettings().roles.items()}
    roles.setdefault("worker", {"permissions": list(WORKER_PERMISSIONS)})
    overrides = {**base, "rbac": {"roles": roles}}
    auth = dict(overrides["authentication"])
    auth["rate_limiting"] = {"api_requests": 100_000}
    overrides["authentication"] = auth
    return overrides


@dataclass
class WorkerSuite:
    suite: Suite
    channel: grpc.aio.Channel
    admin: str  # the admin's access token (submits workflows)
    worker_key: str  # a worker-role user's access token (the workers' bearer)

    @property
    def gateway(self) -> str:
        return self.suite.address("gateway")


@pytest.fixture
async def ws(base_overrides: dict[str, Any]) -> AsyncIterator[WorkerSuite]:
    """The suite with the worker role, the admin's token and a worker's token."""
    suite = await start_suite(worker_overrides(base_overrides))
    try:
        async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
            admin = await login(channel)
            key = await new_user(suite, channel, roles=("worker",))
            yield WorkerSuite(suite, channel, admin, key)
    finally:
        await suite.stop()


def queue_name() -> str:
    return f"q-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def sdk_worker(ws: WorkerSuite) -> AsyncIterator[Callable[..., Worker]]:
    """Starts SDK workers in this process (run_async); stops them after the test."""
    running: list[tuple[Worker, asyncio.Task[None]]] = []

    def start(queue: str, tasks: list[Any], **kwargs: Any) -> Worker:
        kwargs.setdefault("shutdown_grace", 1.0)
        worker = Worker(ws.gateway, ws.worker_key, queues=[queue], tasks=tasks, **kwargs)
        running.append((worker, asyncio.create_task(worker.run_async())))
        return worker

    yield start
    for worker, _ in running:
        worker.stop()
    await asyncio.wait_for(
        asyncio.gather(*(t for _, t in running), return_exceptions=True), timeout=30
    )


class WorkerProcess:
    """`aiwfe worker run tests.workers.worker_tasks` in a subprocess; its JSON lines."""

    def __init__(self, gateway: str, key: str, queue: str, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aiwfe.app.cli", "worker", "run", "tests.workers.worker_tasks",
             "--queue", queue, "--gateway", gateway, *extra],
            cwd=ROOT,
            env={**os.environ, "AIWFE_API_KEY": key, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip

    async def next_event(self, timeout: float = 30) -> dict[str, Any]:
        """The next JSON line the worker's tasks printed."""
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)
        assert line, f"worker exited: {self.stderr()}"
        return dict(json.loads(line))

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 30) -> int:
        return await asyncio.wait_for(asyncio.to_thread(self.proc.wait), timeout)

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        assert self.proc.stderr is not None
        return self.proc.stderr.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def worker_process(ws: WorkerSuite) -> Any:
    """Starts `aiwfe worker run` subprocesses; kills what is left after the test."""
    started: list[WorkerProcess] = []

    def start(queue: str, *extra: str) -> WorkerProcess:
        p = WorkerProcess(ws.gateway, ws.worker_key, queue, *extra)
        started.append(p)
        return p

    yield start
    for p in started:
        p.close()
