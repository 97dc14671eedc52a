"""The data platform's other RPCs while its embedded vector engine works, engine in process vs
in its own process (`qdrant.engine_process`), same run.

    python -m benchmarks.vector_isolation [--points 60000] [--rounds 2] [--search-seconds 5]

qdrant-edge-py holds the GIL through its calls (a search, an update batch, a shard's load),
so in the data platform's process they stall its event loop. For each mode, alternated
`--rounds` times, dataplatform runs alone in a child process on a database of its own, and a
probe reads one cache entry (`GetCacheEntries`: a PostgreSQL point read, 0.9 ms idle) every
2 ms while the engine:

- **ingest**: takes `--points` 768-d points through `UpsertPoints` in 1,000-point calls (the
  RPC path optimizes every 10,000 points: an index build in a child, then the shard's load);
- **search**: answers two searchers calling `SearchPoints` back to back for
  `--search-seconds`;
- **first search after a restart**: loads the shard (dataplatform restarted on the same data).

It prints the probe's p50 / p99 / max in each phase beside its idle figures (the run's
anchor), the search rate and p50, and the CPU dataplatform (with its engine process) spent
per search. Figures are printed; nothing here is a timed test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np

from aiwfe.data.v1 import cache_store_service_pb2 as cache_pb
from aiwfe.data.v1 import cache_store_service_pb2_grpc as cache_grpc
from aiwfe.data.v1 import vector_store_service_pb2 as pb
from aiwfe.data.v1 import vector_store_service_pb2_grpc as pb_grpc
from aiwfe.runtime.identity import IDENTITY_METADATA_KEY, InternalIdentity
from benchmarks import procstat, servers
from benchmarks.dataplatform import serve

DIM = 768
BATCH = 1000
PROBE_EVERY = 0.002
COLLECTION = "isolation"


def _cpu(pid: int) -> float:
    """CPU seconds of `pid` and its live descendants (the engine process)."""
    return procstat.total_cpu_seconds([pid, *procstat.children(pid)])


def _ms(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "n": len(s),
        "p50": round(statistics.median(s), 2),
        "p99": round(s[int(0.99 * (len(s) - 1))], 2),
        "max": round(s[-1], 2),
    }


class _Probe:
    """GetCacheEntries every PROBE_EVERY seconds; latencies in ms since `reset()`."""

    def __init__(self, channel: grpc.aio.Channel, md: Any) -> None:
        self._stub = cache_grpc.CacheStoreServiceStub(channel)
        self._md = md
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._stub.SetCacheEntries(
            cache_pb.SetCacheEntriesRequest(
                entries=[cache_pb.CacheEntry(key="probe", value=b"x" * 64, ttl_seconds=3600)]
            ),
            metadata=self._md(),
            timeout=10,
        )
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        request = cache_pb.GetCacheEntriesRequest(keys=["probe"])
        while True:
            start = time.perf_counter()
            await self._stub.GetCacheEntries(request, metadata=self._md(), timeout=60)
            self.samples.append((time.perf_counter() - start) * 1000)
            await asyncio.sleep(PROBE_EVERY)

    def take(self) -> dict[str, float]:
        if self._task is not None and self._task.done():
            self._task.result()  # the probe failed: say why
        out, self.samples = _ms(self.samples), []
        return out

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@contextlib.asynccontextmanager
async def _serving(
    dsn: str, home: str, engine_process: bool, env: dict[str, str], md: Any
) -> AsyncIterator[tuple[int, Any, _Probe]]:
    """dataplatform in a child process on `home`, and a running probe of it: (its pid, a
    VectorStoreService stub, the probe)."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "benchmarks.vector_isolation", "--serve", dsn, home),
        *(["--engine-process"] if engine_process else []),
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert child.stdout is not None
        line = await child.stdout.readline()
        if not line:
            raise RuntimeError("dataplatform did not start")
        async with grpc.aio.insecure_channel(json.loads(line)["address"]) as channel:
            probe = _Probe(channel, md)
            await probe.start()
            try:
                yield child.pid, pb_grpc.VectorStoreServiceStub(channel), probe
            finally:
                await probe.stop()
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(child.wait(), 30)
        except TimeoutError:
            child.kill()
            await child.wait()


def _points(rng: np.random.Generator, start: int, n: int) -> list[pb.Point]:
    vectors = rng.standard_normal((n, DIM), dtype=np.float32)
    return [pb.Point(id=str(start + i), values=v.tolist()) for i, v in enumerate(vectors)]


async def _searches(stub: Any, md: Any, seconds: float, pid: int) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    queries = [q.tolist() for q in rng.standard_normal((200, DIM), dtype=np.float32)]
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def searcher(offset: int) -> None:
        i = offset
        while time.perf_counter() < deadline:
            request = pb.SearchPointsRequest(
                collection=COLLECTION, vector=queries[i % 200], top_k=10
            )
            start = time.perf_counter()
            await stub.SearchPoints(request, metadata=md(), timeout=60)
            latencies.append((time.perf_counter() - start) * 1000)
            i += 1

    cpu0, wall0 = _cpu(pid), time.perf_counter()
    await asyncio.gather(searcher(0), searcher(100))
    cpu, wall = _cpu(pid) - cpu0, time.perf_counter() - wall0
    return {
        "searches_per_s": round(len(latencies) / wall),
        "search_ms": _ms(latencies),
        "cpu_ms_per_search": round(cpu * 1000 / len(latencies), 3),
    }


