"""ScheduleService against the real suite: ticks submit workflows as the owner, exactly
once per tick across dataplatform replicas, under overlap and catch-up policies; pause,
resume, delete and trigger; owner scoping, validation and permissions."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import psycopg
import pytest
from grpc_status import rpc_status

from aiwfe.app.suite import Suite, start_suite
from aiwfe.runtime import metrics
from aiwfe.runtime.server import start_service
from aiwfe.taskproc.v1 import schedule_service_pb2 as pb
from aiwfe.taskproc.v1 import schedule_service_pb2_grpc as pb_grpc
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from aiwfe.taskproc.v1 import workflow_service_pb2_grpc as wf_grpc
from dataplatform.service import DataPlatformService
from tests.conftest import bearer, field_violations
from tests.taskproc.helpers import finish, new_user, spec

EVERY_SECOND = "* * * * * *"
NOOP = spec({"name": "a", "op": "noop", "inputs": {"echo": "tick"}})
# A step no worker ever polls for: its workflow stays active (for overlap policies).
STUCK = spec(
    {"name": "wait", "op": "task", "inputs": {"queue": "nobody-polls", "type": "t", "input": 1}}
)


async def delete_all_schedules(dsn: str) -> None:
    """Leaves no schedule behind: the run's database is shared by every later suite, whose
    tickers would go on submitting a left per-second schedule's workflows."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("DELETE FROM schedules")


@pytest.fixture(autouse=True)
async def _no_schedule_left(base_overrides: dict[str, Any]) -> Any:
    yield
    await delete_all_schedules(base_overrides["database"]["postgres"]["dsn"])


def _stub(channel: grpc.aio.Channel) -> pb_grpc.ScheduleServiceStub:
    return pb_grpc.ScheduleServiceStub(channel)


async def create(
    channel: grpc.aio.Channel, token: str, workflow: wf_pb.WorkflowSpec = NOOP, **fields: Any
) -> pb.Schedule:
    request = pb.CreateScheduleRequest(
        name=fields.pop("name", "nightly"),
        cron=fields.pop("cron", EVERY_SECOND),
        spec=workflow,
        **fields,
    )
    reply = await _stub(channel).CreateSchedule(request, metadata=bearer(token), timeout=10)
    return reply.schedule


async def get(channel: grpc.aio.Channel, token: str, schedule_id: str) -> pb.Schedule:
    reply = await _stub(channel).GetSchedule(
        pb.GetScheduleRequest(schedule_id=schedule_id), metadata=bearer(token), timeout=10
    )
    return reply.schedule


async def pause(channel: grpc.aio.Channel, token: str, sid: str, paused: bool) -> pb.Schedule:
    reply = await _stub(channel).PauseSchedule(
        pb.PauseScheduleRequest(schedule_id=sid, paused=paused), metadata=bearer(token), timeout=10
    )
    return reply.schedule


async def keys(suite: Suite, schedule_id: str) -> list[tuple[str, str, int]]:
    """(idempotency key, workflow id, state) of the schedule's workflows, by key."""
    async with await psycopg.AsyncConnection.connect(
        suite.settings.database.postgres.dsn, autocommit=True
    ) as conn:
        cur = await conn.execute(
            "SELECT idempotency_key, workflow_id::text, state FROM workflows"
            " WHERE idempotency_key LIKE %s ORDER BY idempotency_key",
            (f"schedule:{schedule_id}:%",),
        )
        return [(r[0], r[1], r[2]) for r in await cur.fetchall()]


async def set_row(suite: Suite, schedule_id: str, assignments: str, *args: Any) -> None:
    """Changes a schedule's row behind the service's back (a simulated outage)."""
    async with await psycopg.AsyncConnection.connect(
        suite.settings.database.postgres.dsn, autocommit=True
    ) as conn:
        await conn.execute(
            f"UPDATE schedules SET {assignments} WHERE schedule_id = %s",  # noqa: S608
            (*args, schedule_id),
        )


