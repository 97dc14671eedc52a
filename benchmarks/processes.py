"""`python -m benchmarks.processes`: cached answers from the gateway run as 1 and as 2
processes on one port (`services.gateway.processes`), side by side.

    python -m benchmarks.processes [--rounds 3] [--seconds 5] [--connections 16] [--streams 64]

One `benchmarks.servers` process holds the back ends; two gateway groups are started on
them by `aiwfe up`'s own supervisor (aiwfe/app/launcher.py), one of 1 process and one of
2 on a port they share with SO_REUSEPORT. The load is h2load (nghttp2's C load generator,
one thread, so the client takes as little of the machine's cores as it can): the same
Embed request framed as gRPC on every stream, answered from the response cache by the
relay at the front (the warm-up fills each process's in-process cache), load shedding off
(capacity is measured, not refusals). Every run is made unpinned (the processes on any
core) and pinned (process i on core i, every thread, as `taskset -a -p`; h2load free).
Rounds alternate which group and which placement go first; `uptime` is printed beside
each run, as the machine is shared. The 2 vs 1 ratio is also projected
on idle cores from the CPU per call of the gateway and of h2load, which other load spoils
far less than it spoils throughput.

h2load counts HTTP status only, and gRPC answers 200 with its status in trailers: the
calls each process answered, and how, are read from the gateway's metrics endpoint (one
port for the group, `process` label per process) before and after each run, so a run
whose calls did not all end OK is reported as such. CPU per call is each gateway
process's CPU (from /proc) over the calls it answered, and h2load's over all calls;
per process also its user and system share, the cores it used, and its context switches
per 1,000 calls (voluntary: it waited for work; involuntary: the scheduler took its core).
The machine's anchors come first: the bare SKIP LOCKED rate, Embed direct to cognitive
at 1 in flight (p50), and a pure Python loop's throughput on 2 cores against 1 (each copy
pinned to its own core): the ratio no shared state limits, the machine's own ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import secrets
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

import grpc
import redis

from aiwfe.app.embedded import free_port
from aiwfe.app.launcher import Supervisor, stop_children
from aiwfe.runtime.config import LauncherSettings
from aiwfe.runtime.identity import IDENTITY_METADATA_KEY, InternalIdentity
from benchmarks import harness, load, overload, procstat, report, servers
from benchmarks.workflows import bare_skip_locked

METHOD = load.EMBED_METHOD
REDIS_URL = os.environ.get("AIWFE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
# Each run is made twice: processes free to run on any core, and each pinned to its own
# core (process i on core i, as `taskset -a -p`; h2load stays free).
PLACEMENTS = ("unpinned", "pinned")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


@dataclass
class Group:
    """One gateway of `processes` processes on one port, under the launcher's supervisor."""

    processes: int
    port: int
    metrics_port: int
    supervisor: Supervisor

    def pids(self) -> dict[str, int]:
        return {str(c.index): c.proc.pid for c in self.supervisor.children if c.proc}


def _gateway_env(server: harness.ServerProcess, port: int, metrics_port: int, n: int) -> dict:
    """The environment of a gateway on `server`'s back ends, as benchmarks.servers sets it."""
    env = {
        **os.environ,
        "JWT_SECRET_KEY": server.jwt_secret,
        "AIWFE_INTERNAL_SECRET_KEY": server.internal_secret,
        "AIWFE_AUTHENTICATION__RATE_LIMITING__API_REQUESTS": "1000000000",
        "AIWFE_REDIS__URL": REDIS_URL,
        "AIWFE_REDIS__KEY_PREFIX": f"aiwfe-bench:{secrets.token_hex(4)}:",
        "AIWFE_GRPC__SHUTDOWN_GRACE_SECONDS": "0.5",
        # Capacity is measured, not shedding: on a loaded machine 512 calls in flight can
        # push the adaptive limit down and turn calls into refusals (benchmarks.overload).
        "AIWFE_LOAD_SHEDDING__ENABLED": "false",
        "AIWFE_LOGGING__LEVEL": "WARNING",
        "AIWFE_SERVICES__GATEWAY__PORT": str(port),
        "AIWFE_SERVICES__GATEWAY__METRICS_PORT": str(metrics_port),
        "AIWFE_SERVICES__GATEWAY__PROCESSES": str(n),
    }
    for name in ("cognitive", "taskproc", "dataplatform"):
        env[f"AIWFE_SERVICES__{name.upper()}__PORT"] = server.address(name).rsplit(":", 1)[1]
    return env


