"""CPU time and memory of other processes, read from /proc (Linux only)."""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds `pid` has used so far (all its threads)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may contain spaces and parentheses: split after its closing one.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLOCK_TICKS


def machine_seconds() -> dict[str, float]:
    """The machine's CPU seconds so far by kind, all cores together (/proc/stat). softirq
    is where loopback TCP's receive side runs: charged to no process."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    return {n: int(v) / CLOCK_TICKS for n, v in zip(names, fields, strict=False)}


def total_cpu_seconds(pids: list[int]) -> float:
    """Summed CPU seconds of `pids` (a process that has gone counts as zero)."""
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def rss_mb(pid: int) -> float:
    """Resident set size of `pid` in MB (MiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def children(pid: int) -> list[int]:
    """Direct children of `pid` (nginx workers under their master)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        return [int(p) for p in text.split()]
    except FileNotFoundError:
        pass
    # Kernels without CONFIG_PROC_CHILDREN: scan every process's parent id.
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def usage(pid: int) -> dict[str, float]:
    """User and system CPU seconds and context switches (voluntary: it waited; involuntary:
    the scheduler took its core away) of `pid`, summed over its threads."""
    total = {"user_s": 0.0, "system_s": 0.0, "voluntary": 0.0, "involuntary": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            status = (task / "status").read_text()
        except (FileNotFoundError, ProcessLookupError):  # a thread that ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total["user_s"] += int(fields[11]) / CLOCK_TICKS
        total["system_s"] += int(fields[12]) / CLOCK_TICKS
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                total["voluntary"] += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                total["involuntary"] += int(line.split()[1])
    return total


def pin(pid: int, cpus: set[int]) -> None:
    """Lets every thread of `pid` run on `cpus` only (as `taskset -a -p`)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task.name), cpus)


_SPIN = """
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
n, start = 0, time.perf_counter()
while time.perf_counter() - start < float(sys.argv[2]):
    for _ in range(10000):
        n += 1
print(n / (time.perf_counter() - start))
"""


def cpu_loop_scaling(seconds: float = 2.0) -> dict[str, float]:
    """The machine's own ceiling for N processes: a pure Python loop's rate on one core,
    alone, and the sum of two at once on two cores (each pinned to its own), as a ratio.
    What no shared state limits; two vCPUs that are one core's hyperthreads give ~1.2x."""

    def spin(cpus: list[int]) -> float:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _SPIN, str(cpu), str(seconds)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for cpu in cpus
        ]
        return sum(float(p.communicate()[0]) for p in procs)

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return {}
    one = statistics.median(spin(cores[:1]) for _ in range(3))
    two = statistics.median(spin(cores[:2]) for _ in range(3))
    return {"loop_per_s_1": round(one), "loop_per_s_2": round(two), "ratio": round(two / one, 3)}