async def until(predicate: Any, within: float, what: str) -> Any:
    """Polls the async `predicate` until it returns something truthy."""
    end = time.monotonic() + within
    while True:
        value = await predicate()
        if value:
            return value
        assert time.monotonic() < end, f"never: {what}"
        await asyncio.sleep(0.05)


async def test_a_tick_submits_a_workflow_that_runs_to_success(suite, gateway_channel) -> None:
    """A per-second schedule's tick creates a workflow (key schedule:<id>:<tick>) as its
    owner, within a second of the tick, and it runs to SUCCEEDED."""
    token = await new_user(suite, gateway_channel)
    created = await create(gateway_channel, token, time_zone="Europe/Paris")
    assert created.next_tick_time.seconds > 0 and not created.paused
    assert created.overlap_policy == pb.OVERLAP_POLICY_SKIP
    assert created.catch_up_policy == pb.CATCH_UP_POLICY_SKIP_MISSED
    found = await until(lambda: keys(suite, created.schedule_id), 5, "a tick's workflow")
    key, workflow_id, _ = found[0]
    tick = datetime.fromisoformat(key.split(":", 2)[2])
    done = await finish(gateway_channel, token, workflow_id)
    assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED
    assert done.steps[0].output["echo"] == "tick"
    lateness = done.create_time.ToDatetime(tzinfo=UTC) - tick
    assert timedelta(0) <= lateness < timedelta(seconds=1), lateness
    me = await get(gateway_channel, token, created.schedule_id)
    assert me.last_workflow_id and me.last_tick_time.seconds >= int(tick.timestamp())
    assert me.next_tick_time.ToDatetime(tzinfo=UTC) > tick
    await pause(gateway_channel, token, created.schedule_id, True)


async def test_two_replicas_tick_each_schedule_once_per_tick(suite, gateway_channel) -> None:
    """With two dataplatform replicas ticking one database, every second of several
    per-second schedules gets exactly one workflow: no tick twice, none found already run,
    no gap between the first and the last."""
    other = await start_service(DataPlatformService(suite.settings), "127.0.0.1", 0)
    try:
        token = await new_user(suite, gateway_channel)
        schedules = [
            await create(gateway_channel, token, STUCK, overlap_policy=pb.OVERLAP_POLICY_ALLOW_ALL)
            for _ in range(4)
        ]
        tickers = [
            suite.running["dataplatform"].service.schedules.ticker,  # type: ignore[attr-defined]
            other.service.schedules.ticker,  # type: ignore[attr-defined]
        ]
        # Both loops run; on top, both replicas race explicit ticks for 3 s.
        end = time.monotonic() + 3
        while time.monotonic() < end:
            await asyncio.gather(*(t.tick_once() for t in tickers))
            await asyncio.sleep(0.02)
        for s in schedules:
            await pause(gateway_channel, token, s.schedule_id, True)
    finally:
        await other.stop(grace=0.5)
    total = 0
    for s in schedules:
        found = await keys(suite, s.schedule_id)
        ticks = [datetime.fromisoformat(k.split(":", 2)[2]) for k, _, _ in found]
        assert len(ticks) >= 3, ticks
        assert len(set(ticks)) == len(ticks)
        assert ticks == [ticks[0] + timedelta(seconds=i) for i in range(len(ticks))], ticks
        total += len(found)
    assert sum(t.totals.duplicates for t in tickers) == 0
    assert sum(t.totals.created for t in tickers) == total


