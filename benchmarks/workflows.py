"""Workflow benchmarks, printed (never timed tests):

    python -m benchmarks.workflows [--jobs 5000] [--e2e 1000] [--latency 100]

1. `bare-skip-locked`: a bare psycopg loop claiming and completing jobs from a one-table
   queue with `FOR UPDATE SKIP LOCKED` (batches of 32, 4 loops) — the ceiling on this box.
2. `store-queue`: the same number of single-step `noop` workflows claimed and completed by
   taskproc's real `Worker` (batch claims, batched completions) against `python -m
   dataplatform` in its own process: leases, attempts, per-attempt records, events and
   DAG advance included.
3. `e2e`: single-step workflows submitted through the gateway (32 in flight), each watched
   until done, against the whole suite in its own process (`benchmarks.servers`), with
   the CPU each process spent per workflow (`postgresql`: every postgres process of the
   server; `cpu_ms_per_workflow_postgresql_own`: only the backends of the suite's own
   database, which a server shared with other work leaves measurable) and PostgreSQL
   transactions per workflow;
   `e2e_run`: the same through RunWorkflow (submit and watch in one call).
4. `latency`: submit → done (Watch ends) one at a time on the idle suite, p50/p99; the
   same through RunWorkflow; and a 3-step chain of `noop` steps through RunWorkflow
   (`latency_idle_run_chain3_ms`), with the median of each stage of both (send → create
   transaction → each step's result written → terminal event → stream end, from the
   client's clock and the store's timestamps: `..._stages_ms`).
   `AIWFE_TASKPROC__EAGER_DISPATCH=false` in the
   environment turns eager dispatch off in the suite, for an A/B on one machine.
5. `external`: steps run by an external worker (`op: task`), the SDK's `Worker` served by
   `aiwfe worker run benchmarks.worker_tasks` in a process of its own, polling through the
   gateway with a `worker` user's token:
   - dispatch latency to a hot worker (its long polls waiting): step ready → task received,
     one workflow at a time. The step (one, no dependencies, leased to the waiting poller's
     taskproc in the insert: eager dispatch) is ready at the commit of the statement that
     inserted its workflow: the moment dataplatform's autocommit `CreateWorkflow` statement
     returned (PostgreSQL answers after the commit, so this is at most that answer's trip,
     ~0.1 ms, after the row became visible), marked by the store (`aiwfe.runtime.hops`,
     switched on for this phase only). Received: the wall clock when the worker called the
     function. Also printed: the hops in between (the store's reply reaching taskproc,
     taskproc answering the poll) and the same from the insert's start (the workflow's
     `create_time`, the figure before 2026-12-01: it counts the insert and its commit);
   - throughput: single-step workflows (Submit + Watch, `--in-flight` at a time) with a
     task step against the same with the built-in `noop` op, in alternating halves on the
     same suite, with the CPU each process (the worker's too) spent per workflow.

6. `timers`: timer lateness. `--timers` (100) workflows, each one `sleep` step whose
   seconds are chosen at submit so that every timer is due at the same instant (about 3 s
   after the first submission; the due time is the workflow's `create_time` + seconds, both
   the store's); lateness = the step's SUCCEEDED event time - its due time, p50/p99/max.
   Twice: on the idle suite, and with taskproc's worker slots all taken by long `noop`
   steps (`busy`: a worker with no free slot does not poll).
7. `fanout`: one workflow whose step fans out over `--fan-out` (1,000) `noop` items,
   `--in-flight` at a time (max_concurrency), against as many single-step `noop`
   workflows, `--in-flight` at a time (Submit + Watch each), on the same suite in
   alternating rounds; each time is submit → the last event of the watch.

Goals from the issues: (2) ≥ 3,000 jobs/s, (3) ≥ 300 workflows/s, (4) p50 ≤ 20 ms (#19,
#23: ≤ 5 ms for one step through RunWorkflow, ≤ 10 ms for the 3-step chain);
(5) dispatch p50 ≤ 5 ms, task throughput ≥ half of noop's; (6) lateness p99 ≤ 1 s;
(7) fan-out ≤ 2x the separate workflows' time.

`--phases` picks phases (default all): `bare` (always run: the machine's anchor), `store`,
`gateway` (3 and 4), `external`, `timers`, `fanout`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import psycopg

from aiwfe.app.embedded import free_port
from aiwfe.auth.v1 import auth_service_pb2 as auth_pb
from aiwfe.auth.v1 import auth_service_pb2_grpc as auth_grpc
from aiwfe.data.v1 import workflow_store_service_pb2 as store_pb
from aiwfe.data.v1 import workflow_store_service_pb2_grpc as store_grpc
from aiwfe.runtime import hops
from aiwfe.runtime.channels import Upstream
from aiwfe.runtime.config import RbacSettings, load_settings
from aiwfe.runtime.identity import IDENTITY_METADATA_KEY, InternalIdentity
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from aiwfe.taskproc.v1 import workflow_service_pb2_grpc as wf_grpc
from benchmarks import procstat, report, servers
from benchmarks.harness import REPO_ROOT, ServerProcess, _login
from taskproc.worker import Worker

BATCH = 32
LOOPS = 4


async def bare_skip_locked(dsn: str, jobs: int) -> dict[str, Any]:
    """Claim+complete throughput of a minimal SKIP LOCKED queue (no events, no leases)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            "CREATE TABLE bench_jobs (id bigserial PRIMARY KEY, state smallint NOT NULL"
            " DEFAULT 0, payload jsonb, result jsonb)"
        )
        await conn.execute("CREATE INDEX bench_jobs_ready ON bench_jobs (id) WHERE state = 0")
        await conn.execute(
            "INSERT INTO bench_jobs (payload) SELECT '{}'::jsonb FROM generate_series(1, %s)",
            (jobs,),
        )

    async def loop() -> int:
        done = 0
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            while True:
                cur = await conn.execute(
                    "UPDATE bench_jobs SET state = 1 WHERE id IN (SELECT id FROM bench_jobs"
                    " WHERE state = 0 ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)"
                    " RETURNING id",
                    (BATCH,),
                )
                ids = [r[0] for r in await cur.fetchall()]
                if not ids:
                    return done
                await conn.execute(
                    "UPDATE bench_jobs SET state = 2, result = '{}' WHERE id = ANY(%s)", (ids,)
                )
                done += len(ids)

    start = time.perf_counter()
    counts = await asyncio.gather(*(loop() for _ in range(LOOPS)))
    elapsed = time.perf_counter() - start
    assert sum(counts) == jobs
    return {"jobs": jobs, "seconds": round(elapsed, 3), "jobs_per_s": round(jobs / elapsed)}


