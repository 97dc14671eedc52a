"""Schedules: the ScheduleStoreService servicer and the ticker, over migration 008's
`schedules` table.

Any number of dataplatform replicas tick. Each one's ticker claims due schedules with
`FOR UPDATE SKIP LOCKED` and, in the same transaction, creates each tick's workflow through
`WorkflowRepository.create` (idempotency key `schedule:<id>:<tick ISO>`, as the schedule's
owner) and advances `next_tick_at`. The row lock keeps two replicas off one schedule, and
the idempotency key makes a tick's workflow unique even if a tick were ever run twice, so
each tick runs exactly once.

What a due tick does:
- catch-up: a tick due longer ago than `taskproc.schedule_grace_seconds` was missed (the
  suite was down). SKIP_MISSED drops missed ticks; LATEST runs the latest one when no tick
  is on time; ALL runs them all, the latest `taskproc.schedule_max_catch_up`.
- overlap, while the previous workflow is active: SKIP drops the tick; BUFFER_ONE keeps it
  (one at most) and starts it once the previous workflow has ended; ALLOW_ALL runs it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import psycopg
from opentelemetry.instrumentation.utils import suppress_instrumentation

from aiwfe.data.v1 import schedule_store_service_pb2 as pb
from aiwfe.data.v1 import schedule_store_service_pb2_grpc as pb_grpc
from aiwfe.data.v1 import workflow_store_service_pb2 as wf_store_pb
from aiwfe.runtime import cron, metrics
from aiwfe.runtime.aio import cancel_and_wait, wait_event
from aiwfe.runtime.config import TaskProcSettings
from aiwfe.runtime.errors import FailedPrecondition, NotFound
from aiwfe.runtime.rbac import Rbac
from aiwfe.runtime.validation import Violations
from aiwfe.taskproc.v1 import schedule_service_pb2 as sched_pb
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from dataplatform.db import Database, DictConnection
from dataplatform.workflows import messages
from dataplatform.workflows.repository import WorkflowRepository
from dataplatform.workflows.states import ACTIVE, sql
from dataplatform.workflows.watches import Wakeups

log = logging.getLogger("aiwfe.dataplatform.schedules")
# Failures that abort the whole transaction (WorkflowRepository.tx retries deadlocks and
# serialization failures; a lost connection is the ticker loop's to retry).
_RETRY = (
    psycopg.errors.DeadlockDetected,
    psycopg.errors.SerializationFailure,
    psycopg.OperationalError,
)

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 50
CLAIM_BATCH = 20  # schedules per ticker transaction
_MIN_SLEEP = 0.01
_ERROR_BACKOFF = 1.0

_SKIP, _BUFFER_ONE, _ALLOW_ALL = (
    sched_pb.OVERLAP_POLICY_SKIP,
    sched_pb.OVERLAP_POLICY_BUFFER_ONE,
    sched_pb.OVERLAP_POLICY_ALLOW_ALL,
)
_SKIP_MISSED, _LATEST, _ALL = (
    sched_pb.CATCH_UP_POLICY_SKIP_MISSED,
    sched_pb.CATCH_UP_POLICY_LATEST,
    sched_pb.CATCH_UP_POLICY_ALL,
)

_COLUMNS = (
    "schedule_id, owner_id, owner_username, owner_roles, name, cron, time_zone, spec,"
    " overlap_policy, catch_up_policy, paused, next_tick_at, last_tick_at, last_workflow_id,"
    " buffered_tick_at, skipped_ticks, created_at, updated_at"
)
# Due schedules, and schedules holding a buffered tick whose previous workflow has ended,
# with their owner as the owner is now (roles, disabled; NULL once deleted).
_CLAIM = (
    "SELECT s.*, now() AS db_now, u.username AS current_username, u.roles AS current_roles,"
    "   u.disabled AS owner_disabled"
    " FROM schedules s LEFT JOIN users u ON u.user_id::text = s.owner_id"
    " WHERE NOT s.paused AND (s.next_tick_at <= now() OR (s.buffered_tick_at IS NOT NULL"
    "   AND NOT EXISTS (SELECT 1 FROM workflows w WHERE w.workflow_id = s.last_workflow_id"
    f"   AND w.state IN ({sql(*ACTIVE)}))))"
    " ORDER BY s.next_tick_at LIMIT %(limit)s FOR UPDATE OF s SKIP LOCKED"
)
# What a schedule's owner must still hold for its ticks to run.
SCHEDULE_PERMISSION = "api:workflow:schedule"


def not_found(schedule_id: str) -> NotFound:
    return NotFound(
        "schedule not found", reason="SCHEDULE_NOT_FOUND", metadata={"scheduleId": schedule_id}
    )


def _schedule_id(value: str) -> uuid.UUID:
    """A schedule id; anything that is not a UUID cannot exist, so it is NOT_FOUND."""
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise not_found(value) from None


def schedule_message(row: dict[str, Any]) -> sched_pb.Schedule:
    """The Schedule message of a `schedules` row."""
    out = sched_pb.Schedule(
        schedule_id=str(row["schedule_id"]),
        name=row["name"],
        cron=row["cron"],
        time_zone=row["time_zone"],
        overlap_policy=row["overlap_policy"],
        catch_up_policy=row["catch_up_policy"],
        paused=row["paused"],
        last_workflow_id=str(row["last_workflow_id"] or ""),
        owner=row["owner_id"],
        skipped_ticks=row["skipped_ticks"],
        create_time=messages.timestamp(row["created_at"]),
        update_time=messages.timestamp(row["updated_at"]),
    )
    out.spec.ParseFromString(row["spec"])
    for field, column in (
        ("next_tick_time", "next_tick_at"),
        ("last_tick_time", "last_tick_at"),
        ("buffered_tick_time", "buffered_tick_at"),
    ):
        if row[column] is not None:
            getattr(out, field).CopyFrom(messages.timestamp(row[column]))
    return out


def tick_key(schedule_id: uuid.UUID, tick: datetime, trigger: bool = False) -> str:
    """A tick's idempotency key: one workflow per schedule and tick time."""
    when = tick.astimezone(UTC).isoformat()
    return f"schedule:{schedule_id}:{'trigger:' if trigger else ''}{when}"