async def test_overlap_skip_buffer_one_and_allow_all(suite, gateway_channel) -> None:
    """While the previous workflow is active, SKIP starts nothing more, BUFFER_ONE holds one
    tick and starts it once the previous workflow ends, ALLOW_ALL starts one per tick."""
    token = await new_user(suite, gateway_channel)
    started, skipped = _ticks("started"), _ticks("skipped")
    skip = await create(gateway_channel, token, STUCK, overlap_policy=pb.OVERLAP_POLICY_SKIP)
    buffer = await create(
        gateway_channel, token, STUCK, overlap_policy=pb.OVERLAP_POLICY_BUFFER_ONE
    )
    allow = await create(gateway_channel, token, STUCK, overlap_policy=pb.OVERLAP_POLICY_ALLOW_ALL)

    async def three_ticks_later() -> bool:
        return len(await keys(suite, allow.schedule_id)) >= 3

    await until(three_ticks_later, 6, "three ticks")
    assert len(await keys(suite, skip.schedule_id)) == 1
    assert (await get(gateway_channel, token, skip.schedule_id)).skipped_ticks >= 1
    held = await get(gateway_channel, token, buffer.schedule_id)
    assert len(await keys(suite, buffer.schedule_id)) == 1
    assert held.buffered_tick_time.seconds > 0 and held.skipped_ticks >= 1
    assert _ticks("started") >= started + 5  # 1 + 1 + at least 3
    assert _ticks("skipped") >= skipped + 1
    await pause(gateway_channel, token, skip.schedule_id, True)
    await pause(gateway_channel, token, allow.schedule_id, True)
    # The first workflow ends: the buffered tick starts (the schedule keeps ticking).
    first = (await keys(suite, buffer.schedule_id))[0]
    await wf_grpc.WorkflowServiceStub(gateway_channel).CancelWorkflow(
        wf_pb.CancelWorkflowRequest(workflow_id=first[1]), metadata=bearer(token), timeout=10
    )
    second = await until(
        lambda: _more_than(suite, buffer.schedule_id, 1), 5, "the buffered tick's workflow"
    )
    assert (
        second[1][0].split(":", 2)[2] == held.buffered_tick_time.ToDatetime(tzinfo=UTC).isoformat()
    )
    await pause(gateway_channel, token, buffer.schedule_id, True)


def _ticks(outcome: str) -> float:
    """workflow_schedule_ticks_total{outcome} in this process (the suite runs in it)."""
    value = metrics.REGISTRY.get_sample_value("workflow_schedule_ticks_total", {"outcome": outcome})
    return value or 0.0


async def _more_than(suite: Suite, sid: str, n: int) -> list[tuple[str, str, int]] | None:
    found = await keys(suite, sid)
    return sorted(found, key=lambda k: k[0]) if len(found) > n else None


@pytest.fixture
async def outage_suite(base_overrides: dict[str, Any]) -> Any:
    """A suite whose catch-up bound is 3 ticks."""
    overrides = {**base_overrides, "taskproc": {"schedule_max_catch_up": 3}}
    running = await start_suite(overrides)
    yield running
    await running.stop()


async def test_catch_up_policies_after_an_outage(outage_suite) -> None:
    """Ten days of daily 03:00 Paris ticks missed: SKIP_MISSED runs none, LATEST runs the
    latest once, ALL runs the latest three (the configured bound); each then waits for
    the next 03:00."""
    suite = outage_suite
    async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
        token = await new_user(suite, channel)
        paris = ZoneInfo("Europe/Paris")
        now = datetime.now(paris)
        latest = now.replace(hour=3, minute=0, second=0, microsecond=0)
        if latest > now:
            latest -= timedelta(days=1)
        expected_latest = [latest.date() - timedelta(days=d) for d in (2, 1, 0)]
        first = (latest - timedelta(days=10)).astimezone(UTC)
        made = {}
        for policy in (
            pb.CATCH_UP_POLICY_SKIP_MISSED,
            pb.CATCH_UP_POLICY_LATEST,
            pb.CATCH_UP_POLICY_ALL,
        ):
            s = await create(
                channel,
                token,
                cron="0 3 * * *",
                time_zone="Europe/Paris",
                paused=True,
                catch_up_policy=policy,
                overlap_policy=pb.OVERLAP_POLICY_ALLOW_ALL,
            )
            # The suite was down for ten days: the next tick is long past.
            await set_row(suite, s.schedule_id, "paused = false, next_tick_at = %s", first)
            made[policy] = s.schedule_id
        suite.running["dataplatform"].service.schedules.ticker.poke()  # type: ignore[attr-defined]

        async def advanced() -> bool:
            for sid in made.values():
                s = await get(channel, token, sid)
                if s.next_tick_time.ToDatetime(tzinfo=UTC) < datetime.now(UTC):
                    return False
            return True

        await until(advanced, 5, "every schedule ticked")
        skipped = await get(channel, token, made[pb.CATCH_UP_POLICY_SKIP_MISSED])
        assert await keys(suite, made[pb.CATCH_UP_POLICY_SKIP_MISSED]) == []
        assert skipped.skipped_ticks >= 3
        nxt = skipped.next_tick_time.ToDatetime(tzinfo=UTC).astimezone(paris)
        assert (nxt.hour, nxt.minute) == (3, 0) and nxt > now
        one = await keys(suite, made[pb.CATCH_UP_POLICY_LATEST])
        assert [datetime.fromisoformat(k.split(":", 2)[2]) for k, _, _ in one] == [
            latest.astimezone(UTC)
        ]
        three = await keys(suite, made[pb.CATCH_UP_POLICY_ALL])
        ticks = [datetime.fromisoformat(k.split(":", 2)[2]).astimezone(paris) for k, _, _ in three]
        assert [t.date() for t in ticks] == expected_latest
        assert all((t.hour, t.minute) == (3, 0) for t in ticks)
        for _, workflow_id, _ in one + three:
            done = await finish(channel, token, workflow_id)
            assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED


