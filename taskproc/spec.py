"""Workflow specs: whole-spec validation before anything is stored, defaults (Temporal's
retry defaults), `${input.PATH}` references (replaced at submit: the input is known then)
and `${steps.NAME.output.FIELD}` references (resolved when the step runs).

A reference is a string input. When the whole string is one reference, the referenced value
replaces it as is (a list stays a list); inside a longer string it is formatted as text.
FIELD is a dotted path whose first part must be an output field of the referenced step's
op, and the referenced step must be an ancestor (via depends_on, transitively), so its
output exists when the step runs.

A fan-out step (`for_each`: one whole `${steps...}` or `${input...}` reference to a list)
runs its op once per item; `${item}` / `${item.PATH}` in its inputs are resolved with the
other references when an item runs, in one pass (a value put in place is never read again
as a reference).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import UTC
from typing import Any

from google.protobuf import json_format, struct_pb2

from aiwfe.data.v1 import workflow_store_service_pb2 as store_pb
from aiwfe.runtime import conditions
from aiwfe.runtime.config import TaskProcSettings
from aiwfe.runtime.validation import Violations
from aiwfe.taskproc.v1 import workflow_service_pb2 as pb
from taskproc.ops import OPS, StepError

NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
REFERENCE = re.compile(r"\$\{steps\.([A-Za-z][A-Za-z0-9_-]*)\.output\.([A-Za-z0-9_.]+)\}")
_ANY_REFERENCE = re.compile(r"\$\{steps\.[^}]*\}")
INPUT_REFERENCE = re.compile(r"\$\{input((?:\.[A-Za-z0-9_-]+)*)\}")
_ANY_INPUT_REFERENCE = re.compile(r"\$\{input[^}]*\}")
ITEM_REFERENCE = re.compile(r"\$\{item((?:\.[A-Za-z0-9_-]+)*)\}")
_ANY_ITEM_REFERENCE = re.compile(r"\$\{item[^}]*\}")
_RUN_REFERENCE = re.compile(f"{REFERENCE.pattern}|{ITEM_REFERENCE.pattern}")
_NO_ITEM = object()  # resolve() outside a fan-out: `${item}` is not a reference there
DEFAULT_MAX_CONCURRENCY = 10  # a fan-out's items running at once when it names none
FAN_OUT_FIELDS = frozenset({"items", "failed"})  # a fan-out step's output

# Temporal's defaults: 3 attempts here (Temporal retries forever; a bounded default is the
# safer choice for AI calls that cost money), 1 s initial, x2, cap 100 x initial.
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_INITIAL_BACKOFF = 1.0
DEFAULT_MULTIPLIER = 2.0
MAX_BACKOFF_SECONDS = 86400.0
MAX_PRIORITY = 1000
MAX_SPEC_NAME = 200
MAX_CONCURRENCY_KEY_CHARS = 256  # a resolved concurrency key
MAX_CONCURRENCY = 1000  # ConcurrencySpec.max: a larger group is no limit worth a queue


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """Every string inside a JSON value, with its field path."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, f"{path}[{i}]")


def _ancestors(deps: dict[str, list[str]]) -> dict[str, set[str]]:
    """Transitive dependencies of every step (the graph is acyclic here)."""
    memo: dict[str, set[str]] = {}

    def visit(name: str) -> set[str]:
        if name not in memo:
            memo[name] = set()
            for d in deps.get(name, ()):
                memo[name] |= {d, *visit(d)}
        return memo[name]

    for name in deps:
        visit(name)
    return memo


def _cycle(deps: dict[str, list[str]]) -> list[str] | None:
    """One cycle of the dependency graph, or None (iterative DFS, bounded by the steps)."""
    color: dict[str, int] = {}
    for root in deps:
        if color.get(root):
            continue
        stack: list[tuple[str, Iterator[str]]] = [(root, iter(deps[root]))]
        color[root] = 1
        path = [root]
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                color[node] = 2
                stack.pop()
                path.pop()
            elif child in deps and color.get(child) == 1:
                return [*path[path.index(child) :], child]
            elif child in deps and not color.get(child):
                color[child] = 1
                stack.append((child, iter(deps[child])))
                path.append(child)
    return None


