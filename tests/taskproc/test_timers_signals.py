"""Durable timers (`sleep`, `not_before`) and signals (`wait_for_signal`, SignalWorkflow)
through the real gateway: nothing waits in memory, signals sent early are kept, duplicates
are no-ops, timeouts take the default or fail the step, payload schemas are enforced, and
a timer due while the suite was down fires once it is back."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from aiwfe.app.suite import start_suite
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from aiwfe.taskproc.v1 import workflow_service_pb2_grpc as wf_grpc
from tests.conftest import bearer, field_violations
from tests.taskproc.helpers import finish, get, new_user, spec, step_status, submit


def payload(**fields: Any) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(fields)
    return out


async def signal(
    channel: grpc.aio.Channel, token: str, workflow_id: str, name: str, **kw: Any
) -> wf_pb.SignalWorkflowResponse:
    return await wf_grpc.WorkflowServiceStub(channel).SignalWorkflow(
        wf_pb.SignalWorkflowRequest(workflow_id=workflow_id, name=name, **kw),
        metadata=bearer(token),
        timeout=10,
    )


def wait_step(name: str = "approve", **inputs: Any) -> dict[str, Any]:
    return {"name": name, "op": "wait_for_signal", "inputs": {"name": "approval", **inputs}}


async def test_sleep_is_a_durable_timer_no_worker_runs(
    suite, gateway_channel, database_dsn
) -> None:
    """A 1 s sleep between two steps delays the second by about a second; the attempt is
    recorded by dataplatform's timer, not a worker."""
    token = await new_user(suite, gateway_channel)
    started = time.monotonic()
    workflow = await submit(
        gateway_channel,
        token,
        spec(
            {"name": "nap", "op": "sleep", "inputs": {"seconds": 1}},
            {
                "name": "after",
                "op": "noop",
                "depends_on": ["nap"],
                "inputs": {"echo": "${steps.nap.output.slept_seconds}"},
            },
        ),
    )
    done = await finish(gateway_channel, token, workflow.workflow_id)
    took = time.monotonic() - started
    assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED
    assert 1.0 <= took < 3.0, took
    assert json_format.MessageToDict(step_status(done, "after").output)["echo"] == 1
    async with await psycopg.AsyncConnection.connect(database_dsn) as conn:
        cur = await conn.execute(
            "SELECT worker_id FROM workflow_step_attempts WHERE workflow_id = %s"
            " AND step_name = 'nap'",
            (workflow.workflow_id,),
        )
        assert await cur.fetchall() == [("dataplatform:timers",)]


async def test_not_before_holds_a_step_until_its_time(suite, gateway_channel) -> None:
    """A step whose not_before is 1.5 s ahead starts no earlier, though runnable at once."""
    token = await new_user(suite, gateway_channel)
    at = timestamp_pb2.Timestamp()
    at.FromNanoseconds(time.time_ns() + 1_500_000_000)
    workflow_spec = spec({"name": "later", "op": "noop", "inputs": {}})
    workflow_spec.steps[0].not_before.CopyFrom(at)
    workflow = await submit(gateway_channel, token, workflow_spec)
    done = await finish(gateway_channel, token, workflow.workflow_id)
    assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED
    started = done.update_time.ToNanoseconds()
    assert started >= at.ToNanoseconds(), "the step ran before its not_before"


async def test_a_signal_sent_before_its_step_is_kept_and_delivered(suite, gateway_channel) -> None:
    """Sent while the workflow is still on its first step, the signal waits and becomes the
    approval step's output once that step is reached; a later step reads it."""
    token = await new_user(suite, gateway_channel)
    workflow = await submit(
        gateway_channel,
        token,
        spec(
            {"name": "draft", "op": "noop", "inputs": {"sleep_ms": 800}},
            {**wait_step(), "depends_on": ["draft"]},
            {
                "name": "publish",
                "op": "noop",
                "depends_on": ["approve"],
                "inputs": {"echo": "${steps.approve.output.by}"},
            },
        ),
    )
    early = await signal(
        gateway_channel, token, workflow.workflow_id, "approval", payload=payload(by="ann")
    )
    assert (early.delivered, early.duplicate) == (False, False)
    done = await finish(gateway_channel, token, workflow.workflow_id)
    assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED
    assert json_format.MessageToDict(step_status(done, "approve").output) == {"by": "ann"}
    assert json_format.MessageToDict(step_status(done, "publish").output)["echo"] == "ann"


