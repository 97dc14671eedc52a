"""Step conditions (`StepSpec.when`): CEL expressions, through cel-python (`celpy`, a pure
Python implementation of the CEL spec with a Lark parser), never `eval`.

Shared by taskproc, which checks an expression at submit (`problems`), and dataplatform,
which evaluates it when the step is reached (`evaluate`). The variables are `input` (the
workflow's input) and `steps`: `steps.NAME.state` ("SUCCEEDED" or "SKIPPED") and
`steps.NAME.output` for the ancestors the expression names. JSON numbers are doubles, as
CEL maps a `google.protobuf.Struct` (`input.n == 3.0`; `<`, `>` mix int and double).

The cost of an evaluation is bounded at submit: at most MAX_CHARS characters, a parse tree
at most MAX_TREE_DEPTH deep (celpy evaluates recursively), and no comprehension macro
(`all`, `exists`, `exists_one`, `map`, `filter`) inside another, so an evaluation is linear
in the size of the data it reads; that data is bounded by the inputs and outputs limits.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import celpy
    import lark

MAX_CHARS = 1024
MAX_TREE_DEPTH = 120  # parse-tree levels; a plain `a.b > 1 && c` is about 15
MAX_COMPREHENSION_NESTING = 1
MAX_ERROR_CHARS = 300
STATE_SUCCEEDED, STATE_SKIPPED = "SUCCEEDED", "SKIPPED"

_MACROS = frozenset({"all", "exists", "exists_one", "map", "filter"})
_VARIABLES = frozenset({"input", "steps"})
# Type names CEL lets an expression use as values (`type(x) == string`).
_TYPE_NAMES = frozenset(
    {"bool", "bytes", "double", "duration", "int", "list", "map", "null_type", "string"}
    | {"timestamp", "type", "uint"}
)
_QUOTED_NAME = re.compile(r"""^(?:"([A-Za-z][A-Za-z0-9_-]*)"|'([A-Za-z][A-Za-z0-9_-]*)')$""")


@functools.cache
def _env() -> celpy.Environment:
    """celpy's environment, built on first use: importing celpy and building its parser
    takes about 0.5 s and 26,000 objects (more for every garbage collection to scan), which
    a process that never meets a `when` does not pay."""
    import celpy

    return celpy.Environment()


def _is_tree(node: Any) -> bool:
    import lark  # loaded with celpy, which made the tree

    return isinstance(node, lark.Tree)


class ConditionError(Exception):
    """A condition that could not be evaluated to a bool (the step fails for good)."""


@dataclass(frozen=True)
class Checked:
    """A parsed expression: its problems (empty when valid), the steps it names and the
    output fields it reads as (step, field) (`steps.NAME.output.FIELD`)."""

    problems: list[str]
    steps: frozenset[str]
    fields: frozenset[tuple[str, str]] = frozenset()


def _depth(tree: lark.Tree) -> int:
    """The parse tree's depth, iteratively (the tree may be deeper than the stack)."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        stack.extend((c, d + 1) for c in node.children if _is_tree(c))
    return deepest


def _only(tree: Any) -> Any:
    """Follows single-child wrappers down to the node that says what `tree` is."""
    while _is_tree(tree) and tree.data != "ident" and len(tree.children) == 1:
        tree = tree.children[0]
    return tree


def _ident(tree: Any) -> str | None:
    """The name if `tree` is a bare identifier."""
    node = _only(tree)
    return str(node.children[0]) if _is_tree(node) and node.data == "ident" else None


def _step_name(node: lark.Tree) -> tuple[bool, str | None]:
    """For `steps.NAME` / `steps["NAME"]`: (True, NAME); for another access on `steps`
    (a computed index): (True, None); else (False, None)."""
    if _ident(node.children[0]) != "steps":
        return False, None
    if node.data == "member_dot":
        return True, str(node.children[1])
    literal = _only(node.children[1])
    if not _is_tree(literal) and getattr(literal, "type", "") == "STRING_LIT":
        m = _QUOTED_NAME.match(str(literal))
        if m:
            return True, m.group(1) or m.group(2)
    return True, None


