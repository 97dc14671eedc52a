"""Long-lived watch streams vs control traffic, printed as JSON (never a timed test):

    python -m benchmarks.streams --streams 2000 [--connections-per 100] [--samples 100]

Against the suite in processes of their own (`benchmarks.servers`, as `aiwfe up` runs it):

1. idle: submit → done latency (SubmitWorkflow + WatchWorkflow of a one-step `noop`
   workflow through the gateway, one at a time, p50/p99), then a burst of `--burst`
   such workflows 16 at a time (step completions/s);
2. flood: `--long` workflows active for `--hold` seconds (10 run a `noop` step that long;
   the others wait for a retry, leaving the workers free), and `--streams` WatchWorkflow
   streams on them through the gateway, opened over
   `--connections-per` streams per client connection (many connections: one carries at
   most the gateway's `grpc.max_concurrent_streams`); each stream counts as open once its
   first event arrived (`--via taskproc` opens them on taskproc itself, past the gateway);
3. during the flood, the same latency samples and burst as in 1 (every workflow must
   succeed; goal: p99 during ≤ 2 x idle p99), while every stream stays open; in both,
   a refusal with RetryInfo (load shedding) is retried after its delay, up to 5 times,
   and counted under `shed_and_retried` by who refused (the wait is in the latency);
4. RSS of the gateway, taskproc and dataplatform before and during the flood: KB per
   stream; CPU each spent per second idle and during the flood; PostgreSQL transactions
   a second in the suite's database over `--settle` seconds with the flood open and no
   other calls (what the watches' re-reads cost; backends report about once a second).

10,000 streams need about 2 x 10,000 / `--connections-per` file descriptors here; taskproc
runs with a `max_watch_streams` of `--streams` + 1,000 (at least the default 10,000), so
the control phase's watches are admitted during the flood.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import time
from collections import Counter
from typing import Any

import grpc

from aiwfe.runtime.config import load_settings
from aiwfe.runtime.identity import IDENTITY_METADATA_KEY, InternalIdentity, Principal
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from aiwfe.taskproc.v1 import workflow_service_pb2_grpc as wf_grpc
from benchmarks import procstat, servers
from benchmarks.harness import ServerProcess, _login
from benchmarks.overload import retry_delay
from benchmarks.workflows import _commits, percentiles, submit_and_wait

SERVICES = ("gateway", "taskproc", "dataplatform")
BURST_IN_FLIGHT = 16
# A workflow refused with RetryInfo (load shedding, RESOURCE_EXHAUSTED) is submitted again
# after the delay given, at most this often, as a client following the contract would;
# only what still fails counts as failed (the refusals are reported as shed_and_retried).
SHED_RETRIES = 5
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
RUNNING = 10  # long workflows whose step runs (the rest wait for a retry: no worker slot)
Metadata = tuple[tuple[str, str], ...]


async def _control_phase(
    stub: wf_grpc.WorkflowServiceStub, md: Metadata, samples: int, burst: int
) -> dict[str, Any]:
    """Submit → done latency one at a time, then step completions/s of a burst; failed
    workflows are counted by status code (the goal is none)."""
    failed: Counter[str] = Counter()
    first: dict[str, str] = {}  # the first failure's details per code
    shed: Counter[str] = Counter()  # refusals with RetryInfo, retried after their delay

    async def one() -> float | None:
        """Submit → done, as a client honouring RetryInfo sees it (its waits included)."""
        start = time.perf_counter()
        for attempt in range(SHED_RETRIES + 1):
            try:
                await submit_and_wait(stub, md)
                return time.perf_counter() - start
            except grpc.aio.AioRpcError as exc:
                delay = retry_delay(exc) if exc.code() is EXHAUSTED else None
                if delay is None or attempt == SHED_RETRIES:
                    failed[exc.code().name] += 1
                    first.setdefault(exc.code().name, exc.details() or "")
                    return None
                shed[(exc.details() or "").split(" overloaded")[0][:40]] += 1
                await asyncio.sleep(delay)
        return None

    latency = [t for _ in range(samples) if (t := await one()) is not None]
    sem = asyncio.Semaphore(BURST_IN_FLIGHT)

    async def limited() -> float | None:
        async with sem:
            return await one()

    start = time.perf_counter()
    done = sum(t is not None for t in await asyncio.gather(*(limited() for _ in range(burst))))
    elapsed = time.perf_counter() - start
    return {
        "submit_to_done_ms": percentiles(latency) if latency else None,
        "burst": burst,
        "step_completions_per_s": round(done / elapsed, 1),
        "failed": {code: {"n": n, "first": first[code]} for code, n in failed.items()},
        "shed_and_retried": dict(shed),
    }


def _long_spec(hold: int, running: bool) -> wf_pb.WorkflowSpec:
    """A workflow active for `hold` seconds: a step running that long, or (so as not to
    take every worker slot) a step whose first attempt fails and whose retry is due then."""
    spec = wf_pb.WorkflowSpec(name="long", timeout_seconds=hold + 60)
    step = spec.steps.add(name="hold", op="noop", timeout_seconds=hold + 30)
    if running:
        step.inputs.update({"sleep_ms": hold * 1000})
    else:
        step.inputs.update({"fail_times": 1})
        step.retry_policy.max_attempts = 2
        step.retry_policy.initial_backoff_seconds = hold
    return spec


def _usage(pids: dict[str, int]) -> dict[str, tuple[float, float]]:
    """(RSS MB, CPU seconds so far) of each service."""
    return {n: (procstat.rss_mb(p), procstat.cpu_seconds(p)) for n, p in pids.items()}


async def _open_watch(
    stub: wf_grpc.WorkflowServiceStub,
    md: Metadata,
    workflow_id: str,
    opened: asyncio.Event,
    opening: asyncio.Semaphore,
) -> None:
    """One WatchWorkflow stream, read until cancelled; `opened` once its first event came.
    It holds one of `opening`'s places until then."""
    await opening.acquire()
    call = stub.WatchWorkflow(wf_pb.WatchWorkflowRequest(workflow_id=workflow_id), metadata=md)
    try:
        async for _ in call:
            if not opened.is_set():
                opened.set()
                opening.release()
    finally:
        if not opened.is_set():
            opening.release()
        call.cancel()