def _start_dataplatform(env: dict[str, str]) -> subprocess.Popen[str]:
    """`python -m dataplatform` configured by `env`, returned once it serves."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dataplatform"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("dataplatform:"):
        proc.kill()
        raise RuntimeError(f"dataplatform did not start: {line!r}")
    return proc


async def store_queue(dsn: str, jobs: int) -> dict[str, Any]:
    """The real Worker against dataplatform in its own process, on preloaded workflows."""
    secret = secrets.token_urlsafe(32)
    port = free_port()
    env = {
        **os.environ,
        "AIWFE_DATABASE__POSTGRES__DSN": dsn,
        "AIWFE_INTERNAL_SECRET_KEY": secret,
        "AIWFE_ADMIN_PASSWORD": secrets.token_urlsafe(18),
        "AIWFE_SERVICES__DATAPLATFORM__PORT": str(port),
        "AIWFE_LOGGING__LEVEL": "WARNING",
    }
    proc = _start_dataplatform(env)
    try:
        settings = load_settings(
            env={},
            overrides={
                "authentication": {"internal": {"secret_key": secret}},
                "services": {"dataplatform": {"port": port}, "cognitive": {"port": free_port()}},
                "taskproc": {"worker_concurrency": 256, "claim_batch": 128},
            },
        )
        identity = InternalIdentity.from_settings(settings)
        store = Upstream(
            "dataplatform", f"127.0.0.1:{port}", settings, identity, "taskproc",
            files=[store_pb.DESCRIPTOR],
        )  # fmt: skip
        cognitive = Upstream(
            "cognitive", settings.services.cognitive.address, settings, identity, "taskproc"
        )
        stub = store_grpc.WorkflowStoreServiceStub(store.channel)
        md = ((IDENTITY_METADATA_KEY, identity.assertion(None, "bench")),)
        spec = wf_pb.WorkflowSpec(name="bench", timeout_seconds=3600)
        step = spec.steps.add(name="a", op="noop", timeout_seconds=60)
        step.retry_policy.max_attempts = 3
        step.retry_policy.initial_backoff_seconds = 1
        step.retry_policy.backoff_multiplier = 2
        step.retry_policy.max_backoff_seconds = 100
        owner = store_pb.WorkflowOwner(user_id="bench", username="bench")
        sem = asyncio.Semaphore(32)

        async def create() -> None:
            async with sem:
                await stub.CreateWorkflow(
                    store_pb.CreateWorkflowRequest(owner=owner, spec=spec), metadata=md, timeout=30
                )

        t0 = time.perf_counter()
        await asyncio.gather(*(create() for _ in range(jobs)))
        submit_rate = jobs / (time.perf_counter() - t0)
        worker = Worker(settings.taskproc, settings.grpc.shutdown_grace_seconds, store, cognitive)
        cpu_store = procstat.cpu_seconds(proc.pid)
        cpu_worker = time.process_time()
        start = time.perf_counter()
        worker.start()
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            for _ in range(100_000):
                cur = await conn.execute("SELECT count(*) FROM workflows WHERE state = 3")
                row = await cur.fetchone()
                if row and row[0] >= jobs:
                    break
                await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - start
        cpu_store = procstat.cpu_seconds(proc.pid) - cpu_store
        cpu_worker = time.process_time() - cpu_worker
        await worker.stop()
        await store.close()
        await cognitive.close()
        return {
            "jobs": jobs,
            "seconds": round(elapsed, 3),
            "jobs_per_s": round(jobs / elapsed),
            "store_submit_per_s": round(submit_rate),
            # CPU per step: where the time goes (the rest is PostgreSQL).
            "dataplatform_cpu_us_per_job": round(cpu_store / jobs * 1e6),
            "worker_cpu_us_per_job": round(cpu_worker / jobs * 1e6),
        }
    finally:
        proc.terminate()
        proc.wait(20)


def _noop_spec(steps: int = 1) -> wf_pb.WorkflowSpec:
    """`steps` noop steps in a chain (each depends on the one before)."""
    spec = wf_pb.WorkflowSpec(name="bench")
    for i in range(steps):
        step = spec.steps.add(name=f"s{i}", op="noop")
        if i:
            step.depends_on.append(f"s{i - 1}")
    return spec


async def submit_and_wait(stub: wf_grpc.WorkflowServiceStub, md: Any) -> float:
    start = time.perf_counter()
    reply = await stub.SubmitWorkflow(
        wf_pb.SubmitWorkflowRequest(spec=_noop_spec()), metadata=md, timeout=30
    )
    last = None
    async for event in stub.WatchWorkflow(
        wf_pb.WatchWorkflowRequest(workflow_id=reply.workflow.workflow_id), metadata=md, timeout=30
    ):
        last = event
    assert last is not None and last.workflow_state == wf_pb.WORKFLOW_STATE_SUCCEEDED
    return time.perf_counter() - start


def _named_pids(prefix: str) -> list[int]:
    """Every process whose command name starts with `prefix` (PostgreSQL's backends do
    the queue's work; Redis serves the gateway's rate limits and sessions)."""
    return [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and _comm(entry).startswith(prefix)
    ]


def _comm(entry: Path) -> str:
    try:
        return (entry / "comm").read_text()
    except OSError:
        return ""


def _machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine so far (all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / procstat.CLOCK_TICKS


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each service, of PostgreSQL and Redis (processes started
    since count in full), of this process (the load generator) and of the machine."""
    used = {name: procstat.cpu_seconds(pid) for name, pid in pids.items()}
    used["postgresql"] = procstat.total_cpu_seconds(_named_pids("postgres"))
    used["redis"] = procstat.total_cpu_seconds(_named_pids("redis-server"))
    used["load-generator"] = time.process_time()
    used["machine"] = _machine_cpu_seconds()
    return used