async def test_a_waiting_step_takes_a_signal_at_once_and_duplicates_are_no_ops(
    suite, gateway_channel
) -> None:
    """A step already waiting takes the signal in the SignalWorkflow call itself; the same
    signal_id again changes nothing."""
    token = await new_user(suite, gateway_channel)
    workflow = await submit(gateway_channel, token, spec(wait_step()))
    for _ in range(50):  # the step is reached as soon as the workflow is stored
        if step_status(await get(gateway_channel, token, workflow.workflow_id), "approve").state:
            break
        await asyncio.sleep(0.02)
    sent = await signal(
        gateway_channel,
        token,
        workflow.workflow_id,
        "approval",
        payload=payload(ok=True),
        signal_id="s-1",
    )
    assert sent.delivered and not sent.duplicate
    done = await finish(gateway_channel, token, workflow.workflow_id)
    assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED
    with pytest.raises(grpc.aio.AioRpcError) as finished:
        await signal(
            gateway_channel, token, workflow.workflow_id, "approval", payload=payload(ok=False)
        )
    assert finished.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # Deduplication: a second workflow waits for two signals; the first is sent twice.
    two = await submit(
        gateway_channel, token, spec(wait_step("a"), {**wait_step("b"), "depends_on": ["a"]})
    )
    first = await signal(
        gateway_channel, token, two.workflow_id, "approval", payload=payload(n=1), signal_id="x"
    )
    again = await signal(
        gateway_channel, token, two.workflow_id, "approval", payload=payload(n=9), signal_id="x"
    )
    assert again.duplicate and not again.delivered and not first.duplicate
    await asyncio.sleep(0.5)
    pending = await get(gateway_channel, token, two.workflow_id)
    assert step_status(pending, "b").state != wf_pb.STEP_STATE_SUCCEEDED
    await signal(
        gateway_channel, token, two.workflow_id, "approval", payload=payload(n=2), signal_id="y"
    )
    done = await finish(gateway_channel, token, two.workflow_id)
    assert [json_format.MessageToDict(step_status(done, s).output) for s in "ab"] == [
        {"n": 1},
        {"n": 2},
    ]


async def test_a_signal_timeout_takes_the_default_or_fails(suite, gateway_channel) -> None:
    """No signal in time: a step with a default outputs it; one without fails the workflow
    saying which signal never came."""
    token = await new_user(suite, gateway_channel)
    with_default = await submit(
        gateway_channel,
        token,
        spec(wait_step(timeout_seconds=0.5, default={"approved": False})),
    )
    without = await submit(gateway_channel, token, spec(wait_step(timeout_seconds=0.5)))
    done = await finish(gateway_channel, token, with_default.workflow_id)
    assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED
    assert json_format.MessageToDict(step_status(done, "approve").output) == {"approved": False}
    failed = await finish(gateway_channel, token, without.workflow_id)
    assert failed.state == wf_pb.WORKFLOW_STATE_FAILED
    assert "no signal 'approval' within 0.5 s" in failed.error


