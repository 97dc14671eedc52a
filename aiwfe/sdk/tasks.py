"""Task functions and what they see: the `@task` decorator, binding a task's JSON input to
a function's parameters, its result as the step's output, and `current_task()` (the
running task's details, cancellation flag and heartbeat). The worker that serves them is
`aiwfe.sdk.worker`, whose docstring describes the rules."""

from __future__ import annotations

import contextvars
import functools
import inspect
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from google.protobuf import struct_pb2

F = TypeVar("F", bound=Callable[..., Any])
TASK_ATTRIBUTE = "__aiwfe_task__"


class NonRetryableError(Exception):
    """Raised by a task function: the failure is final, the step is not retried."""


class TaskCancelled(Exception):
    """Raised by `TaskInfo.raise_if_cancelled()` in a sync function whose task was
    cancelled (workflow cancelled or timed out, task lost, or worker shutting down)."""


class InputBindingError(Exception):
    """A task's input does not fit its function's parameters."""


# --- the @task decorator ----------------------------------------------------------------


@dataclass(frozen=True)
class TaskDefinition:
    """A function served as task type `name`."""

    name: str
    fn: Callable[..., Any]
    is_async: bool
    signature: inspect.Signature

    def bind(self, value: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The call arguments for a task's input (see the module's docstring)."""
        try:
            if isinstance(value, dict):
                unknown = _unknown_keywords(self.signature, value)
                if unknown:
                    raise TypeError(f"unexpected keyword argument {', '.join(unknown)}")
                bound = self.signature.bind(**value)
            elif value is None and _takes_nothing(self.signature):
                bound = self.signature.bind()
            else:
                bound = self.signature.bind(value)
        except TypeError as exc:
            kind = "object" if isinstance(value, dict) else _json_kind(value)
            raise InputBindingError(
                f"input does not fit task {self.name!r} {self.name}{_plain(self.signature)}: "
                f"{exc} (a JSON object binds to keyword parameters, any other value to "
                f"the one positional parameter; got a JSON {kind})"
            ) from None
        return bound.args, bound.kwargs


def _unknown_keywords(sig: inspect.Signature, value: dict[str, Any]) -> list[str]:
    params = sig.parameters.values()
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return []
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return [repr(k) for k in value if k not in names]


def _plain(sig: inspect.Signature) -> inspect.Signature:
    """The signature without annotations: `(text, max_words=50)`."""
    return sig.replace(
        parameters=[p.replace(annotation=p.empty) for p in sig.parameters.values()],
        return_annotation=sig.empty,
    )


def _takes_nothing(sig: inspect.Signature) -> bool:
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in sig.parameters.values())  # fmt: skip


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array"


def task(name: str | Callable[..., Any] | None = None) -> Any:
    """Marks a function as a task type: `@task("summarize")`, or `@task` / `@task()` to
    use the function's name. The function is returned unchanged (still callable)."""

    def mark(fn: F, task_name: str | None = None) -> F:
        setattr(fn, TASK_ATTRIBUTE, definition(fn, task_name))
        return fn

    if callable(name):
        return mark(name)
    return functools.partial(mark, task_name=name)


def definition(fn: Callable[..., Any], name: str | None = None) -> TaskDefinition:
    """The TaskDefinition of `fn` (its @task name, else `name` or its own name)."""
    existing = getattr(fn, TASK_ATTRIBUTE, None)
    if isinstance(existing, TaskDefinition) and name is None:
        return existing
    task_name = name or getattr(fn, "__name__", "")
    if not task_name:
        raise ValueError(f"{fn!r} has no name: pass one, @task('name')")
    return TaskDefinition(
        task_name,
        fn,
        inspect.iscoroutinefunction(fn),
        inspect.signature(fn),
    )


def tasks_in_module(module: Any) -> list[TaskDefinition]:
    """The @task functions defined or imported at the top of `module`."""
    found = {}
    for value in vars(module).values():
        spec = getattr(value, TASK_ATTRIBUTE, None)
        if isinstance(spec, TaskDefinition):
            found[spec.name] = spec
    return list(found.values())


# --- JSON <-> protobuf -------------------------------------------------------------------


def from_value(value: struct_pb2.Value) -> Any:
    """A google.protobuf.Value as plain Python; whole numbers as int."""
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return from_struct(value.struct_value)
    if kind == "list_value":
        return [from_value(v) for v in value.list_value.values]
    if kind == "number_value":
        n = value.number_value
        return int(n) if n.is_integer() and abs(n) < 2**53 else n
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None


def from_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    return {k: from_value(v) for k, v in struct.fields.items()}


def output_struct(result: Any) -> struct_pb2.Struct:
    """The step's output for a return value: a dict as is, anything else as
    {"result": value}. TypeError/ValueError when it is not JSON."""
    out = struct_pb2.Struct()
    out.update(result if isinstance(result, dict) else {"result": result})
    return out


def details_struct(details: Mapping[str, Any] | None) -> struct_pb2.Struct | None:
    if details is None:
        return None
    out = struct_pb2.Struct()
    out.update(dict(details))
    return out


# --- the task context ----------------------------------------------------------------------


# The running task, set by the worker in the context it calls the function in.
CURRENT_TASK: contextvars.ContextVar[TaskInfo] = contextvars.ContextVar("aiwfe_task")


@dataclass(eq=False)
class TaskInfo:
    """The running task, as `current_task()` returns it inside a task function."""

    task_token: str
    workflow_id: str
    step_name: str
    queue: str
    type: str
    attempt: int
    attempt_deadline: datetime | None
    heartbeat_timeout: float
    traceparent: str
    cancel_reason: str = ""
    _details: Mapping[str, Any] | None = field(default=None, repr=False)
    _beat_now: Callable[[], object] = field(default=lambda: None, repr=False)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def cancelled(self) -> bool:
        """True once the task should stop: the workflow was cancelled or timed out, the
        task was lost (re-dispatched elsewhere), or the worker is shutting down."""
        return self._cancelled.is_set()

    def raise_if_cancelled(self) -> None:
        """Raises TaskCancelled when `cancelled` is true (for sync functions)."""
        if self._cancelled.is_set():
            raise TaskCancelled(self.cancel_reason)

    def heartbeat(self, details: Mapping[str, Any] | None = None) -> None:
        """Records progress details (kept with the step) and asks for a heartbeat soon
        (at most one per 0.5 s); safe from any thread. Heartbeats go out on their own
        anyway: call it to report progress, not to stay alive."""
        if details is not None:
            self._details = dict(details)
        self._beat_now()


def current_task() -> TaskInfo:
    """The task the calling task function runs (LookupError outside one)."""
    return CURRENT_TASK.get()