async def _round(
    dsn: str, env: dict[str, str], engine_process: bool, points: int, search_s: float
) -> dict[str, Any]:
    identity = InternalIdentity(env[servers.INTERNAL_SECRET_ENV])

    def md() -> tuple[tuple[str, str], ...]:  # an assertion is short-lived: one per call
        return ((IDENTITY_METADATA_KEY, identity.assertion(None, "bench")),)

    out: dict[str, Any] = {"engine_process": engine_process}
    with tempfile.TemporaryDirectory(prefix="aiwfe-bench-vi-") as home:
        async with _serving(dsn, home, engine_process, env, md) as (pid, stub, probe):
            await asyncio.sleep(2)
            probe.take()  # warm-up
            await asyncio.sleep(2)
            out["idle"] = probe.take()
            collection = pb.Collection(name=COLLECTION, dimension=DIM)
            await stub.CreateCollection(
                pb.CreateCollectionRequest(collection=collection), metadata=md(), timeout=30
            )
            rng = np.random.default_rng(1)
            t0 = time.perf_counter()
            for start in range(0, points, BATCH):
                batch = _points(rng, start, min(BATCH, points - start))
                await stub.UpsertPoints(
                    pb.UpsertPointsRequest(collection=COLLECTION, points=batch),
                    metadata=md(),
                    timeout=600,
                )
            out["ingest_points_per_s"] = round(points / (time.perf_counter() - t0))
            out["ingest"] = probe.take()
            out["search"] = await _searches(stub, md, search_s, pid)
            out["search"]["probe"] = probe.take()
        # Restarted on the same data: its first search loads the shard.
        async with _serving(dsn, home, engine_process, env, md) as (pid, stub, probe):
            await asyncio.sleep(1)
            probe.take()
            t0 = time.perf_counter()
            await stub.SearchPoints(
                pb.SearchPointsRequest(collection=COLLECTION, vector=[1.0] * DIM, top_k=10),
                metadata=md(),
                timeout=600,
            )
            out["first_search_ms"] = round((time.perf_counter() - t0) * 1000, 1)
            await asyncio.sleep(0.05)
            out["load"] = probe.take()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.vector_isolation", description=__doc__
    )
    parser.add_argument("--points", type=int, default=60_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--search-seconds", type=float, default=5.0)
    parser.add_argument("--admin-dsn", default=servers.DEFAULT_ADMIN_DSN)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)  # child: DSN, home
    parser.add_argument("--engine-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        dsn, home = args.serve
        qdrant = {"engine_process": args.engine_process}
        servers._runner()(serve(dsn, home, qdrant=qdrant))
        return 0

    database = f"aiwfe_bench_vi_{uuid.uuid4().hex[:10]}"
    dsn = servers.database_dsn(args.admin_dsn, database)
    env = {
        **os.environ,
        servers.JWT_SECRET_ENV: secrets.token_urlsafe(32),
        servers.INTERNAL_SECRET_ENV: secrets.token_urlsafe(32),
        servers.ADMIN_PASSWORD_ENV: secrets.token_urlsafe(16),
    }
    servers.create_database(args.admin_dsn, database)
    rounds = []
    try:
        for _ in range(args.rounds):
            for engine_process in (False, True):
                rounds.append(
                    asyncio.run(_round(dsn, env, engine_process, args.points, args.search_seconds))
                )
    finally:
        servers.drop_database(args.admin_dsn, database)

    print(
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; "
        f"{args.points:,} points x {DIM} through UpsertPoints; probe: GetCacheEntries every "
        f"{PROBE_EVERY * 1000:.0f} ms (p50 / p99 / max ms)"
    )
    print(
        f"{'engine':12} {'idle (anchor)':>20} {'ingest':>24} {'search':>24}"
        f" {'first-search load':>24}"
    )
    for r in rounds:
        cells = [
            "/".join(f"{r[phase][k]:g}" for k in ("p50", "p99", "max"))
            for phase in ("idle", "ingest")
        ]
        cells.append("/".join(f"{r['search']['probe'][k]:g}" for k in ("p50", "p99", "max")))
        cells.append("/".join(f"{r['load'][k]:g}" for k in ("p50", "p99", "max")))
        mode = "own process" if r["engine_process"] else "in process"
        print(f"{mode:12} {cells[0]:>20} {cells[1]:>24} {cells[2]:>24} {cells[3]:>24}")
    for r in rounds:
        mode = "own process" if r["engine_process"] else "in process"
        s = r["search"]
        print(
            f"{mode:12} ingest {r['ingest_points_per_s']:,} points/s; search "
            f"{s['searches_per_s']}/s, p50 {s['search_ms']['p50']} ms, CPU "
            f"{s['cpu_ms_per_search']} ms per search; first search after restart "
            f"{r['first_search_ms']} ms"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rounds, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