def _commits(admin_dsn: str, database: str) -> int:
    """Transactions committed in `database` so far (backends report about once a second)."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (database,)
        ).fetchone()
    return int(row[0]) if row else 0


def _backends(admin_dsn: str, database: str) -> dict[int, float]:
    """CPU seconds so far of each PostgreSQL backend connected to `database`: the suite's
    own share of the server, which `postgresql` (every postgres process) cannot give on a
    server shared with other work. WAL writer and other background processes excluded."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s", (database,)
        ).fetchall()
    return {int(pid): procstat.total_cpu_seconds([int(pid)]) for (pid,) in rows}


async def _run_and_wait(stub: wf_grpc.WorkflowServiceStub, md: Any, steps: int = 1) -> float:
    """The same workflow through RunWorkflow: submit and watch in one call."""
    return (await _run_marked(stub, md, steps))[0]


def _seconds(stamp: Any) -> float:
    return float(stamp.seconds + stamp.nanos / 1e9)


async def _run_marked(
    stub: wf_grpc.WorkflowServiceStub, md: Any, steps: int = 1
) -> tuple[float, dict[str, float]]:
    """`_run_and_wait`, and where its time went (seconds), from this process's wall clock
    and the store's timestamps (the same machine's clock): send → the create transaction's
    start (the workflow's `create_time`) → each step's SUCCEEDED event (written by the
    complete statement, `clock_timestamp()`, before its commit) → the terminal event here →
    the stream's end."""
    sent, start = time.time(), time.perf_counter()
    updates = []
    async for update in stub.RunWorkflow(
        wf_pb.RunWorkflowRequest(spec=_noop_spec(steps)), metadata=md, timeout=30
    ):
        updates.append((time.time(), update))
    total, ended = time.perf_counter() - start, time.time()
    last = updates[-1][1]
    assert last.event.workflow_state == wf_pb.WORKFLOW_STATE_SUCCEEDED
    created = _seconds(updates[0][1].workflow.create_time)
    marks = {"send → create transaction": created - sent}
    mark = created
    done = [
        _seconds(u.event.event_time)
        for _, u in updates
        if u.HasField("event") and u.event.step_state == wf_pb.STEP_STATE_SUCCEEDED
    ]
    for i, at in enumerate(done):
        marks[f"→ step {i + 1} result written"] = at - mark
        mark = at
    marks["last result written → terminal event here"] = updates[-1][0] - mark
    marks["terminal event → stream end"] = ended - updates[-1][0]
    return total, marks


def _median_marks(runs: list[tuple[float, dict[str, float]]]) -> dict[str, float]:
    return {k: round(statistics.median(m[k] for _, m in runs) * 1000, 2) for k in runs[0][1]}


async def _throughput(
    server: ServerProcess,
    admin_dsn: str,
    workflows: int,
    in_flight: int,
    run: Any,
    extra_pids: dict[str, int] | None = None,
) -> dict[str, Any]:
    """`workflows` runs of `run()` with `in_flight` at a time, and where the CPU went."""
    sem = asyncio.Semaphore(in_flight)

    async def one() -> None:
        async with sem:
            await run()

    pids = {n: p for n, p in server.info["service_pids"].items() if "_" not in n}
    pids.update(extra_pids or {})
    before = _cpu(pids)
    backends = _backends(admin_dsn, server.database)
    commits = _commits(admin_dsn, server.database)
    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(workflows)))
    elapsed = time.perf_counter() - start
    used = {name: cpu - before[name] for name, cpu in _cpu(pids).items()}
    own = sum(
        cpu - backends.get(pid, 0.0) for pid, cpu in _backends(admin_dsn, server.database).items()
    )
    await asyncio.sleep(1.5)  # backends report their statistics about once a second
    commits = _commits(admin_dsn, server.database) - commits
    machine = used.pop("machine")
    used["other"] = max(0.0, machine - sum(used.values()))
    return {
        "workflows": workflows,
        "seconds": round(elapsed, 3),
        "workflows_per_s": round(workflows / elapsed),
        "in_flight": in_flight,
        # CPU per workflow, by process: where the two cores go.
        "cpu_ms_per_workflow": {n: round(c / workflows * 1000, 2) for n, c in used.items()},
        # PostgreSQL backends of this suite's database only (`postgresql`: all of them).
        "cpu_ms_per_workflow_postgresql_own": round(own / workflows * 1000, 2),
        "cpu_cores_busy": round(machine / elapsed, 2),
        "pg_transactions_per_workflow": round(commits / workflows, 2),
    }


