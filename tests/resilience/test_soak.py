"""Soak: a bounded mixed load through the gateway of `aiwfe up` (four service processes) from
several concurrent clients — login, Embed, IndexDocuments + Search, submit + watch workflow.

Asserts zero unexpected errors and bounded RSS growth of every service after warm-up, and
reports requests, errors, p50/p99 per RPC and RSS per service (printed; also written as JSON
to $AIWFE_SOAK_REPORT when set). $AIWFE_SOAK_SECONDS sets the load time (default 45).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from aiwfe.app.embedded import free_port
from aiwfe.cognitive.v1 import cognitive_service_pb2 as cog_pb
from aiwfe.cognitive.v1 import cognitive_service_pb2_grpc as cog_grpc
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from aiwfe.taskproc.v1 import workflow_service_pb2_grpc as wf_grpc
from tests.conftest import ADMIN_PASSWORD, bearer, login
from tests.taskproc.helpers import spec

pytestmark = pytest.mark.slow

SERVICES = ("dataplatform", "cognitive", "taskproc", "gateway")
CLIENTS = 6
WARMUP_SECONDS = 10.0
RSS_GROWTH_LIMIT_MB = 50.0
# Rate limits are lifted (see the fixture); a refusal is still counted, apart from errors.
EXPECTED = {grpc.StatusCode.RESOURCE_EXHAUSTED}


def rss_mb(pid: int) -> float:
    """Resident set size of a process from /proc/<pid>/status, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def service_pids(launcher: int) -> dict[str, int]:
    """The launcher's children by service name (`python -m <service>`)."""
    found = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line
            )
            cmdline = (status.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(fields.get("PPid", "0").strip()) == launcher and b"-m" in cmdline:
            found[cmdline[cmdline.index(b"-m") + 1].decode()] = int(status.parent.name)
    return found


@pytest.fixture
def soak_up(database_dsn: str, tmp_path: Path) -> Iterator[tuple[int, dict[str, int]]]:
    """`aiwfe up` on free ports with the machine's Redis, its own key prefix, INFO logs and
    per-user limits far above what the load makes; yields the gateway port and service pids."""
    ports = {name: free_port() for name in SERVICES}
    env = {
        **os.environ,
        "AIWFE_HOME": str(tmp_path / "home"),
        "AIWFE_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "AIWFE_DATABASE__POSTGRES__DSN": database_dsn,
        "AIWFE_REDIS__KEY_PREFIX": f"aiwfe-soak:{uuid.uuid4().hex[:8]}:",
        "AIWFE_AUTHENTICATION__RATE_LIMITING__API_REQUESTS": "1000000",
        # Every client logs in as admin, concurrently: each login reserves a failure first.
        "AIWFE_AUTHENTICATION__RATE_LIMITING__LOGIN_ATTEMPTS": "1000",
        "AIWFE_AUTHENTICATION__RATE_LIMITING__LOGIN_ATTEMPTS_PER_ADDRESS": "1000",
        "AIWFE_LOGGING__LEVEL": "WARNING",
        **{f"AIWFE_SERVICES__{n.upper()}__PORT": str(p) for n, p in ports.items()},
        **{f"AIWFE_SERVICES__{n.upper()}__METRICS_PORT": "null" for n in ports},
    }
    log = (tmp_path / "services.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "aiwfe", "up"],
        env=env, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        until = time.monotonic() + 90
        for line in proc.stdout:  # the banner ends with the Ctrl-C hint
            if line.startswith("Ctrl-C"):
                break
            assert time.monotonic() < until, "aiwfe up not ready"
        pids = service_pids(proc.pid)
        assert set(pids) == set(SERVICES), pids
        yield ports["gateway"], pids
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()


class Tally:
    """Latencies and outcomes per RPC."""

    def __init__(self) -> None:
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.codes: Counter[tuple[str, str]] = Counter()
        self.unexpected: list[str] = []

    async def timed(self, rpc: str, call: Awaitable[Any]) -> Any:
        """Awaits `call` (started just now), recording its latency or its status code."""
        started = time.perf_counter()
        try:
            result = await call
        except grpc.aio.AioRpcError as exc:
            self.codes[rpc, exc.code().name] += 1
            if exc.code() not in EXPECTED:
                self.unexpected.append(f"{rpc}: {exc.code().name} {exc.details()}")
            return None
        self.latencies[rpc].append(time.perf_counter() - started)
        self.codes[rpc, "OK"] += 1
        return result

    def summary(self) -> dict[str, Any]:
        out = {}
        for rpc, values in sorted(self.latencies.items()):
            values = sorted(values)
            out[rpc] = {
                "ok": len(values),
                "p50_ms": round(1000 * values[len(values) // 2], 2),
                "p99_ms": round(1000 * values[min(len(values) - 1, int(len(values) * 0.99))], 2),
            }
        return out


async def _drain(stream: Any) -> list[Any]:
    """Every message of a server stream."""
    return [item async for item in stream]


async def client_loop(
    n: int, channel: grpc.aio.Channel, tally: Tally, stop_at: float, rng: random.Random
) -> None:
    """One client: mostly Embed (a small text pool, so hits and misses), some index+search,
    some workflows submitted and watched to the end, and an occasional fresh login."""
    token = await tally.timed("Login", login(channel))
    assert token, tally.unexpected
    cognitive = cog_grpc.CognitiveServiceStub(channel)
    workflows = wf_grpc.WorkflowServiceStub(channel)
    md = bearer(token)
    collection = f"soak-{n}"
    indexed = 0
    while time.monotonic() < stop_at:
        pick = rng.random()
        if pick < 0.5:
            text = f"soak text {rng.randrange(200)}"
            await tally.timed(
                "Embed",
                cognitive.Embed(cog_pb.EmbedRequest(texts=[text]), metadata=md, timeout=30),
            )
        elif pick < 0.7:
            doc = cog_pb.Document(
                id=f"d{indexed % 50}", text=f"document {indexed} about {rng.random()}"
            )
            indexed += 1
            await tally.timed(
                "IndexDocuments",
                cognitive.IndexDocuments(
                    cog_pb.IndexDocumentsRequest(collection=collection, documents=[doc]),
                    metadata=md,
                    timeout=30,
                ),
            )
            await tally.timed(
                "Search",
                cognitive.Search(
                    cog_pb.SearchRequest(collection=collection, query="document about", top_k=5),
                    metadata=md,
                    timeout=30,
                ),
            )
        elif pick < 0.97:
            submitted = await tally.timed(
                "SubmitWorkflow",
                workflows.SubmitWorkflow(
                    wf_pb.SubmitWorkflowRequest(
                        spec=spec(
                            {"name": "a", "op": "noop"},
                            {"name": "b", "op": "noop", "depends_on": ["a"]},
                        )
                    ),
                    metadata=md,
                    timeout=30,
                ),
            )
            if submitted is not None:
                request = wf_pb.WatchWorkflowRequest(workflow_id=submitted.workflow.workflow_id)
                stream = workflows.WatchWorkflow(request, metadata=md, timeout=60)
                events = await tally.timed("WatchWorkflow", _drain(stream))
                if events is not None:
                    assert events[-1].workflow_state == wf_pb.WORKFLOW_STATE_SUCCEEDED, events[-1]
        else:
            fresh = await tally.timed("Login", login(channel))
            if fresh:
                md = bearer(fresh)


async def test_soak_mixed_load_no_errors_bounded_rss(soak_up) -> None:
    """Mixed load from 6 clients for a fixed time: no unexpected error, every watched workflow
    succeeds, and no service's RSS grows more than 50 MB after a warm-up."""
    port, pids = soak_up
    seconds = float(os.environ.get("AIWFE_SOAK_SECONDS", "45"))
    rss_start = {name: rss_mb(pid) for name, pid in pids.items()}
    warmup, tally = Tally(), Tally()
    started = time.monotonic()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        rngs = [random.Random(i) for i in range(CLIENTS)]
        warm_until = started + WARMUP_SECONDS
        await asyncio.gather(
            *(client_loop(i, channel, warmup, warm_until, rngs[i]) for i in range(CLIENTS))
        )
        rss_warm = {name: rss_mb(pid) for name, pid in pids.items()}
        load_started = time.monotonic()
        await asyncio.gather(
            *(
                client_loop(i, channel, tally, load_started + seconds, rngs[i])
                for i in range(CLIENTS)
            )
        )
        elapsed = time.monotonic() - load_started
    rss_end = {name: rss_mb(pid) for name, pid in pids.items()}
    requests = sum(tally.codes.values())
    refused = sum(
        n
        for t in (warmup, tally)
        for (_, code), n in t.codes.items()
        if code == "RESOURCE_EXHAUSTED"
    )
    report = {
        "clients": CLIENTS,
        "warmup_seconds": WARMUP_SECONDS,
        "warmup_requests": sum(warmup.codes.values()),
        "load_seconds": round(elapsed, 1),
        "requests": requests,
        "unexpected_errors": len(warmup.unexpected) + len(tally.unexpected),
        "rate_limited": refused,
        "per_rpc": tally.summary(),
        "rss_mb": {
            name: {
                "start": round(rss_start[name], 1),
                "after_warmup": round(rss_warm[name], 1),
                "end": round(rss_end[name], 1),
                "growth_after_warmup": round(rss_end[name] - rss_warm[name], 1),
            }
            for name in SERVICES
        },
    }
    print("\nsoak report:", json.dumps(report, indent=2))
    if path := os.environ.get("AIWFE_SOAK_REPORT"):
        await asyncio.to_thread(Path(path).write_text, json.dumps(report, indent=2))
    assert warmup.unexpected + tally.unexpected == [], (warmup.unexpected + tally.unexpected)[:10]
    assert requests > 100  # the load really ran
    for name in SERVICES:
        assert report["rss_mb"][name]["growth_after_warmup"] < RSS_GROWTH_LIMIT_MB, report
