"""Idle memory of each service as `aiwfe up` runs them: one process per service.

Starts `python -m aiwfe up` on free ports with a temporary home (the local PostgreSQL,
its own database), waits for the banner, lets start-up settle, reads each service's
VmRSS from /proc, and stops it. Goal (performance issue): ≤ 120 MB RSS each with the
built-in embedder.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

from aiwfe.app.embedded import free_port
from benchmarks import procstat, servers

SERVICES = ("gateway", "cognitive", "taskproc", "dataplatform")
GOAL_MB = 120.0


def _service_pids(launcher: int) -> dict[str, int]:
    found = {}
    for pid in procstat.children(launcher):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        for name in SERVICES:
            if name.encode() in cmdline:
                found[name] = pid
    return found


def run(admin_dsn: str = servers.DEFAULT_ADMIN_DSN, settle_seconds: float = 3.0) -> dict[str, Any]:
    database = f"aiwfe_bench_mem_{uuid.uuid4().hex[:8]}"
    servers.create_database(admin_dsn, database)
    home = tempfile.mkdtemp(prefix="aiwfe-mem-")
    env = {
        **os.environ,
        "AIWFE_HOME": home,
        "AIWFE_ADMIN_PASSWORD": uuid.uuid4().hex,
        "AIWFE_DATABASE__POSTGRES__DSN": servers.database_dsn(admin_dsn, database),
        "AIWFE_LOGGING__LEVEL": "WARNING",
        **{f"AIWFE_SERVICES__{n.upper()}__PORT": str(free_port()) for n in SERVICES},
        **{f"AIWFE_SERVICES__{n.upper()}__METRICS_PORT": str(free_port()) for n in SERVICES},
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "aiwfe", "up"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1)
            line = proc.stdout.readline() if ready else ""
            if line.startswith("Ctrl-C"):
                break
            if proc.poll() is not None:
                raise RuntimeError("aiwfe up exited before it was ready")
        time.sleep(settle_seconds)
        rss = {
            name: round(procstat.rss_mb(pid), 1) for name, pid in _service_pids(proc.pid).items()
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    return {
        "idle_rss_mb": rss,
        "goal_mb": GOAL_MB,
        "goal_met": bool(rss) and all(v <= GOAL_MB for v in rss.values()),
    }


if __name__ == "__main__":
    result = run()
    for name, mb in result["idle_rss_mb"].items():
        print(f"{name:13s} {mb:6.1f} MB")
    print(f"goal ≤ {GOAL_MB:.0f} MB each: {'met' if result['goal_met'] else 'NOT met'}")