def validate(spec: pb.WorkflowSpec, limits: TaskProcSettings) -> pb.WorkflowSpec:
    """Checks the whole spec and returns a copy with every default filled in.

    Raises:
        InvalidArgument: listing every violation as `spec.steps[i].field` paths.
    """
    v = Violations()
    v.text(spec.name, "spec.name", max_chars=MAX_SPEC_NAME, required=False)
    n = len(spec.steps)
    v.check(1 <= n <= limits.max_steps, "spec.steps", f"must list 1 to {limits.max_steps} steps")
    v.check(
        0 <= spec.timeout_seconds <= limits.max_workflow_timeout,
        "spec.timeout_seconds",
        f"must be between 0 (default) and {limits.max_workflow_timeout:g}",
    )
    v.check(
        spec.input.ByteSize() <= limits.max_input_bytes,
        "spec.input",
        f"must be at most {limits.max_input_bytes} bytes (got {spec.input.ByteSize()})",
    )
    v.check(
        abs(spec.priority) <= MAX_PRIORITY,
        "spec.priority",
        f"must be between -{MAX_PRIORITY} and {MAX_PRIORITY}",
    )
    if n > limits.max_steps:
        v.raise_if_any()  # do not walk an oversized spec
    index: dict[str, int] = {}
    for i, step in enumerate(spec.steps):
        field = f"spec.steps[{i}]"
        v.text(step.name, f"{field}.name", max_chars=limits.max_name_chars)
        if step.name and len(step.name) <= limits.max_name_chars:
            if not NAME.fullmatch(step.name):
                v.add(f"{field}.name", "must match [A-Za-z][A-Za-z0-9_-]*")
            elif step.name in index:
                v.add(f"{field}.name", f"duplicate step name {step.name!r}")
            else:
                index[step.name] = i
    deps: dict[str, list[str]] = {}
    for i, step in enumerate(spec.steps):
        field = f"spec.steps[{i}]"
        if step.op not in OPS:
            v.add(f"{field}.op", f"unknown op {step.op!r}; known: {', '.join(sorted(OPS))}")
        seen: set[str] = set()
        for j, dep in enumerate(step.depends_on):
            if dep == step.name:
                v.add(f"{field}.depends_on[{j}]", "a step cannot depend on itself")
            elif dep not in index:
                v.add(f"{field}.depends_on[{j}]", f"no step named {dep[:80]!r}")
            elif dep in seen:
                v.add(f"{field}.depends_on[{j}]", f"{dep!r} is listed twice")
            seen.add(dep)
        if step.name in index and index[step.name] == i:
            deps[step.name] = [d for d in step.depends_on if d in index and d != step.name]
        _check_retry(step.retry_policy, f"{field}.retry_policy", limits, v)
        v.check(
            0 <= step.timeout_seconds <= limits.max_step_timeout,
            f"{field}.timeout_seconds",
            f"must be between 0 (default) and {limits.max_step_timeout:g}",
        )
        size = step.inputs.ByteSize()
        v.check(
            size <= limits.max_input_bytes,
            f"{field}.inputs",
            f"must be at most {limits.max_input_bytes} bytes (got {size})",
        )
    cycle = _cycle(deps)
    if cycle:
        v.add(f"spec.steps[{index[cycle[0]]}].depends_on", f"cycle: {' -> '.join(cycle)}")
    v.raise_if_any()
    ancestors = _ancestors(deps)
    timeout = spec.timeout_seconds or limits.default_workflow_timeout
    workflow_input = json_format.MessageToDict(spec.input)
    substituted: dict[int, dict[str, Any]] = {}
    for i, step in enumerate(spec.steps):
        inputs = json_format.MessageToDict(step.inputs)
        if any("${input" in s for _, s in _strings(inputs, "")):
            field = f"spec.steps[{i}].inputs"
            inputs = substitute_input(inputs, workflow_input, field, v)
            size = json_format.ParseDict(inputs, struct_pb2.Struct()).ByteSize()
            v.check(
                size <= limits.max_input_bytes,
                field,
                f"must be at most {limits.max_input_bytes} bytes with spec.input's values"
                f" in place (got {size})",
            )
            substituted[i] = inputs
        _check_references(step.name, inputs, f"spec.steps[{i}].inputs", spec, index, ancestors, v)
        _check_fan_out(step, f"spec.steps[{i}]", inputs, workflow_input, limits, v)
        if step.for_each and REFERENCE.fullmatch(step.for_each):
            _check_references(
                step.name, step.for_each, f"spec.steps[{i}].for_each", spec, index, ancestors, v
            )
        op = OPS[step.op]
        if op.check_with_references or not any(
            _ANY_REFERENCE.search(s) or _ANY_ITEM_REFERENCE.search(s)
            for _, s in _strings(inputs, "")
        ):
            problem = op.check_inputs(inputs)
            if problem:
                v.add(f"spec.steps[{i}].inputs", problem)
        _check_waits(step, f"spec.steps[{i}]", inputs, timeout, v)
        _check_condition(step, f"spec.steps[{i}]", spec, index, ancestors, v)
    key = _concurrency_key(spec, workflow_input, v) if spec.HasField("concurrency") else None
    v.raise_if_any()
    out = _with_defaults(spec, limits, substituted)
    if key is not None:
        out.concurrency.key = key
    return out


