"""WorkflowStoreService: taskproc's durable workflow state and step queue in PostgreSQL.

The queue is the `workflow_steps` table. Workers claim runnable steps with
`FOR UPDATE SKIP LOCKED` under a lease (owner + expiry); the claim bumps `attempt`, which is
the fencing token: results, failures, releases and lease extensions apply only where
`lease_owner = worker AND attempt = n AND state = RUNNING`, so a worker whose lease expired
can never record a result twice or advance a workflow twice. Expired leases are swept back
to claimable (crash recovery), counting as a failed attempt.

Every transition appends an event under the workflow row's lock, so per-workflow sequence
numbers are gap-free and commit in order: a watcher resuming `after_sequence` loses nothing.
Workers wake through `WaitForWork` (pushed in process on submit/complete/cancel, and to
other replicas through `replica_bus`) and poll as a fallback, because LISTEN/NOTIFY does
not survive PgBouncer's transaction pooling.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from datetime import datetime
from operator import itemgetter
from typing import Any, TypeVar

import grpc
import psycopg
from google.protobuf import json_format, struct_pb2, timestamp_pb2
from psycopg.types.json import Jsonb

from aiwfe import metrics
from aiwfe.data.v1 import workflow_store_service_pb2 as pb
from aiwfe.data.v1 import workflow_store_service_pb2_grpc as pb_grpc
from aiwfe.errors import InvalidArgument, NotFound
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from aiwfe.validation import Violations
from dataplatform.db import Database, DictConnection
from dataplatform.replica_bus import ReplicaBus

log = logging.getLogger("aiwfe.dataplatform.workflows")
T = TypeVar("T")

# WorkflowState / StepState numbers, as stored.
W_PENDING, W_RUNNING, W_SUCCEEDED, W_FAILED, W_CANCELLED, W_TIMED_OUT = 1, 2, 3, 4, 5, 6
S_PENDING, S_RUNNING, S_SUCCEEDED, S_FAILED, S_CANCELLED, S_RETRYING = 1, 2, 3, 4, 5, 6
ACTIVE = (W_PENDING, W_RUNNING)

MAX_STEPS = 1000
MAX_BATCH = 1000
MAX_ID_CHARS = 128
MAX_ERROR_CHARS = 4000
MAX_LEASE_SECONDS = 3600.0
# The error of an attempt whose lease expired: its step's error and its attempt row.
LEASE_LOST = "lease expired (worker lost)"
_SWEEP_INTERVAL = 0.25  # expired leases and workflow deadlines, at most this often
_HEARTBEAT_SECONDS = 15.0
_TX_RETRIES = 5
_EVENT_PAGE = 500
_DEFAULT_POLL_SECONDS = 1.0
_SUBMITTED = "workflow submitted"  # a workflow's first event
_RECENT_SECONDS = 5.0  # how long a new workflow's events wait for a watcher to adopt them
_RECENT_MAX = 10_000
_MIN_POLL_SECONDS = 0.01
_MAX_POLL_SECONDS = 30.0
# Events the current transaction appended, by workflow, pushed to watchers once it commits;
# None where nobody watched when they were appended (rows not fetched: watchers re-read).
_Appended = dict[uuid.UUID, list[dict[str, Any]] | None]
_touched: ContextVar[_Appended | None] = ContextVar("aiwfe_wf_touched", default=None)

_STEP_COLUMNS = "name, position, state, attempt, output, error"
_WF_COLUMNS = (
    "workflow_id, owner_id, owner_username, owner_roles, spec, state, error,"
    " created_at, updated_at, last_sequence"
)


def _ts(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _struct(value: dict[str, Any] | None) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    if value:
        out.update(value)
    return out


def _dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(struct)


def _workflow(row: dict[str, Any], steps: list[dict[str, Any]]) -> wf_pb.Workflow:
    """The Workflow message for a workflow row and its step rows (in spec order)."""
    wf = wf_pb.Workflow(
        workflow_id=str(row["workflow_id"]),
        owner=row["owner_id"],
        state=row["state"],
        error=row["error"],
        create_time=_ts(row["created_at"]),
        update_time=_ts(row["updated_at"]),
    )
    wf.spec.ParseFromString(row["spec"])
    for s in steps:
        status = wf.steps.add(
            name=s["name"], state=s["state"], attempts=s["attempt"], error=s["error"]
        )
        if s["output"] is not None:
            status.output.CopyFrom(_struct(s["output"]))
    return wf


def _event(e: dict[str, Any]) -> wf_pb.WatchWorkflowResponse:
    return wf_pb.WatchWorkflowResponse(
        sequence=e["sequence"],
        workflow_state=e["workflow_state"],
        step_name=e["step_name"],
        step_state=e["step_state"],
        message=e["message"],
        event_time=_ts(e["created_at"]),
    )


def _check_poll(v: Violations, seconds: float) -> None:
    v.check(
        seconds == 0 or _MIN_POLL_SECONDS <= seconds <= _MAX_POLL_SECONDS,
        "poll_interval_seconds",
        f"must be 0 (default) or between {_MIN_POLL_SECONDS:g} and {_MAX_POLL_SECONDS:g}",
    )


def _uuid(value: str) -> uuid.UUID:
    """A workflow id; anything that is not a UUID cannot exist, so it is NOT_FOUND."""
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise NotFound("workflow not found") from None


class Wakeups:
    """Fan-out to WaitForWork and WatchWorkflowEvents streams: work may be runnable,
    workflows stopped, events committed. This replica's commits wake its own streams in
    process and are told to the other replicas through `peers` when there are any."""

    def __init__(self) -> None:
        self._subscribers: set[_Subscriber] = set()
        self._watchers: dict[uuid.UUID, set[_Watch]] = {}
        self.peers: ReplicaBus | None = None

    def watch(self, workflow_id: uuid.UUID) -> _Watch:
        """Receives the events this process commits for `workflow_id` (`unwatch` after)."""
        watch = _Watch()
        self._watchers.setdefault(workflow_id, set()).add(watch)
        return watch

    def unwatch(self, workflow_id: uuid.UUID, watch: _Watch) -> None:
        watches = self._watchers.get(workflow_id)
        if watches is not None:
            watches.discard(watch)
            if not watches:
                del self._watchers[workflow_id]

    def watching(self, workflow_ids: set[uuid.UUID]) -> bool:
        return not self._watchers.keys().isdisjoint(workflow_ids)

    def subscribe(self) -> _Subscriber:
        sub = _Subscriber()
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: _Subscriber) -> None:
        self._subscribers.discard(sub)

    # --- this replica committed -----------------------------------------------------------

    def appended(self, events: _Appended) -> None:
        if not events:
            return
        self.deliver(events)
        if self.peers is not None:
            self.peers.events(events.keys())

    def work(self) -> None:
        self.wake_work()
        if self.peers is not None:
            self.peers.work()

    def stopped(self, workflow_ids: list[str]) -> None:
        self.wake_stopped(workflow_ids)
        if self.peers is not None:
            self.peers.stopped(workflow_ids)

    # --- this replica's streams only (also what another replica's notice wakes) ----------

    def wake_work(self) -> None:
        for sub in self._subscribers:
            sub.work = True
            sub.event.set()

    def wake_stopped(self, workflow_ids: list[str]) -> None:
        if not workflow_ids:
            return
        for sub in self._subscribers:
            if len(sub.stopped) < MAX_BATCH:
                sub.stopped.update(workflow_ids)
            sub.event.set()

    def deliver(self, events: _Appended) -> None:
        """Committed rows (None: unknown, re-read) to this replica's watchers."""
        for wid, rows in events.items():
            for watch in self._watchers.get(wid, ()):
                watch.push(rows)

    def wake_watchers(self, workflow_ids: set[uuid.UUID] | None) -> None:
        """Watchers of these workflows (None: all) re-read from the database."""
        if workflow_ids is None:
            watches = [w for ws in self._watchers.values() for w in ws]
        else:
            watches = [w for wid in workflow_ids for w in self._watchers.get(wid, ())]
        for watch in watches:
            watch.push(None)