def plan_ticks(
    row: dict[str, Any], now: datetime, limits: TaskProcSettings
) -> tuple[list[datetime], int]:
    """The due ticks of `row` its catch-up policy runs (oldest first) and how many it
    drops (at least: ticks beyond the catch-up bound are not counted one by one)."""
    ticks, truncated = cron.due(
        row["cron"], row["time_zone"], row["next_tick_at"], now, limits.schedule_max_catch_up
    )
    grace = timedelta(seconds=limits.schedule_grace_seconds)
    on_time = [t for t in ticks if now - t <= grace]
    policy = row["catch_up_policy"]
    if policy == _ALL:
        run = ticks
    elif policy == _LATEST:
        run = on_time or ticks[-1:]
    else:
        run = on_time
    return run, len(ticks) - len(run) + int(truncated)


@dataclass
class TickCounts:
    """What ticking did: schedules claimed, workflows created, ticks found already run."""

    claimed: int = 0
    created: int = 0
    duplicates: int = 0
    failed: int = 0  # schedules whose tick raised (skipped to their next tick)
    skipped: int = 0  # ticks that started nothing (overlap, catch-up, owner)


class ScheduleRepository:
    """The SQL of schedules, and one tick of one schedule."""

    def __init__(self, db: Database, workflows: WorkflowRepository, rbac: Rbac) -> None:
        self._db = db
        self._workflows = workflows
        self._rbac = rbac

    async def insert(self, owner: wf_store_pb.WorkflowOwner, s: sched_pb.Schedule) -> Any:
        sid = uuid.uuid4()
        async with self._db.autocommit() as conn:
            cur = await conn.execute(
                "INSERT INTO schedules (schedule_id, owner_id, owner_username, owner_roles,"
                " name, cron, time_zone, spec, overlap_policy, catch_up_policy, paused,"
                " next_tick_at)"
                " VALUES (%(id)s, %(owner_id)s, %(username)s, %(roles)s, %(name)s, %(cron)s,"
                " %(tz)s, %(spec)s, %(overlap)s, %(catch_up)s, %(paused)s, %(next)s)"
                f" RETURNING {_COLUMNS}",
                {
                    "id": sid,
                    "owner_id": owner.user_id,
                    "username": owner.username,
                    "roles": list(owner.roles),
                    "name": s.name,
                    "cron": s.cron,
                    "tz": s.time_zone,
                    "spec": s.spec.SerializeToString(),
                    "overlap": s.overlap_policy or _SKIP,
                    "catch_up": s.catch_up_policy or _SKIP_MISSED,
                    "paused": s.paused,
                    "next": None if s.paused else await _next_tick(conn, s.cron, s.time_zone),
                },
            )
            row = _one(await cur.fetchone())
        return schedule_message(row)

    @staticmethod
    async def visible(
        conn: DictConnection, schedule_id: str, scope: wf_store_pb.WorkflowScope, lock: bool
    ) -> dict[str, Any]:
        """The schedule row (locked FOR UPDATE with `lock`), if `scope` may see it."""
        sid = _schedule_id(schedule_id)
        cur = await conn.execute(
            f"SELECT {_COLUMNS}, now() AS db_now FROM schedules WHERE schedule_id = %(id)s"
            + (" FOR UPDATE" if lock else ""),
            {"id": sid},
        )
        row = await cur.fetchone()
        if row is None or (not scope.all_owners and row["owner_id"] != scope.owner_id):
            raise not_found(schedule_id)
        return row

    async def get(self, schedule_id: str, scope: wf_store_pb.WorkflowScope) -> Any:
        async with self._db.autocommit() as conn:
            return schedule_message(await self.visible(conn, schedule_id, scope, lock=False))

    async def page(
        self, scope: wf_store_pb.WorkflowScope, after: tuple[datetime, uuid.UUID] | None, size: int
    ) -> tuple[list[Any], str]:
        """A page of schedules, newest first, and the next page's token ("" at the end)."""
        where = ["true"]
        args: dict[str, Any] = {"limit": size + 1}
        if not scope.all_owners:
            where.append("owner_id = %(owner_id)s")
            args["owner_id"] = scope.owner_id
        if after is not None:
            where.append("(created_at, schedule_id) < (%(created)s, %(id)s)")
            args["created"], args["id"] = after
        async with self._db.autocommit() as conn:
            cur = await conn.execute(
                f"SELECT {_COLUMNS} FROM schedules WHERE {' AND '.join(where)}"
                " ORDER BY created_at DESC, schedule_id DESC LIMIT %(limit)s",
                args,
            )
            rows = await cur.fetchall()
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = messages.page_token(rows[-1]["created_at"], rows[-1]["schedule_id"])
        return [schedule_message(r) for r in rows], token

    async def pause(self, schedule_id: str, scope: wf_store_pb.WorkflowScope, paused: bool) -> Any:
        """Pauses (dropping a buffered tick) or resumes (next tick: the cron's next after
        now; ticks while paused are not caught up). Pausing a paused schedule changes
        nothing, nor does resuming a running one."""
        async with self._db.pool.connection() as conn:
            row = await self.visible(conn, schedule_id, scope, lock=True)
            if row["paused"] != paused:
                nxt = None if paused else await _next_tick(conn, row["cron"], row["time_zone"])
                cur = await conn.execute(
                    "UPDATE schedules SET paused = %(paused)s, next_tick_at = %(next)s,"
                    " buffered_tick_at = NULL, updated_at = now()"
                    f" WHERE schedule_id = %(id)s RETURNING {_COLUMNS}",
                    {"paused": paused, "next": nxt, "id": row["schedule_id"]},
                )
                row = _one(await cur.fetchone())
            return schedule_message(row)

    async def delete(self, schedule_id: str, scope: wf_store_pb.WorkflowScope) -> Any:
        async with self._db.pool.connection() as conn:
            row = await self.visible(conn, schedule_id, scope, lock=True)
            await conn.execute(
                "DELETE FROM schedules WHERE schedule_id = %(id)s", {"id": row["schedule_id"]}
            )
            return schedule_message(row)

    async def trigger(
        self, conn: DictConnection, schedule_id: str, scope: wf_store_pb.WorkflowScope
    ) -> pb.TriggerStoredScheduleResponse:
        """Submits the schedule's workflow now (key with the trigger time), paused or not
        and whatever its overlap policy; it becomes the schedule's last workflow."""
        row = await self.visible(conn, schedule_id, scope, lock=True)
        cur = await conn.execute(
            "SELECT username AS current_username, roles AS current_roles,"
            " disabled AS owner_disabled FROM users WHERE user_id::text = %(owner)s",
            {"owner": row["owner_id"]},
        )
        owner = await cur.fetchone()
        row.update(owner or {"current_username": None, "current_roles": None})
        if not self._owner_allowed(row):
            raise FailedPrecondition(
                "the schedule's owner may no longer run it",
                reason="SCHEDULE_OWNER_NOT_ALLOWED",
                metadata={"scheduleId": schedule_id},
            )
        key = tick_key(row["schedule_id"], row["db_now"], trigger=True)
        workflow = (await self._submit(conn, row, key)).workflow
        cur = await conn.execute(
            "UPDATE schedules SET last_workflow_id = %(wf)s, updated_at = now()"
            f" WHERE schedule_id = %(id)s RETURNING {_COLUMNS}",
            {"wf": uuid.UUID(workflow.workflow_id), "id": row["schedule_id"]},
        )
        updated = _one(await cur.fetchone())
        return pb.TriggerStoredScheduleResponse(
            workflow=workflow, schedule=schedule_message(updated)
        )

    def _owner_allowed(self, row: dict[str, Any]) -> bool:
        """The owner, disabled, deleted or no longer allowed to schedule, runs nothing."""
        return row.get("owner_disabled") is False and self._rbac.allows(
            tuple(row["current_roles"]), SCHEDULE_PERMISSION
        )

    async def _submit(self, conn: DictConnection, row: dict[str, Any], key: str) -> Any:
        """Creates the schedule's workflow as its owner as the owner is now (name and
        roles read with the row), in the caller's transaction."""
        spec = wf_pb.WorkflowSpec()
        spec.ParseFromString(row["spec"])
        request = wf_store_pb.CreateWorkflowRequest(
            owner=wf_store_pb.WorkflowOwner(
                user_id=row["owner_id"],
                username=row["current_username"],
                roles=list(row["current_roles"]),
            ),
            spec=spec,
            idempotency_key=key,
            schedule_id=str(row["schedule_id"]),
        )
        return await self._workflows.create(request, uuid.uuid4(), conn)

    async def _active(self, conn: DictConnection, workflow_id: uuid.UUID | None) -> bool:
        if workflow_id is None:
            return False
        cur = await conn.execute(
            f"SELECT 1 FROM workflows WHERE workflow_id = %(id)s AND state IN ({sql(*ACTIVE)})",
            {"id": workflow_id},
        )
        return await cur.fetchone() is not None

    async def tick_due(self, conn: DictConnection, limits: TaskProcSettings) -> TickCounts:
        """Claims up to CLAIM_BATCH due schedules (SKIP LOCKED) and runs their ticks."""
        cur = await conn.execute(_CLAIM, {"limit": CLAIM_BATCH})
        rows = await cur.fetchall()
        counts = TickCounts(claimed=len(rows))
        for row in rows:
            try:
                async with conn.transaction():  # a savepoint: one bad schedule, not all
                    await self._tick(conn, row, limits, counts)
            except _RETRY:
                raise  # the whole transaction is retried (WorkflowRepository.tx)
            except Exception:
                # Left due, it would fail again on every look: its ticks until now are
                # skipped instead, and the next one is tried.
                log.exception("schedule %s failed to tick; skipped", row["schedule_id"])
                await conn.execute(
                    "UPDATE schedules SET next_tick_at = %(next)s, buffered_tick_at = NULL,"
                    " skipped_ticks = skipped_ticks + 1, updated_at = now()"
                    " WHERE schedule_id = %(id)s",
                    {
                        "next": cron.next_after(row["cron"], row["time_zone"], row["db_now"]),
                        "id": row["schedule_id"],
                    },
                )
                counts.failed += 1
        return counts

    async def _tick(
        self,
        conn: DictConnection,
        row: dict[str, Any],
        limits: TaskProcSettings,
        counts: TickCounts,
    ) -> None:
        """One claimed schedule: its buffered tick if the previous workflow ended, then
        its due ticks under its catch-up and overlap policies; advances next_tick_at."""
        now = row["db_now"]
        last_wf, last_tick = row["last_workflow_id"], row["last_tick_at"]
        buffered, skipped = row["buffered_tick_at"], 0
        active = await self._active(conn, last_wf)
        ticks: list[datetime] = []
        if buffered is not None and not active:
            ticks.append(buffered)
            buffered = None
        nxt = row["next_tick_at"]
        if nxt is not None and nxt <= now:
            run, skipped = plan_ticks(row, now, limits)
            ticks += run
            nxt = cron.next_after(row["cron"], row["time_zone"], now)
        overlap = row["overlap_policy"]
        allowed = self._owner_allowed(row)
        for tick in ticks:
            if not allowed:
                skipped += 1
                continue
            if active and overlap != _ALLOW_ALL:
                if overlap == _BUFFER_ONE and buffered is None:
                    buffered = tick
                else:
                    skipped += 1
                continue
            reply = await self._submit(conn, row, tick_key(row["schedule_id"], tick))
            last_wf, last_tick, active = uuid.UUID(reply.workflow.workflow_id), tick, True
            # A tick's workflow already there would mean the tick ran twice (never, while
            # the row lock holds): counted, so the replica test can see it.
            counts.created += reply.created
            counts.duplicates += not reply.created
        counts.skipped += skipped
        await conn.execute(
            "UPDATE schedules SET next_tick_at = %(next)s, last_tick_at = %(last_tick)s,"
            " last_workflow_id = %(last_wf)s, buffered_tick_at = %(buffered)s,"
            " skipped_ticks = skipped_ticks + %(skipped)s, updated_at = now()"
            " WHERE schedule_id = %(id)s",
            {
                "next": nxt,
                "last_tick": last_tick,
                "last_wf": last_wf,
                "buffered": buffered,
                "skipped": skipped,
                "id": row["schedule_id"],
            },
        )

    async def seconds_to_next(self) -> float | None:
        """Seconds until the earliest tick of an unpaused schedule, if any."""
        async with self._db.autocommit() as conn:
            cur = await conn.execute(
                "SELECT extract(epoch FROM min(next_tick_at) - now())::float8 AS s"
                " FROM schedules WHERE NOT paused"
            )
            row = await cur.fetchone()
        return None if row is None or row["s"] is None else float(row["s"])


