"""The gateway hop's own cost per call: CPU µs and system calls, robust on a shared machine.

    python -m benchmarks.hopcost [--calls 4000] [--rounds 3] [--strace] [--target cached]

Wall-clock latency ratios move with whatever else the machine runs; what the hop's process
spends per call moves much less. This starts the benchmark's server process (each service
in a process of its own, as `python -m benchmarks` does), sends a fixed number of the same
Embed calls (cache bypassed, as the `gateway` scenario does) at 32 and at 1 in flight, and
prints the target process's CPU µs per call (from /proc) and, with `--strace`, its system
calls per call by name (`strace -c -f -p PID` attached for another fixed number of calls;
ptrace slows the calls, so those rounds are not timed). With `--callgrind` the gateway
runs under `valgrind --tool=callgrind`, instrumented only while the calls are made: its
instructions per call in user space, the same whatever else the machine does.
`--target cached` sends the calls without bypassing the response cache: after the first,
each is answered by the gateway's relay from its in-process cache (what
`python -m benchmarks.processes` loads), so the figures are that path's cost per call.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")  # as benchmarks/__main__.py

import grpc

from aiwfe.runtime.identity import IDENTITY_METADATA_KEY, InternalIdentity
from benchmarks import harness, load, procstat, servers

Metadata = tuple[tuple[str, str], ...]
_STRACE_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")


async def _calls(channel: grpc.aio.Channel, metadata: Metadata, n: int, concurrency: int) -> float:
    """`n` Embed calls, `concurrency` in flight; returns the p50 latency in ms."""
    call = channel.unary_unary(load.EMBED_METHOD)
    request = load.embed_request()
    left = n
    latencies: list[int] = []

    async def loop() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            t0 = time.perf_counter_ns()
            await call(request, metadata=metadata, timeout=load.CALL_TIMEOUT_S)
            latencies.append(time.perf_counter_ns() - t0)

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return statistics.median(latencies) / 1e6


def _user_system(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of `pid` so far."""
    with open(f"/proc/{pid}/stat") as stat:
        text = stat.read()
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) / procstat.CLOCK_TICKS, int(fields[12]) / procstat.CLOCK_TICKS


