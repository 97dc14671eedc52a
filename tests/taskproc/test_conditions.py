"""Step conditions (`when:`, CEL) through the real gateway: a true condition runs the step, a
false one skips it with an event, skips cascade or are run past (`on_dependency_skipped`),
conditions read the workflow input and earlier outputs, a condition that errors when it runs
fails the step for good, every mistake is a field violation at submit, and a skipped task
step never reaches a worker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from aiwfe.app.suite import Suite, start_suite
from aiwfe.taskproc.v1 import schedule_service_pb2 as sched_pb
from aiwfe.taskproc.v1 import schedule_service_pb2_grpc as sched_grpc
from aiwfe.taskproc.v1 import worker_service_pb2 as pb
from aiwfe.taskproc.v1 import worker_service_pb2_grpc as pb_grpc
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from aiwfe.taskproc.v1 import workflow_service_pb2_grpc as wf_grpc
from tests.conftest import bearer, field_violations
from tests.taskproc.helpers import finish, get, new_user, spec, step_status, submit, watch
from tests.taskproc.test_schedules import delete_all_schedules

ROLES = {
    "admin": {"permissions": ["api:*", "cognitive:*", "data:*", "system:*"]},
    "user": {"permissions": ["api:read", "api:workflow:*", "cognitive:inference"]},
    "readonly": {"permissions": ["api:read"]},
    "worker": {"permissions": ["worker:queue:*"]},
}
SKIPPED = wf_pb.STEP_STATE_SKIPPED
SUCCEEDED = wf_pb.STEP_STATE_SUCCEEDED


@pytest.fixture
async def suite(base_overrides: dict[str, Any]) -> AsyncIterator[Suite]:
    running = await start_suite({**base_overrides, "rbac": {"roles": ROLES}})
    yield running
    await running.stop()


def noop(name: str, *deps: str, when: str = "", **extra: Any) -> dict[str, Any]:
    step: dict[str, Any] = {"name": name, "op": "noop", "depends_on": list(deps)}
    if when:
        step["when"] = when
    step.update(extra)
    return step


Events = list[wf_pb.WatchWorkflowResponse]


async def run(
    channel: grpc.aio.Channel, token: str, workflow: wf_pb.WorkflowSpec
) -> tuple[wf_pb.Workflow, Events]:
    """Submits, follows to the end; returns the final workflow and its events."""
    submitted = await submit(channel, token, workflow)
    events = await watch(channel, token, submitted.workflow_id)
    return await get(channel, token, submitted.workflow_id), events


def states(workflow: wf_pb.Workflow) -> dict[str, int]:
    return {s.name: s.state for s in workflow.steps}


def step_events(events: Events, name: str) -> list[tuple[int, str]]:
    return [(e.step_state, e.message) for e in events if e.step_name == name]


async def test_a_true_condition_runs_and_a_false_one_skips_with_an_event(
    suite, gateway_channel
) -> None:
    """After `a`, `yes` (true) runs and `no` (false) is SKIPPED with the event "condition
    false: <expr>"; the workflow SUCCEEDS with a skipped step."""
    token = await new_user(suite, gateway_channel)
    workflow, events = await run(
        gateway_channel,
        token,
        spec(
            noop("a", inputs={"echo": "spam"}),
            noop("yes", "a", when='steps.a.output.echo == "spam"'),
            noop("no", "a", when='steps.a.output.echo != "spam"'),
        ),
    )
    assert workflow.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, workflow.error
    assert states(workflow) == {"a": SUCCEEDED, "yes": SUCCEEDED, "no": SKIPPED}
    assert step_events(events, "no") == [
        (SKIPPED, """condition false: steps.a.output.echo != "spam\"""")
    ]
    assert step_status(workflow, "no").attempts == 0
    assert events[-1].message == "workflow succeeded"