def _concurrency_key(spec: pb.WorkflowSpec, workflow_input: dict[str, Any], v: Violations) -> str:
    """The concurrency key with `${input.PATH}` replaced (a number becomes text); checks
    `max` too. Violations name `spec.concurrency.key` and `spec.concurrency.max`."""
    c = spec.concurrency
    v.check(
        1 <= c.max <= MAX_CONCURRENCY,
        "spec.concurrency.max",
        f"must be between 1 and {MAX_CONCURRENCY}",
    )
    field = "spec.concurrency.key"
    if len(c.key) > MAX_CONCURRENCY_KEY_CHARS:  # never walk an oversized template
        v.add(field, f"must be at most {MAX_CONCURRENCY_KEY_CHARS} characters")
        return ""
    key: Any = c.key
    if "${input" in key:
        before = len(v.items)
        key = substitute_input({"key": key}, workflow_input, "spec.concurrency", v)["key"]
        if len(v.items) > before:
            return ""
    if isinstance(key, float | int) and not isinstance(key, bool):
        key = as_text(key)
    if not isinstance(key, str):
        v.add(field, f"must resolve to a string or a number (got {json.dumps(key)[:80]})")
        return ""
    v.text(key, field, max_chars=MAX_CONCURRENCY_KEY_CHARS)
    return key


def substitute_input(
    inputs: dict[str, Any], workflow_input: dict[str, Any], field: str, v: Violations
) -> dict[str, Any]:
    """`inputs` with every `${input.PATH}` replaced by that value of the workflow's input; a
    malformed reference or a missing PATH is a violation at its field path."""

    def one(raw: str, path: str) -> Any:
        m = INPUT_REFERENCE.fullmatch(raw)
        if m is None:
            v.add(path, f"malformed reference {raw[:80]!r}: use ${{input.PATH}}")
            return raw
        if not m.group(1):
            return workflow_input
        try:
            return _lookup(workflow_input, m.group(1)[1:], raw)
        except StepError as exc:
            v.add(path, str(exc).replace("the output", "spec.input", 1))
            return raw

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, dict):
            return {k: walk(x, f"{path}.{k}") for k, x in value.items()}
        if isinstance(value, list):
            return [walk(x, f"{path}[{j}]") for j, x in enumerate(value)]
        if isinstance(value, str) and "${input" in value:
            if INPUT_REFERENCE.fullmatch(value):
                return one(value, path)
            return _ANY_INPUT_REFERENCE.sub(lambda m: as_text(one(m.group(0), path)), value)
        return value

    return dict(walk(inputs, field))


def _check_fan_out(
    step: pb.StepSpec,
    field: str,
    inputs: dict[str, Any],
    workflow_input: dict[str, Any],
    limits: TaskProcSettings,
    v: Violations,
) -> None:
    """`for_each` and its companions: `${item}` only in a fan-out step, an op that can fan
    out, bounds; a list from the workflow input is checked here (it is known now)."""
    items = [
        (path, raw)
        for path, text in _strings(inputs, f"{field}.inputs")
        for raw in _ANY_ITEM_REFERENCE.findall(text)
    ]
    if not step.for_each:
        for path, _ in items:
            v.add(path, "${item} is defined only in a step with for_each")
        v.check(step.max_concurrency == 0, f"{field}.max_concurrency", "needs for_each")
        v.check(step.item_failure == 0, f"{field}.item_failure", "needs for_each")
        return
    for path, raw in items:
        if not ITEM_REFERENCE.fullmatch(raw):
            v.add(path, f"malformed reference {raw[:80]!r}: use ${{item}} or ${{item.PATH}}")
    if not OPS[step.op].fan_out:
        v.add(f"{field}.for_each", f"op {step.op!r} cannot fan out")
    v.check(
        0 <= step.max_concurrency <= limits.max_fan_out_concurrency,
        f"{field}.max_concurrency",
        f"must be between 0 (default {DEFAULT_MAX_CONCURRENCY})"
        f" and {limits.max_fan_out_concurrency}",
    )
    v.check(
        step.item_failure in pb.ItemFailurePolicy.values(),
        f"{field}.item_failure",
        "is not a known item failure policy",
    )
    if INPUT_REFERENCE.fullmatch(step.for_each):
        before = len(v.items)
        found = substitute_input({"for_each": step.for_each}, workflow_input, field, v)
        if len(v.items) == before:
            _check_items(found["for_each"], f"{field}.for_each", limits, v)
    elif not REFERENCE.fullmatch(step.for_each):
        v.add(
            f"{field}.for_each",
            "must be one whole reference: ${steps.NAME.output.PATH} or ${input.PATH}",
        )