class _Subscriber:
    __slots__ = ("event", "stopped", "work")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.work = True  # a new subscriber looks for work at once
        self.stopped: set[str] = set()
        self.event.set()


class _Watch:
    """One watcher's inbox: committed event rows pushed in process, and a wake-up."""

    __slots__ = ("event", "overflowed", "rows")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.rows: list[dict[str, Any]] = []
        self.overflowed = False

    def push(self, rows: list[dict[str, Any]] | None) -> None:
        if rows is None or len(self.rows) + len(rows) > _EVENT_PAGE:
            self.rows.clear()  # unknown rows or a slow reader: re-read from the database
            self.overflowed = True
        elif not self.overflowed:
            self.rows.extend(rows)
        self.event.set()

    def reset(self) -> None:
        """Before a database read, which sees everything committed so far."""
        self.event.clear()
        self.rows.clear()
        self.overflowed = False

    def take(self, after: int) -> tuple[list[dict[str, Any]], bool]:
        """The pushed events that follow `after` without a gap, and whether any are missing
        (another replica's commit in between, or an overflow): then the caller re-reads."""
        self.event.clear()
        rows = sorted((r for r in self.rows if r["sequence"] > after), key=itemgetter("sequence"))
        self.rows.clear()
        run: list[dict[str, Any]] = []
        for row in rows:
            if row["sequence"] != after + len(run) + 1:
                break
            run.append(row)
        return run, self.overflowed or len(run) < len(rows)


