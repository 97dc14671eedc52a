"""Task functions the external-worker tests serve, in process or with `aiwfe worker run
tests.workers.worker_tasks` in a subprocess. A subprocess reports what it runs as JSON
lines on stdout (the test reads the task token of a worker it kills from there)."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from aiwfe.sdk import current_task, task


def _report(event: str, **fields: Any) -> None:
    info = current_task()
    line = {"event": event, "token": info.task_token, "queue": info.queue,
            "workflow_id": info.workflow_id, "attempt": info.attempt, **fields}  # fmt: skip
    print(json.dumps(line), flush=True)
    sys.stdout.flush()


@task("summarize")
async def summarize(text: str, max_words: int = 50) -> dict[str, Any]:
    """The first `max_words` words of `text`."""
    return {"summary": " ".join(text.split()[:max_words])}


@task("shout")
def shout(text: str) -> str:
    """Sync: the text upper-cased (a non-dict return becomes {"result": ...})."""
    return text.upper()


@task("first_attempt_hangs")
async def first_attempt_hangs(seconds: float = 3600) -> dict[str, Any]:
    """Attempt 1 reports its token and hangs; later attempts return their number."""
    attempt = current_task().attempt
    _report("started")
    if attempt == 1:
        await asyncio.sleep(seconds)
    return {"attempt": attempt}


@task("nap")
async def nap(seconds: float) -> dict[str, Any]:
    """Sleeps `seconds`, then returns the attempt that slept."""
    _report("started", seconds=seconds)
    await asyncio.sleep(seconds)
    return {"slept": seconds, "attempt": current_task().attempt}