async def test_a_skip_cascades_to_dependants_by_default(suite, gateway_channel) -> None:
    """A false root condition skips its dependants and theirs (policy SKIP, the default,
    and SKIP spelled out); a workflow of skipped steps only SUCCEEDS at once."""
    token = await new_user(suite, gateway_channel)
    workflow, events = await run(
        gateway_channel,
        token,
        spec(
            noop("gate", when="false"),
            noop("b", "gate"),
            noop("c", "b", on_dependency_skipped="DEPENDENCY_SKIP_POLICY_SKIP"),
        ),
    )
    assert workflow.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, workflow.error
    assert states(workflow) == {"gate": SKIPPED, "b": SKIPPED, "c": SKIPPED}
    assert step_events(events, "b") == [(SKIPPED, "dependency 'gate' was skipped")]
    assert step_events(events, "c") == [(SKIPPED, "dependency 'b' was skipped")]
    assert all(s.attempts == 0 for s in workflow.steps)


async def test_policy_run_goes_on_past_a_skipped_dependency(suite, gateway_channel) -> None:
    """With on_dependency_skipped RUN a step runs though its dependency was skipped (and
    its own condition sees the skip); a step whose inputs reference the skipped output fails
    for good with a message saying so."""
    token = await new_user(suite, gateway_channel)
    run_policy = "DEPENDENCY_SKIP_POLICY_RUN"
    workflow, _ = await run(
        gateway_channel,
        token,
        spec(
            noop("gate", when="false"),
            noop(
                "after",
                "gate",
                when='steps.gate.state == "SKIPPED"',
                on_dependency_skipped=run_policy,
                inputs={"echo": "ran"},
            ),
            noop("last", "after", inputs={"echo": "${steps.after.output.echo}"}),
        ),
    )
    assert workflow.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, workflow.error
    assert states(workflow) == {"gate": SKIPPED, "after": SUCCEEDED, "last": SUCCEEDED}
    assert json_format.MessageToDict(step_status(workflow, "last").output)["echo"] == "ran"

    workflow, _ = await run(
        gateway_channel,
        token,
        spec(
            noop("gate", when="false"),
            noop(
                "uses",
                "gate",
                on_dependency_skipped=run_policy,
                inputs={"echo": "${steps.gate.output.echo}"},
                retry_policy={"max_attempts": 3},
            ),
        ),
    )
    assert workflow.state == wf_pb.WORKFLOW_STATE_FAILED
    uses = step_status(workflow, "uses")
    assert uses.state == wf_pb.STEP_STATE_FAILED and uses.attempts == 1
    assert "step 'gate' was skipped, so it has no output" in uses.error


async def test_a_root_condition_reads_the_workflow_input(suite, gateway_channel) -> None:
    """`input` is the workflow's input: the same spec runs its root step for one input and
    skips it for another (numbers are doubles)."""
    token = await new_user(suite, gateway_channel)
    steps = (noop("premium", when='input.tier == "gold" && input.seats >= 10.0'),)
    gold, _ = await run(gateway_channel, token, spec(*steps, input={"tier": "gold", "seats": 12}))
    assert states(gold) == {"premium": SUCCEEDED}
    few, _ = await run(gateway_channel, token, spec(*steps, input={"tier": "gold", "seats": 3}))
    assert states(few) == {"premium": SKIPPED}
    assert few.state == wf_pb.WORKFLOW_STATE_SUCCEEDED


async def test_a_runtime_error_fails_the_step_for_good(suite, gateway_channel) -> None:
    """A condition that errors when it runs (a missing key, a type error, a result that is
    not a bool) FAILS its step with no attempt or retry, names the expression and the
    error, and fails the workflow (the dead letter)."""
    token = await new_user(suite, gateway_channel)
    cases = {
        "steps.a.output.echo.missing == 1.0": "no such member in mapping: 'missing'",
        "steps.a.output.echo.text + 1.0 == 2.0": "no matching overload",
        "steps.a.output.echo.text": "gave a string, not a bool",
    }
    for expression, error in cases.items():
        workflow, events = await run(
            gateway_channel,
            token,
            spec(
                noop("a", inputs={"echo": {"text": "t"}}),
                noop("check", "a", when=expression, retry_policy={"max_attempts": 5}),
                noop("after", "check"),
            ),
        )
        assert workflow.state == wf_pb.WORKFLOW_STATE_FAILED, expression
        check = step_status(workflow, "check")
        assert check.state == wf_pb.STEP_STATE_FAILED and check.attempts == 0
        assert f"condition {expression!r}" in check.error and error in check.error, check.error
        assert step_status(workflow, "after").state == wf_pb.STEP_STATE_CANCELLED
        assert workflow.error == f"step 'check' failed: {check.error}"
        assert step_events(events, "check") == [(wf_pb.STEP_STATE_FAILED, check.error)]


