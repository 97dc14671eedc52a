"""The op registry: ops add themselves at import, names are unique, the view is read-only."""

from __future__ import annotations

from typing import Any

import pytest

from taskproc import ops
from taskproc.ops import OPS, Op, StepContext, register


async def _run(ctx: StepContext, inputs: dict[str, Any]) -> dict[str, Any]:
    return {}


def test_every_module_in_the_package_registered_its_ops() -> None:
    """Importing the package is enough: each op module's ops are there, under their names."""
    assert set(OPS) == {
        "noop",
        "cognitive.embed",
        "cognitive.index",
        "cognitive.search",
        "cognitive.classify",
        "cognitive.generate",
        "task",
        "sleep",
        "wait_for_signal",
    }
    assert all(o.name == name for name, o in OPS.items())


def test_a_second_op_of_the_same_name_is_refused() -> None:
    """Two modules claiming one name fail at import, instead of one silently winning."""
    with pytest.raises(ValueError, match="'noop' is registered twice"):
        register(Op("noop", _run, None, lambda _: None))
    assert OPS["noop"].run is ops.noop.noop


def test_the_registry_cannot_be_edited_from_outside() -> None:
    """OPS is a read-only view: only register() adds."""
    with pytest.raises(TypeError):
        OPS["x"] = Op("x", _run, None, lambda _: None)  # type: ignore[index]
