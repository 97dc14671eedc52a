"""The task functions `python -m benchmarks.workflows` serves with `aiwfe worker run
benchmarks.worker_tasks` (an SDK worker in a process of its own, so its CPU is its own)."""

from __future__ import annotations

import time
from typing import Any

from aiwfe.sdk import task


@task("bench_noop")
async def bench_noop(**_: Any) -> dict[str, Any]:
    """Does nothing but say when it was called (wall clock, for the dispatch latency)."""
    return {"received": time.time()}