async def test_every_condition_mistake_is_a_field_violation(suite, gateway_channel) -> None:
    """A syntax error, too long or too deep an expression, a step that is not an ancestor or
    does not exist, a computed step index, an unknown variable, a nested comprehension, an
    output field the step's op does not produce, an attribute of `steps.NAME` other than
    state and output, and an unknown skip policy are INVALID_ARGUMENT at
    `spec.steps[i].when` (or the policy's field), all in one answer."""
    token = await new_user(suite, gateway_channel)
    bad = {
        1: ("input.x >", "not a CEL expression"),
        2: ("true || " * 130 + "true", "at most 1024 characters"),
        3: ("(" * 15 + "true" + ")" * 15, "nests too deeply"),
        4: ("steps.sibling.state == 'SKIPPED'", "references step 'sibling', which is not in"),
        5: ("steps.ghost.state == 'SKIPPED'", "references unknown step 'ghost'"),
        6: ("steps[input.name].state == 'SKIPPED'", 'name a step as steps.NAME or steps["NAME"]'),
        7: ("secret == 1.0", "unknown variable 'secret'"),
        8: ("[[1]].all(x, x.exists(y, y > 0))", "cannot hold another"),
        9: ("steps.root.output.nothing == 1.0", "step 'root' has no output field 'nothing'"),
        10: ("steps.root.outputs == null", "steps.root has only state and output"),
    }
    steps = [noop("root")]
    for i in range(1, 11):
        steps.append(noop(f"s{i}", "root", when=bad[i][0]))
    steps.append(noop("sibling", "root"))
    workflow = spec(*steps)
    workflow.steps.add(name="policy", op="noop", on_dependency_skipped=9)  # type: ignore[arg-type]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await submit(gateway_channel, token, workflow)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = field_violations(caught.value)
    for i, (_, problem) in bad.items():
        assert problem in found.get(f"spec.steps[{i}].when", ""), (i, found)
    assert "unknown policy 9" in found["spec.steps[12].on_dependency_skipped"]
    assert len(found) == 11, found
    # And the same expressions are fine where they are valid: a steps["NAME"] index works.
    ok = spec(
        noop("root", inputs={"echo": "x"}),
        noop("s1", "root", when='steps["root"].output.echo == "x"'),
    )
    done = await finish(
        gateway_channel, token, (await submit(gateway_channel, token, ok)).workflow_id
    )
    assert states(done) == {"root": SUCCEEDED, "s1": SUCCEEDED}


def task(name: str, when: str, *deps: str) -> dict[str, Any]:
    return {
        "name": name,
        "op": "task",
        "depends_on": list(deps),
        "when": when,
        "inputs": {"queue": "conditional", "type": "work", "input": {"n": 1}},
    }


