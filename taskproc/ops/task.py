"""`task`: a step run by an external worker (WorkerService, taskproc/tasks.py).

Its inputs are `queue` and `type` (literal names: the queue is a permission,
worker:queue:<queue>, and a column the store claims by), `input` (any JSON value, references
allowed) and optional `heartbeat_timeout_seconds`. The store hands such steps only to
workers polling their queue, never to taskproc's own workers; should one reach `run`
anyway, it fails for good rather than hang.
"""

from __future__ import annotations

import re
from typing import Any

from taskproc.ops import Op, StepContext, StepError, register

QUEUE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")  # no ':' or '*': a queue is a permission part
MAX_HEARTBEAT_SECONDS = 3600.0
_INPUTS = frozenset({"queue", "type", "input", "heartbeat_timeout_seconds"})


def name_problem(value: Any, what: str) -> str | None:
    """Why `value` is not a valid queue or task type name (None when it is)."""
    if not isinstance(value, str) or not QUEUE_NAME.fullmatch(value):
        return f"{what} must be 1-64 characters of A-Z a-z 0-9 . _ - (no references)"
    return None


def _check(inputs: dict[str, Any]) -> str | None:
    unknown = sorted(set(inputs) - _INPUTS)
    if unknown:
        return f"unknown task inputs {unknown}; known: {sorted(_INPUTS)}"
    problem = name_problem(inputs.get("queue"), "queue") or name_problem(inputs.get("type"), "type")
    if problem:
        return problem
    heartbeat = inputs.get("heartbeat_timeout_seconds", 30)
    if (
        not isinstance(heartbeat, int | float)
        or isinstance(heartbeat, bool)
        or not 1 <= heartbeat <= MAX_HEARTBEAT_SECONDS
    ):
        return f"heartbeat_timeout_seconds must be between 1 and {MAX_HEARTBEAT_SECONDS:g}"
    return None


async def _run(ctx: StepContext, inputs: dict[str, Any]) -> dict[str, Any]:
    raise StepError("task steps run on external workers (WorkerService)", retryable=False)


register(Op("task", _run, None, _check, check_with_references=True))
