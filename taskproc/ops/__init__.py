"""Workflow step operations: a registry every op adds itself to.

An op is a module in this package that calls `register(Op(...))` (or decorates its runner
with `@op(...)`) at import; importing the package imports every module in it, so adding an
op is one new file here plus its tests, and no list to edit. Submit refuses an op the
registry does not know (INVALID_ARGUMENT, a field violation listing the known ops:
`taskproc/spec.py`); the worker fails such a step for good should one reach it anyway.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import grpc

from aiwfe.runtime.channels import Upstream

# Upstream failures a retry cannot fix: the step fails at once.
PERMANENT_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)


class StepError(Exception):
    """A failure of the step itself; `retryable` False ends the workflow without retries."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class StepContext:
    """What an op may use: its attempt number, the worker, cognitive and its deadline."""

    attempt: int
    worker_id: str
    cognitive: Upstream
    timeout: float


Runner = Callable[[StepContext, dict[str, Any]], Awaitable[dict[str, Any]]]
InputCheck = Callable[[dict[str, Any]], str | None]


@dataclass(frozen=True)
class Op:
    """An operation: validates inputs at submit time, runs at step time. `output_fields`
    names what `${steps.X.output.FIELD}` may reference (None: anything). `check` runs only
    on inputs without references unless `check_with_references` (it then must accept a
    reference wherever one may stand). `fan_out` False refuses `for_each` on it at submit
    (steps that wait in dataplatform rather than run)."""

    name: str
    run: Runner
    output_fields: frozenset[str] | None
    check: InputCheck
    check_with_references: bool = False
    fan_out: bool = True

    def check_inputs(self, inputs: dict[str, Any]) -> str | None:
        return self.check(inputs)


_registry: dict[str, Op] = {}
OPS: Mapping[str, Op] = MappingProxyType(_registry)  # read-only view, filled at import


def register(new: Op) -> Op:
    """Adds an op; a second op of the same name is a programming error."""
    if new.name in _registry:
        raise ValueError(f"workflow op {new.name!r} is registered twice")
    _registry[new.name] = new
    return new


def op(
    name: str, output_fields: frozenset[str] | None, check: InputCheck
) -> Callable[[Runner], Runner]:
    """Registers the decorated runner as op `name`."""

    def decorate(run: Runner) -> Runner:
        register(Op(name, run, output_fields, check))
        return run

    return decorate


def _load_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_load_all()