async def _next_tick(conn: DictConnection, expr: str, zone_name: str) -> datetime:
    """The cron's next tick after the database's clock (the clock the ticker compares to)."""
    cur = await conn.execute("SELECT now() AS now")
    return cron.next_after(expr, zone_name, _one(await cur.fetchone())["now"])


def _one(row: dict[str, Any] | None) -> dict[str, Any]:
    """The row a statement that always returns one returned."""
    if row is None:
        raise RuntimeError("the statement returned no row")
    return row


class Ticker:
    """The loop that ticks due schedules on this replica (every replica runs one)."""

    def __init__(
        self,
        repo: ScheduleRepository,
        workflows: WorkflowRepository,
        wakeups: Wakeups,
        limits: TaskProcSettings,
    ) -> None:
        self._repo = repo
        self._workflows = workflows
        self._wakeups = wakeups
        self._limits = limits
        self._task: asyncio.Task[None] | None = None
        self._poke = asyncio.Event()
        self.totals = TickCounts()  # since start (tests and logs)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="schedule-ticker")

    def poke(self) -> None:
        """A schedule changed on this replica: look again now."""
        self._poke.set()

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    async def tick_once(self) -> int:
        """Ticks every due schedule (in batches); returns the workflows created."""
        total = 0
        limits = self._limits
        while True:

            async def work(conn: DictConnection) -> TickCounts:
                return await self._repo.tick_due(conn, limits)

            counts = await self._workflows.tx(work)
            total += counts.created
            self.totals.claimed += counts.claimed
            self.totals.created += counts.created
            self.totals.duplicates += counts.duplicates
            self.totals.failed += counts.failed
            self.totals.skipped += counts.skipped
            for outcome, n in (
                ("started", counts.created),
                ("skipped", counts.skipped),
                ("failed", counts.failed),
            ):
                if n:
                    metrics.workflow_schedule_ticks.labels(outcome).inc(n)
            if counts.created:
                self._wakeups.work()
            if counts.claimed < CLAIM_BATCH:
                return total

    async def _run(self) -> None:
        # A polling loop is not traced (issue #20: idle loops flooded the exporter with
        # spans): its queries, several a second per replica, would each be a root span.
        with suppress_instrumentation():
            await self._loop()

    async def _loop(self) -> None:
        interval = self._limits.schedule_tick_interval
        while True:
            try:
                await self.tick_once()
                until = await self._repo.seconds_to_next()
                sleep = interval if until is None else max(_MIN_SLEEP, min(interval, until))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("ticking schedules failed; retrying", exc_info=True)
                sleep = _ERROR_BACKOFF
            self._poke.clear()
            await wait_event(self._poke, sleep)