def _check_items(value: Any, field: str, limits: TaskProcSettings, v: Violations) -> None:
    """A fan-out's list known at submit (from the workflow input)."""
    if not isinstance(value, list):
        v.add(field, f"must name a list (got {type(value).__name__})")
    elif len(value) > limits.max_fan_out_items:
        v.add(
            field,
            f"names {len(value)} items; at most taskproc.max_fan_out_items"
            f" ({limits.max_fan_out_items})",
        )


def _check_waits(
    step: pb.StepSpec, field: str, inputs: dict[str, Any], timeout: float, v: Violations
) -> None:
    """Timers end within the workflow's timeout: a sleep, a signal's timeout, not_before."""
    for key in ("seconds", "timeout_seconds"):
        value = inputs.get(key) if step.op in ("sleep", "wait_for_signal") else None
        if isinstance(value, int | float) and value > timeout:
            v.add(f"{field}.inputs", f"{key} must be at most the workflow timeout ({timeout:g} s)")
    if step.HasField("not_before"):
        ahead = step.not_before.ToDatetime(tzinfo=UTC).timestamp() - time.time()
        v.check(
            ahead <= timeout,
            f"{field}.not_before",
            f"must be at most the workflow timeout ({timeout:g} s) ahead",
        )


def _check_condition(
    step: pb.StepSpec,
    field: str,
    spec: pb.WorkflowSpec,
    index: dict[str, int],
    ancestors: dict[str, set[str]],
    v: Violations,
) -> None:
    """`when` parses, stays within its cost bounds, names only ancestors and only output
    fields their ops produce."""
    v.check(
        step.on_dependency_skipped in pb.DependencySkipPolicy.values(),
        f"{field}.on_dependency_skipped",
        f"unknown policy {step.on_dependency_skipped}",
    )
    if not step.when:
        return
    checked = conditions.check(step.when)
    for problem in checked.problems:
        v.add(f"{field}.when", problem)
    for target in sorted(checked.steps):
        if target not in index:
            v.add(f"{field}.when", f"references unknown step {target[:80]!r}")
        elif target not in ancestors.get(step.name, set()):
            v.add(f"{field}.when", f"references step {target!r}, which is not in depends_on")
    for target, out_field in sorted(checked.fields):
        fields = OPS[spec.steps[index[target]].op].output_fields if target in index else None
        if fields is not None and out_field not in fields:
            v.add(
                f"{field}.when",
                f"step {target!r} has no output field {out_field!r}; "
                f"it has: {', '.join(sorted(fields))}",
            )


def _check_retry(rp: pb.RetryPolicy, field: str, limits: TaskProcSettings, v: Violations) -> None:
    v.check(
        0 <= rp.max_attempts <= limits.max_attempts,
        f"{field}.max_attempts",
        f"must be between 0 (default {DEFAULT_MAX_ATTEMPTS}) and {limits.max_attempts}",
    )
    v.check(
        0 <= rp.initial_backoff_seconds <= MAX_BACKOFF_SECONDS,
        f"{field}.initial_backoff_seconds",
        f"must be between 0 (default 1) and {MAX_BACKOFF_SECONDS:g}",
    )
    v.check(
        rp.backoff_multiplier == 0 or 1 <= rp.backoff_multiplier <= 100,
        f"{field}.backoff_multiplier",
        "must be 0 (default 2) or between 1 and 100",
    )
    v.check(
        0 <= rp.max_backoff_seconds <= MAX_BACKOFF_SECONDS,
        f"{field}.max_backoff_seconds",
        f"must be between 0 (default 100 x initial) and {MAX_BACKOFF_SECONDS:g}",
    )
    if rp.max_backoff_seconds and rp.initial_backoff_seconds > rp.max_backoff_seconds:
        v.add(f"{field}.max_backoff_seconds", "must not be less than initial_backoff_seconds")
    v.check(0 <= rp.jitter <= 1, f"{field}.jitter", "must be between 0 and 1")