@pytest.mark.parametrize(
    "change", ["disabled = true", "roles = '{readonly}'"], ids=["disabled", "demoted"]
)
async def test_an_owner_no_longer_allowed_runs_nothing(suite, gateway_channel, change) -> None:
    """Once its owner is disabled, or keeps no role granting api:workflow:schedule, a
    schedule's ticks start no workflow (counted as skipped) and a trigger is refused
    (FAILED_PRECONDITION, SCHEDULE_OWNER_NOT_ALLOWED)."""
    token = await new_user(suite, gateway_channel)
    s = await create(gateway_channel, token, STUCK, overlap_policy=pb.OVERLAP_POLICY_ALLOW_ALL)
    await until(lambda: keys(suite, s.schedule_id), 5, "a first tick")
    async with await psycopg.AsyncConnection.connect(
        suite.settings.database.postgres.dsn, autocommit=True
    ) as conn:
        await conn.execute(
            f"UPDATE users SET {change} WHERE user_id::text = %s",  # noqa: S608
            (s.owner,),
        )
    count = len(await keys(suite, s.schedule_id))
    before = await _skipped(suite, s.schedule_id)
    await asyncio.sleep(2)
    assert len(await keys(suite, s.schedule_id)) <= count + 1  # one tick may be in flight
    assert await _skipped(suite, s.schedule_id) >= before + 1
    # Nor does a trigger, even an admin's.
    admin = await new_user(suite, gateway_channel, ("admin",))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _stub(gateway_channel).TriggerSchedule(
            pb.TriggerScheduleRequest(schedule_id=s.schedule_id), metadata=bearer(admin)
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    status = rpc_status.from_call(err.value)
    assert status is not None and "SCHEDULE_OWNER_NOT_ALLOWED" in str(status.details)


async def _skipped(suite: Suite, schedule_id: str) -> int:
    async with await psycopg.AsyncConnection.connect(
        suite.settings.database.postgres.dsn, autocommit=True
    ) as conn:
        cur = await conn.execute(
            "SELECT skipped_ticks FROM schedules WHERE schedule_id = %s", (schedule_id,)
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def test_a_schedule_that_cannot_tick_does_not_stop_the_others(suite, gateway_channel) -> None:
    """A schedule whose tick raises (its stored spec corrupted) is skipped to its next
    tick, counted, while another schedule ticked in the same pass keeps running."""
    token = await new_user(suite, gateway_channel)
    bad = await create(gateway_channel, token, STUCK, overlap_policy=pb.OVERLAP_POLICY_ALLOW_ALL)
    good = await create(gateway_channel, token, STUCK, overlap_policy=pb.OVERLAP_POLICY_ALLOW_ALL)
    await set_row(suite, bad.schedule_id, "spec = %s", b"\xff\xff not a WorkflowSpec")
    ticker = suite.running["dataplatform"].service.schedules.ticker  # type: ignore[attr-defined]
    failed = ticker.totals.failed

    async def good_ticked_twice() -> bool:
        return len(await keys(suite, good.schedule_id)) >= 2

    await until(good_ticked_twice, 5, "the good schedule ticks on")
    assert ticker.totals.failed > failed
    before = await _skipped(suite, bad.schedule_id)
    assert before >= 1
    await asyncio.sleep(1.2)
    assert await _skipped(suite, bad.schedule_id) > before  # each tick skipped, not stuck
    for s in (bad, good):
        await set_row(suite, s.schedule_id, "paused = true, next_tick_at = NULL")


async def test_pause_and_resume(suite, gateway_channel) -> None:
    """A paused schedule has no next tick and starts nothing; resumed, it ticks again."""
    token = await new_user(suite, gateway_channel)
    s = await create(gateway_channel, token, STUCK, paused=True)
    assert s.paused and not s.HasField("next_tick_time")
    await asyncio.sleep(1.5)
    assert await keys(suite, s.schedule_id) == []
    resumed = await pause(gateway_channel, token, s.schedule_id, False)
    assert not resumed.paused and resumed.HasField("next_tick_time")
    await until(lambda: keys(suite, s.schedule_id), 5, "a tick after resume")
    paused = await pause(gateway_channel, token, s.schedule_id, True)
    assert paused.paused and not paused.HasField("next_tick_time")
    count = len(await keys(suite, s.schedule_id))
    await asyncio.sleep(1.5)
    assert len(await keys(suite, s.schedule_id)) == count


async def test_delete_stops_ticking_and_forgets_the_schedule(suite, gateway_channel) -> None:
    """A deleted schedule is NOT_FOUND, gone from the list, and starts no more workflows."""
    token = await new_user(suite, gateway_channel)
    s = await create(gateway_channel, token, STUCK, overlap_policy=pb.OVERLAP_POLICY_ALLOW_ALL)
    await until(lambda: keys(suite, s.schedule_id), 5, "a first tick")
    gone = await _stub(gateway_channel).DeleteSchedule(
        pb.DeleteScheduleRequest(schedule_id=s.schedule_id), metadata=bearer(token), timeout=10
    )
    assert gone.schedule.schedule_id == s.schedule_id
    count = len(await keys(suite, s.schedule_id))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await get(gateway_channel, token, s.schedule_id)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await _stub(gateway_channel).ListSchedules(
        pb.ListSchedulesRequest(), metadata=bearer(token), timeout=10
    )
    assert s.schedule_id not in [x.schedule_id for x in listed.schedules]
    await asyncio.sleep(1.5)
    assert len(await keys(suite, s.schedule_id)) == count


async def test_trigger_runs_the_schedule_now(suite, gateway_channel) -> None:
    """TriggerSchedule submits the workflow at once, even paused, with a trigger key; it
    runs to SUCCEEDED and becomes the schedule's last workflow."""
    token = await new_user(suite, gateway_channel)
    s = await create(gateway_channel, token, cron="0 3 1 1 *", paused=True)
    reply = await _stub(gateway_channel).TriggerSchedule(
        pb.TriggerScheduleRequest(schedule_id=s.schedule_id), metadata=bearer(token), timeout=10
    )
    assert reply.schedule.last_workflow_id == reply.workflow.workflow_id
    [(key, workflow_id, _)] = await keys(suite, s.schedule_id)
    assert workflow_id == reply.workflow.workflow_id
    assert key.startswith(f"schedule:{s.schedule_id}:trigger:")
    done = await finish(gateway_channel, token, workflow_id)
    assert done.state == wf_pb.WORKFLOW_STATE_SUCCEEDED


async def test_another_users_schedule_is_not_found(suite, gateway_channel) -> None:
    """Another user cannot see, pause, delete or trigger a schedule (NOT_FOUND,
    SCHEDULE_NOT_FOUND) nor list it; an admin sees it."""
    owner = await new_user(suite, gateway_channel)
    other = await new_user(suite, gateway_channel)
    admin = await new_user(suite, gateway_channel, ("admin",))
    s = await create(gateway_channel, owner, paused=True)
    stub = _stub(gateway_channel)
    sid = s.schedule_id
    for call in (
        stub.GetSchedule(pb.GetScheduleRequest(schedule_id=sid), metadata=bearer(other)),
        stub.PauseSchedule(pb.PauseScheduleRequest(schedule_id=sid), metadata=bearer(other)),
        stub.DeleteSchedule(pb.DeleteScheduleRequest(schedule_id=sid), metadata=bearer(other)),
        stub.TriggerSchedule(pb.TriggerScheduleRequest(schedule_id=sid), metadata=bearer(other)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        status = rpc_status.from_call(err.value)
        assert status is not None and "SCHEDULE_NOT_FOUND" in str(status.details)
    listed = await stub.ListSchedules(pb.ListSchedulesRequest(), metadata=bearer(other))
    assert sid not in [x.schedule_id for x in listed.schedules]
    assert (await get(gateway_channel, admin, sid)).owner == s.owner
    assert await keys(suite, sid) == []  # nothing was triggered


async def test_every_validation_mistake_is_a_field_violation(suite, gateway_channel) -> None:
    """A bad cron, an unknown zone, unknown policies, an empty name and a spec mistake
    come back together, one field violation each; nothing is stored."""
    token = await new_user(suite, gateway_channel)
    bad_spec = spec({"name": "a", "op": "no-such-op"})
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(
            gateway_channel,
            token,
            bad_spec,
            name="",
            cron="61 * * * *",
            time_zone="Mars/Olympus_Mons",
            overlap_policy=99,  # type: ignore[arg-type]
            catch_up_policy=42,  # type: ignore[arg-type]
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = field_violations(err.value)
    assert set(fields) == {
        "name",
        "cron",
        "time_zone",
        "overlap_policy",
        "catch_up_policy",
        "spec.steps[0].op",
    }, fields
    assert "minute" in fields["cron"].lower()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(gateway_channel, token, cron="* * *")
    assert set(field_violations(err.value)) == {"cron"}
    listed = await _stub(gateway_channel).ListSchedules(
        pb.ListSchedulesRequest(), metadata=bearer(token), timeout=10
    )
    assert list(listed.schedules) == []


async def test_readonly_may_read_but_not_schedule(suite, gateway_channel) -> None:
    """The readonly role lists schedules but is PERMISSION_DENIED creating or triggering."""
    token = await new_user(suite, gateway_channel, ("readonly",))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(gateway_channel, token)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _stub(gateway_channel).TriggerSchedule(
            pb.TriggerScheduleRequest(schedule_id="x"), metadata=bearer(token), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    listed = await _stub(gateway_channel).ListSchedules(
        pb.ListSchedulesRequest(), metadata=bearer(token), timeout=10
    )
    assert list(listed.schedules) == []


async def test_list_pages_newest_first_with_tokens_bound_to_the_caller(
    suite, gateway_channel
) -> None:
    """ListSchedules pages newest first with an opaque token; another user's use of the
    token is INVALID_ARGUMENT."""
    token = await new_user(suite, gateway_channel)
    other = await new_user(suite, gateway_channel)
    made = [(await create(gateway_channel, token, name=f"s{i}", paused=True)) for i in range(3)]
    stub = _stub(gateway_channel)
    first = await stub.ListSchedules(
        pb.ListSchedulesRequest(page_size=2), metadata=bearer(token), timeout=10
    )
    assert [s.name for s in first.schedules] == ["s2", "s1"] and first.next_page_token
    rest = await stub.ListSchedules(
        pb.ListSchedulesRequest(page_size=2, page_token=first.next_page_token),
        metadata=bearer(token),
        timeout=10,
    )
    assert [s.schedule_id for s in rest.schedules] == [made[0].schedule_id]
    assert rest.next_page_token == ""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListSchedules(
            pb.ListSchedulesRequest(page_size=2, page_token=first.next_page_token),
            metadata=bearer(other),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