async def test_signals_are_checked_against_the_workflow(suite, gateway_channel) -> None:
    """A payload breaking the step's schema, a signal no step waits for, and another user's
    workflow are refused; nothing is stored for them."""
    owner = await new_user(suite, gateway_channel)
    other = await new_user(suite, gateway_channel)
    schema = {
        "type": "object",
        "required": ["approved"],
        "properties": {"approved": {"type": "boolean"}},
    }
    workflow = await submit(gateway_channel, owner, spec(wait_step(schema=schema)))
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await signal(
            gateway_channel, owner, workflow.workflow_id, "approval", payload=payload(approved=1)
        )
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "payload['approved']" in field_violations(bad.value)
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await signal(gateway_channel, owner, workflow.workflow_id, "nobody-waits")
    assert "name" in field_violations(unknown.value)
    with pytest.raises(grpc.aio.AioRpcError) as foreign:
        await signal(
            gateway_channel, other, workflow.workflow_id, "approval", payload=payload(approved=True)
        )
    assert foreign.value.code() == grpc.StatusCode.NOT_FOUND
    sent = await signal(
        gateway_channel, owner, workflow.workflow_id, "approval", payload=payload(approved=True)
    )
    assert sent.delivered


async def test_timer_and_signal_specs_are_validated(suite, gateway_channel) -> None:
    """A sleep past the workflow timeout, a bad signal name, an invalid schema, a default
    breaking its schema and a not_before past the timeout are field violations."""
    token = await new_user(suite, gateway_channel)
    far = timestamp_pb2.Timestamp()
    far.FromNanoseconds(time.time_ns() + 3_600_000_000_000)
    late = spec({"name": "a", "op": "noop", "inputs": {}}, timeout_seconds=60)
    late.steps[0].not_before.CopyFrom(far)
    cases = [
        (
            spec({"name": "a", "op": "sleep", "inputs": {"seconds": 120}}, timeout_seconds=60),
            "inputs",
        ),
        (spec({"name": "a", "op": "sleep", "inputs": {}}), "inputs"),
        (spec({"name": "a", "op": "wait_for_signal", "inputs": {"name": "has space"}}), "inputs"),
        (
            spec(
                {
                    "name": "a",
                    "op": "wait_for_signal",
                    "inputs": {"name": "x", "schema": {"type": 5}},
                }
            ),
            "inputs",
        ),
        (
            spec(wait_step(schema={"type": "object", "required": ["k"]}, default={"j": 1})),
            "inputs",
        ),
        (late, "not_before"),
    ]
    for workflow_spec, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await submit(gateway_channel, token, workflow_spec)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, workflow_spec
        assert f"spec.steps[0].{field}" in field_violations(refused.value), workflow_spec


async def test_a_timer_due_while_the_suite_was_down_fires_once_it_is_back(
    base_overrides, suite, gateway_channel
) -> None:
    """The suite stops with a 1 s timer pending and stays down past it; a new suite on the
    same database fires it and the workflow finishes exactly once."""
    token = await new_user(suite, gateway_channel)
    workflow = await submit(
        gateway_channel,
        token,
        spec(
            {"name": "nap", "op": "sleep", "inputs": {"seconds": 1}},
            {"name": "after", "op": "noop", "depends_on": ["nap"], "inputs": {}},
        ),
    )
    await suite.stop()
    await asyncio.sleep(1.5)
    back = await start_suite(base_overrides)
    try:
        async with grpc.aio.insecure_channel(back.address("gateway")) as channel:
            from tests.conftest import login

            admin = await login(channel)
            done = await finish(channel, admin, workflow.workflow_id)
            assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED
            assert [s.attempts for s in done.steps] == [1, 1]
    finally:
        await back.stop()


def test_the_readme_example_is_a_valid_spec() -> None:
    """README's "Workflow language" example parses and passes submit-time validation."""
    from pathlib import Path

    import yaml

    from aiwfe.runtime.config import Settings
    from taskproc.spec import validate

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = text.index("name: review-answer")
    example = yaml.safe_load(text[start : text.index("```", start)])
    spec_ = validate(json_format.ParseDict(example, wf_pb.WorkflowSpec()), Settings().taskproc)
    assert [s.op for s in spec_.steps] == ["cognitive.generate", "sleep", "wait_for_signal", "noop"]
