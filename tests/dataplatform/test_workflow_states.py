"""The engine's stored states are the contract's enums: same names, same numbers."""

from __future__ import annotations

from enum import IntEnum

import pytest

from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from dataplatform.workflows.states import StepState, WorkflowState


@pytest.mark.parametrize(
    ("ours", "proto", "prefix"),
    [
        (WorkflowState, wf_pb.WorkflowState, "WORKFLOW_STATE_"),
        (StepState, wf_pb.StepState, "STEP_STATE_"),
    ],
)
def test_states_mirror_the_proto_enum(ours: type[IntEnum], proto: object, prefix: str) -> None:
    """Every stored state is the proto value of the same name, and every proto value but
    UNSPECIFIED has its Python twin (a state added to the proto fails here until mirrored)."""
    values = dict(proto.items())  # type: ignore[attr-defined]
    expected = {k.removeprefix(prefix): v for k, v in values.items() if v != 0}
    assert {m.name: int(m) for m in ours} == expected