def percentiles(samples: list[float]) -> dict[str, Any]:
    samples = sorted(samples)
    return {
        "n": len(samples),
        "p50": round(statistics.median(samples) * 1000, 2),
        "p99": round(samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1000, 2),
    }


async def gateway_phases(
    admin_dsn: str, e2e: int, latency: int, in_flight: int = 32
) -> dict[str, Any]:
    """Submit + Watch (two calls) and RunWorkflow (one), idle latency and throughput."""
    server = ServerProcess(admin_dsn)
    server.start()
    try:
        token = await _login(server.address("gateway"), server.admin_password)
        md = (("authorization", f"Bearer {token}"),)
        async with grpc.aio.insecure_channel(server.address("gateway")) as channel:
            stub = wf_grpc.WorkflowServiceStub(channel)
            for _ in range(20):  # warm-up
                await submit_and_wait(stub, md)
                await _run_and_wait(stub, md)
            idle = [await submit_and_wait(stub, md) for _ in range(latency)]
            idle_run = [await _run_marked(stub, md) for _ in range(latency)]
            idle_chain = [await _run_marked(stub, md, 3) for _ in range(latency)]
            e2e_result = await _throughput(
                server, admin_dsn, e2e, in_flight, lambda: submit_and_wait(stub, md)
            )
            run_result = await _throughput(
                server, admin_dsn, e2e, in_flight, lambda: _run_and_wait(stub, md)
            )
        return {
            "latency_idle_ms": percentiles(idle),
            "latency_idle_run_ms": percentiles([t for t, _ in idle_run]),
            "latency_idle_run_chain3_ms": percentiles([t for t, _ in idle_chain]),
            # Medians of each stage ("Where submit → done goes" in README).
            "latency_idle_run_stages_ms": _median_marks(idle_run),
            "latency_idle_run_chain3_stages_ms": _median_marks(idle_chain),
            "e2e": e2e_result,
            "e2e_run": run_result,
        }
    finally:
        server.stop()


# --- external workers (op: task) ---------------------------------------------------------

WORKER_ROLE_ENV = "AIWFE_RBAC__ROLES__{}__PERMISSIONS"
TASK_QUEUE = "bench"


def _roles_env() -> dict[str, str]:
    """The seed roles plus `worker` (worker:queue:*) for the server process: setting any
    role from the environment replaces the whole table, so every role is set."""
    roles = {name: list(r.permissions) for name, r in RbacSettings().roles.items()}
    roles.setdefault("worker", ["worker:queue:*"])
    return {WORKER_ROLE_ENV.format(name.upper()): json.dumps(p) for name, p in roles.items()}


def _task_spec() -> wf_pb.WorkflowSpec:
    spec = wf_pb.WorkflowSpec(name="bench-task")
    step = spec.steps.add(name="a", op="task")
    step.inputs.update({"queue": TASK_QUEUE, "type": "bench_noop", "input": {}})
    return spec


SHED: dict[str, int] = {"submissions": 0}  # SubmitWorkflow refused by load shedding


async def _submit(
    stub: wf_grpc.WorkflowServiceStub, md: Any, make: Callable[[], wf_pb.WorkflowSpec]
) -> tuple[wf_pb.SubmitWorkflowResponse, wf_pb.WorkflowSpec]:
    """SubmitWorkflow of `make()`; a submission shed (RESOURCE_EXHAUSTED) is counted and
    made and sent again after 50 ms. Returns the reply and the spec that was accepted."""
    while True:
        spec = make()
        try:
            reply = await stub.SubmitWorkflow(
                wf_pb.SubmitWorkflowRequest(spec=spec), metadata=md, timeout=30
            )
            return reply, spec
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            SHED["submissions"] += 1
            await asyncio.sleep(0.05)


async def _submit_and_watch(
    stub: wf_grpc.WorkflowServiceStub, md: Any, spec: wf_pb.WorkflowSpec
) -> tuple[wf_pb.Workflow, list[wf_pb.WatchWorkflowResponse]]:
    """Submit + Watch to the end (the workflow as created, its events); shed submissions
    are sent again (`_submit`)."""
    reply, _ = await _submit(stub, md, lambda: spec)
    events = [
        event
        async for event in stub.WatchWorkflow(
            wf_pb.WatchWorkflowRequest(workflow_id=reply.workflow.workflow_id),
            metadata=md,
            timeout=30,
        )
    ]
    last = events[-1] if events else None
    assert last is not None and last.workflow_state == wf_pb.WORKFLOW_STATE_SUCCEEDED, last
    return reply.workflow, events


def _running_after(wf: wf_pb.Workflow, events: list[wf_pb.WatchWorkflowResponse]) -> float:
    """Seconds from the workflow's creation to its step's RUNNING event (the claim)."""
    running = next(e for e in events if e.step_state == wf_pb.STEP_STATE_RUNNING)
    return running.event_time.ToDatetime().timestamp() - wf.create_time.ToDatetime().timestamp()


