"""Fan-out (`for_each`) through the real gateway: items run as steps of their own, at most
`max_concurrency` at once, outputs in input order; fail-fast and collect; the item bound;
lists known at submit and at run time; task items served by an SDK worker; and kill -9 of
taskproc and of dataplatform in the middle of a fan-out."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from tests.taskproc.helpers import finish, new_user, spec, step_status, submit


def fan(name: str = "each", for_each: str = "${input.items}", **fields: Any) -> dict[str, Any]:
    step = {"name": name, "op": "noop", "for_each": for_each}
    step.update(fields)
    step.setdefault("inputs", {"echo": "${item}"})
    return step


async def test_outputs_come_back_in_input_order(suite, gateway_channel) -> None:
    """Items finishing out of order (later ones sleep less) still give outputs in input
    order, and a dependant reads them through ${steps.NAME.output.items}."""
    token = await new_user(suite, gateway_channel)
    items = [{"n": i, "ms": (5 - i) * 40} for i in range(6)]
    workflow = await submit(
        gateway_channel,
        token,
        spec(
            fan(inputs={"echo": "n=${item.n}", "sleep_ms": "${item.ms}"}, max_concurrency=6),
            {
                "name": "after",
                "op": "noop",
                "depends_on": ["each"],
                "inputs": {"echo": "${steps.each.output.items}"},
            },
            input={"items": items},
        ),
    )
    done = await finish(gateway_channel, token, workflow.workflow_id)
    assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, done.error
    out = json_format.MessageToDict(step_status(done, "each").output)
    assert [o["echo"] for o in out["items"]] == [f"n={i}" for i in range(6)]
    assert [s.name for s in done.steps] == ["each", "after"]