def _as_admin(server: ServerProcess) -> Metadata:
    """What the gateway would send taskproc for an admin (to bypass the gateway)."""
    settings = load_settings(
        env={}, overrides={"authentication": {"internal": {"secret_key": server.internal_secret}}}
    )
    admin = Principal(user_id="bench-admin", username="bench-admin", roles=("admin",))
    return (
        (
            IDENTITY_METADATA_KEY,
            InternalIdentity.from_settings(settings).assertion(admin, "gateway"),
        ),
    )


def _raise_fd_limit(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        soft = hard if hard == resource.RLIM_INFINITY else min(hard, max(needed, soft))
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


async def run(opts: argparse.Namespace) -> dict[str, Any]:
    channels_needed = -(-opts.streams // opts.connections_per)
    fd_limit = _raise_fd_limit(2 * channels_needed + 256)
    server = ServerProcess(
        opts.admin_dsn,
        # The servers' limit must admit the flood and the control phase's own watches
        # (the default is 10,000: a flood of 10,000 would leave none).
        {"AIWFE_TASKPROC__MAX_WATCH_STREAMS": str(max(10_000, opts.streams + 1_000))},
    )
    server.start()
    watches: list[asyncio.Task[None]] = []
    channels: list[grpc.aio.Channel] = []
    try:
        pids = {n: server.info["service_pids"][n] for n in SERVICES}
        address = server.address("gateway")
        md: Metadata = (
            ("authorization", f"Bearer {await _login(address, server.admin_password)}"),
        )
        control_channel = grpc.aio.insecure_channel(address)
        channels.append(control_channel)
        stub = wf_grpc.WorkflowServiceStub(control_channel)
        for _ in range(20):  # warm-up
            await submit_and_wait(stub, md)

        t0, before = time.perf_counter(), _usage(pids)
        idle = await _control_phase(stub, md, opts.samples, opts.burst)
        idle_seconds, after_idle = time.perf_counter() - t0, _usage(pids)

        long_ids = [
            (
                await stub.SubmitWorkflow(
                    wf_pb.SubmitWorkflowRequest(spec=_long_spec(opts.hold, running=i < RUNNING)),
                    metadata=md,
                    timeout=30,
                )
            ).workflow.workflow_id
            for i in range(opts.long)
        ]
        # Many client connections, each its own (grpc would share one between equal channels).
        flood_address, flood_md = address, md
        if opts.via == "taskproc":
            flood_address, flood_md = server.address("taskproc"), _as_admin(server)
        flood_channels = [
            grpc.aio.insecure_channel(
                flood_address, options=[("grpc.use_local_subchannel_pool", 1)]
            )
            for _ in range(channels_needed)
        ]
        channels.extend(flood_channels)
        opened = [asyncio.Event() for _ in range(opts.streams)]
        # At most `open_batch` opening at once: a burst of thousands of new calls makes
        # grpc's server cancel some before any handler sees them (users arrive spread).
        # Each watch frees its place once its first event came, so the next one starts
        # then (a loop that polled the oldest one every 10 ms opened ~30 streams/s).
        opening = asyncio.Semaphore(opts.open_batch)
        t_open = time.perf_counter()
        for i in range(opts.streams):
            watch_stub = wf_grpc.WorkflowServiceStub(flood_channels[i // opts.connections_per])
            watches.append(
                asyncio.create_task(
                    _open_watch(watch_stub, flood_md, long_ids[i % opts.long], opened[i], opening)
                )
            )
        waiting: asyncio.Future[Any] = asyncio.gather(*(e.wait() for e in opened))
        ends: list[asyncio.Future[Any]] = [waiting, *watches]
        while not waiting.done():
            await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED, timeout=1)
            if failed := [w for w in watches if w.done()]:
                waiting.cancel()
                raise RuntimeError(f"{len(failed)} watches ended: {failed[0].exception()!r}")
            if not waiting.done() and time.perf_counter() - t_open > opts.open_timeout:
                waiting.cancel()
                n = sum(e.is_set() for e in opened)
                raise RuntimeError(f"only {n} of {opts.streams} watches opened")
        open_seconds = time.perf_counter() - t_open
        # The flood alone (no control calls): what its watches cost the database.
        commits = _commits(server.admin_dsn, server.database)
        await asyncio.sleep(opts.settle)
        flood_tps = (_commits(server.admin_dsn, server.database) - commits) / opts.settle
        t1, flood_before = time.perf_counter(), _usage(pids)
        during = await _control_phase(stub, md, opts.samples, opts.burst)
        flood_seconds, flood_after = time.perf_counter() - t1, _usage(pids)
        ended = [w for w in watches if w.done()]
        for wid in long_ids:
            await stub.CancelWorkflow(
                wf_pb.CancelWorkflowRequest(workflow_id=wid), metadata=md, timeout=30
            )
        return {
            "streams": opts.streams,
            "streams_via": opts.via,
            "client_connections": channels_needed,
            "fd_limit": fd_limit,
            "seconds_to_open_all": round(open_seconds, 2),
            "streams_ended_early": len(ended),
            "db_transactions_per_s_flood_alone": round(flood_tps, 1),
            "idle": idle,
            "during_flood": during,
            "p99_during_vs_idle": round(
                during["submit_to_done_ms"]["p99"] / idle["submit_to_done_ms"]["p99"], 2
            )
            if during["submit_to_done_ms"]
            else None,
            "rss_mb_before": {n: round(before[n][0], 1) for n in SERVICES},
            "rss_kb_per_stream": {
                n: round((flood_before[n][0] - after_idle[n][0]) * 1024 / opts.streams, 1)
                for n in SERVICES
            },
            "cpu_per_s_idle_phase": {
                n: round((after_idle[n][1] - before[n][1]) / idle_seconds, 3) for n in SERVICES
            },
            "cpu_per_s_flood_phase": {
                n: round((flood_after[n][1] - flood_before[n][1]) / flood_seconds, 3)
                for n in SERVICES
            },
        }
    finally:
        for w in watches:
            w.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*watches, return_exceptions=True)
        for ch in channels:
            await ch.close()
        server.stop()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument(
        "--connections-per", type=int, default=100, help="streams per client connection"
    )
    parser.add_argument("--long", type=int, default=10, help="long workflows watched")
    parser.add_argument("--hold", type=int, default=600, help="seconds a long step sleeps")
    parser.add_argument("--samples", type=int, default=100, help="latency samples per phase")
    parser.add_argument("--burst", type=int, default=200, help="workflows per burst")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds after opening")
    parser.add_argument("--open-timeout", type=float, default=300.0)
    parser.add_argument(
        "--open-batch", type=int, default=200, help="streams opening at once, at most"
    )
    parser.add_argument(
        "--via",
        choices=("gateway", "taskproc"),
        default="gateway",
        help="where the flood's streams go (taskproc: straight, past the gateway's relay)",
    )
    parser.add_argument("--admin-dsn", default=servers.DEFAULT_ADMIN_DSN)
    opts = parser.parse_args()
    print(json.dumps(asyncio.run(run(opts)), indent=2))


if __name__ == "__main__":
    cli()