def _ms(samples: list[float]) -> dict[str, Any]:
    samples = sorted(samples)
    return {
        "n": len(samples),
        "p50": round(statistics.median(samples) * 1000, 2),
        "p95": round(samples[max(0, int(len(samples) * 0.95) - 1)] * 1000, 2),
    }


def _start_worker(gateway: str, key: str, concurrency: int) -> subprocess.Popen[str]:
    """`aiwfe worker run benchmarks.worker_tasks` in a process of its own."""
    return subprocess.Popen(
        [sys.executable, "-m", "aiwfe.app.cli", "worker", "run", "benchmarks.worker_tasks",
         "--queue", TASK_QUEUE, "--gateway", gateway, "--concurrency", str(concurrency)],
        cwd=REPO_ROOT,
        env={**os.environ, "AIWFE_API_KEY": key},
        stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip


async def external_phases(
    admin_dsn: str, tasks: int, dispatch: int, in_flight: int, concurrency: int = 32
) -> dict[str, Any]:
    """Dispatch latency to a hot SDK worker, and task vs noop throughput (same suite)."""
    marks = Path(tempfile.mkdtemp(prefix="aiwfe-hops-")) / "hops"
    server = ServerProcess(admin_dsn, extra_env={**_roles_env(), hops.ENV: str(marks)})
    server.start()
    worker = None
    try:
        gateway = server.address("gateway")
        admin = await _login(gateway, server.admin_password)
        md = (("authorization", f"Bearer {admin}"),)
        async with grpc.aio.insecure_channel(gateway) as channel:
            password = secrets.token_urlsafe(18)
            await auth_grpc.UserAdminServiceStub(channel).CreateUser(
                auth_pb.CreateUserRequest(username="bench-worker", password=password,
                                          roles=["worker"]),
                metadata=md, timeout=30,
            )  # fmt: skip
            key = (
                await auth_grpc.AuthServiceStub(channel).Login(
                    auth_pb.LoginRequest(username="bench-worker", password=password), timeout=30
                )
            ).access_token
            worker = _start_worker(gateway, key, concurrency)
            stub = wf_grpc.WorkflowServiceStub(channel)
            for _ in range(min(20, dispatch)):  # warm-up; the worker polls once one ran
                await _submit_and_watch(stub, md, _task_spec())
                await _submit_and_watch(stub, md, _noop_spec())
            sampled: list[tuple[wf_pb.Workflow, float]] = []  # (as created, received at)
            task_claimed, noop_claimed = [], []
            for _ in range(dispatch):  # one at a time, alternating task and noop
                wf, events = await _submit_and_watch(stub, md, _task_spec())
                done = await stub.GetWorkflow(
                    wf_pb.GetWorkflowRequest(workflow_id=wf.workflow_id), metadata=md, timeout=30
                )
                output = done.workflow.steps[0].output.fields
                sampled.append((wf, output["received"].number_value))
                task_claimed.append(_running_after(wf, events))
                noop_claimed.append(
                    _running_after(*await _submit_and_watch(stub, md, _noop_spec()))
                )
            halves: dict[str, list[dict[str, Any]]] = {"noop": [], "task": []}
            extra = {"worker": worker.pid}
            for _ in range(2):  # alternating halves: the machine's drift hits both alike
                for name, spec in (("noop", _noop_spec()), ("task", _task_spec())):
                    halves[name].append(
                        await _throughput(
                            server, admin_dsn, tasks // 2, in_flight,
                            lambda s=spec: _submit_and_watch(stub, md, s), extra,
                        )
                    )  # fmt: skip
        noop, task = _merge(halves["noop"]), _merge(halves["task"])
        return {
            # step ready (the insert's commit) -> the worker called the function, and hops
            **_dispatch_hops(sampled, marks),
            # step ready -> the step's RUNNING event (the store's claim), task and noop
            "task_claim_ms": _ms(task_claimed),
            "noop_claim_ms": _ms(noop_claimed),
            "noop": noop,
            "task": task,
            "task_vs_noop": round(task["workflows_per_s"] / noop["workflows_per_s"], 3),
            "submissions_shed_and_retried": SHED["submissions"],
        }
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(30)
        server.stop()
        shutil.rmtree(marks.parent, ignore_errors=True)


# The hops of one dispatch, in order: (mark, what the span up to it covers).
DISPATCH_HOPS = (
    ("committed", "insert: statement start (create_time) -> committed"),
    ("leased_to_taskproc", "commit -> the store's reply (the leased step) in taskproc"),
    ("poll_answered", "-> handed to the waiting PollTask, answered (token, input)"),
    ("received", "-> through the gateway to the SDK worker, function called"),
)


def _dispatch_hops(sampled: list[tuple[wf_pb.Workflow, float]], marks: Path) -> dict[str, Any]:
    """Step ready (the insert's commit) -> received, and each hop between, from the marks
    the suite wrote (`aiwfe.runtime.hops`) for the sampled workflows."""
    at: dict[str, dict[str, float]] = {}
    for line in marks.read_text(encoding="ascii").splitlines():
        key, hop, seconds, _ = line.split()
        at.setdefault(key, {}).setdefault(hop, float(seconds))
    spans: dict[str, list[float]] = {hop: [] for hop, _ in DISPATCH_HOPS}
    ready, from_start = [], []
    for wf, received in sampled:
        seen = at.get(wf.workflow_id, {})
        times = [wf.create_time.ToDatetime().timestamp()]
        times += [seen.get(hop, 0.0) for hop, _ in DISPATCH_HOPS[:-1]] + [received]
        if not all(times):  # not eagerly dispatched (no poller was waiting): not counted
            continue
        for (hop, _), start, end in zip(DISPATCH_HOPS, times[:-1], times[1:], strict=True):
            spans[hop].append(end - start)
        ready.append(received - seen["committed"])
        from_start.append(received - times[0])
    if not ready:
        raise RuntimeError(f"no dispatch of {len(sampled)} was marked (is {hops.ENV} read?)")
    return {
        "dispatch_ms": _ms(ready),
        "dispatch_from_insert_start_ms": _ms(from_start),
        "dispatch_hops_ms": {hop: _ms(samples) for hop, samples in spans.items()},
        "dispatch_not_eager": len(sampled) - len(ready),
    }


def _merge(halves: list[dict[str, Any]]) -> dict[str, Any]:
    """Two `_throughput` results as one (rates from the summed counts and seconds)."""
    n = sum(h["workflows"] for h in halves)
    seconds = sum(h["seconds"] for h in halves)
    cpu: dict[str, float] = {}
    for h in halves:
        for name, ms in h["cpu_ms_per_workflow"].items():
            cpu[name] = cpu.get(name, 0.0) + ms * h["workflows"] / n
    return {
        "workflows": n,
        "seconds": round(seconds, 3),
        "workflows_per_s": round(n / seconds),
        "cpu_ms_per_workflow": {k: round(v, 2) for k, v in cpu.items()},
        "cpu_cores_busy": round(
            sum(h["cpu_cores_busy"] * h["seconds"] for h in halves) / seconds, 2
        ),
        "pg_transactions_per_workflow": round(
            sum(h["pg_transactions_per_workflow"] * h["workflows"] for h in halves) / n, 2
        ),
    }


def external_summary(result: dict[str, Any]) -> str:
    """The external-worker figures beside their goals, with the machine's anchors."""
    ext, m = result["external"], result["machine"]
    bare = result["bare-skip-locked"]["jobs_per_s"]
    d = ext["dispatch_ms"]
    tc, nc = ext["task_claim_ms"], ext["noop_claim_ms"]
    lines = [
        f"machine: {m['cores']} cores, Python {m['python']}, grpcio {m['grpcio']}, "
        f"{m['date']}; anchor: bare SKIP LOCKED loop {bare:,} jobs/s",
        f"dispatch to a hot worker (step ready = the insert's commit -> task received): "
        f"p50 {d['p50']} ms, p95 {d['p95']} ms (n={d['n']}; goal p50 <= 5 ms; "
        f"{ext['dispatch_not_eager']} not eagerly dispatched, left out)",
        *(
            f"  {label}: p50 {ext['dispatch_hops_ms'][hop]['p50']} ms, "
            f"p95 {ext['dispatch_hops_ms'][hop]['p95']} ms"
            for hop, label in DISPATCH_HOPS
        ),
        f"  from the insert's start (create_time) -> task received: "
        f"p50 {ext['dispatch_from_insert_start_ms']['p50']} ms, "
        f"p95 {ext['dispatch_from_insert_start_ms']['p95']} ms",
        f"step ready -> claimed (RUNNING event): task p50 {tc['p50']} ms, p95 {tc['p95']} ms;"
        f" built-in noop p50 {nc['p50']} ms, p95 {nc['p95']} ms",
        f"load shedding refused {ext['submissions_shed_and_retried']} submissions (retried)",
    ]
    for name in ("noop", "task"):
        r = ext[name]
        cpu = ", ".join(f"{k} {v}" for k, v in r["cpu_ms_per_workflow"].items())
        lines.append(f"{name}: {r['workflows_per_s']} workflows/s; CPU ms per workflow: {cpu}")
    lines.append(f"task vs noop: {ext['task_vs_noop']}x (goal >= 0.5x)")
    return "\n".join(lines)


# --- timer lateness -----------------------------------------------------------------------


def _timer_lead(n: int) -> float:
    """Seconds from the first submission to the instant all `n` timers are due: time to
    submit them all (3 s for the default 100)."""
    return min(3.0, 0.5 + 0.025 * n)


def _sleep_spec(seconds: float) -> wf_pb.WorkflowSpec:
    spec = wf_pb.WorkflowSpec(name="bench-timer")
    spec.steps.add(name="nap", op="sleep").inputs.update({"seconds": seconds})
    return spec


async def _timer_lateness(stub: wf_grpc.WorkflowServiceStub, md: Any, n: int) -> dict[str, Any]:
    """`n` sleep timers due at one instant: lateness of each one's SUCCEEDED event."""
    due_at = time.time() + _timer_lead(n)
    sem = asyncio.Semaphore(32)

    async def one() -> tuple[float, float]:
        async with sem:  # only the submissions: every watch waits at once
            reply, spec = await _submit(
                stub, md, lambda: _sleep_spec(round(due_at - time.time(), 6))
            )
        seconds = spec.steps[0].inputs["seconds"]
        events = [
            e
            async for e in stub.WatchWorkflow(
                wf_pb.WatchWorkflowRequest(workflow_id=reply.workflow.workflow_id),
                metadata=md,
                timeout=60,
            )
        ]
        assert events[-1].workflow_state == wf_pb.WORKFLOW_STATE_SUCCEEDED, events[-1]
        due = reply.workflow.create_time.ToNanoseconds() / 1e9 + seconds
        fired = next(
            e.event_time.ToNanoseconds() / 1e9
            for e in events
            if e.step_name == "nap" and e.step_state == wf_pb.STEP_STATE_SUCCEEDED
        )
        return due, fired - due

    results = await asyncio.gather(*(one() for _ in range(n)))
    dues = [d for d, _ in results]
    late = sorted(lateness for _, lateness in results)
    return {
        "timers": n,
        "due_spread_ms": round((max(dues) - min(dues)) * 1000, 2),
        "late_p50_ms": round(statistics.median(late) * 1000, 1),
        "late_p99_ms": round(late[min(n - 1, int(n * 0.99))] * 1000, 1),
        "late_max_ms": round(late[-1] * 1000, 1),
    }


async def timer_phases(admin_dsn: str, timers: int) -> dict[str, Any]:
    """Timer lateness on the idle suite, then with every worker slot taken."""
    server = ServerProcess(admin_dsn)
    server.start()
    try:
        token = await _login(server.address("gateway"), server.admin_password)
        md = (("authorization", f"Bearer {token}"),)
        async with grpc.aio.insecure_channel(server.address("gateway")) as channel:
            stub = wf_grpc.WorkflowServiceStub(channel)
            await _submit_and_watch(stub, md, _sleep_spec(0.1))  # warm-up
            idle = await _timer_lateness(stub, md, timers)
            slots = load_settings(env={}).taskproc.worker_concurrency
            hog = wf_pb.WorkflowSpec(name="bench-hog")
            # Each hog holds its slot past the busy measurement (a warm-up second, the
            # lead, the lateness) and then ends.
            hog_ms = int((1.0 + _timer_lead(timers) + 2.0) * 1000)
            hog.steps.add(name="a", op="noop").inputs.update({"sleep_ms": hog_ms})
            hogs = [asyncio.ensure_future(_submit_and_watch(stub, md, hog)) for _ in range(slots)]
            await asyncio.sleep(1.0)  # the worker has claimed them all
            busy = await _timer_lateness(stub, md, timers)
            busy["worker_slots_taken"] = slots
            await asyncio.gather(*hogs)
        return {"idle": idle, "busy": busy, "submissions_shed_and_retried": SHED["submissions"]}
    finally:
        server.stop()


def timer_summary(result: dict[str, Any]) -> str:
    """Timer lateness beside its goal, with the machine's anchor."""
    m, bare = result["machine"], result["bare-skip-locked"]["jobs_per_s"]
    lines = [
        f"machine: {m['cores']} cores, Python {m['python']}, grpcio {m['grpcio']}, "
        f"{m['date']}; anchor: bare SKIP LOCKED loop {bare:,} jobs/s"
    ]
    for name in ("idle", "busy"):
        r = result["timers"][name]
        lines.append(
            f"timers {name}: {r['timers']} sleeps due at once (spread {r['due_spread_ms']} ms):"
            f" late p50 {r['late_p50_ms']} ms, p99 {r['late_p99_ms']} ms,"
            f" max {r['late_max_ms']} ms (goal p99 <= 1000 ms)"
        )
    lines.append(
        f"load shedding refused {result['timers']['submissions_shed_and_retried']} submissions"
        " (made again with the seconds left, retried)"
    )
    return "\n".join(lines)


# --- fan-out (for_each) vs separate workflows ---------------------------------------------


def _fan_out_spec(items: int, concurrency: int) -> wf_pb.WorkflowSpec:
    spec = wf_pb.WorkflowSpec(name="bench-fan-out")
    spec.input.update({"items": list(range(items))})
    spec.steps.add(name="each", op="noop", for_each="${input.items}", max_concurrency=concurrency)
    spec.steps[0].inputs.update({"echo": "${item}"})
    return spec


async def _fan_out_once(
    stub: wf_grpc.WorkflowServiceStub, md: Any, items: int, c: int
) -> tuple[float, str]:
    """Submit → last event of one fan-out; its seconds and workflow id."""
    start = time.perf_counter()
    reply = await stub.SubmitWorkflow(
        wf_pb.SubmitWorkflowRequest(spec=_fan_out_spec(items, c)), metadata=md, timeout=30
    )
    last = None
    async for event in stub.WatchWorkflow(
        wf_pb.WatchWorkflowRequest(workflow_id=reply.workflow.workflow_id), metadata=md, timeout=600
    ):
        last = event
    assert last is not None and last.workflow_state == wf_pb.WORKFLOW_STATE_SUCCEEDED, last
    return time.perf_counter() - start, reply.workflow.workflow_id


async def _get_ms(stub: wf_grpc.WorkflowServiceStub, md: Any, workflow_id: str) -> float:
    """Median GetWorkflow latency (ms) of one workflow, 20 calls."""
    samples = []
    for _ in range(20):
        start = time.perf_counter()
        await stub.GetWorkflow(
            wf_pb.GetWorkflowRequest(workflow_id=workflow_id), metadata=md, timeout=30
        )
        samples.append(time.perf_counter() - start)
    return round(statistics.median(samples) * 1000, 2)


async def fan_out_phase(admin_dsn: str, items: int, in_flight: int, rounds: int) -> dict[str, Any]:
    """A fan-out of `items` noop items vs `items` single-step workflows, alternated. Load
    shedding is off: on a machine shared with other work its adaptive limit refused the
    separate workflows' submissions (RESOURCE_EXHAUSTED), which would favour the fan-out."""
    server = ServerProcess(admin_dsn, {"AIWFE_LOAD_SHEDDING__ENABLED": "false"})
    server.start()
    try:
        token = await _login(server.address("gateway"), server.admin_password)
        md = (("authorization", f"Bearer {token}"),)
        async with grpc.aio.insecure_channel(server.address("gateway")) as channel:
            stub = wf_grpc.WorkflowServiceStub(channel)
            sem = asyncio.Semaphore(in_flight)

            async def one() -> None:
                async with sem:
                    await submit_and_wait(stub, md)

            async def separate() -> float:
                start = time.perf_counter()
                await asyncio.gather(*(one() for _ in range(items)))
                return time.perf_counter() - start

            warm = min(50, items)
            await _fan_out_once(stub, md, warm, in_flight)  # warm-up
            for _ in range(warm):
                await submit_and_wait(stub, md)
            fan: list[float] = []
            sep: list[float] = []
            for _ in range(rounds):
                sep.append(await separate())
                seconds, fanned = await _fan_out_once(stub, md, items, in_flight)
                fan.append(seconds)
            single = await stub.SubmitWorkflow(
                wf_pb.SubmitWorkflowRequest(spec=_noop_spec()), metadata=md, timeout=30
            )
            get_ms = {
                "fan_out": await _get_ms(stub, md, fanned),
                "single_step": await _get_ms(stub, md, single.workflow.workflow_id),
            }
        return {
            "items": items,
            "in_flight": in_flight,
            "fan_out_seconds": [round(t, 3) for t in fan],
            "separate_seconds": [round(t, 3) for t in sep],
            "fan_out_vs_separate": round(sum(fan) / sum(sep), 3),
            "get_workflow_p50_ms": get_ms,
        }
    finally:
        server.stop()


def fan_out_summary(result: dict[str, Any]) -> str:
    """The fan-out figures beside their goal, with the machine's anchor."""
    fo = result["fanout"]
    bare = result["bare-skip-locked"]["jobs_per_s"]
    return "\n".join(
        [
            f"{result['machine']['date']}; anchor: bare SKIP LOCKED loop {bare:,} jobs/s",
            f"fan-out of {fo['items']} noop items ({fo['in_flight']} at once):"
            f" {fo['fan_out_seconds']} s",
            f"{fo['items']} single-step noop workflows ({fo['in_flight']} in flight):"
            f" {fo['separate_seconds']} s",
            f"fan-out / separate: {fo['fan_out_vs_separate']}x (goal <= 2x)",
            f"GetWorkflow p50: the fan-out {fo['get_workflow_p50_ms']['fan_out']} ms,"
            f" a single-step workflow {fo['get_workflow_p50_ms']['single_step']} ms",
        ]
    )


PHASES = ("bare", "store", "gateway", "external", "timers", "fanout")


async def main(opts: argparse.Namespace) -> dict[str, Any]:
    phases = set(opts.phases.split(",")) if opts.phases else set(PHASES)
    unknown = phases - set(PHASES)
    if unknown:
        raise SystemExit(f"unknown phases {sorted(unknown)}; known: {', '.join(PHASES)}")
    result: dict[str, Any] = {"machine": report.machine()}
    database = f"aiwfe_bench_wf_{secrets.token_hex(4)}"
    servers.create_database(opts.admin_dsn, database)
    dsn = servers.database_dsn(opts.admin_dsn, database)
    try:
        # The machine's anchor, always: its speed moves by ~2x between sessions.
        result["bare-skip-locked"] = await bare_skip_locked(dsn, opts.jobs)
        if "store" in phases:
            result["store-queue"] = await store_queue(dsn, opts.jobs)
    finally:
        servers.drop_database(opts.admin_dsn, database)
    if "gateway" in phases:
        result.update(await gateway_phases(opts.admin_dsn, opts.e2e, opts.latency, opts.in_flight))
    if "external" in phases:
        result["external"] = await external_phases(
            opts.admin_dsn, opts.tasks, opts.dispatch, opts.in_flight, opts.worker_concurrency
        )
    if "timers" in phases:
        result["timers"] = await timer_phases(opts.admin_dsn, opts.timers)
    if "fanout" in phases:
        result["fanout"] = await fan_out_phase(
            opts.admin_dsn, opts.fan_out, opts.in_flight, opts.fan_out_rounds
        )
    if "store-queue" in result:
        result["store_vs_bare"] = round(
            result["store-queue"]["jobs_per_s"] / result["bare-skip-locked"]["jobs_per_s"], 3
        )
    return result


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--e2e", type=int, default=1000)
    parser.add_argument("--latency", type=int, default=100)
    parser.add_argument("--in-flight", type=int, default=32, help="e2e workflows in flight")
    parser.add_argument("--tasks", type=int, default=1000, help="workflows per external half")
    parser.add_argument("--dispatch", type=int, default=200, help="dispatch latency samples")
    parser.add_argument("--worker-concurrency", type=int, default=32)
    parser.add_argument("--timers", type=int, default=100, help="timers due at once")
    parser.add_argument("--fan-out", type=int, default=1000, help="items of the fan-out")
    parser.add_argument("--fan-out-rounds", type=int, default=2, help="alternated rounds")
    parser.add_argument("--phases", default="", help=f"comma-separated: {', '.join(PHASES)}")
    parser.add_argument("--admin-dsn", default=servers.DEFAULT_ADMIN_DSN)
    opts = parser.parse_args()
    result = asyncio.run(main(opts))
    print(json.dumps(result, indent=2))
    if "external" in result:
        print(external_summary(result), file=sys.stderr)
    if "timers" in result:
        print(timer_summary(result), file=sys.stderr)
    if "fanout" in result:
        print(fan_out_summary(result), file=sys.stderr)


if __name__ == "__main__":
    cli()