def _strace_counts(path: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    with open(path) as summary:
        for line in summary:
            match = _STRACE_ROW.match(line)
            if match and match.group(2) != "total":
                counts[match.group(2)] += int(match.group(1))
    return counts


async def _traced(
    pid: int, channel: grpc.aio.Channel, metadata: Metadata, n: int, concurrency: int
) -> Counter[str]:
    with tempfile.NamedTemporaryFile(prefix="hopcost-strace-", suffix=".txt") as out:
        tracer = await asyncio.create_subprocess_exec(
            "strace", "-c", "-f", "-p", str(pid), "-o", out.name, stderr=subprocess.DEVNULL
        )
        await asyncio.sleep(1.0)  # attached to every thread
        await _calls(channel, metadata, n, concurrency)
        tracer.send_signal(signal.SIGINT)
        await asyncio.wait_for(tracer.wait(), 10)
        return _strace_counts(out.name)


def _callgrind(pid: int, *option: str) -> None:
    subprocess.run(["callgrind_control", *option, str(pid)], check=True, capture_output=True)


async def _instructions(
    pid: int, out_dir: str, channel: grpc.aio.Channel, metadata: Metadata, n: int, c: int
) -> tuple[int, int]:
    """User-space instructions the (callgrind-run) process spends on `n` calls: in all,
    and under libuv's socket reads (the relay's work per call: what timers and background
    tasks do, such as renewing quota leases, runs elsewhere and moves with the clock)."""
    before = set(os.listdir(out_dir))
    _callgrind(pid, "-z")
    _callgrind(pid, "-i", "on")
    await _calls(channel, metadata, n, c)
    _callgrind(pid, "-i", "off")
    _callgrind(pid, "-d")
    return _dumped_total(out_dir, set(os.listdir(out_dir)) - before)


def _dumped_total(out_dir: str, names: set[str]) -> tuple[int, int]:
    total = reads = 0
    for name in names:
        annotated = subprocess.run(
            ["callgrind_annotate", "--inclusive=yes", os.path.join(out_dir, name)],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        for line in annotated.splitlines():
            count = line.lstrip().split(" ", 1)[0].replace(",", "")  # right-aligned
            if "PROGRAM TOTALS" in line:
                total += int(count)
            elif "stream.c:uv__read [" in line:
                reads += int(count)
    return total, reads


async def _run(args: argparse.Namespace) -> None:
    extra: dict[str, str] = {}
    out_dir = ""
    if args.callgrind:
        out_dir = tempfile.mkdtemp(prefix="hopcost-callgrind-")
        extra[servers.GATEWAY_WRAPPER_ENV] = (
            "valgrind --tool=callgrind --instr-atstart=no "
            f"--callgrind-out-file={out_dir}/callgrind.out.%p"
        )
    server = harness.ServerProcess(args.admin_dsn, extra)
    server.start(timeout=900 if args.callgrind else 90)
    try:
        if args.target == "direct":
            identity = InternalIdentity(server.internal_secret)
            metadata: Metadata = ((IDENTITY_METADATA_KEY, identity.assertion(None, "bench")),)
            address, pid = server.address("cognitive"), server.info["service_pids"]["cognitive"]
        else:
            token = await harness._login(server.address("gateway"), server.admin_password)
            metadata = (("authorization", f"Bearer {token}"),)
            if args.target == "gateway":  # `cached`: answered from the response cache
                metadata += (("cache-control", "no-store"),)
            address, pid = server.address("gateway"), server.info["service_pids"]["gateway"]
        async with grpc.aio.insecure_channel(address) as channel:
            await load.preflight(channel, metadata)
            # Under callgrind the gateway is slow: more than 8 in flight would be shed.
            high = 8 if args.callgrind else 32
            await _calls(channel, metadata, args.calls // 2, high)
            if args.callgrind:
                for concurrency in (high, 1):
                    n = args.calls if concurrency > 1 else args.calls // 4
                    instructions = [
                        await _instructions(pid, out_dir, channel, metadata, n, concurrency)
                        for _ in range(args.rounds)
                    ]
                    shown = ", ".join(f"{t / n / 1000:.0f}" for t, _ in instructions)
                    reads = ", ".join(f"{r / n / 1000:.0f}" for _, r in instructions)
                    print(
                        f"{args.target} at {concurrency:2d} in flight: k instructions/call "
                        f"{shown}; under socket reads {reads}"
                    )
                print(f"callgrind dumps in {out_dir}")
                return
            rows: dict[int, list[tuple[float, float, float]]] = {32: [], 1: []}
            for _ in range(args.rounds):
                for concurrency in (32, 1):
                    n = args.calls if concurrency > 1 else args.calls // 4
                    user0, system0 = _user_system(pid)
                    p50 = await _calls(channel, metadata, n, concurrency)
                    user1, system1 = _user_system(pid)
                    rows[concurrency].append(
                        ((user1 - user0) / n * 1e6, (system1 - system0) / n * 1e6, p50)
                    )
            for concurrency, found in rows.items():
                cpus = ", ".join(f"{u + s:.0f} ({u:.0f}+{s:.0f})" for u, s, _ in found)
                p50s = ", ".join(f"{p50:.3f}" for _, _, p50 in found)
                median = statistics.median(u + s for u, s, _ in found)
                print(
                    f"{args.target} at {concurrency:2d} in flight: CPU µs/call (user+system) "
                    f"{cpus}, median {median:.0f}; p50 ms {p50s}"
                )
            if args.py_spy:
                for concurrency in (32, 1):
                    n = args.calls * 3 if concurrency > 1 else args.calls // 2
                    path = f"{args.py_spy}.{concurrency}.txt"
                    spy = await asyncio.create_subprocess_exec(
                        "py-spy", "record", "--nonblocking", "-r", "250", "-f", "raw",
                        "-o", path, "-p", str(pid),
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )  # fmt: skip
                    await asyncio.sleep(1.0)
                    await _calls(channel, metadata, n, concurrency)
                    spy.send_signal(signal.SIGINT)
                    await asyncio.wait_for(spy.wait(), 30)
                    print(f"py-spy profile at {concurrency} in flight: {path}")
            if args.strace:
                for concurrency in (32, 1):
                    n = args.calls if concurrency > 1 else args.calls // 4
                    counts = await _traced(pid, channel, metadata, n, concurrency)
                    total = sum(counts.values())
                    top = ", ".join(
                        f"{name} {count / n:.2f}" for name, count in counts.most_common(8)
                    )
                    print(
                        f"{args.target} at {concurrency:2d} in flight: "
                        f"{total / n:.2f} syscalls/call ({top})"
                    )
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hopcost", description=__doc__)
    parser.add_argument("--calls", type=int, default=4000, help="calls per round at 32 in flight")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--strace", action="store_true", help="count system calls per call")
    parser.add_argument(
        "--callgrind", action="store_true", help="instructions per call (gateway under callgrind)"
    )
    parser.add_argument("--py-spy", help="write py-spy's raw profiles to this path prefix")
    parser.add_argument("--target", choices=("gateway", "cached", "direct"), default="gateway")
    parser.add_argument("--admin-dsn", default=servers.DEFAULT_ADMIN_DSN)
    args = parser.parse_args(argv)
    runner: Any = asyncio.run
    runner(_run(args))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