def calls(group: Group) -> dict[tuple[str, str], float]:
    """(process, code) → Embed calls the group's processes have answered so far."""
    url = f"http://127.0.0.1:{group.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if not line.startswith("request_rate_counter_total{"):
            continue
        series, value = line.rsplit(" ", 1)
        labels = dict(_LABEL.findall(series))
        if labels.get("method") == METHOD:  # one process alone has no `process` label
            key = (labels.get("process", "0"), labels["code"])
            out[key] = out.get(key, 0.0) + float(value)
    return out


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def h2load(port: int, body: str, token: str, opts: argparse.Namespace, seconds: float) -> dict:
    """One h2load run; its req/s over the measured `seconds` and its own CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        [
            "h2load", "-t", "1", "-c", str(opts.connections), "-m", str(opts.streams),
            "-D", f"{seconds:g}", "--warm-up-time", "1", "-d", body,
            "-H", "content-type: application/grpc", "-H", "te: trailers",
            "-H", f"authorization: Bearer {token}",
            f"http://127.0.0.1:{port}{METHOD}",
        ],
        capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"h2load failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out.stdout)
    done = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", out.stdout)
    if rps is None or done is None:
        raise RuntimeError(f"unexpected h2load output:\n{out.stdout}\n{out.stderr}")
    return {"rps": float(rps.group(1)), "requests": int(done.group(2)), "cpu_s": cpu}


def redis_cpu_seconds() -> float:
    """CPU seconds the gateways' Redis has used (INFO cpu: its own threads)."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        info = client.info("cpu")
    finally:
        client.close()
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def measure(group: Group, body: str, token: str, opts: argparse.Namespace) -> dict[str, Any]:
    """One run on `group`: throughput, calls and CPU per process, uptime."""
    pids = group.pids()
    redis0 = redis_cpu_seconds()
    load_avg = uptime()
    cpu0 = {i: procstat.cpu_seconds(p) for i, p in pids.items()}
    use0 = {i: procstat.usage(p) for i, p in pids.items()}
    calls0 = calls(group)
    machine0 = procstat.machine_seconds()
    started = time.monotonic()
    run = h2load(group.port, body, token, opts, opts.seconds)
    wall = time.monotonic() - started
    machine1 = procstat.machine_seconds()
    redis1 = redis_cpu_seconds()
    calls1 = calls(group)
    cpu1 = {i: procstat.cpu_seconds(p) for i, p in pids.items()}
    use1 = {i: procstat.usage(p) for i, p in pids.items()}
    delta = {k: v - calls0.get(k, 0.0) for k, v in calls1.items() if v > calls0.get(k, 0.0)}
    ok = {i: delta.get((i, "OK"), 0.0) for i in pids}
    failed = {f"{i}:{code}": n for (i, code), n in delta.items() if code != "OK"}
    total = sum(ok.values())
    stats = {}
    for i in pids:
        used = {k: use1[i][k] - use0[i][k] for k in use0[i]}
        per = 1000 / ok[i] if ok[i] else 0.0
        stats[i] = {
            "cores": round((cpu1[i] - cpu0[i]) / wall, 3),
            "user_us_per_call": round(used["user_s"] * 1e3 * per, 2),
            "system_us_per_call": round(used["system_s"] * 1e3 * per, 2),
            "voluntary_switches_per_1000_calls": round(used["voluntary"] * per, 2),
            "involuntary_switches_per_1000_calls": round(used["involuntary"] * per, 2),
        }
    return {
        "uptime": load_avg,
        "rps": run["rps"],
        "calls_ok_by_process": {i: int(n) for i, n in ok.items()},
        "calls_not_ok": failed,
        "cpu_ms_per_call_by_process": {
            i: round((cpu1[i] - cpu0[i]) * 1000 / ok[i], 4) if ok[i] else None for i in pids
        },
        "process_stats": stats,
        "client_cpu_ms_per_call": round(run["cpu_s"] * 1000 / total, 4) if total else None,
        # Interrupt work (loopback TCP's receive side) per call, and the machine's idle
        # cores: what no process is charged for.
        "kernel_ms_per_call": round(
            sum(machine1[k] - machine0[k] for k in ("irq", "softirq")) * 1000 / total, 4
        )
        if total
        else None,
        "idle_cores": round((machine1["idle"] - machine0["idle"]) / wall, 2),
        # The API rate limit's exact sliding window: a sorted-set member per call.
        "redis_ms_per_call": round((redis1 - redis0) * 1000 / total, 4) if total else None,
        "machine_cores_by_kind": {
            k: round((machine1[k] - machine0[k]) / wall, 3) for k in machine0
        },
    }


def place(group: Group, pinned: bool) -> None:
    """Pins process i of `group` to core i (mod the cores), or lets it run on any."""
    cores = os.cpu_count() or 1
    for i, pid in group.pids().items():
        procstat.pin(pid, {int(i) % cores} if pinned else set(range(cores)))


def grpc_body(path: str) -> None:
    """The Embed request as one gRPC message frame (uncompressed), for h2load's -d."""
    message = load.embed_request()
    with open(path, "wb") as f:
        f.write(b"\0" + struct.pack(">I", len(message)) + message)


async def anchors(server: harness.ServerProcess) -> dict[str, Any]:
    """The machine's speed this session: bare SKIP LOCKED jobs/s, direct Embed p50."""
    dsn = servers.database_dsn(server.admin_dsn, server.database)
    bare = await bare_skip_locked(dsn, 5000)
    identity = InternalIdentity(server.internal_secret)
    metadata = ((IDENTITY_METADATA_KEY, identity.assertion(None, "bench")),)
    async with grpc.aio.insecure_channel(server.address("cognitive")) as direct:
        body = load.embed_request()
        await overload.drive(direct, metadata, body, 1, 0.5)
        outcome = await overload.drive(direct, metadata, body, 1, 2.0)
    return {
        "bare_skip_locked_jobs_per_s": bare["jobs_per_s"],
        "direct_embed_p50_ms": outcome.summary()["admitted_p50_ms"],
        "cpu_loop_2_vs_1": await asyncio.to_thread(procstat.cpu_loop_scaling),
    }


async def start_group(server: harness.ServerProcess, n: int, stop: asyncio.Event) -> Group:
    port, metrics_port = free_port(), free_port()
    supervisor = Supervisor(LauncherSettings(), _gateway_env(server, port, metrics_port, n), stop)
    if not await supervisor.start("gateway", n):
        raise RuntimeError("stopped while the gateway started")
    return Group(n, port, metrics_port, supervisor)


async def run(opts: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("h2load") is None:
        raise SystemExit("h2load is required (apt-get install nghttp2-client)")
    result: dict[str, Any] = {"machine": report.machine(), "options": vars(opts)}
    server = harness.ServerProcess(opts.admin_dsn)
    stop = asyncio.Event()
    groups: list[Group] = []
    with tempfile.TemporaryDirectory() as tmp:
        body = os.path.join(tmp, "embed.grpc")
        grpc_body(body)
        try:
            await asyncio.to_thread(server.start)
            result["anchors"] = await anchors(server)
            for n in (1, 2):
                groups.append(await start_group(server, n, stop))
            token = await harness._login(f"127.0.0.1:{groups[0].port}", server.admin_password)
            for group in groups:  # every process's in-process cache holds the answer
                await asyncio.to_thread(h2load, group.port, body, token, opts, 2.0)
            runs: dict[str, dict[int, list[dict[str, Any]]]] = {
                placement: {1: [], 2: []} for placement in PLACEMENTS
            }
            for r in range(opts.rounds):
                order = groups if r % 2 == 0 else groups[::-1]
                for placement in PLACEMENTS if r % 2 == 0 else PLACEMENTS[::-1]:
                    for group in order:
                        place(group, placement == "pinned")
                        print(
                            f"round {r + 1}: {group.processes} process(es), {placement} ...",
                            file=sys.stderr,
                        )
                        measured = await asyncio.to_thread(measure, group, body, token, opts)
                        runs[placement][group.processes].append(measured)
                        print(
                            f"  {measured['rps']:.0f} req/s  {measured['uptime']}", file=sys.stderr
                        )
            result["placements"] = {p: summary(runs[p]) for p in PLACEMENTS}
        finally:
            stop.set()
            for group in groups:
                await stop_children(group.supervisor.children)
            await asyncio.to_thread(server.stop)
    return result


def summary(runs: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    """One placement's runs, their 2 vs 1 ratios and the CPU per call they took."""
    ratios = [b["rps"] / a["rps"] for a, b in zip(runs[1], runs[2], strict=True)]
    gateway_ms = {
        str(n): round(
            statistics.median(
                v for run in rs for v in run["cpu_ms_per_call_by_process"].values() if v
            ),
            4,
        )
        for n, rs in runs.items()
    }
    client_ms = round(
        statistics.median(run["client_cpu_ms_per_call"] for rs in runs.values() for run in rs), 4
    )
    kernel_ms = round(
        statistics.median(run["kernel_ms_per_call"] for rs in runs.values() for run in rs), 4
    )
    redis_ms = round(
        statistics.median(run["redis_ms_per_call"] for rs in runs.values() for run in rs), 4
    )
    return {
        "runs": runs,
        "ratio_2_vs_1_by_round": [round(x, 3) for x in ratios],
        "ratio_2_vs_1_median": round(statistics.median(ratios), 3),
        "cpu_ms_per_call_median": gateway_ms,
        "client_cpu_ms_per_call_median": client_ms,
        "kernel_cpu_ms_per_call_median": kernel_ms,
        "projected_ratio_on_idle_cores": projected_ratio(gateway_ms, client_ms),
        "redis_cpu_ms_per_call_median": redis_ms,
        "projected_ratio_with_kernel": projected_ratio(
            gateway_ms, client_ms + kernel_ms + redis_ms
        ),
    }


def projected_ratio(gateway_ms: dict[str, float], client_ms: float) -> float:
    """2 vs 1 process throughput on idle cores, from CPU per call alone: N processes do at
    most N cores' worth of calls, and the gateway and what else each call costs the same
    cores (`client_ms`: h2load, and with the kernel's interrupt work too) at most all
    cores'. Load-independent where the measured ratio is not (a shared machine's other
    load). With 2 cores and g, c per call, the ceiling is 2g / (g + c): the cheaper the
    gateway's call against the rest, the lower."""
    cores = os.cpu_count() or 1

    def ceiling(n: int) -> float:
        per_call = gateway_ms[str(n)]
        return min(min(n, cores) / per_call, cores / (per_call + client_ms))

    return round(ceiling(2) / ceiling(1), 3)


def render(result: dict[str, Any]) -> str:
    a, m = result["anchors"], result["machine"]
    lines = [
        f"gateway processes: cached Embed answered at the front, h2load -t 1"
        f" -c {result['options']['connections']} -m {result['options']['streams']}",
        f"{m['date']}, {m['cores']} cores; anchors: bare SKIP LOCKED"
        f" {a['bare_skip_locked_jobs_per_s']:,} jobs/s, direct Embed p50"
        f" {a['direct_embed_p50_ms']} ms; a pure Python loop on 2 cores vs 1:"
        f" {a['cpu_loop_2_vs_1'].get('ratio', '-')}x (the machine's own ceiling)",
        "| placement | round | processes | req/s | calls by process | CPU us/call by process"
        " (user + system) | cores by process | switches per 1000 calls by process"
        " (voluntary / involuntary) | h2load CPU us/call | Redis CPU us/call"
        " | irq + softirq us/call | idle cores | not OK | load average |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for placement, s in result["placements"].items():
        for n, runs in s["runs"].items():
            for r, run in enumerate(runs, 1):
                stats = run["process_stats"]
                cpu = ", ".join(
                    f"{run['cpu_ms_per_call_by_process'][i] * 1000:.1f}"
                    f" ({p['user_us_per_call']:.1f} + {p['system_us_per_call']:.1f})"
                    if run["cpu_ms_per_call_by_process"][i]
                    else "-"
                    for i, p in stats.items()
                )
                cores = ", ".join(f"{p['cores']:.2f}" for p in stats.values())
                switches = ", ".join(
                    f"{p['voluntary_switches_per_1000_calls']:.1f}"
                    f" / {p['involuntary_switches_per_1000_calls']:.1f}"
                    for p in stats.values()
                )
                client = run["client_cpu_ms_per_call"]
                lines.append(
                    f"| {placement} | {r} | {n} | {run['rps']:,.0f} | {run['calls_ok_by_process']}"
                    f" | {cpu} | {cores} | {switches}"
                    f" | {client * 1000 if client else 0:.1f}"
                    f" | {(run['redis_ms_per_call'] or 0) * 1000:.1f}"
                    f" | {(run['kernel_ms_per_call'] or 0) * 1000:.1f} | {run['idle_cores']}"
                    f" | {run['calls_not_ok'] or 0}"
                    f" | {run['uptime'].split('load average: ')[-1]} |"
                )
    for placement, s in result["placements"].items():
        lines.append(
            f"{placement}: 2 vs 1 process throughput by round {s['ratio_2_vs_1_by_round']},"
            f" median {s['ratio_2_vs_1_median']}x (goal >= 1.6x); gateway CPU us per call,"
            " median over runs and processes: 1 process"
            f" {s['cpu_ms_per_call_median']['1'] * 1000:.1f}, 2 processes"
            f" {s['cpu_ms_per_call_median']['2'] * 1000:.1f};"
            f" h2load {s['client_cpu_ms_per_call_median'] * 1000:.1f};"
            f" irq + softirq {s['kernel_cpu_ms_per_call_median'] * 1000:.1f};"
            f" Redis {s['redis_cpu_ms_per_call_median'] * 1000:.1f};"
            f" 2 vs 1 projected on idle cores from them: {s['projected_ratio_on_idle_cores']}x"
            f" (gateway and h2load), {s['projected_ratio_with_kernel']}x (all of them)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--connections", type=int, default=16, help="h2load clients")
    parser.add_argument("--streams", type=int, default=64, help="streams per connection")
    parser.add_argument("--json", help="also write the JSON result here")
    parser.add_argument("--admin-dsn", default=servers.DEFAULT_ADMIN_DSN)
    opts = parser.parse_args(argv)
    result = asyncio.run(run(opts))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=2)
    print(render(result))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
