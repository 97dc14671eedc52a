"""`WorkflowSpec.input` and `${input.PATH}` references, through the real gateway: values are
put in place at submit (types kept for a whole-string reference), and a missing or
malformed path is a field violation before anything is stored."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import json_format

from tests.conftest import field_violations
from tests.taskproc.helpers import finish, new_user, spec, step_status, submit


async def test_input_references_are_replaced_at_submit(suite, gateway_channel) -> None:
    token = await new_user(suite, gateway_channel)
    workflow = spec(
        {"name": "a", "op": "noop", "inputs": {"echo": "${input.docs}"}},
        {"name": "b", "op": "noop", "inputs": {"echo": "for ${input.customer.name}: ${input.n}"}},
        {"name": "c", "op": "noop", "inputs": {"echo": "${input}"}},
        input={"docs": ["x", {"y": 1}], "customer": {"name": "acme"}, "n": 3},
    )
    accepted = await submit(gateway_channel, token, workflow)
    stored = json_format.MessageToDict(accepted.spec.steps[1].inputs)
    assert stored == {"echo": "for acme: 3"}, stored
    done = await finish(gateway_channel, token, accepted.workflow_id)
    outputs = {s.name: json_format.MessageToDict(s.output) for s in done.steps}
    assert outputs["a"]["echo"] == ["x", {"y": 1}]
    assert outputs["b"]["echo"] == "for acme: 3"
    assert outputs["c"]["echo"]["customer"] == {"name": "acme"}
    assert step_status(done, "a").state == step_status(done, "c").state


@pytest.mark.parametrize(
    ("echo", "fragment"),
    [
        ("${input.missing}", "spec.input has no 'missing'"),
        ("${input.docs.5}", "spec.input has no '5'"),
        ("x ${input.bad ref}", "malformed reference"),
    ],
)
async def test_bad_input_references_are_field_violations(
    suite, gateway_channel, echo, fragment
) -> None:
    token = await new_user(suite, gateway_channel)
    workflow = spec({"name": "a", "op": "noop", "inputs": {"echo": echo}}, input={"docs": ["only"]})
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await submit(gateway_channel, token, workflow)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(err.value)
    assert fragment in violations.get("spec.steps[0].inputs.echo", ""), violations


async def test_an_oversized_input_is_refused(suite, gateway_channel) -> None:
    token = await new_user(suite, gateway_channel)
    big = "x" * (suite.settings.taskproc.max_input_bytes + 1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await submit(gateway_channel, token, spec({"name": "a", "op": "noop"}, input={"b": big}))
    assert "spec.input" in field_violations(err.value)