class WorkflowStore(pb_grpc.WorkflowStoreServiceServicer):
    def __init__(self, db: Database) -> None:
        self._db = db
        self.wakeups = Wakeups()
        self._next_sweep = 0.0
        # Watches CreateWorkflow left for new workflows: (expiry, owner, watch), oldest first.
        self._recent: dict[uuid.UUID, tuple[float, str, _Watch]] = {}

    # --- plumbing -------------------------------------------------------------------------

    async def _tx(self, work: Callable[[DictConnection], Awaitable[T]]) -> T:
        """Runs `work` in one transaction, retrying on deadlock/serialization failures."""
        for attempt in range(_TX_RETRIES):
            touched: _Appended = {}
            token = _touched.set(touched)
            try:
                async with self._db.pool.connection() as conn:
                    result = await work(conn)
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                if attempt == _TX_RETRIES - 1:
                    raise
                await asyncio.sleep(random.uniform(0.001, 0.02) * (attempt + 1))
                continue
            finally:
                _touched.reset(token)
            self.wakeups.appended(touched)  # committed: push to this replica's watchers
            return result
        raise AssertionError("unreachable")

    @staticmethod
    async def _lock_workflows(conn: DictConnection, ids: list[uuid.UUID]) -> None:
        """Locks workflow rows in id order, so concurrent batches never deadlock on them."""
        if len(ids) > 1:
            await conn.execute(
                "SELECT 1 FROM workflows WHERE workflow_id = ANY(%s)"
                " ORDER BY workflow_id FOR NO KEY UPDATE",
                (sorted(ids),),
            )

    async def _append_events(
        self,
        conn: DictConnection,
        events: list[tuple[uuid.UUID, str, int, str]],
        new_states: dict[uuid.UUID, tuple[int, str]] | None = None,
        promote_pending: bool = False,
        locked: bool = False,
    ) -> None:
        """Appends (workflow, step, step_state, message) events with gap-free sequences and
        applies workflow state changes (state, error) in the same statement."""
        if not events:
            return
        new_states = new_states or {}
        if not locked:
            await self._lock_workflows(conn, list({e[0] for e in events}))
        cur = await conn.execute(
            "WITH c AS (SELECT * FROM unnest(%(wf)s::uuid[], %(step)s::text[],"
            "   %(ss)s::smallint[], %(msg)s::text[]) WITH ORDINALITY AS c(wf, step, ss, msg, ord)),"
            " n AS (SELECT wf, count(*) AS k FROM c GROUP BY wf),"
            " t AS (SELECT * FROM unnest(%(twf)s::uuid[], %(tstate)s::smallint[], %(terr)s::text[])"
            "   AS t(wf, state, err)),"
            " w AS (UPDATE workflows w SET last_sequence = w.last_sequence + n.k,"
            "   state = COALESCE(t.state, CASE WHEN %(promote)s AND w.state = 1 THEN 2"
            "     ELSE w.state END),"
            "   error = COALESCE(t.err, w.error), updated_at = now()"
            "   FROM n LEFT JOIN t ON t.wf = n.wf WHERE w.workflow_id = n.wf"
            "   RETURNING w.workflow_id, w.last_sequence, n.k, w.state)"
            " INSERT INTO workflow_events"
            " (workflow_id, sequence, workflow_state, step_name, step_state, message)"
            " SELECT c.wf, w.last_sequence - w.k"
            "   + row_number() OVER (PARTITION BY c.wf ORDER BY c.ord), w.state, c.step, c.ss,"
            "   c.msg FROM c JOIN w ON w.workflow_id = c.wf"
            " RETURNING workflow_id, sequence, workflow_state, step_name, step_state, message,"
            "   created_at",
            {
                "wf": [e[0] for e in events],
                "step": [e[1] for e in events],
                "ss": [e[2] for e in events],
                "msg": [e[3][:MAX_ERROR_CHARS] for e in events],
                "twf": list(new_states),
                "tstate": [s for s, _ in new_states.values()],
                "terr": [err for _, err in new_states.values()],
                "promote": promote_pending,
            },
        )
        touched = _touched.get()
        if touched is not None:
            wids = {e[0] for e in events}
            if self.wakeups.watching(wids):
                for row in await cur.fetchall():
                    rows = touched.setdefault(row["workflow_id"], [])
                    if rows is not None:
                        rows.append(row)
            else:  # parsing rows nobody reads costs the queue; a late watcher re-reads
                touched.update(dict.fromkeys(wids))

    async def _load(self, conn: DictConnection, rows: list[dict[str, Any]]) -> list[wf_pb.Workflow]:
        """Workflow messages for workflow rows, with their steps in spec order."""
        if not rows:
            return []
        cur = await conn.execute(
            f"SELECT workflow_id, {_STEP_COLUMNS} FROM workflow_steps"
            " WHERE workflow_id = ANY(%s) ORDER BY workflow_id, position",
            ([r["workflow_id"] for r in rows],),
        )
        steps: dict[uuid.UUID, list[dict[str, Any]]] = {}
        for s in await cur.fetchall():
            steps.setdefault(s["workflow_id"], []).append(s)
        return [_workflow(r, steps.get(r["workflow_id"], [])) for r in rows]

    async def _visible(
        self, conn: DictConnection, workflow_id: str, scope: pb.WorkflowScope
    ) -> dict[str, Any]:
        wid = _uuid(workflow_id)
        cur = await conn.execute(
            f"SELECT {_WF_COLUMNS} FROM workflows WHERE workflow_id = %s", (wid,)
        )
        row = await cur.fetchone()
        if row is None or (not scope.all_owners and row["owner_id"] != scope.owner_id):
            raise NotFound("workflow not found")  # another owner's workflow looks absent
        return row

    # --- workflows ------------------------------------------------------------------------

    async def CreateWorkflow(
        self, request: pb.CreateWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateWorkflowResponse:
        """Stores a workflow. A new one is watched from before the insert for a few seconds,
        so the WatchWorkflowEvents that usually follows adopts its events with no read."""
        wid = uuid.uuid4()
        self._remember(wid, request.owner.user_id)
        created = False
        try:
            stored = await self._create(request, wid)
            created = stored.created
        finally:
            if not created:
                self._forget(wid)
        return stored

    def _remember(self, wid: uuid.UUID, owner: str) -> None:
        now = time.monotonic()
        while self._recent:  # oldest first: they expire in insertion order
            oldest, (expires, _, _) = next(iter(self._recent.items()))
            if expires > now and len(self._recent) < _RECENT_MAX:
                break
            self._forget(oldest)
        self._recent[wid] = (now + _RECENT_SECONDS, owner, self.wakeups.watch(wid))

    def _forget(self, wid: uuid.UUID) -> None:
        entry = self._recent.pop(wid, None)
        if entry is not None:
            self.wakeups.unwatch(wid, entry[2])

    def _adopt(self, wid: uuid.UUID, scope: pb.WorkflowScope, after: int) -> _Watch | None:
        """The watch CreateWorkflow left for `wid`, if this caller may see the workflow and
        follows it from the start (it holds every event this replica committed since)."""
        entry = self._recent.get(wid)
        if entry is None or after != 0 or not (scope.all_owners or scope.owner_id == entry[1]):
            return None
        del self._recent[wid]
        return entry[2]

    async def _create(
        self, request: pb.CreateWorkflowRequest, wid: uuid.UUID
    ) -> pb.CreateWorkflowResponse:
        """Stores the workflow as `wid`, or returns the one its idempotency key names."""
        spec = request.spec
        v = Violations()
        v.text(request.owner.user_id, "owner.user_id", max_chars=MAX_ID_CHARS)
        v.text(request.idempotency_key, "idempotency_key", max_chars=256, required=False)
        v.check(1 <= len(spec.steps) <= MAX_STEPS, "spec.steps", f"must list 1 to {MAX_STEPS}")
        v.check(spec.timeout_seconds > 0, "spec.timeout_seconds", "must be positive")
        v.raise_if_any()
        steps = list(spec.steps)
        policies = [st.retry_policy for st in steps]
        args = {
            "wid": wid,
            "owner": request.owner.user_id,
            "username": request.owner.username,
            "roles": list(request.owner.roles),
            "key": request.idempotency_key or None,
            "spec": spec.SerializeToString(),
            "priority": spec.priority,
            "timeout": spec.timeout_seconds,
            "name": [st.name for st in steps],
            "op": [st.op for st in steps],
            "inputs": [Jsonb(_dict(st.inputs)) for st in steps],
            "deps": [Jsonb(list(st.depends_on)) for st in steps],
            "ma": [p.max_attempts for p in policies],
            "ib": [p.initial_backoff_seconds for p in policies],
            "bm": [p.backoff_multiplier for p in policies],
            "mb": [p.max_backoff_seconds for p in policies],
            "j": [p.jitter for p in policies],
            "t": [st.timeout_seconds for st in steps],
            "submitted": _SUBMITTED,
        }
        # One statement, so one round trip in autocommit and atomic by itself: the workflow
        # row, its steps and its first event, unless the idempotency key was used before.
        # Only this replica can watch an id not out yet (RunStoredWorkflow, or the watch
        # CreateWorkflow leaves), so the first event is delivered here, not announced.
        async with self._db.autocommit() as conn:
            cur = await conn.execute(
                "WITH w AS (INSERT INTO workflows (workflow_id, owner_id, owner_username,"
                "   owner_roles, idempotency_key, spec, state, priority, deadline_at,"
                "   last_sequence)"
                "   VALUES (%(wid)s, %(owner)s, %(username)s, %(roles)s, %(key)s, %(spec)s, 1,"
                "   %(priority)s, now() + %(timeout)s * interval '1 second', 1)"
                f"  ON CONFLICT (owner_id, idempotency_key) DO NOTHING RETURNING {_WF_COLUMNS}),"
                " s AS (INSERT INTO workflow_steps (workflow_id, name, position, op, inputs,"
                "   depends_on, remaining_deps, state, priority, max_attempts, initial_backoff,"
                "   backoff_multiplier, max_backoff, jitter, timeout_seconds)"
                "   SELECT w.workflow_id, u.name, u.ord - 1, u.op, u.inputs,"
                "   ARRAY(SELECT jsonb_array_elements_text(u.deps)), jsonb_array_length(u.deps),"
                "   1, %(priority)s, u.ma, u.ib, u.bm, u.mb, u.j, u.t"
                "   FROM w, unnest(%(name)s::text[], %(op)s::text[], %(inputs)s::jsonb[],"
                "   %(deps)s::jsonb[], %(ma)s::int[], %(ib)s::float8[], %(bm)s::float8[],"
                "   %(mb)s::float8[], %(j)s::float8[], %(t)s::float8[])"
                "   WITH ORDINALITY AS u(name, op, inputs, deps, ma, ib, bm, mb, j, t, ord)),"
                " e AS (INSERT INTO workflow_events (workflow_id, sequence, workflow_state,"
                "   message, created_at)"
                "   SELECT workflow_id, 1, state, %(submitted)s, created_at FROM w)"
                " SELECT * FROM w",
                args,
            )
            row = await cur.fetchone()
            if row is not None:  # nothing to read back: every step is PENDING, no attempts
                self.wakeups.work()
                first = {
                    "sequence": 1,
                    "workflow_state": row["state"],
                    "step_name": "",
                    "step_state": 0,
                    "message": _SUBMITTED,
                    "created_at": row["created_at"],
                }
                self.wakeups.deliver({wid: [first]})  # watched before the insert, if at all
                pending = [
                    {"name": st.name, "state": S_PENDING, "attempt": 0, "error": "", "output": None}
                    for st in steps
                ]
                return pb.CreateWorkflowResponse(workflow=_workflow(row, pending), created=True)
            # The idempotency key was used before (or is being used right now: the insert
            # waited for that transaction, so its workflow is committed): the same workflow.
            cur = await conn.execute(
                f"SELECT {_WF_COLUMNS} FROM workflows WHERE owner_id = %s AND idempotency_key = %s",
                (request.owner.user_id, args["key"]),
            )
            existing = await cur.fetchone()
            assert existing is not None
            return pb.CreateWorkflowResponse(workflow=(await self._load(conn, [existing]))[0])

    async def GetStoredWorkflow(
        self, request: pb.GetStoredWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetStoredWorkflowResponse:
        async with self._db.pool.connection() as conn:
            row = await self._visible(conn, request.workflow_id, request.scope)
            return pb.GetStoredWorkflowResponse(workflow=(await self._load(conn, [row]))[0])

    async def ListStoredWorkflows(
        self, request: pb.ListStoredWorkflowsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListStoredWorkflowsResponse:
        v = Violations()
        v.check(0 <= request.page_size <= 1000, "page_size", "must be between 0 and 1000")
        v.raise_if_any()
        size = request.page_size or 50
        where: list[str] = ["true"]
        args: list[Any] = []
        if not request.scope.all_owners:
            where.append("owner_id = %s")
            args.append(request.scope.owner_id)
        if request.state:
            where.append("state = %s")
            args.append(int(request.state))
        if request.page_token:
            created, wid = _page_after(request.page_token)
            where.append("(created_at, workflow_id) < (%s, %s)")
            args += [created, wid]
        async with self._db.pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_WF_COLUMNS} FROM workflows WHERE {' AND '.join(where)}"
                " ORDER BY created_at DESC, workflow_id DESC LIMIT %s",
                (*args, size + 1),
            )
            rows = await cur.fetchall()
            more = len(rows) > size
            rows = rows[:size]
            workflows = await self._load(conn, rows)
        token = _page_token(rows[-1]["created_at"], rows[-1]["workflow_id"]) if more else ""
        return pb.ListStoredWorkflowsResponse(workflows=workflows, next_page_token=token)

    async def _stop(self, conn: DictConnection, wid: uuid.UUID, state: int, message: str) -> bool:
        """Cancels a workflow's unfinished steps and moves it to `state` (if still active)."""
        cur = await conn.execute(
            "UPDATE workflow_steps SET state = 5, lease_owner = NULL, lease_expires_at = NULL,"
            " updated_at = now() WHERE workflow_id = %s AND state IN (1, 2, 6) RETURNING name",
            (wid,),
        )
        names = [r["name"] for r in await cur.fetchall()]
        cur = await conn.execute(
            "SELECT state FROM workflows WHERE workflow_id = %s FOR NO KEY UPDATE", (wid,)
        )
        row = await cur.fetchone()
        if row is None or row["state"] not in ACTIVE:
            return False
        await self._append_events(
            conn,
            [*((wid, n, S_CANCELLED, message) for n in names), (wid, "", 0, message)],
            {wid: (state, message if state != W_CANCELLED else "")},
        )
        return True

    async def CancelStoredWorkflow(
        self, request: pb.CancelStoredWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelStoredWorkflowResponse:
        async def work(
            conn: DictConnection,
        ) -> tuple[pb.CancelStoredWorkflowResponse, bool]:
            row = await self._visible(conn, request.workflow_id, request.scope)
            stopped = False
            if row["state"] in ACTIVE:
                stopped = await self._stop(conn, row["workflow_id"], W_CANCELLED, "cancelled")
                row = await self._visible(conn, request.workflow_id, request.scope)
            wf = (await self._load(conn, [row]))[0]
            return pb.CancelStoredWorkflowResponse(workflow=wf), stopped

        reply, stopped = await self._tx(work)
        if stopped:
            self.wakeups.stopped([reply.workflow.workflow_id])
        return reply

    async def ListWorkflowEvents(
        self, request: pb.ListWorkflowEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListWorkflowEventsResponse:
        v = Violations()
        v.check(0 <= request.limit <= 1000, "limit", "must be between 0 and 1000")
        v.check(request.after_sequence >= 0, "after_sequence", "must not be negative")
        v.raise_if_any()
        row, events = await self._events(
            _uuid(request.workflow_id),
            request.scope,
            request.after_sequence,
            request.limit or _EVENT_PAGE,
        )
        return pb.ListWorkflowEventsResponse(
            events=[_event(e) for e in events],
            workflow_state=row["state"],
            last_sequence=row["last_sequence"],
        )

    async def WatchWorkflowEvents(
        self, request: pb.WatchWorkflowEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchWorkflowEventsResponse]:
        """One stream per watcher, until the workflow is terminal and every event is sent."""
        v = Violations()
        v.check(request.after_sequence >= 0, "after_sequence", "must not be negative")
        _check_poll(v, request.poll_interval_seconds)
        v.raise_if_any()
        wid = _uuid(request.workflow_id)
        watch = self._adopt(wid, request.scope, request.after_sequence)
        adopted = watch is not None
        if watch is None:
            watch = self.wakeups.watch(wid)  # before the first read: nothing is missed
        try:
            async for events in self._follow(
                wid,
                request.scope,
                request.after_sequence,
                request.poll_interval_seconds,
                watch,
                need_read=not adopted,
            ):
                yield pb.WatchWorkflowEventsResponse(events=events)
        finally:
            self.wakeups.unwatch(wid, watch)

    async def RunStoredWorkflow(
        self, request: pb.RunStoredWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RunStoredWorkflowResponse]:
        """CreateWorkflow, then its events. The new id is watched before the insert, so
        every event is pushed to this stream and none needs a read; a reused idempotency
        key follows the existing workflow from its first event, read from the database."""
        v = Violations()
        _check_poll(v, request.poll_interval_seconds)
        v.raise_if_any()
        wid = uuid.uuid4()
        watch = self.wakeups.watch(wid)
        try:
            stored = await self._create(request.create, wid)
            yield pb.RunStoredWorkflowResponse(stored=stored)
            if not stored.created:
                self.wakeups.unwatch(wid, watch)
                wid = uuid.UUID(stored.workflow.workflow_id)
                watch = self.wakeups.watch(wid)
            scope = pb.WorkflowScope(owner_id=request.create.owner.user_id)
            async for events in self._follow(
                wid, scope, 0, request.poll_interval_seconds, watch, not stored.created
            ):
                yield pb.RunStoredWorkflowResponse(
                    events=pb.WatchWorkflowEventsResponse(events=events)
                )
        finally:
            self.wakeups.unwatch(wid, watch)

    async def _follow(
        self,
        wid: uuid.UUID,
        scope: pb.WorkflowScope,
        after: int,
        poll_seconds: float,
        watch: _Watch,
        need_read: bool = True,
    ) -> AsyncIterator[list[wf_pb.WatchWorkflowResponse]]:
        """Batches of events after `after` until the workflow is terminal. Commits pushed
        to `watch` need no read; a gap in their sequences (another replica's commit), an
        overflow or `poll_seconds` without a push makes it read from the database."""
        poll = poll_seconds or _DEFAULT_POLL_SECONDS
        while True:
            if need_read:
                watch.reset()
                row, events = await self._events(wid, scope, after, _EVENT_PAGE)
                last = events[-1]["sequence"] if events else after
                finished = row["state"] not in ACTIVE and last >= row["last_sequence"]
                need_read = len(events) == _EVENT_PAGE  # more are waiting
            else:
                events, need_read = watch.take(after)
                # A terminal event is its workflow's last: every transition after it would
                # need an active workflow.
                finished = bool(events) and events[-1]["workflow_state"] not in ACTIVE
            if events:
                after = events[-1]["sequence"]
                yield [_event(e) for e in events]
            if finished:
                return
            if need_read:
                continue
            try:
                await asyncio.wait_for(watch.event.wait(), poll)
            except TimeoutError:
                need_read = True

    async def stopped_among(self, ids: list[uuid.UUID]) -> list[str]:
        """Those of `ids` that name a workflow no longer active."""
        async with self._db.autocommit() as conn:
            cur = await conn.execute(
                "SELECT workflow_id FROM workflows WHERE workflow_id = ANY(%s)"
                " AND state NOT IN (1, 2)",
                (ids,),
            )
            return [str(r["workflow_id"]) for r in await cur.fetchall()]

    async def _events(
        self, wid: uuid.UUID, scope: pb.WorkflowScope, after: int, limit: int
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The workflow (state, last sequence) and its events after `after`, in one
        autocommit query."""
        async with self._db.autocommit() as conn:
            cur = await conn.execute(
                "SELECT w.owner_id, w.state, w.last_sequence, e.sequence, e.workflow_state,"
                " e.step_name, e.step_state, e.message, e.created_at FROM workflows w"
                " LEFT JOIN LATERAL (SELECT * FROM workflow_events x"
                "   WHERE x.workflow_id = w.workflow_id AND x.sequence > %s"
                "   ORDER BY x.sequence LIMIT %s) e ON true"
                " WHERE w.workflow_id = %s ORDER BY e.sequence",
                (after, limit, wid),
            )
            rows = await cur.fetchall()
        if not rows or (not scope.all_owners and rows[0]["owner_id"] != scope.owner_id):
            raise NotFound("workflow not found")
        return rows[0], [r for r in rows if r["sequence"] is not None]

    # --- the queue ------------------------------------------------------------------------

    async def _sweep(self, conn: DictConnection) -> list[str]:
        """Times out overdue workflows and makes expired leases claimable again (counting a
        failed attempt); returns the ids of workflows stopped."""
        stopped: list[str] = []
        cur = await conn.execute(
            "SELECT workflow_id FROM workflows WHERE state IN (1, 2) AND deadline_at < now()"
            " ORDER BY deadline_at LIMIT 100"
        )
        for row in await cur.fetchall():
            if await self._stop(conn, row["workflow_id"], W_TIMED_OUT, "workflow timed out"):
                stopped.append(str(row["workflow_id"]))
        # The lost attempt gets its row like any finished attempt (`e` holds the lease owner
        # from before the update). No conflict is possible (a recorded attempt is no longer
        # RUNNING), but a sweep must never abort on one: it is what recovers lost work.
        cur = await conn.execute(
            "WITH e AS (SELECT workflow_id, name, lease_owner FROM workflow_steps"
            "   WHERE state = 2 AND lease_expires_at < now()"
            "   ORDER BY lease_expires_at LIMIT 100 FOR UPDATE SKIP LOCKED),"
            " u AS (UPDATE workflow_steps s SET state = 6, failures = s.failures + 1,"
            "   lease_owner = NULL, lease_expires_at = NULL, next_run_at = now(),"
            "   error = %(lost)s, updated_at = now()"
            "   FROM e WHERE s.workflow_id = e.workflow_id AND s.name = e.name"
            "   RETURNING s.workflow_id, s.name, s.attempt, s.failures, s.max_attempts,"
            "     e.lease_owner),"
            " rec AS (INSERT INTO workflow_step_attempts"
            "   (workflow_id, step_name, attempt, worker_id, succeeded, error)"
            "   SELECT workflow_id, name, attempt, coalesce(lease_owner, ''), false, %(lost)s"
            "   FROM u ON CONFLICT DO NOTHING)"
            " SELECT workflow_id, name, attempt, failures, max_attempts FROM u",
            {"lost": LEASE_LOST},
        )
        expired = sorted(await cur.fetchall(), key=lambda r: (r["workflow_id"], r["name"]))
        events = []
        for r in expired:
            msg = f"attempt {r['attempt']}: {LEASE_LOST}"
            if r["failures"] >= r["max_attempts"]:
                await self._fail_workflow(conn, r["workflow_id"], r["name"], r["failures"], msg)
                stopped.append(str(r["workflow_id"]))
            else:
                events.append((r["workflow_id"], r["name"], S_RETRYING, msg))
        await self._append_events(conn, events)
        cur = await conn.execute(
            "SELECT count(*) AS n FROM workflow_steps WHERE state IN (1, 6)"
            " AND remaining_deps = 0 AND next_run_at <= now()"
        )
        depth = await cur.fetchone()
        metrics.workflow_queue_depth.set(depth["n"] if depth else 0)
        if expired:
            log.warning("reclaimed %d steps with expired leases", len(expired))
        return stopped

    async def _fail_workflow(
        self, conn: DictConnection, wid: uuid.UUID, step: str, attempts: int, error: str
    ) -> None:
        """The dead letter: the step FAILED, the rest cancelled, the workflow FAILED."""
        await conn.execute(
            "UPDATE workflow_steps SET state = 4, error = %s, lease_owner = NULL,"
            " lease_expires_at = NULL, updated_at = now() WHERE workflow_id = %s AND name = %s",
            (error[:MAX_ERROR_CHARS], wid, step),
        )
        cur = await conn.execute(
            "UPDATE workflow_steps SET state = 5, lease_owner = NULL, lease_expires_at = NULL,"
            " updated_at = now() WHERE workflow_id = %s AND state IN (1, 2, 6) RETURNING name",
            (wid,),
        )
        others = [r["name"] for r in await cur.fetchall()]
        reason = f"step {step!r} failed after {attempts} attempt(s): {error}"[:MAX_ERROR_CHARS]
        await self._append_events(
            conn,
            [
                (wid, step, S_FAILED, error),
                *((wid, n, S_CANCELLED, "workflow failed") for n in others),
                (wid, "", 0, reason),
            ],
            {wid: (W_FAILED, reason)},
        )
        metrics.workflow_dead_letters.inc()

    async def ClaimSteps(
        self, request: pb.ClaimStepsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClaimStepsResponse:
        v = Violations()
        v.text(request.worker_id, "worker_id", max_chars=MAX_ID_CHARS)
        v.check(1 <= request.max_steps <= MAX_BATCH, "max_steps", f"must be 1 to {MAX_BATCH}")
        v.check(
            0 < request.lease_seconds <= MAX_LEASE_SECONDS,
            "lease_seconds",
            f"must be in (0, {MAX_LEASE_SECONDS:.0f}]",
        )
        v.raise_if_any()
        stopped: list[str] = []
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + _SWEEP_INTERVAL
            stopped = await self._tx(self._sweep)
            self.wakeups.stopped(stopped)

        async def work(conn: DictConnection) -> pb.ClaimStepsResponse:
            cur = await conn.execute(
                "WITH picked AS (SELECT workflow_id, name FROM workflow_steps"
                "   WHERE state IN (1, 6) AND remaining_deps = 0 AND next_run_at <= now()"
                "   ORDER BY priority DESC, next_run_at LIMIT %(n)s"
                "   FOR UPDATE SKIP LOCKED)"
                " UPDATE workflow_steps s SET state = 2, attempt = s.attempt + 1,"
                "   lease_owner = %(me)s,"
                "   lease_expires_at = now() + %(lease)s * interval '1 second',"
                "   updated_at = now()"
                " FROM picked, workflows w"
                " WHERE s.workflow_id = picked.workflow_id AND s.name = picked.name"
                "   AND w.workflow_id = s.workflow_id"
                " RETURNING s.workflow_id, s.name, s.op, s.inputs, s.attempt, s.timeout_seconds,"
                "   s.lease_expires_at, s.priority, s.next_run_at, w.owner_id, w.owner_username,"
                "   w.owner_roles",
                {"n": request.max_steps, "me": request.worker_id, "lease": request.lease_seconds},
            )
            rows = sorted(await cur.fetchall(), key=lambda r: (-r["priority"], r["next_run_at"]))
            reply = pb.ClaimStepsResponse()
            if not rows:
                cur = await conn.execute(
                    "SELECT min(next_run_at) AS t FROM workflow_steps"
                    " WHERE state IN (1, 6) AND remaining_deps = 0"
                )
                nxt = await cur.fetchone()
                if nxt and nxt["t"] is not None:
                    reply.next_run_time.CopyFrom(_ts(nxt["t"]))
                return reply
            referencing = {r["workflow_id"] for r in rows if "${steps." in json.dumps(r["inputs"])}
            outputs: dict[uuid.UUID, dict[str, Any]] = {}
            if referencing:
                cur = await conn.execute(
                    "SELECT workflow_id, name, output FROM workflow_steps"
                    " WHERE workflow_id = ANY(%s) AND state = 3",
                    (list(referencing),),
                )
                for o in await cur.fetchall():
                    outputs.setdefault(o["workflow_id"], {})[o["name"]] = o["output"]
            await self._append_events(
                conn,
                [(r["workflow_id"], r["name"], S_RUNNING, f"attempt {r['attempt']}") for r in rows],
                promote_pending=True,
            )
            for r in rows:
                step = reply.steps.add(
                    ref=pb.StepRef(
                        workflow_id=str(r["workflow_id"]), step_name=r["name"], attempt=r["attempt"]
                    ),
                    op=r["op"],
                    inputs=_struct(r["inputs"]),
                    timeout_seconds=r["timeout_seconds"],
                    owner=pb.WorkflowOwner(
                        user_id=r["owner_id"], username=r["owner_username"], roles=r["owner_roles"]
                    ),
                    lease_expire_time=_ts(r["lease_expires_at"]),
                )
                if r["workflow_id"] in outputs:
                    step.dependency_outputs.CopyFrom(_struct(outputs[r["workflow_id"]]))
            return reply

        return await self._tx(work)

    @staticmethod
    def _refs(refs: Any) -> tuple[list[uuid.UUID], list[str], list[int]]:
        return (
            [_uuid(r.workflow_id) for r in refs],
            [r.step_name for r in refs],
            [r.attempt for r in refs],
        )

    async def ExtendLeases(
        self, request: pb.ExtendLeasesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExtendLeasesResponse:
        v = Violations()
        v.text(request.worker_id, "worker_id", max_chars=MAX_ID_CHARS)
        v.check(len(request.steps) <= MAX_BATCH, "steps", f"at most {MAX_BATCH}")
        v.check(0 < request.lease_seconds <= MAX_LEASE_SECONDS, "lease_seconds", "out of range")
        v.raise_if_any()
        if not request.steps:
            return pb.ExtendLeasesResponse()
        wf, name, attempt = self._refs(request.steps)
        async with self._db.pool.connection() as conn:
            cur = await conn.execute(
                "UPDATE workflow_steps s SET lease_expires_at = now() + %s * interval '1 second'"
                " FROM unnest(%s::uuid[], %s::text[], %s::int[]) AS u(wf, name, attempt)"
                " WHERE s.workflow_id = u.wf AND s.name = u.name AND s.attempt = u.attempt"
                "   AND s.lease_owner = %s AND s.state = 2"
                " RETURNING s.workflow_id, s.name, s.attempt",
                (request.lease_seconds, wf, name, attempt, request.worker_id),
            )
            held = {(str(r["workflow_id"]), r["name"], r["attempt"]) for r in await cur.fetchall()}
        return pb.ExtendLeasesResponse(
            lost=[
                r
                for r in request.steps
                if (str(_uuid(r.workflow_id)), r.step_name, r.attempt) not in held
            ]
        )

    async def CompleteSteps(
        self, request: pb.CompleteStepsRequest, context: grpc.aio.ServicerContext
    ) -> pb.CompleteStepsResponse:
        v = Violations()
        v.text(request.worker_id, "worker_id", max_chars=MAX_ID_CHARS)
        v.check(1 <= len(request.results) <= MAX_BATCH, "results", f"must list 1 to {MAX_BATCH}")
        v.raise_if_any()
        # A ref listed twice is recorded once: later duplicates are answered False.
        first: dict[tuple[str, str, int], int] = {}
        for i, r in enumerate(request.results):
            first.setdefault((r.ref.workflow_id, r.ref.step_name, r.ref.attempt), i)
        unique = list(first.values())
        results = [request.results[i] for i in unique]
        wf, name, attempt = self._refs([r.ref for r in results])
        outputs = [json.dumps(_dict(r.output)) for r in results]
        me = request.worker_id

        async def work(conn: DictConnection) -> tuple[list[bool], bool]:
            # One statement records the results where the lease is still ours, one row per
            # attempt (its primary key makes "recorded once" a database guarantee), and
            # counts down the dependents' unmet dependencies.
            cur = await conn.execute(
                "WITH u AS (SELECT * FROM unnest(%(wf)s::uuid[], %(name)s::text[],"
                "   %(attempt)s::int[], %(output)s::jsonb[])"
                "   WITH ORDINALITY AS u(wf, name, attempt, output, ord)),"
                " done AS (UPDATE workflow_steps s SET state = 3, output = u.output, error = '',"
                "   lease_owner = NULL, lease_expires_at = NULL, updated_at = now() FROM u"
                "   WHERE s.workflow_id = u.wf AND s.name = u.name AND s.attempt = u.attempt"
                "   AND s.lease_owner = %(me)s AND s.state = 2"
                "   RETURNING u.ord, s.workflow_id, s.name, s.attempt, u.output),"
                " rec AS (INSERT INTO workflow_step_attempts"
                "   (workflow_id, step_name, attempt, worker_id, succeeded, output)"
                "   SELECT workflow_id, name, attempt, %(me)s, true, output FROM done),"
                " deps AS (UPDATE workflow_steps d SET remaining_deps = d.remaining_deps - x.k,"
                "   next_run_at = now(), updated_at = now()"
                "   FROM (SELECT d2.workflow_id, d2.name, count(*) AS k FROM workflow_steps d2"
                "     JOIN done a ON d2.workflow_id = a.workflow_id AND a.name = ANY(d2.depends_on)"
                "     WHERE d2.state = 1 GROUP BY 1, 2) x"
                "   WHERE d.workflow_id = x.workflow_id AND d.name = x.name"
                "   RETURNING d.remaining_deps)"
                " SELECT ord, workflow_id, name, attempt, NULL::int AS remaining FROM done"
                " UNION ALL SELECT NULL, NULL, NULL, NULL, remaining_deps FROM deps",
                {"wf": wf, "name": name, "attempt": attempt, "output": outputs, "me": me},
            )
            rows = await cur.fetchall()
            done = sorted(
                (r for r in rows if r["ord"] is not None),
                key=lambda r: (r["workflow_id"], r["name"]),
            )
            accepted = [False] * len(request.results)
            for r in done:
                accepted[unique[r["ord"] - 1]] = True
            if not done:
                return accepted, False
            woke = any(r["remaining"] == 0 for r in rows if r["ord"] is None)
            # Completions of sibling steps serialise on the workflow row, and the check runs
            # after the lock so it sees them: the last step to finish finishes the workflow.
            touched = sorted({r["workflow_id"] for r in done})
            await conn.execute(
                "SELECT 1 FROM workflows WHERE workflow_id = ANY(%s)"
                " ORDER BY workflow_id FOR NO KEY UPDATE",
                (touched,),
            )
            cur = await conn.execute(
                "SELECT workflow_id FROM workflow_steps WHERE workflow_id = ANY(%s)"
                " GROUP BY workflow_id HAVING bool_and(state = 3)",
                (touched,),
            )
            finished = [r["workflow_id"] for r in await cur.fetchall()]
            events = [
                (r["workflow_id"], r["name"], S_SUCCEEDED, f"attempt {r['attempt']}") for r in done
            ]
            events += [(w, "", 0, "workflow succeeded") for w in finished]
            await self._append_events(
                conn, events, {w: (W_SUCCEEDED, "") for w in finished}, locked=True
            )
            return accepted, woke

        accepted, woke = await self._tx(work)
        if woke:
            self.wakeups.work()
        return pb.CompleteStepsResponse(accepted=accepted)

    async def FailStep(
        self, request: pb.FailStepRequest, context: grpc.aio.ServicerContext
    ) -> pb.FailStepResponse:
        v = Violations()
        v.text(request.worker_id, "worker_id", max_chars=MAX_ID_CHARS)
        v.raise_if_any()
        wid = _uuid(request.ref.workflow_id)
        error = request.error[:MAX_ERROR_CHARS] or "failed"

        async def work(conn: DictConnection) -> tuple[pb.FailStepResponse, bool]:
            cur = await conn.execute(
                "UPDATE workflow_steps SET failures = failures + 1, error = %s, updated_at = now()"
                " WHERE workflow_id = %s AND name = %s AND attempt = %s AND lease_owner = %s"
                "   AND state = 2"
                " RETURNING op, failures, max_attempts, initial_backoff, backoff_multiplier,"
                "   max_backoff, jitter",
                (error, wid, request.ref.step_name, request.ref.attempt, request.worker_id),
            )
            row = await cur.fetchone()
            if row is None:
                return pb.FailStepResponse(accepted=False), False
            await conn.execute(
                "INSERT INTO workflow_step_attempts"
                " (workflow_id, step_name, attempt, worker_id, succeeded, error)"
                " VALUES (%s, %s, %s, %s, false, %s)",
                (wid, request.ref.step_name, request.ref.attempt, request.worker_id, error),
            )
            msg = f"attempt {request.ref.attempt} failed: {error}"
            if not request.retryable or row["failures"] >= row["max_attempts"]:
                await self._fail_workflow(conn, wid, request.ref.step_name, row["failures"], msg)
                return pb.FailStepResponse(accepted=True, will_retry=False), True
            delay = backoff_seconds(
                row["failures"],
                row["initial_backoff"],
                row["backoff_multiplier"],
                row["max_backoff"],
                row["jitter"],
            )
            await self._append_events(
                conn, [(wid, request.ref.step_name, S_RETRYING, f"{msg}; retry in {delay:.3f}s")]
            )
            # Counted from after the RETRYING event's time, so the recorded schedule never
            # shows a retry earlier than its backoff.
            cur = await conn.execute(
                "UPDATE workflow_steps SET state = 6, lease_owner = NULL, lease_expires_at = NULL,"
                " next_run_at = clock_timestamp() + %s * interval '1 second'"
                " WHERE workflow_id = %s AND name = %s RETURNING next_run_at",
                (delay, wid, request.ref.step_name),
            )
            nxt = await cur.fetchone()
            assert nxt is not None
            metrics.workflow_step_retries.labels(row["op"]).inc()
            reply = pb.FailStepResponse(accepted=True, will_retry=True)
            reply.next_run_time.CopyFrom(_ts(nxt["next_run_at"]))
            return reply, False

        reply, stopped = await self._tx(work)
        if stopped:
            self.wakeups.stopped([request.ref.workflow_id])
        return reply

    async def ReleaseSteps(
        self, request: pb.ReleaseStepsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseStepsResponse:
        v = Violations()
        v.text(request.worker_id, "worker_id", max_chars=MAX_ID_CHARS)
        v.check(len(request.steps) <= MAX_BATCH, "steps", f"at most {MAX_BATCH}")
        v.raise_if_any()
        if not request.steps:
            return pb.ReleaseStepsResponse()
        wf, name, attempt = self._refs(request.steps)

        async def work(conn: DictConnection) -> int:
            cur = await conn.execute(
                "UPDATE workflow_steps s SET state = 1, lease_owner = NULL,"
                "   lease_expires_at = NULL, next_run_at = now(), updated_at = now()"
                " FROM unnest(%s::uuid[], %s::text[], %s::int[]) AS u(wf, name, attempt)"
                " WHERE s.workflow_id = u.wf AND s.name = u.name AND s.attempt = u.attempt"
                "   AND s.lease_owner = %s AND s.state = 2"
                " RETURNING s.workflow_id, s.name, s.attempt",
                (wf, name, attempt, request.worker_id),
            )
            rows = sorted(await cur.fetchall(), key=lambda r: (r["workflow_id"], r["name"]))
            await self._append_events(
                conn,
                [
                    (r["workflow_id"], r["name"], S_PENDING, f"attempt {r['attempt']} released")
                    for r in rows
                ],
            )
            return len(rows)

        released = await self._tx(work)
        if released:
            self.wakeups.work()
        return pb.ReleaseStepsResponse(released=released)

    async def WaitForWork(
        self, request: pb.WaitForWorkRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WaitForWorkResponse]:
        sub = self.wakeups.subscribe()
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(sub.event.wait(), _HEARTBEAT_SECONDS)
                sub.event.clear()
                stopped = sorted(sub.stopped)
                sub.stopped.clear()
                work, sub.work = sub.work, False
                # A heartbeat (nothing set) keeps idle streams alive through proxies.
                yield pb.WaitForWorkResponse(work_available=work, stopped_workflow_ids=stopped)
        finally:
            self.wakeups.unsubscribe(sub)


def backoff_seconds(
    failures: int, initial: float, multiplier: float, maximum: float, jitter: float
) -> float:
    """The wait before the retry after the `failures`-th failure: exponential, capped, then
    stretched by up to `jitter` (a fraction) so retrying workers spread out."""
    base = min(maximum, initial * multiplier ** max(0, failures - 1))
    return base * (1 + random.random() * jitter)


def _page_token(created: datetime, wid: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(f"{created.isoformat()}|{wid}".encode()).decode()


def _page_after(token: str) -> tuple[datetime, uuid.UUID]:
    try:
        created, wid = base64.urlsafe_b64decode(token.encode()).decode().split("|")
        return datetime.fromisoformat(created), uuid.UUID(wid)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument([("page_token", "is not a token this service issued")]) from None
