"""`sleep` and `wait_for_signal`: steps no worker runs.

Both wait in the database, not in memory: dataplatform's timer loop completes a `sleep`
when its timer is due, and hands a `wait_for_signal` the oldest signal of its name sent with
SignalWorkflow (kept if sent before the step is reached), or on timeout its `default` (or
fails it for good). Nothing is held while they wait: no worker slot, no connection, and a
timer due while every service was down fires once they are back. Should one reach a
worker, it fails for good rather than hang.
"""

from __future__ import annotations

import re
from typing import Any

from jsonschema import Draft202012Validator, SchemaError

from taskproc.ops import Op, StepContext, StepError, register

MAX_WAIT_SECONDS = 7 * 86400.0  # the longest workflow timeout allowed (taskproc config)
SIGNAL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")
_SLEEP_INPUTS = frozenset({"seconds"})
_WAIT_INPUTS = frozenset({"name", "timeout_seconds", "default", "schema"})


def _seconds(value: Any, what: str, required: bool) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value:
        return f"{what} must be a positive number of seconds"
    if value > MAX_WAIT_SECONDS:
        return f"{what} must be at most {MAX_WAIT_SECONDS:g}"
    return None


def _unknown(inputs: dict[str, Any], known: frozenset[str]) -> str | None:
    unknown = sorted(set(inputs) - known)
    return f"unknown inputs {unknown}; known: {sorted(known)}" if unknown else None


def _check_sleep(inputs: dict[str, Any]) -> str | None:
    return _unknown(inputs, _SLEEP_INPUTS) or _seconds(inputs.get("seconds"), "seconds", True)


def check_signal_name(name: Any) -> str | None:
    """Why `name` is not a valid signal name (None when it is)."""
    if not isinstance(name, str) or not SIGNAL_NAME.fullmatch(name):
        return "name must be 1-64 characters: a letter, then letters, digits, . _ -"
    return None


def _check_wait(inputs: dict[str, Any]) -> str | None:
    problem = (
        _unknown(inputs, _WAIT_INPUTS)
        or check_signal_name(inputs.get("name"))
        or _seconds(inputs.get("timeout_seconds"), "timeout_seconds", False)
    )
    if problem:
        return problem
    if "default" in inputs and not isinstance(inputs["default"], dict):
        return "default must be an object (it becomes the step's output)"
    if "schema" in inputs:
        try:
            Draft202012Validator.check_schema(inputs["schema"])
        except SchemaError as exc:
            return f"schema is not a valid JSON Schema: {exc.message}"
        if "default" in inputs:
            error = next(
                Draft202012Validator(inputs["schema"]).iter_errors(inputs["default"]), None
            )
            if error is not None:
                return f"default does not match schema: {error.message}"
    return None


async def _run(ctx: StepContext, inputs: dict[str, Any]) -> dict[str, Any]:
    raise StepError("this step waits in dataplatform, not on a worker", retryable=False)


register(Op("sleep", _run, frozenset({"slept_seconds"}), _check_sleep, fan_out=False))
register(Op("wait_for_signal", _run, None, _check_wait, fan_out=False))