def _check_references(
    name: str,
    inputs: dict[str, Any] | str,
    field: str,
    spec: pb.WorkflowSpec,
    index: dict[str, int],
    ancestors: dict[str, set[str]],
    v: Violations,
) -> None:
    for path, text in _strings(inputs, field):
        for raw in _ANY_REFERENCE.findall(text):
            m = REFERENCE.fullmatch(raw)
            if m is None:
                v.add(path, f"malformed reference {raw[:80]!r}: use ${{steps.NAME.output.FIELD}}")
                continue
            target, out_field = m.group(1), m.group(2)
            if target not in index:
                v.add(path, f"references unknown step {target!r}")
            elif target not in ancestors.get(name, set()):
                v.add(path, f"references step {target!r}, which is not in depends_on")
            else:
                referenced = spec.steps[index[target]]
                fields = FAN_OUT_FIELDS if referenced.for_each else OPS[referenced.op].output_fields
                head = out_field.split(".", 1)[0]
                if fields is not None and head not in fields:
                    v.add(
                        path,
                        f"step {target!r} has no output field {head!r}; "
                        f"it has: {', '.join(sorted(fields))}",
                    )


def _with_defaults(
    spec: pb.WorkflowSpec, limits: TaskProcSettings, substituted: dict[int, dict[str, Any]]
) -> pb.WorkflowSpec:
    out = pb.WorkflowSpec()
    out.CopyFrom(spec)
    out.timeout_seconds = spec.timeout_seconds or limits.default_workflow_timeout
    for i, inputs in substituted.items():
        out.steps[i].inputs.Clear()
        out.steps[i].inputs.update(inputs)
    for step in out.steps:
        rp = step.retry_policy
        rp.max_attempts = rp.max_attempts or DEFAULT_MAX_ATTEMPTS
        rp.initial_backoff_seconds = rp.initial_backoff_seconds or DEFAULT_INITIAL_BACKOFF
        rp.backoff_multiplier = rp.backoff_multiplier or DEFAULT_MULTIPLIER
        rp.max_backoff_seconds = rp.max_backoff_seconds or 100 * rp.initial_backoff_seconds
        step.timeout_seconds = step.timeout_seconds or limits.default_step_timeout
        if step.for_each:
            step.max_concurrency = step.max_concurrency or min(
                DEFAULT_MAX_CONCURRENCY, limits.max_fan_out_concurrency
            )
            step.item_failure = step.item_failure or pb.ITEM_FAILURE_POLICY_FAIL_FAST
        if step.op == "wait_for_signal" and "timeout_seconds" not in step.inputs.fields:
            step.inputs["timeout_seconds"] = out.timeout_seconds  # until the workflow's end
    return out


def as_text(value: Any) -> str:
    """A referenced value inside a longer string: strings as they are, whole numbers without
    ".0" (JSON numbers arrive as floats), anything else as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return json.dumps(value)


def _lookup(value: Any, path: str, raw: str) -> Any:
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise StepError(f"{raw}: the output has no {part!r}", retryable=False)
    return value


def resolve(
    inputs: dict[str, Any], outputs: dict[str, Any], item: Any = _NO_ITEM
) -> dict[str, Any]:
    """Inputs with every reference replaced by the referenced output value, and with an
    `item` (a fan-out item's run) every `${item}` / `${item.PATH}` by the item's value.

    Raises:
        StepError: (not retryable) when a referenced output or field does not exist.
    """
    pattern, marker = (REFERENCE, "${steps.") if item is _NO_ITEM else (_RUN_REFERENCE, "${")

    def one(raw: str) -> Any:
        m = REFERENCE.fullmatch(raw)
        if m is not None:
            step, path = m.group(1), m.group(2)
            if step not in outputs:  # an ancestor without output: it was skipped
                raise StepError(
                    f"{raw}: step {step!r} was skipped, so it has no output", retryable=False
                )
            return _lookup(outputs[step], path, raw)
        m = ITEM_REFERENCE.fullmatch(raw)
        if m is None or not m.group(1):
            return item
        try:
            return _lookup(item, m.group(1)[1:], raw)
        except StepError as exc:
            raise StepError(str(exc).replace("the output", "the item", 1), False) from None

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, str) and marker in value:
            if pattern.fullmatch(value):
                return one(value)
            return pattern.sub(lambda m: as_text(one(m.group(0))), value)
        return value

    return walk(inputs)


def claimed_inputs(step: store_pb.ClaimedStep) -> dict[str, Any]:
    """A claimed step's inputs, its references resolved (outputs, a fan-out's item)."""
    inputs = json_format.MessageToDict(step.inputs)
    outputs = json_format.MessageToDict(step.dependency_outputs)
    if step.HasField("item"):
        return resolve(inputs, outputs, json_format.MessageToDict(step.item))
    if step.HasField("dependency_outputs"):
        return resolve(inputs, outputs)
    return inputs
