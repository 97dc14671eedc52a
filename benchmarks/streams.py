"""Long-lived watch streams vs control traffic, printed as JSON (never a timed test):

    python -m benchmarks.streams --streams 10000 [--connections-per 100] [--connections 1000]

Against the suite in processes of their own (`benchmarks.servers`, as `aiwfe up` runs it):

0. the machine's anchors: a bare SKIP LOCKED queue's jobs/s, Embed straight to cognitive
   at 1 in flight (p50/p99);
1. idle: submit → done latency (SubmitWorkflow + WatchWorkflow of a one-step `noop`
   workflow through the gateway, one at a time, p50/p99), then a burst of `--burst` such
   workflows 16 at a time (step completions/s);
2. flood: `--long` workflows that stay running (each waits for signals: `wait_for_signal`
   steps, which hold no worker slot); `--settle` seconds later, unary Embed latency
   through the gateway on a connection of its own (`--embed-samples` calls one at a time,
   texts cognitive has cached, past the gateway's response cache, p50/p99); then
   `--streams` WatchWorkflow streams on them through
   the gateway, opened over `--connections-per` streams per client connection (many
   connections: one carries at most the gateway's `grpc.max_concurrent_streams`); each
   stream counts as open once its first event arrived (`--via taskproc` opens them on
   taskproc itself, past the gateway);
3. during the flood, `--settle` seconds after it opened: the same Embed latency (goal: p99
   during ≤ 1.5 x idle p99; with `--streams 0` the two differ by noise alone); event lag:
   `--lag-rounds` times, each long workflow is signalled once, which completes one of its
   steps, and every stream records when that event reached it: arrival - the event's
   `event_time` (set by PostgreSQL's clock when the event row is written, before the
   commit: an upper bound of commit → arrival), over every stream (goal: all ≤ 100 ms;
   streams that missed an event are counted); the same latency samples and burst as in 1
   (every workflow must succeed; goal: p99 during ≤ 2 x idle p99), while every stream stays
   open; in both, a refusal with RetryInfo (load shedding) is retried after its delay, up
   to 5 times, and counted under `shed_and_retried` by who refused (the wait is in the
   latency);
4. RSS of the gateway, taskproc and dataplatform before and during the flood: KB per
   stream; CPU each spent per second idle and during the flood; PostgreSQL transactions
   a second in the suite's database over `--settle` seconds with the flood open and no
   other calls (what the watches' re-reads cost; backends report about once a second);
5. connections (with the flood still open): `--connections` more client connections, each
   making one unary Embed call a second (their starts spread over the first second) for
   `--connection-seconds`: calls, failures by status code, latency p50/p99, and the
   gateway's RSS growth per connection.

10,000 streams need about 2 x 10,000 / `--connections-per` file descriptors here, plus 2 per
extra connection; taskproc runs with a `max_watch_streams` of `--streams` + 1,000 (at least
the default 10,000), so the control phase's watches are admitted during the flood.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from aiwfe.cognitive.v1 import cognitive_service_pb2 as cog_pb
from aiwfe.cognitive.v1 import cognitive_service_pb2_grpc as cog_grpc
from aiwfe.runtime.config import load_settings
from aiwfe.runtime.identity import IDENTITY_METADATA_KEY, InternalIdentity, Principal
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from aiwfe.taskproc.v1 import workflow_service_pb2_grpc as wf_grpc
from benchmarks import procstat, report, servers
from benchmarks.harness import ServerProcess, _login
from benchmarks.overload import refuser, retry_delay
from benchmarks.workflows import _commits, bare_skip_locked, percentiles, submit_and_wait

SERVICES = ("gateway", "taskproc", "dataplatform")
BURST_IN_FLIGHT = 16
# A workflow refused with RetryInfo (load shedding, RESOURCE_EXHAUSTED) is submitted again
# after the delay given, at most this often, as a client following the contract would;
# only what still fails counts as failed (the refusals are reported as shed_and_retried).
SHED_RETRIES = 5
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
LAG_GOAL_SECONDS = 0.1  # an event reaches every stream within this of its commit
ANCHOR_JOBS = 20_000
ANCHOR_CALLS = 500
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)  # grpc shares equal channels'
Metadata = tuple[tuple[str, str], ...]


class _Outcomes:
    """Failed calls by status code (the first one's details kept) and refusals with
    RetryInfo that were retried after their delay, by who refused."""

    def __init__(self) -> None:
        self.failed: Counter[str] = Counter()
        self.first: dict[str, str] = {}
        self.shed: Counter[str] = Counter()

    async def attempt(self, call: Callable[[], Awaitable[Any]]) -> float | None:
        """Seconds `call` took as a client honouring RetryInfo sees it (its waits
        included), or None when it failed for good."""
        start = time.perf_counter()
        for attempt in range(SHED_RETRIES + 1):
            try:
                await call()
                return time.perf_counter() - start
            except grpc.aio.AioRpcError as exc:
                delay = retry_delay(exc) if exc.code() is EXHAUSTED else None
                if delay is None or attempt == SHED_RETRIES:
                    self.failed[exc.code().name] += 1
                    self.first.setdefault(exc.code().name, exc.details() or "")
                    return None
                self.shed[refuser(exc)] += 1
                await asyncio.sleep(delay)
        return None

    def summary(self) -> dict[str, Any]:
        return {
            "failed": {
                code: {"n": n, "first": self.first[code]} for code, n in self.failed.items()
            },
            "shed_and_retried": dict(self.shed),
        }


async def _control_phase(
    stub: wf_grpc.WorkflowServiceStub, md: Metadata, samples: int, burst: int
) -> dict[str, Any]:
    """Submit → done latency one at a time, then step completions/s of a burst; failed
    workflows are counted by status code (the goal is none)."""
    outcomes = _Outcomes()

    async def one() -> float | None:
        return await outcomes.attempt(lambda: submit_and_wait(stub, md))

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
        **outcomes.summary(),
    }


def _long_spec(hold: int, probes: int) -> wf_pb.WorkflowSpec:
    """A workflow that stays running for `hold` seconds and holds no worker slot: `probes`
    steps each waiting for its own signal (p0, p1, ...: one event each when signalled),
    and one waiting for a signal never sent until its timeout."""
    spec = wf_pb.WorkflowSpec(name="long", timeout_seconds=hold + 60)
    for name in [*(f"p{i}" for i in range(probes)), "hold"]:
        step = spec.steps.add(name=name, op="wait_for_signal", timeout_seconds=hold + 30)
        step.inputs.update({"name": name, "timeout_seconds": hold, "default": {}})
    return spec


# The gateway's response cache would answer a repeated Embed itself: the probes skip it, so
# each call goes through the relay to cognitive, whose in-process cache holds the text.
NO_STORE = (("cache-control", "no-store"),)


def _embed_texts(tag: str, n: int) -> list[cog_pb.EmbedRequest]:
    return [cog_pb.EmbedRequest(texts=[f"{tag} {i}"]) for i in range(n)]


async def _warm(stub: cog_grpc.CognitiveServiceStub, md: Metadata, requests: list[Any]) -> None:
    """Has cognitive compute and cache the texts of `requests` (200 a call)."""
    texts = [r.texts[0] for r in requests]
    for i in range(0, len(texts), 200):
        batch = cog_pb.EmbedRequest(texts=texts[i : i + 200])
        await stub.Embed(batch, metadata=md + NO_STORE, timeout=60)


async def _embed_latency(
    stub: cog_grpc.CognitiveServiceStub,
    md: Metadata,
    requests: list[Any],
    pids: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Unary Embed latency, one call at a time (each a text cognitive has cached), and
    the CPU `pids` spent per call meanwhile (load-independent, unlike the p99)."""
    cpu = {n: procstat.cpu_seconds(p) for n, p in (pids or {}).items()}
    out = []
    for request in requests:
        start = time.perf_counter()
        await stub.Embed(request, metadata=md + NO_STORE, timeout=30)
        out.append(time.perf_counter() - start)
    used = {
        n: round((procstat.cpu_seconds(p) - cpu[n]) * 1e6 / len(out), 1)
        for n, p in (pids or {}).items()
    }
    return percentiles(out) | ({"cpu_us_per_call": used} if used else {}) | {"uptime": _uptime()}


def _uptime() -> str:
    """The load average beside each wall-clock figure (the machine is shared)."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _usage(pids: dict[str, int]) -> dict[str, tuple[float, float]]:
    """(RSS MB, CPU seconds so far) of each service."""
    return {n: (procstat.rss_mb(p), procstat.cpu_seconds(p)) for n, p in pids.items()}


async def _open_watch(
    stub: wf_grpc.WorkflowServiceStub,
    md: Metadata,
    workflow_id: str,
    opened: asyncio.Event,
    opening: asyncio.Semaphore,
    lags: list[float],
) -> None:
    """One WatchWorkflow stream, read until cancelled; `opened` once its first event came.
    It holds one of `opening`'s places until then. Each probe step's completion adds its
    lag (arrival - event_time, seconds) to `lags`."""
    await opening.acquire()
    call = stub.WatchWorkflow(wf_pb.WatchWorkflowRequest(workflow_id=workflow_id), metadata=md)
    try:
        async for event in call:
            if not opened.is_set():
                opened.set()
                opening.release()
            elif event.step_state == wf_pb.STEP_STATE_SUCCEEDED and event.step_name != "hold":
                lags.append(time.time() - event.event_time.ToNanoseconds() / 1e9)
    finally:
        if not opened.is_set():
            opening.release()
        call.cancel()


async def _lag_phase(
    stub: wf_grpc.WorkflowServiceStub,
    md: Metadata,
    long_ids: list[str],
    lags: list[float],
    opts: argparse.Namespace,
    pids: dict[str, int],
) -> dict[str, Any]:
    """Signals each long workflow `--lag-rounds` times, one workflow every `--lag-gap`
    seconds (each signal completes one probe step: one event to each of its watchers),
    and summarises what every stream recorded, with the CPU each process spent per event
    delivered to a stream (the load generator's own included: it reads every copy)."""
    lags.clear()
    cpu = {**pids, "load_generator": os.getpid()}
    before = {n: procstat.cpu_seconds(p) for n, p in cpu.items()}
    for r in range(opts.lag_rounds):
        for wid in long_ids:
            await stub.SignalWorkflow(
                wf_pb.SignalWorkflowRequest(workflow_id=wid, name=f"p{r}"), metadata=md, timeout=30
            )
            await asyncio.sleep(opts.lag_gap)
    expected = opts.lag_rounds * opts.streams
    for _ in range(50):  # the stragglers, 5 s at most
        if len(lags) >= expected:
            break
        await asyncio.sleep(0.1)
    ordered = sorted(lags)
    per_event = max(1, len(ordered))
    return {
        "gap_between_events_s": opts.lag_gap,
        "events_expected": expected,
        "events_received": len(ordered),
        "lag_ms": percentiles(ordered) | {"max": round(ordered[-1] * 1000, 2)} if ordered else None,
        "over_100_ms": sum(lag > LAG_GOAL_SECONDS for lag in ordered),
        "missed": expected - len(ordered),
        "cpu_us_per_event_delivered": {
            n: round((procstat.cpu_seconds(p) - before[n]) * 1e6 / per_event, 1)
            for n, p in cpu.items()
        },
        "uptime": _uptime(),
    }


async def _connections_phase(
    address: str, md: Metadata, opts: argparse.Namespace, gateway_pid: int
) -> dict[str, Any]:
    """`--connections` more client connections, each making one Embed call a second (a
    text of its own, cached by cognitive) for `--connection-seconds`."""
    n = opts.connections
    requests = _embed_texts("connection", n)
    channels = [grpc.aio.insecure_channel(address, options=OWN_CONNECTION) for _ in range(n)]
    await _warm(cog_grpc.CognitiveServiceStub(channels[0]), md, requests)
    rss_before = procstat.rss_mb(gateway_pid)
    outcomes = _Outcomes()
    latency: list[float] = []
    peak = [rss_before]

    async def caller(i: int, channel: grpc.aio.Channel) -> None:
        stub = cog_grpc.CognitiveServiceStub(channel)
        start = time.perf_counter() + i / n  # spread over the first second
        for k in range(int(opts.connection_seconds)):
            await asyncio.sleep(max(0.0, start + k - time.perf_counter()))
            took = await outcomes.attempt(
                lambda: stub.Embed(requests[i], metadata=md + NO_STORE, timeout=30)
            )
            if took is not None:
                latency.append(took)

    async def sample_rss() -> None:
        while True:
            await asyncio.sleep(0.5)
            peak[0] = max(peak[0], procstat.rss_mb(gateway_pid))

    sampler = asyncio.create_task(sample_rss())
    try:
        await asyncio.gather(*(caller(i, ch) for i, ch in enumerate(channels)))
    finally:
        sampler.cancel()
        rss_open = procstat.rss_mb(gateway_pid)
        for ch in channels:
            await ch.close()
    return {
        "connections": n,
        "seconds": opts.connection_seconds,
        "calls": len(latency) + sum(outcomes.failed.values()),
        **outcomes.summary(),
        "latency_ms": percentiles(latency) if latency else None,
        "gateway_rss_kb_per_connection": round((rss_open - rss_before) * 1024 / n, 1),
        "gateway_rss_kb_per_connection_peak": round((peak[0] - rss_before) * 1024 / n, 1),
        "uptime": _uptime(),
    }


async def _anchors(server: ServerProcess, requests: list[Any]) -> dict[str, Any]:
    """The machine's speed this session (it moves by ~2x between days): a bare SKIP LOCKED
    queue's jobs/s in the suite's database, and Embed straight to cognitive, 1 in flight."""
    dsn = servers.database_dsn(server.admin_dsn, server.database)
    bare = await bare_skip_locked(dsn, ANCHOR_JOBS)
    async with grpc.aio.insecure_channel(server.address("cognitive")) as channel:
        direct = cog_grpc.CognitiveServiceStub(channel)
        internal = _as_admin(server)
        await _warm(direct, internal, requests)
        latency = await _embed_latency(direct, internal, requests)
    return {"bare_skip_locked_jobs_per_s": bare["jobs_per_s"], "direct_embed_ms": latency}


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
    fd_limit = _raise_fd_limit(2 * (channels_needed + opts.connections) + 256)
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
        embed_pids = {n: server.info["service_pids"][n] for n in ("gateway", "cognitive")}
        address = server.address("gateway")
        md: Metadata = (
            ("authorization", f"Bearer {await _login(address, server.admin_password)}"),
        )
        control_channel = grpc.aio.insecure_channel(address)
        # The Embed probe's connection: no stream and no workflow call shares it.
        embed_channel = grpc.aio.insecure_channel(address, options=OWN_CONNECTION)
        channels += [control_channel, embed_channel]
        stub = wf_grpc.WorkflowServiceStub(control_channel)
        embed = cog_grpc.CognitiveServiceStub(embed_channel)
        probes = _embed_texts(f"probe {time.time_ns()}", max(opts.embed_samples, ANCHOR_CALLS))
        for _ in range(20):  # warm-up
            await submit_and_wait(stub, md)
        anchors = await _anchors(server, probes[:ANCHOR_CALLS])
        await _warm(embed, md, probes)
        probes = probes[: opts.embed_samples]
        await _embed_latency(embed, md, probes[:100])

        t0, before = time.perf_counter(), _usage(pids)
        idle = await _control_phase(stub, md, opts.samples, opts.burst)
        idle_seconds, after_idle = time.perf_counter() - t0, _usage(pids)
        idle["uptime"] = _uptime()

        long_ids = [
            (
                await stub.SubmitWorkflow(
                    wf_pb.SubmitWorkflowRequest(spec=_long_spec(opts.hold, opts.lag_rounds)),
                    metadata=md,
                    timeout=30,
                )
            ).workflow.workflow_id
            for _ in range(opts.long)
        ]
        # Embed without the flood right before it opens, after the same settling time as
        # the probe with it open: the streams are the one difference between the two.
        await asyncio.sleep(opts.settle)
        embed_idle = await _embed_latency(embed, md, probes, embed_pids)
        # Many client connections, each its own (grpc would share one between equal channels).
        flood_address, flood_md = address, md
        if opts.via == "taskproc":
            flood_address, flood_md = server.address("taskproc"), _as_admin(server)
        flood_channels = [
            grpc.aio.insecure_channel(flood_address, options=OWN_CONNECTION)
            for _ in range(channels_needed)
        ]
        channels.extend(flood_channels)
        opened = [asyncio.Event() for _ in range(opts.streams)]
        lags: list[float] = []
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
                    _open_watch(
                        watch_stub, flood_md, long_ids[i % opts.long], opened[i], opening, lags
                    )
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
        flood_open = _usage(pids)
        embed_flood = await _embed_latency(embed, md, probes, embed_pids)
        lag = await _lag_phase(stub, md, long_ids, lags, opts, pids)
        t1, flood_before = time.perf_counter(), _usage(pids)
        during = await _control_phase(stub, md, opts.samples, opts.burst)
        flood_seconds, flood_after = time.perf_counter() - t1, _usage(pids)
        during["uptime"] = _uptime()
        connections = None
        if opts.connections:
            connections = await _connections_phase(address, md, opts, pids["gateway"])
        ended = [w for w in watches if w.done()]
        for wid in long_ids:
            await stub.CancelWorkflow(
                wf_pb.CancelWorkflowRequest(workflow_id=wid), metadata=md, timeout=30
            )
        return {
            "machine": report.machine(),
            "anchors": anchors,
            "streams": opts.streams,
            "streams_via": opts.via,
            "workflows_watched": opts.long,
            "client_connections": channels_needed,
            "fd_limit": fd_limit,
            "seconds_to_open_all": round(open_seconds, 2),
            "streams_ended_early": len(ended),
            "db_transactions_per_s_flood_alone": round(flood_tps, 1),
            "rss_mb_before": {n: round(before[n][0], 1) for n in SERVICES},
            "rss_kb_per_stream": {
                n: round((flood_open[n][0] - after_idle[n][0]) * 1024 / max(1, opts.streams), 1)
                for n in SERVICES
            },
            "embed_idle_ms": embed_idle,
            "embed_during_flood_ms": embed_flood,
            "embed_p99_during_vs_idle": round(embed_flood["p99"] / embed_idle["p99"], 2),
            "event_lag_during_flood": lag,
            "idle": idle,
            "during_flood": during,
            "p99_during_vs_idle": round(
                during["submit_to_done_ms"]["p99"] / idle["submit_to_done_ms"]["p99"], 2
            )
            if during["submit_to_done_ms"] and idle["submit_to_done_ms"]
            else None,
            "cpu_per_s_idle_phase": {
                n: round((after_idle[n][1] - before[n][1]) / idle_seconds, 3) for n in SERVICES
            },
            "cpu_per_s_flood_phase": {
                n: round((flood_after[n][1] - flood_before[n][1]) / flood_seconds, 3)
                for n in SERVICES
            },
            "connections_during_flood": connections,
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
    parser.add_argument("--hold", type=int, default=600, help="seconds a long workflow runs")
    parser.add_argument("--lag-rounds", type=int, default=5, help="events per long workflow")
    parser.add_argument(
        "--lag-gap", type=float, default=0.2, help="seconds between two workflows' events"
    )
    parser.add_argument("--embed-samples", type=int, default=1000, help="Embed calls per phase")
    parser.add_argument(
        "--connections", type=int, default=1000, help="extra connections, a call a second each"
    )
    parser.add_argument("--connection-seconds", type=float, default=10.0)
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
