"""Error reasons as a contract: every raise site in the services names a reason from
`aiwfe.runtime.errors.REASONS` (right code, declared metadata keys), every registered reason is
raised somewhere, and the README's "Error reasons" table is the registry.

`python -m tests.test_error_reasons` prints the table to paste into the README.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from aiwfe.runtime import errors
from aiwfe.runtime.errors import REASONS, AiwfeError

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("aiwfe", "gateway", "cognitive", "taskproc", "dataplatform")
UPPER_SNAKE = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)*$")
LOWER_CAMEL = re.compile(r"^[a-z][a-zA-Z0-9]*$")  # ErrorInfo.metadata keys, as googleapis asks


def _error_classes() -> dict[str, type[AiwfeError]]:
    found: dict[str, type[AiwfeError]] = {}
    todo: list[type[AiwfeError]] = [AiwfeError]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


CLASSES = _error_classes()


@dataclass(frozen=True)
class Site:
    """One construction of an error class, or one `reason=` given anywhere."""

    where: str
    cls: str | None  # the error class constructed, None for another call
    reason: ast.expr | None
    metadata: ast.expr | None


def _sources() -> list[Path]:
    return [
        path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if not path.name.endswith(("_pb2.py", "_pb2_grpc.py", "_pb2.pyi"))
    ]


def _sites() -> list[Site]:
    out = []
    for path in _sources():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
                kw = {k.arg: k.value for k in node.keywords}
                if name in CLASSES or "reason" in kw:
                    cls = name if name in CLASSES else None
                    out.append(Site(where, cls, kw.get("reason"), kw.get("metadata")))
            elif isinstance(node, ast.arguments):  # a `reason: str = "…"` parameter default
                params = [*node.posonlyargs, *node.args, *node.kwonlyargs]
                defaults = [*node.defaults, *node.kw_defaults]
                for param, default in zip(reversed(params), reversed(defaults), strict=False):
                    if param.arg == "reason" and default is not None:
                        out.append(Site(where, None, default, None))
    return out


SITES = _sites()


def _constant(expr: ast.expr | None) -> str | None:
    return expr.value if isinstance(expr, ast.Constant) and isinstance(expr.value, str) else None


def _error_reasons() -> set[str]:
    """Every UPPER_SNAKE reason string given at a call or as a `reason` default."""
    return {r for s in SITES if (r := _constant(s.reason)) is not None and UPPER_SNAKE.match(r)}


def test_every_raise_site_uses_a_registered_reason_for_its_code() -> None:
    """Each error class constructed in the services passes a literal reason (or relies on
    its class's own), registered for that class's status code, with only declared
    metadata keys; every UPPER_SNAKE `reason=` anywhere is registered."""
    problems = []
    constructed = [s for s in SITES if s.cls is not None and s.cls != "AiwfeError"]
    assert len(constructed) > 40, "the scan found too few raise sites"
    for site in constructed:
        cls = CLASSES[site.cls]  # type: ignore[index]
        if site.reason is None:
            continue  # InvalidArgument (REQUEST_INVALID) and DependencyUnavailable fix it
        reason = _constant(site.reason)
        if reason is None:
            problems.append(f"{site.where}: reason must be a literal the scan can read")
            continue
        spec = REASONS.get(reason)
        if spec is None:
            problems.append(f"{site.where}: {reason} is not in errors.REASONS")
            continue
        if spec.code is not cls.code:
            problems.append(f"{site.where}: {reason} is {spec.code.name}, not {cls.code.name}")
        if isinstance(site.metadata, ast.Dict):
            keys = {_constant(k) for k in site.metadata.keys}
            if extra := keys - {"fields", *spec.metadata}:
                problems.append(f"{site.where}: metadata {extra} not declared for {reason}")
    problems += [f"{r} is not in errors.REASONS" for r in _error_reasons() - set(REASONS)]
    assert not problems, "\n".join(problems)


def test_every_registered_reason_is_raised_somewhere() -> None:
    """The registry holds no dead entries: each reason appears at some raise site."""
    assert set(REASONS) - _error_reasons() == set()


def test_registry_is_well_formed() -> None:
    """Reasons are UPPER_SNAKE, none just repeats a status code's name, each has a
    description, and metadata keys are lowerCamelCase."""
    for name, spec in REASONS.items():
        assert UPPER_SNAKE.match(name), name
        assert name not in {c.name for c in grpc.StatusCode}, name
        assert spec.when, name
        assert all(LOWER_CAMEL.match(k) for k in spec.metadata), (name, spec.metadata)
    assert errors.ERROR_DOMAIN == "aiwfe.dev"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: errors.NotFound("x", reason="NOT_A_REASON"), "not a registered reason"),
        (lambda: errors.NotFound("x", reason="TOKEN_EXPIRED"), "not a registered reason"),
        (
            lambda: errors.NotFound("x", reason="WORKFLOW_NOT_FOUND", metadata={"user": "u"}),
            "not declared",
        ),
    ],
)
def test_unregistered_reasons_and_metadata_are_refused_at_construction(make, message) -> None:
    """An unknown reason, a reason of another code, or undeclared metadata is a
    programming error caught where the error is built, not a silently wrong contract."""
    with pytest.raises(ValueError, match=message):
        make()


def reasons_table() -> str:
    """The README's "Error reasons" table, one row per registered reason."""
    rows = ["| reason | code | when | metadata |", "|---|---|---|---|"]
    for name, spec in REASONS.items():
        keys = ", ".join(f"`{k}`" for k in spec.metadata)
        rows.append(f"| `{name}` | {spec.code.name} | {spec.when} | {keys} |")
    return "\n".join(rows) + "\n"


def test_readme_table_is_the_registry() -> None:
    """README.md's "Error reasons" table lists exactly the registry, in its order (print
    the expected one with `python -m tests.test_error_reasons`)."""
    readme = (ROOT / "README.md").read_text()
    assert reasons_table() in readme


if __name__ == "__main__":
    print(reasons_table(), end="")