async def test_a_skipped_task_step_never_reaches_a_worker(suite, gateway_channel) -> None:
    """A task step whose condition is false is SKIPPED in the store: a worker polling its
    queue gets nothing, while the true one's task is polled and completed; timer and signal
    steps skip the same way (no waiting)."""
    token = await new_user(suite, gateway_channel)
    worker = await new_user(suite, gateway_channel, roles=("worker",))
    stub = pb_grpc.WorkerServiceStub(gateway_channel)
    workflow = spec(
        noop("a", inputs={"echo": "go"}),
        task("skipped", 'steps.a.output.echo == "stop"', "a"),
        task("runs", 'steps.a.output.echo == "go"', "a"),
        {"name": "nap", "op": "sleep", "when": "false", "inputs": {"seconds": 600}},
        {
            "name": "approve",
            "op": "wait_for_signal",
            "depends_on": ["a"],
            "when": "false",
            "inputs": {"name": "approval"},
        },
    )
    submitted = await submit(gateway_channel, token, workflow)
    polled = await stub.PollTask(
        pb.PollTaskRequest(queues=["conditional"], wait_seconds=5),
        metadata=bearer(worker),
        timeout=10,
    )
    assert polled.step_name == "runs", polled
    output = struct_pb2.Struct()
    output.update({"done": True})
    await stub.CompleteTask(
        pb.CompleteTaskRequest(task_token=polled.task_token, queue="conditional", output=output),
        metadata=bearer(worker),
        timeout=10,
    )
    done = await finish(gateway_channel, token, submitted.workflow_id)
    assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, done.error
    assert states(done) == {
        "a": SUCCEEDED,
        "skipped": SKIPPED,
        "runs": SUCCEEDED,
        "nap": SKIPPED,
        "approve": SKIPPED,
    }
    again = await stub.PollTask(
        pb.PollTaskRequest(queues=["conditional"], wait_seconds=1),
        metadata=bearer(worker),
        timeout=10,
    )
    assert again.task_token == "", again


async def test_conditions_after_a_timer_and_a_signal(suite, gateway_channel) -> None:
    """Steps reached by dataplatform itself have their conditions evaluated there too: after
    a timer fires (the sweep) and after a signal is delivered (SignalWorkflow)."""
    token = await new_user(suite, gateway_channel)
    submitted = await submit(
        gateway_channel,
        token,
        spec(
            {"name": "nap", "op": "sleep", "inputs": {"seconds": 0.2}},
            noop("rested", "nap", when="steps.nap.output.slept_seconds > 0.0"),
            {"name": "approve", "op": "wait_for_signal", "inputs": {"name": "approval"}},
            noop("publish", "approve", when="steps.approve.output.approved"),
            noop("reject", "approve", when="!steps.approve.output.approved"),
        ),
    )
    payload = struct_pb2.Struct()
    payload.update({"approved": False})
    await wf_grpc.WorkflowServiceStub(gateway_channel).SignalWorkflow(
        wf_pb.SignalWorkflowRequest(
            workflow_id=submitted.workflow_id, name="approval", payload=payload
        ),
        metadata=bearer(token),
        timeout=10,
    )
    done = await finish(gateway_channel, token, submitted.workflow_id)
    assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, done.error
    assert states(done) == {
        "nap": SUCCEEDED,
        "rested": SUCCEEDED,
        "approve": SUCCEEDED,
        "publish": SKIPPED,
        "reject": SUCCEEDED,
    }


async def test_a_scheduled_workflow_evaluates_its_root_conditions(
    suite, gateway_channel, base_overrides
) -> None:
    """A schedule's tick creates the workflow inside the ticker's transaction; its root
    conditions are evaluated there as at submit."""
    token = await new_user(suite, gateway_channel)
    stub = sched_grpc.ScheduleServiceStub(gateway_channel)
    try:
        created = await stub.CreateSchedule(
            sched_pb.CreateScheduleRequest(
                name="conditional",
                cron="0 3 1 1 *",
                paused=True,
                spec=spec(noop("gate", when="input.go"), noop("b", "gate"), input={"go": False}),
            ),
            metadata=bearer(token),
            timeout=10,
        )
        reply = await stub.TriggerSchedule(
            sched_pb.TriggerScheduleRequest(schedule_id=created.schedule.schedule_id),
            metadata=bearer(token),
            timeout=10,
        )
        done = await finish(gateway_channel, token, reply.workflow.workflow_id)
        assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED, done.error
        assert states(done) == {"gate": SKIPPED, "b": SKIPPED}
    finally:
        await delete_all_schedules(base_overrides["database"]["postgres"]["dsn"])