class ScheduleStore(pb_grpc.ScheduleStoreServiceServicer):
    """ScheduleStoreService: taskproc validated the request; this checks what it stores."""

    def __init__(
        self,
        db: Database,
        workflows: WorkflowRepository,
        wakeups: Wakeups,
        limits: TaskProcSettings,
        rbac: Rbac,
    ) -> None:
        self.repo = ScheduleRepository(db, workflows, rbac)
        self._workflows = workflows
        self._wakeups = wakeups
        self.ticker = Ticker(self.repo, workflows, wakeups, limits)

    async def CreateStoredSchedule(
        self, request: pb.CreateStoredScheduleRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateStoredScheduleResponse:
        s = request.schedule
        v = Violations()
        v.text(request.owner.user_id, "owner.user_id", max_chars=128)
        v.text(s.name, "schedule.name", max_chars=200)
        for field, problem in cron.problems(s.cron, s.time_zone):
            v.add(f"schedule.{field}", problem)
        v.check(len(s.spec.steps) > 0, "schedule.spec.steps", "must not be empty")
        v.check(
            s.overlap_policy in sched_pb.OverlapPolicy.values(),
            "schedule.overlap_policy",
            "unknown",
        )
        v.check(
            s.catch_up_policy in sched_pb.CatchUpPolicy.values(),
            "schedule.catch_up_policy",
            "unknown",
        )
        v.raise_if_any()
        stored = await self.repo.insert(request.owner, s)
        self.ticker.poke()
        return pb.CreateStoredScheduleResponse(schedule=stored)

    async def GetStoredSchedule(
        self, request: pb.GetStoredScheduleRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetStoredScheduleResponse:
        return pb.GetStoredScheduleResponse(
            schedule=await self.repo.get(request.schedule_id, request.scope)
        )

    async def ListStoredSchedules(
        self, request: pb.ListStoredSchedulesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListStoredSchedulesResponse:
        v = Violations()
        v.check(
            0 <= request.page_size <= MAX_PAGE_SIZE,
            "page_size",
            f"must be between 0 and {MAX_PAGE_SIZE}",
        )
        v.raise_if_any()
        after = messages.page_after(request.page_token) if request.page_token else None
        schedules, token = await self.repo.page(
            request.scope, after, request.page_size or DEFAULT_PAGE_SIZE
        )
        return pb.ListStoredSchedulesResponse(schedules=schedules, next_page_token=token)

    async def PauseStoredSchedule(
        self, request: pb.PauseStoredScheduleRequest, context: grpc.aio.ServicerContext
    ) -> pb.PauseStoredScheduleResponse:
        schedule = await self.repo.pause(request.schedule_id, request.scope, request.paused)
        self.ticker.poke()
        return pb.PauseStoredScheduleResponse(schedule=schedule)

    async def DeleteStoredSchedule(
        self, request: pb.DeleteStoredScheduleRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteStoredScheduleResponse:
        return pb.DeleteStoredScheduleResponse(
            schedule=await self.repo.delete(request.schedule_id, request.scope)
        )

    async def TriggerStoredSchedule(
        self, request: pb.TriggerStoredScheduleRequest, context: grpc.aio.ServicerContext
    ) -> pb.TriggerStoredScheduleResponse:
        async def work(conn: DictConnection) -> pb.TriggerStoredScheduleResponse:
            return await self.repo.trigger(conn, request.schedule_id, request.scope)

        reply = await self._workflows.tx(work)
        self._wakeups.work()
        return reply
