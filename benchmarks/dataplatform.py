"""Data platform point reads: through the RPC vs the same query with psycopg, same run.

    python -m benchmarks.dataplatform [--n 3000] [--dsn-base postgresql://postgres@127.0.0.1:6432/postgres]

Starts dataplatform alone in a child process (uvloop, as in production) on a database of its
own, then times sequential point reads from this process:

- ``rpc GetUser``: UserStoreService.GetUser by username over gRPC on loopback;
- ``rpc GetCacheEntries``: CacheStoreService.GetCacheEntries of one key;
- ``psycopg pool (as the service)``: the GetUser query through dataplatform's own
  `Database.autocommit()` (psycopg_pool, autocommit read), exactly as the servicer runs it;
- ``psycopg autocommit``: the same query on one autocommit connection (the floor).

Goal: p50 <= 1 ms through the RPC (the design's seed target for a database query: 40 ms).
``--dsn-base`` points the service and the psycopg runs at another server, e.g. PgBouncer.
Figures are printed; nothing here is a timed test.
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
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import psycopg
from psycopg.rows import dict_row

from aiwfe.data.v1 import cache_store_service_pb2 as cache_pb
from aiwfe.data.v1 import cache_store_service_pb2_grpc as cache_grpc
from aiwfe.data.v1 import user_store_service_pb2 as user_pb
from aiwfe.data.v1 import user_store_service_pb2_grpc as user_grpc
from aiwfe.runtime.config import PostgresSettings
from aiwfe.runtime.identity import IDENTITY_METADATA_KEY, InternalIdentity
from benchmarks import servers
from dataplatform.db import Database

_USER_QUERY = (
    "SELECT user_id, username, password_hash, roles, disabled, created_at, updated_at"
    " FROM users WHERE username = %s"
)


async def serve(dsn: str, home: str, **overrides: Any) -> None:
    """Child: dataplatform alone on a free port, its home `home` and `overrides` on top of
    the benchmarks' settings; prints its address; runs until SIGTERM."""
    from aiwfe.runtime.config import load_settings
    from aiwfe.runtime.server import start_service
    from dataplatform.service import DataPlatformService

    settings = load_settings(env={}, overrides={**servers._overrides(home, dsn), **overrides})
    running = await start_service(DataPlatformService(settings), "127.0.0.1", 0)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print(json.dumps({"address": running.address}), flush=True)
    await stop.wait()
    await running.stop(grace=0.5)


async def _serve(dsn: str) -> None:
    with tempfile.TemporaryDirectory(prefix="aiwfe-bench-dp-") as home:
        await serve(dsn, home)


async def _time(call: Callable[[], Awaitable[Any]], n: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        await call()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return {
        "p50_ms": round(statistics.median(samples), 3),
        "p95_ms": round(samples[int(0.95 * (n - 1))], 3),
        "p99_ms": round(samples[int(0.99 * (n - 1))], 3),
        "mean_ms": round(statistics.fmean(samples), 3),
    }


async def measure(address: str, dsn: str, internal_secret: str, n: int) -> dict[str, Any]:
    """Runs every phase against the started service and `dsn`; returns the figures."""
    warmup = max(50, n // 10)
    md = ((IDENTITY_METADATA_KEY, InternalIdentity(internal_secret).assertion(None, "bench")),)
    results: dict[str, Any] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        users = user_grpc.UserStoreServiceStub(channel)
        cache = cache_grpc.CacheStoreServiceStub(channel)
        await cache.SetCacheEntries(
            cache_pb.SetCacheEntriesRequest(
                entries=[cache_pb.CacheEntry(key="bench:key", value=b"x" * 3072, ttl_seconds=600)]
            ),
            metadata=md,
            timeout=10,
        )
        get_user = user_pb.GetUserRequest(username=servers.ADMIN_USERNAME)
        get_cache = cache_pb.GetCacheEntriesRequest(keys=["bench:key"])
        results["rpc GetUser"] = await _time(
            lambda: users.GetUser(get_user, metadata=md, timeout=5), n, warmup
        )
        results["rpc GetCacheEntries"] = await _time(
            lambda: cache.GetCacheEntries(get_cache, metadata=md, timeout=5), n, warmup
        )

    db = Database(dsn, PostgresSettings(pool_size=1, max_overflow=0))
    await db.open()
    try:

        async def pooled() -> None:
            async with db.autocommit() as conn:
                cur = await conn.execute(_USER_QUERY, (servers.ADMIN_USERNAME,))
                await cur.fetchone()

        results["psycopg pool (as the service)"] = await _time(pooled, n, warmup)
    finally:
        await db.close()

    kwargs = {"prepare_threshold": None, "row_factory": dict_row}
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True, **kwargs) as conn:

        async def autocommit() -> None:
            cur = await conn.execute(_USER_QUERY, (servers.ADMIN_USERNAME,))
            await cur.fetchone()

        results["psycopg autocommit"] = await _time(autocommit, n, warmup)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dataplatform", description=__doc__)
    parser.add_argument("--n", type=int, default=3000, help="timed calls per phase")
    parser.add_argument("--admin-dsn", default=servers.DEFAULT_ADMIN_DSN)
    parser.add_argument(
        "--dsn-base",
        help="a DSN on the server the service uses (default: the admin DSN)",
    )
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # child mode: the DSN to serve
    args = parser.parse_args(argv)
    if args.serve:
        servers._runner()(_serve(args.serve))
        return 0

    database = f"aiwfe_bench_dp_{uuid.uuid4().hex[:10]}"
    dsn = servers.database_dsn(args.dsn_base or args.admin_dsn, database)
    env = {
        **os.environ,
        servers.JWT_SECRET_ENV: secrets.token_urlsafe(32),
        servers.INTERNAL_SECRET_ENV: secrets.token_urlsafe(32),
        servers.ADMIN_PASSWORD_ENV: secrets.token_urlsafe(16),
    }
    servers.create_database(args.admin_dsn, database)
    child = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.dataplatform", "--serve", dsn],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        if not line:
            print("dataplatform did not start", file=sys.stderr)
            return 1
        address = json.loads(line)["address"]
        results = asyncio.run(measure(address, dsn, env[servers.INTERNAL_SECRET_ENV], args.n))
    finally:
        child.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=10)
        if child.poll() is None:
            child.kill()
        servers.drop_database(args.admin_dsn, database)

    server = dsn.rsplit("/", 1)[0].split("@")[-1]
    print(f"data platform point reads, {args.n} sequential calls each, PostgreSQL at {server}")
    print(f"{'phase':32} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for phase, r in results.items():
        cells = " ".join(f"{r[k]:8.3f}" for k in ("p50_ms", "p95_ms", "p99_ms", "mean_ms"))
        print(f"{phase:32} {cells}")
    rpc = results["rpc GetUser"]["p50_ms"]
    print(f"goal p50 <= 1 ms via RPC: {'met' if rpc <= 1.0 else 'NOT met'} ({rpc} ms)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"server": server, "n": args.n, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
