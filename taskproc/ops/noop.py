"""`noop`: a deterministic step for tests and benchmarks (sleep, fail on demand, echo)."""

from __future__ import annotations

import asyncio
from typing import Any

from taskproc.ops import StepContext, StepError, op

MAX_NOOP_SLEEP_MS = 600_000


def _number(inputs: dict[str, Any], key: str, maximum: float) -> str | None:
    value = inputs.get(key, 0)
    if not isinstance(value, int | float) or isinstance(value, bool):
        return f"{key} must be a number"
    if not 0 <= value <= maximum:
        return f"{key} must be between 0 and {maximum:g}"
    return None


def _check_noop(inputs: dict[str, Any]) -> str | None:
    return _number(inputs, "sleep_ms", MAX_NOOP_SLEEP_MS) or _number(inputs, "fail_times", 1000)


@op("noop", frozenset({"echo", "attempt", "worker"}), _check_noop)
async def noop(ctx: StepContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """Sleeps `sleep_ms`, fails (retryably) while attempt <= `fail_times`, or for good when
    `fail` is "permanent"; echoes `echo`."""
    sleep_ms = float(inputs.get("sleep_ms", 0))
    if sleep_ms:
        await asyncio.sleep(sleep_ms / 1000)
    if inputs.get("fail") == "permanent":
        raise StepError("noop asked to fail permanently", retryable=False)
    if ctx.attempt <= int(inputs.get("fail_times", 0)):
        raise StepError(f"noop failing attempt {ctx.attempt} as asked")
    return {"echo": inputs.get("echo"), "attempt": ctx.attempt, "worker": ctx.worker_id}