def _walk(tree: lark.Tree, bound: frozenset[str], nesting: int) -> Iterator[tuple[str, Any]]:
    """Yields ("step", NAME) for each step named, ("field", (NAME, FIELD)) for each output
    field read and ("problem", text) for each problem."""
    data = tree.data
    if data == "member_dot" and "steps" not in bound:
        base = _only(tree.children[0])
        if _is_tree(base) and base.data in ("member_dot", "member_index"):
            is_steps, name = _step_name(base)
            attribute = str(tree.children[1])
            if is_steps and name is not None and attribute not in ("state", "output"):
                yield "problem", f"steps.{name} has only state and output, not {attribute!r}"
            if base.data == "member_dot" and str(base.children[1]) == "output":
                inner = _only(base.children[0])
                if _is_tree(inner) and inner.data in ("member_dot", "member_index"):
                    is_steps, name = _step_name(inner)
                    if is_steps and name is not None:
                        yield "field", (name, attribute)
    if data in ("member_dot", "member_index"):
        is_steps, name = _step_name(tree)
        if is_steps and "steps" not in bound:
            if name is None:
                yield "problem", 'name a step as steps.NAME or steps["NAME"]'
            else:
                yield "step", name
            return
    if data == "ident":
        name = str(tree.children[0])
        if name == "steps" and name not in bound:
            yield "problem", 'name a step as steps.NAME or steps["NAME"]'
        elif name not in _VARIABLES | _TYPE_NAMES | bound:
            yield "problem", f"unknown variable {name!r}; the variables are input and steps"
        return
    if data in ("member_object", "dot_ident", "dot_ident_arg"):
        yield "problem", "message construction and leading-dot names are not supported"
        return
    if data == "member_dot_arg" and str(tree.children[1]) in _MACROS:
        args = tree.children[2].children if len(tree.children) > 2 and tree.children[2] else []
        var = _ident(args[0]) if args else None
        if var is None or len(args) < 2:
            yield "problem", f"{tree.children[1]}() takes a variable name and an expression"
            return
        if nesting >= MAX_COMPREHENSION_NESTING:
            yield "problem", "a comprehension (all, exists, map, filter) cannot hold another"
            return
        yield from _walk(tree.children[0], bound, nesting)
        for arg in args[1:]:
            yield from _walk(arg, bound | {var}, nesting + 1)
        return
    for child in tree.children:
        if _is_tree(child):
            yield from _walk(child, bound, nesting)


@functools.lru_cache(maxsize=1024)
def check(expression: str) -> Checked:
    """Parses and checks an expression (cached: the same text always checks the same)."""
    if len(expression) > MAX_CHARS:
        problem = f"must be at most {MAX_CHARS} characters (got {len(expression)})"
        return Checked([problem], frozenset())
    import celpy

    try:
        tree = _env().compile(expression)
    except (celpy.CELParseError, RecursionError) as exc:
        return Checked([f"not a CEL expression: {_short(exc)}"], frozenset())
    if _depth(tree) > MAX_TREE_DEPTH:
        problem = f"nests too deeply (at most {MAX_TREE_DEPTH} parse-tree levels)"
        return Checked([problem], frozenset())
    problems: list[str] = []
    steps: set[str] = set()
    fields: set[tuple[str, str]] = set()
    for kind, value in _walk(tree, frozenset(), 0):
        if kind == "step":
            steps.add(value)
        elif kind == "field":
            fields.add(value)
        elif value not in problems:
            problems.append(value)
    return Checked(problems, frozenset(steps), frozenset(fields))


@functools.lru_cache(maxsize=1024)
def _program(expression: str) -> celpy.Runner:
    return _env().program(_env().compile(expression))


def _doubles(value: Any) -> Any:
    """JSON as CEL sees a Struct: every number a double (bools stay bools)."""
    if isinstance(value, dict):
        return {k: _doubles(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_doubles(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def evaluate(expression: str, workflow_input: dict[str, Any], steps: dict[str, Any]) -> bool:
    """The condition's value over `input` and `steps` (name -> {"state", "output"?}).

    Raises:
        ConditionError: the expression is invalid, failed (a missing key, a type error) or
            did not give a bool; the message names the expression and the error.
    """
    import celpy

    shown = expression if len(expression) <= 200 else expression[:200] + "..."
    if check(expression).problems:
        raise ConditionError(f"condition {shown!r}: {check(expression).problems[0]}")
    activation = {
        "input": celpy.json_to_cel(_doubles(workflow_input)),
        "steps": celpy.json_to_cel(_doubles(steps)),
    }
    try:
        result = _program(expression).evaluate(activation)
    except celpy.CELEvalError as exc:
        raise ConditionError(f"condition {shown!r} failed: {_short(exc)}") from None
    except (RecursionError, ArithmeticError, TypeError, ValueError, KeyError) as exc:
        raise ConditionError(f"condition {shown!r} failed: {_short(exc)}") from None
    if isinstance(result, celpy.CELEvalError):
        raise ConditionError(f"condition {shown!r} failed: {_short(result)}")
    if not isinstance(result, celpy.celtypes.BoolType):
        kind = type(result).__name__.removesuffix("Type").lower()
        raise ConditionError(f"condition {shown!r} gave a {kind}, not a bool")
    return bool(result)


def _short(exc: BaseException) -> str:
    """An error's first line, bounded (celpy's messages can dump its whole activation)."""
    text = str(exc.args[0]) if exc.args else str(exc)
    text = text.split("\n", 1)[0].split(" (in activation", 1)[0]
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "..."
