"""The workflow repository: every SQL statement of the engine, over the tables of
migration 004 (`workflows`, `workflow_steps`, `workflow_step_attempts`, `workflow_events`).

Statements take named parameters and write states by name (`states.sql`). The claim bumps
`attempt`, the fencing token: results, failures, releases and lease extensions apply only
where `lease_owner = worker AND attempt = n AND state = RUNNING`, so a worker whose lease
expired can never record a result twice or advance a workflow twice.

Every transition appends an event under the workflow row's lock (`append_events`), so
per-workflow sequence numbers are gap-free and commit in order: a watcher resuming
`after_sequence` loses nothing. What to do (retry or dead letter, when to sweep) is
`scheduling`'s; this module only says how.

Over 600 lines on purpose: every statement of the engine in one place, so a schema change is
checked against all its queries at once.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, NamedTuple, TypeVar

import psycopg
from psycopg.types.json import Jsonb

from aiwfe.data.v1 import workflow_store_service_pb2 as pb
from dataplatform.db import Database, DictConnection
from dataplatform.workflows import messages, watches
from dataplatform.workflows.states import (
    ACTIVE,
    CLAIMABLE,
    UNFINISHED,
    WORKFLOW_EVENT,
    StepState,
    WorkflowState,
    sql,
)

T = TypeVar("T")

MAX_ERROR_CHARS = 4000
# Steps no worker runs: dataplatform's sweep fires them (queue names users cannot take).
TIMER_QUEUE = "$timer"
SIGNAL_QUEUE = "$signal"
TIMER_WORKER = "dataplatform:timers"  # the lease owner of steps dataplatform completes
SIGNAL_WORKER = "dataplatform:signals"
DEFAULT_HEARTBEAT_SECONDS = 30.0  # a task step's lease without heartbeat_timeout_seconds
# ConcurrencySpec bounds (taskproc/spec.py checks them first, with the same numbers).
MAX_CONCURRENCY_KEY_CHARS = 256
MAX_CONCURRENCY = 1000  # `max`; also how many queued workflows one admission reads
SUBMITTED = "workflow submitted"  # a workflow's first event
_TX_RETRIES = 5

_STEP_COLUMNS = "name, position, state, attempt, output, error, details"
_WF_COLUMNS = (
    "workflow_id, owner_id, owner_username, owner_roles, spec, state, error,"
    " created_at, updated_at, last_sequence"
)
_PENDING, _RUNNING = int(StepState.PENDING), int(StepState.RUNNING)
_SUCCEEDED, _RETRYING = int(StepState.SUCCEEDED), int(StepState.RETRYING)


def timer_seconds(step: Any) -> float | None:
    """A StepSpec's timer: a sleep's seconds, a wait_for_signal's timeout (defaults are
    filled in at submit, taskproc/spec.py)."""
    key = {"sleep": "seconds", "wait_for_signal": "timeout_seconds"}.get(step.op)
    return None if key is None else float(step.inputs.fields[key].number_value)


def step_queue(step: Any) -> str | None:
    """A StepSpec's `queue` column: a task's queue, an internal one for timers and
    signals, None for a built-in op."""
    if step.op == "task":
        return str(step.inputs.fields["queue"].string_value)
    return {"sleep": TIMER_QUEUE, "wait_for_signal": SIGNAL_QUEUE}.get(step.op)


class Woken(NamedTuple):
    """What became runnable: built-in steps, and the queues of task steps."""

    builtin: bool
    queues: set[str]


def woken(rows: Any) -> Woken:
    """The kinds of runnable steps among rows with a `queue` (NULL: built-in)."""
    queues = {r["queue"] for r in rows}
    return Woken(None in queues, {q for q in queues if q is not None})


class NewEvent(NamedTuple):
    """An event to append; `step_state` is WORKFLOW_EVENT for the workflow's own."""

    workflow_id: uuid.UUID
    step_name: str
    step_state: int
    message: str


class StepRefs(NamedTuple):
    """Step references as parallel columns, for `unnest`."""

    workflow_ids: list[uuid.UUID]
    names: list[str]
    attempts: list[int]


def step_refs(refs: Any) -> StepRefs:
    return StepRefs(
        [messages.workflow_id(r.workflow_id) for r in refs],
        [r.step_name for r in refs],
        [r.attempt for r in refs],
    )


_APPEND_EVENTS = (
    "WITH c AS (SELECT * FROM unnest(%(workflow_ids)s::uuid[], %(step_names)s::text[],"
    "   %(step_states)s::smallint[], %(messages)s::text[])"
    "   WITH ORDINALITY AS c(wf, step, step_state, msg, ord)),"
    " n AS (SELECT wf, count(*) AS k FROM c GROUP BY wf),"
    " t AS (SELECT * FROM unnest(%(moved_ids)s::uuid[], %(moved_states)s::smallint[],"
    "   %(moved_errors)s::text[]) AS t(wf, state, err)),"
    " w AS (UPDATE workflows w SET last_sequence = w.last_sequence + n.k,"
    "   state = COALESCE(t.state, CASE WHEN %(promote_pending)s"
    f"     AND w.state = {WorkflowState.PENDING:d} THEN {WorkflowState.RUNNING:d}"
    "     ELSE w.state END),"
    "   error = COALESCE(t.err, w.error), updated_at = now()"
    "   FROM n LEFT JOIN t ON t.wf = n.wf WHERE w.workflow_id = n.wf"
    "   RETURNING w.workflow_id, w.last_sequence, n.k, w.state)"
    " INSERT INTO workflow_events"
    " (workflow_id, sequence, workflow_state, step_name, step_state, message)"
    " SELECT c.wf, w.last_sequence - w.k"
    "   + row_number() OVER (PARTITION BY c.wf ORDER BY c.ord), w.state, c.step,"
    "   c.step_state, c.msg FROM c JOIN w ON w.workflow_id = c.wf"
    " RETURNING workflow_id, sequence, workflow_state, step_name, step_state, message,"
    "   created_at"
)

_CREATE = (
    "WITH w AS (INSERT INTO workflows (workflow_id, owner_id, owner_username,"
    "   owner_roles, idempotency_key, spec, state, priority, deadline_at,"
    "   last_sequence, trace_context)"
    "   VALUES (%(workflow_id)s, %(owner_id)s, %(owner_username)s, %(owner_roles)s,"
    f"   %(idempotency_key)s, %(spec)s, {WorkflowState.PENDING:d},"
    "   %(priority)s, now() + %(timeout_seconds)s * interval '1 second', 1,"
    "   %(trace_context)s)"
    f"  ON CONFLICT (owner_id, idempotency_key) DO NOTHING RETURNING {_WF_COLUMNS}),"
    " s AS (INSERT INTO workflow_steps (workflow_id, name, position, op, inputs,"
    "   depends_on, remaining_deps, state, priority, max_attempts, initial_backoff,"
    "   backoff_multiplier, max_backoff, jitter, timeout_seconds, queue, task_type,"
    "   heartbeat_timeout, timer_seconds, not_before_at, next_run_at)"
    "   SELECT w.workflow_id, u.name, u.ord - 1, u.op, u.inputs,"
    "   ARRAY(SELECT jsonb_array_elements_text(u.deps)), jsonb_array_length(u.deps),"
    f"   {_PENDING}, %(priority)s, u.max_attempts, u.initial_backoff,"
    "   u.backoff_multiplier, u.max_backoff, u.jitter, u.timeout_seconds,"
    # A task step's queue and type (validated literals, see taskproc/ops/task.py) become
    # columns, so claims filter on an index.
    f"   CASE u.op WHEN 'task' THEN u.inputs->>'queue' WHEN 'sleep' THEN '{TIMER_QUEUE}'"
    f"     WHEN 'wait_for_signal' THEN '{SIGNAL_QUEUE}' END,"
    "   CASE WHEN u.op = 'task' THEN u.inputs->>'type' END,"
    "   CASE WHEN u.op = 'task' THEN coalesce("
    "     (u.inputs->>'heartbeat_timeout_seconds')::float8, %(default_heartbeat)s) END,"
    "   u.timer, u.not_before,"
    "   greatest(now() + coalesce(u.timer, 0) * interval '1 second', u.not_before)"
    "   FROM w, unnest(%(step_names)s::text[], %(step_ops)s::text[],"
    "   %(step_inputs)s::jsonb[], %(step_deps)s::jsonb[], %(max_attempts)s::int[],"
    "   %(initial_backoffs)s::float8[], %(backoff_multipliers)s::float8[],"
    "   %(max_backoffs)s::float8[], %(jitters)s::float8[], %(step_timeouts)s::float8[],"
    "   %(step_timers)s::float8[], %(step_not_befores)s::timestamptz[])"
    "   WITH ORDINALITY AS u(name, op, inputs, deps, max_attempts, initial_backoff,"
    "   backoff_multiplier, max_backoff, jitter, timeout_seconds, timer, not_before, ord)),"
    " e AS (INSERT INTO workflow_events (workflow_id, sequence, workflow_state,"
    "   message, created_at)"
    "   SELECT workflow_id, 1, state, %(submitted)s, created_at FROM w)"
    " SELECT * FROM w"
)

# A workflow's concurrency key if it holds one of its key's slots (admitted), else NULL.
_SLOT_KEY = "CASE WHEN admitted THEN concurrency_key END AS slot_key"
# One transaction at a time decides a key's admissions (the two-int advisory lock form: its
# own key space; a hash collision of two keys only serialises them).
_LOCK_KEY = "SELECT pg_advisory_xact_lock(20014, hashtext(%(owner)s || chr(31) || %(key)s))"
_INTERNAL = f"('{TIMER_QUEUE}', '{SIGNAL_QUEUE}')"
# Built-in steps (queue IS NULL) go to taskproc's workers, task steps to the external
# workers polling their queue; each kind has its partial index (migrations 004, 006).
_BUILTIN = "queue IS NULL"
_TASKS = (
    "queue IS NOT NULL AND queue = ANY(%(queues)s)"
    " AND (cardinality(%(types)s::text[]) = 0 OR task_type = ANY(%(types)s))"
)
_CLAIM = (
    "WITH picked AS (SELECT workflow_id, name FROM workflow_steps"
    f"   WHERE state IN ({sql(*CLAIMABLE)}) AND remaining_deps = 0 AND next_run_at <= now()"
    "   AND {kind}"
    "   ORDER BY priority DESC, next_run_at LIMIT %(max_steps)s"
    "   FOR UPDATE SKIP LOCKED)"
    f" UPDATE workflow_steps s SET state = {_RUNNING}, attempt = s.attempt + 1,"
    "   lease_owner = %(worker_id)s,"
    # A task's lease is its heartbeat timeout, never past its attempt's deadline;
    # taskproc's own workers time their steps out themselves (no deadline column).
    "   lease_expires_at = now() + CASE WHEN s.queue IS NULL"
    "     THEN %(lease_seconds)s ELSE least(s.heartbeat_timeout, s.timeout_seconds) END"
    "     * interval '1 second',"
    "   attempt_deadline_at = CASE WHEN s.queue IS NOT NULL"
    "     THEN now() + s.timeout_seconds * interval '1 second' END,"
    "   details = NULL, updated_at = now()"
    " FROM picked, workflows w"
    " WHERE s.workflow_id = picked.workflow_id AND s.name = picked.name"
    "   AND w.workflow_id = s.workflow_id"
    " RETURNING s.workflow_id, s.name, s.op, s.inputs, s.attempt, s.timeout_seconds,"
    "   s.lease_expires_at, s.priority, s.next_run_at, w.owner_id, w.owner_username,"
    "   w.owner_roles, s.queue, s.task_type, s.heartbeat_timeout, s.attempt_deadline_at,"
    "   w.trace_context, w.created_at AS submitted_at"
)

_COMPLETE = (
    "WITH u AS (SELECT * FROM unnest(%(workflow_ids)s::uuid[], %(names)s::text[],"
    "   %(attempts)s::int[], %(outputs)s::jsonb[])"
    "   WITH ORDINALITY AS u(wf, name, attempt, output, ord)),"
    f" done AS (UPDATE workflow_steps s SET state = {_SUCCEEDED}, output = u.output,"
    "   error = '', lease_owner = NULL, lease_expires_at = NULL, updated_at = now() FROM u"
    "   WHERE s.workflow_id = u.wf AND s.name = u.name AND s.attempt = u.attempt"
    f"   AND s.lease_owner = %(worker_id)s AND s.state = {_RUNNING}"
    "   RETURNING u.ord, s.workflow_id, s.name, s.attempt, u.output),"
    " rec AS (INSERT INTO workflow_step_attempts"
    "   (workflow_id, step_name, attempt, worker_id, succeeded, output)"
    "   SELECT workflow_id, name, attempt, %(worker_id)s, true, output FROM done),"
    " deps AS (UPDATE workflow_steps d SET remaining_deps = d.remaining_deps - x.k,"
    # A timer starts when the step is reached (harmless until the last dependency).
    "   next_run_at = greatest(now() + coalesce(d.timer_seconds, 0) * interval '1 second',"
    "     d.not_before_at), updated_at = now()"
    "   FROM (SELECT d2.workflow_id, d2.name, count(*) AS k FROM workflow_steps d2"
    "     JOIN done a ON d2.workflow_id = a.workflow_id AND a.name = ANY(d2.depends_on)"
    f"     WHERE d2.state = {_PENDING} GROUP BY 1, 2) x"
    "   WHERE d.workflow_id = x.workflow_id AND d.name = x.name"
    "   RETURNING d.workflow_id, d.remaining_deps, d.queue)"
    " SELECT ord, workflow_id, name, attempt, NULL::int AS remaining, NULL AS queue FROM done"
    " UNION ALL SELECT NULL, workflow_id, NULL, NULL, remaining_deps, queue FROM deps"
)

_EXPIRE_LEASES = (
    # The lost attempt gets its row like any finished attempt (`e` holds the lease owner
    # from before the update). No conflict is possible (a recorded attempt is no longer
    # RUNNING), but a sweep must never abort on one: it is what recovers lost work.
    "WITH e AS (SELECT workflow_id, name, lease_owner FROM workflow_steps"
    f"   WHERE state = {_RUNNING} AND lease_expires_at < now()"
    "   ORDER BY lease_expires_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED),"
    # A task whose lease ran into its attempt deadline timed out; any other lease ran out
    # because its worker stopped heartbeating (or extending).
    f" u AS (UPDATE workflow_steps s SET state = {_RETRYING}, failures = s.failures + 1,"
    "   lease_owner = NULL, lease_expires_at = NULL, next_run_at = now(),"
    "   error = CASE WHEN s.lease_expires_at >= s.attempt_deadline_at"
    "     THEN %(timed_out)s ELSE %(error)s END, updated_at = now()"
    "   FROM e WHERE s.workflow_id = e.workflow_id AND s.name = e.name"
    "   RETURNING s.workflow_id, s.name, s.attempt, s.failures, s.max_attempts,"
    "     e.lease_owner, s.error, s.queue, s.task_type),"
    " rec AS (INSERT INTO workflow_step_attempts"
    "   (workflow_id, step_name, attempt, worker_id, succeeded, error)"
    "   SELECT workflow_id, name, attempt, coalesce(lease_owner, ''), false, error"
    "   FROM u ON CONFLICT DO NOTHING)"
    " SELECT workflow_id, name, attempt, failures, max_attempts, error, queue, task_type"
    " FROM u"
)


class WorkflowRepository:
    """The engine's reads and writes; `wakeups` hears what each transaction appended."""

    def __init__(self, db: Database, wakeups: watches.Wakeups) -> None:
        self._db = db
        self._wakeups = wakeups

    # --- transactions and events ----------------------------------------------------------

    async def tx(self, work: Callable[[DictConnection], Awaitable[T]]) -> T:
        """Runs `work` in one transaction, retrying on deadlock/serialization failures;
        once it commits, the events it appended reach this replica's watchers."""
        for attempt in range(_TX_RETRIES):
            with watches.collecting() as appended, watches.collecting_work() as runnable:
                try:
                    async with self._db.pool.connection() as conn:
                        result = await work(conn)
                except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                    if attempt == _TX_RETRIES - 1:
                        raise
                    await asyncio.sleep(random.uniform(0.001, 0.02) * (attempt + 1))
                    continue
            self._wakeups.appended(appended)
            self._wakeups.work(runnable.builtin, runnable.queues)
            return result
        raise RuntimeError("unreachable: the last attempt returns or raises")

    @staticmethod
    async def lock_workflows(conn: DictConnection, ids: list[uuid.UUID]) -> None:
        """Locks workflow rows in id order, so concurrent batches never deadlock on them."""
        if len(ids) > 1:
            await conn.execute(
                "SELECT 1 FROM workflows WHERE workflow_id = ANY(%(ids)s)"
                " ORDER BY workflow_id FOR NO KEY UPDATE",
                {"ids": sorted(ids)},
            )

    async def append_events(
        self,
        conn: DictConnection,
        events: list[NewEvent],
        new_states: dict[uuid.UUID, tuple[WorkflowState, str]] | None = None,
        promote_pending: bool = False,
        locked: bool = False,
        slots: set[tuple[str, str]] | None = None,
    ) -> None:
        """Appends events with gap-free sequences and applies workflow state changes
        (state, error) in the same statement; `promote_pending` moves PENDING workflows
        to RUNNING.

        Every workflow that finishes goes through here, so here its concurrency slot is
        freed and the next queued workflow of its key admitted. `slots` are the (owner, key)
        slots the finishing workflows held, when the caller read them with its row locks
        (None: read here, one more statement)."""
        if not events:
            return
        new_states = new_states or {}
        if not locked:
            await self.lock_workflows(conn, list({e.workflow_id for e in events}))
        cur = await conn.execute(
            _APPEND_EVENTS,
            {
                "workflow_ids": [e.workflow_id for e in events],
                "step_names": [e.step_name for e in events],
                "step_states": [e.step_state for e in events],
                "messages": [e.message[:MAX_ERROR_CHARS] for e in events],
                "moved_ids": list(new_states),
                "moved_states": [int(s) for s, _ in new_states.values()],
                "moved_errors": [err for _, err in new_states.values()],
                "promote_pending": promote_pending,
            },
        )
        appended = watches.current_appended()
        if appended is not None:
            wids = {e.workflow_id for e in events}
            if self._wakeups.watching(wids):
                for row in await cur.fetchall():
                    rows = appended.setdefault(row["workflow_id"], [])
                    if rows is not None:
                        rows.append(row)
            else:  # parsing rows nobody reads costs the queue; a late watcher re-reads
                appended.update(dict.fromkeys(wids))
        finished = [w for w, (state, _) in new_states.items() if state not in ACTIVE]
        if finished:
            if slots is None:
                slots = await self.slots_held(conn, finished)
            if slots:
                await self.admit(conn, slots)

    # --- workflows ------------------------------------------------------------------------

    async def create(
        self,
        request: pb.CreateWorkflowRequest,
        wid: uuid.UUID,
        conn_in: DictConnection | None = None,
    ) -> pb.CreateWorkflowResponse:
        """Stores the workflow as `wid`, or returns the one its idempotency key names. One
        statement, so one round trip in autocommit and atomic by itself: the workflow row,
        its steps and its first event, unless the idempotency key was used before. Only
        this replica can watch an id not out yet, so the first event is delivered here,
        not announced. A workflow with a concurrency key takes a transaction instead: it
        is stored, then admitted or queued (`enqueue`).

        With `conn_in` it runs inside the caller's transaction (a schedule's tick) and
        wakes no one: the caller calls `Wakeups.work()` once it commits."""
        spec = request.spec
        steps = list(spec.steps)
        policies = [st.retry_policy for st in steps]
        key = request.idempotency_key or None
        args = {
            "workflow_id": wid,
            "owner_id": request.owner.user_id,
            "owner_username": request.owner.username,
            "owner_roles": list(request.owner.roles),
            "idempotency_key": key,
            "spec": spec.SerializeToString(),
            "priority": spec.priority,
            "timeout_seconds": spec.timeout_seconds,
            "step_names": [st.name for st in steps],
            "step_ops": [st.op for st in steps],
            "step_inputs": [Jsonb(messages.as_dict(st.inputs)) for st in steps],
            "step_deps": [Jsonb(list(st.depends_on)) for st in steps],
            "max_attempts": [p.max_attempts for p in policies],
            "initial_backoffs": [p.initial_backoff_seconds for p in policies],
            "backoff_multipliers": [p.backoff_multiplier for p in policies],
            "max_backoffs": [p.max_backoff_seconds for p in policies],
            "jitters": [p.jitter for p in policies],
            "step_timeouts": [st.timeout_seconds for st in steps],
            "step_timers": [timer_seconds(st) for st in steps],
            "step_not_befores": [
                st.not_before.ToDatetime(tzinfo=UTC) if st.HasField("not_before") else None
                for st in steps
            ],
            "submitted": SUBMITTED,
            "default_heartbeat": DEFAULT_HEARTBEAT_SECONDS,
            "trace_context": messages.trace_context_json(request),
        }
        if conn_in is not None:
            return await self._insert(conn_in, request, wid, args, notify=False)
        if spec.concurrency.key:
            return await self.tx(lambda conn: self._insert(conn, request, wid, args, True))
        async with self._db.autocommit() as conn:
            return await self._insert(conn, request, wid, args, notify=True)

    async def _insert(
        self,
        conn: DictConnection,
        request: pb.CreateWorkflowRequest,
        wid: uuid.UUID,
        args: dict[str, Any],
        notify: bool,
    ) -> pb.CreateWorkflowResponse:
        """`create`'s statement and what follows it on `conn`."""
        steps = request.spec.steps
        cur = await conn.execute(_CREATE, args)
        row = await cur.fetchone()
        if row is not None:  # nothing to read back: every step is PENDING, no attempts
            first = {
                "sequence": 1,
                "workflow_state": row["state"],
                "step_name": "",
                "step_state": WORKFLOW_EVENT,
                "message": SUBMITTED,
                "created_at": row["created_at"],
            }
            if request.spec.concurrency.key:
                appended = watches.current_appended()
                if notify and appended is not None:  # delivered once the transaction commits
                    appended[wid] = [first]
                await self.enqueue(conn, wid, request.owner.user_id, request.spec.concurrency)
            elif notify:
                roots = [st for st in steps if not st.depends_on]
                self._wakeups.work(*woken({"queue": step_queue(st)} for st in roots))
                self._wakeups.deliver({wid: [first]})  # watched before the insert, if at all
            pending = [
                {
                    "name": st.name,
                    "state": _PENDING,
                    "attempt": 0,
                    "error": "",
                    "output": None,
                    "details": None,
                }
                for st in steps
            ]
            return pb.CreateWorkflowResponse(workflow=messages.workflow(row, pending), created=True)
        # The idempotency key was used before (or is being used right now: the insert
        # waited for that transaction, so its workflow is committed): the same workflow.
        cur = await conn.execute(
            f"SELECT {_WF_COLUMNS} FROM workflows"
            " WHERE owner_id = %(owner_id)s AND idempotency_key = %(idempotency_key)s",
            {"owner_id": request.owner.user_id, "idempotency_key": args["idempotency_key"]},
        )
        existing = await cur.fetchone()
        if existing is None:  # the conflicting row committed before this read
            raise RuntimeError(f"workflow of idempotency key {args['idempotency_key']!r} vanished")
        return pb.CreateWorkflowResponse(workflow=(await self.load(conn, [existing]))[0])

    # --- concurrency keys -----------------------------------------------------------------

    async def enqueue(
        self, conn: DictConnection, wid: uuid.UUID, owner_id: str, concurrency: Any
    ) -> None:
        """A workflow just stored joins its key's queue: its root steps gated (one more
        unmet dependency each), then `admit` lets it through at once if a slot is free."""
        await conn.execute(
            "WITH w AS (UPDATE workflows SET concurrency_key = %(key)s,"
            "   concurrency_max = %(max)s, admitted = false WHERE workflow_id = %(id)s)"
            " UPDATE workflow_steps SET remaining_deps = remaining_deps + 1"
            " WHERE workflow_id = %(id)s AND cardinality(depends_on) = 0",
            {"id": wid, "key": concurrency.key, "max": concurrency.max},
        )
        if wid not in await self.admit(conn, {(owner_id, concurrency.key)}):
            await self.append_events(
                conn,
                [
                    NewEvent(
                        wid,
                        "",
                        WORKFLOW_EVENT,
                        f"queued: concurrency key {concurrency.key!r}"
                        f" (max {concurrency.max}): waiting for a slot",
                    )
                ],
            )

    @staticmethod
    async def slots_held(conn: DictConnection, ids: list[uuid.UUID]) -> set[tuple[str, str]]:
        """The (owner, key) slots these workflows hold (admitted under a concurrency key)."""
        cur = await conn.execute(
            "SELECT DISTINCT owner_id, concurrency_key FROM workflows"
            " WHERE workflow_id = ANY(%(ids)s) AND admitted",
            {"ids": ids},
        )
        return {(r["owner_id"], r["concurrency_key"]) for r in await cur.fetchall()}

    async def admit(self, conn: DictConnection, slots: set[tuple[str, str]]) -> set[uuid.UUID]:
        """Admits queued workflows of these (owner, key) groups in submit order while fewer
        than the next one's `max` of its key are admitted and active: ungates their root
        steps (timers start now) and records the wake-up for the commit. Under the key's
        advisory lock, so replicas decide one at a time and never over-admit. Returns the
        workflows admitted."""
        admitted: set[uuid.UUID] = set()
        for owner, key in sorted(slots):  # one lock order: no deadlock between keys
            group = {"owner": owner, "key": key, "limit": MAX_CONCURRENCY}
            await conn.execute(_LOCK_KEY, group)
            while True:
                cur = await conn.execute(
                    "SELECT count(*) AS n FROM workflows WHERE owner_id = %(owner)s"
                    "   AND concurrency_key = %(key)s AND admitted"
                    f"   AND state IN ({sql(*ACTIVE)})",
                    group,
                )
                row = await cur.fetchone()
                active = row["n"] if row else 0
                cur = await conn.execute(
                    "SELECT workflow_id, concurrency_max FROM workflows"
                    " WHERE owner_id = %(owner)s AND concurrency_key = %(key)s"
                    f"   AND NOT admitted AND state IN ({sql(*ACTIVE)})"
                    " ORDER BY created_at, workflow_id LIMIT %(limit)s",
                    group,
                )
                picks = []
                for q in await cur.fetchall():
                    if active >= q["concurrency_max"]:
                        break
                    picks.append(q["workflow_id"])
                    active += 1
                if not picks:
                    break
                got = await self._ungate(conn, sorted(picks), key)
                admitted |= got
                if len(got) == len(picks):
                    break  # else one was cancelled meanwhile: count again
        return admitted

    async def _ungate(self, conn: DictConnection, ids: list[uuid.UUID], key: str) -> set[uuid.UUID]:
        """Admits these queued workflows (steps first, then the workflow rows: the order
        `stop` locks them in); a workflow stopped meanwhile is skipped."""
        cur = await conn.execute(
            "UPDATE workflow_steps SET remaining_deps = remaining_deps - 1,"
            "   next_run_at = greatest(now() + coalesce(timer_seconds, 0) * interval '1 second',"
            "     not_before_at), updated_at = now()"
            " WHERE workflow_id = ANY(%(ids)s) AND cardinality(depends_on) = 0"
            f"   AND state = {_PENDING} RETURNING workflow_id, queue",
            {"ids": ids},
        )
        steps = await cur.fetchall()
        cur = await conn.execute(
            "UPDATE workflows SET admitted = true WHERE workflow_id = ANY(%(ids)s)"
            f" AND NOT admitted AND state IN ({sql(*ACTIVE)}) RETURNING workflow_id",
            {"ids": ids},
        )
        got = {r["workflow_id"] for r in await cur.fetchall()}
        message = f"admitted: concurrency key {key!r}"
        await self.append_events(
            conn, [NewEvent(w, "", WORKFLOW_EVENT, message) for w in sorted(got)], locked=True
        )
        watches.made_runnable(*woken(r for r in steps if r["workflow_id"] in got))
        waiting = sorted({r["workflow_id"] for r in steps if r["queue"] == SIGNAL_QUEUE} & got)
        if waiting:  # signals sent while it was queued are kept for its steps
            _, more = await self.deliver_signals(conn, waiting, SIGNAL_WORKER)
            watches.made_runnable(*more)
        return got

    async def load(self, conn: DictConnection, rows: list[dict[str, Any]]) -> list[Any]:
        """Workflow messages for workflow rows, with their steps in spec order."""
        if not rows:
            return []
        cur = await conn.execute(
            f"SELECT workflow_id, {_STEP_COLUMNS} FROM workflow_steps"
            " WHERE workflow_id = ANY(%(ids)s) ORDER BY workflow_id, position",
            {"ids": [r["workflow_id"] for r in rows]},
        )
        steps: dict[uuid.UUID, list[dict[str, Any]]] = {}
        for s in await cur.fetchall():
            steps.setdefault(s["workflow_id"], []).append(s)
        return [messages.workflow(r, steps.get(r["workflow_id"], [])) for r in rows]

    async def visible(
        self, conn: DictConnection, workflow_id: str, scope: pb.WorkflowScope
    ) -> dict[str, Any]:
        """The workflow row, if `scope` may see it: another owner's workflow looks absent."""
        wid = messages.workflow_id(workflow_id)
        cur = await conn.execute(
            f"SELECT {_WF_COLUMNS} FROM workflows WHERE workflow_id = %(id)s", {"id": wid}
        )
        row = await cur.fetchone()
        if row is None or (not scope.all_owners and row["owner_id"] != scope.owner_id):
            raise messages.not_found(workflow_id)
        return row

    async def get(self, workflow_id: str, scope: pb.WorkflowScope) -> Any:
        async with self._db.pool.connection() as conn:
            row = await self.visible(conn, workflow_id, scope)
            return (await self.load(conn, [row]))[0]

    async def page(
        self,
        scope: pb.WorkflowScope,
        state: int,
        after: tuple[datetime, uuid.UUID] | None,
        size: int,
    ) -> tuple[list[Any], str]:
        """A page of workflows, newest first, and the next page's token ("" at the end)."""
        where: list[str] = ["true"]
        args: dict[str, Any] = {"limit": size + 1}
        if not scope.all_owners:
            where.append("owner_id = %(owner_id)s")
            args["owner_id"] = scope.owner_id
        if state:
            where.append("state = %(state)s")
            args["state"] = state
        if after is not None:
            where.append("(created_at, workflow_id) < (%(after_created)s, %(after_id)s)")
            args["after_created"], args["after_id"] = after
        async with self._db.pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_WF_COLUMNS} FROM workflows WHERE {' AND '.join(where)}"
                " ORDER BY created_at DESC, workflow_id DESC LIMIT %(limit)s",
                args,
            )
            rows = await cur.fetchall()
            more = len(rows) > size
            rows = rows[:size]
            workflows = await self.load(conn, rows)
        token = messages.page_token(rows[-1]["created_at"], rows[-1]["workflow_id"]) if more else ""
        return workflows, token

    async def stop(
        self, conn: DictConnection, wid: uuid.UUID, state: WorkflowState, message: str
    ) -> bool:
        """Cancels a workflow's unfinished steps and moves it to `state` (if still active)."""
        names = await self.cancel_unfinished_steps(conn, wid)
        cur = await conn.execute(
            f"SELECT state, owner_id, {_SLOT_KEY} FROM workflows WHERE workflow_id = %(id)s"
            " FOR NO KEY UPDATE",
            {"id": wid},
        )
        row = await cur.fetchone()
        if row is None or row["state"] not in ACTIVE:
            return False
        await self.append_events(
            conn,
            [
                *(NewEvent(wid, n, StepState.CANCELLED, message) for n in names),
                NewEvent(wid, "", WORKFLOW_EVENT, message),
            ],
            {wid: (state, message if state != WorkflowState.CANCELLED else "")},
            slots={(row["owner_id"], row["slot_key"])} if row["slot_key"] is not None else set(),
        )
        return True

    @staticmethod
    async def cancel_unfinished_steps(conn: DictConnection, wid: uuid.UUID) -> list[str]:
        cur = await conn.execute(
            f"UPDATE workflow_steps SET state = {StepState.CANCELLED:d}, lease_owner = NULL,"
            " lease_expires_at = NULL, updated_at = now()"
            f" WHERE workflow_id = %(id)s AND state IN ({sql(*UNFINISHED)}) RETURNING name",
            {"id": wid},
        )
        return [r["name"] for r in await cur.fetchall()]

    async def fail_step(
        self, conn: DictConnection, wid: uuid.UUID, step: str, error: str, reason: str
    ) -> None:
        """The step FAILED with `error`, the rest cancelled, the workflow FAILED for
        `reason` (the dead letter)."""
        await conn.execute(
            f"UPDATE workflow_steps SET state = {StepState.FAILED:d}, error = %(error)s,"
            " lease_owner = NULL, lease_expires_at = NULL, updated_at = now()"
            " WHERE workflow_id = %(id)s AND name = %(step)s",
            {"error": error[:MAX_ERROR_CHARS], "id": wid, "step": step},
        )
        others = await self.cancel_unfinished_steps(conn, wid)
        await self.append_events(
            conn,
            [
                NewEvent(wid, step, StepState.FAILED, error),
                *(NewEvent(wid, n, StepState.CANCELLED, "workflow failed") for n in others),
                NewEvent(wid, "", WORKFLOW_EVENT, reason),
            ],
            {wid: (WorkflowState.FAILED, reason)},
        )

    async def events(
        self, wid: uuid.UUID, scope: pb.WorkflowScope, after: int, limit: int
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The workflow (state, last sequence) and its events after `after`, in one
        autocommit query."""
        async with self._db.autocommit() as conn:
            cur = await conn.execute(
                "SELECT w.owner_id, w.state, w.last_sequence, e.sequence, e.workflow_state,"
                " e.step_name, e.step_state, e.message, e.created_at FROM workflows w"
                " LEFT JOIN LATERAL (SELECT * FROM workflow_events x"
                "   WHERE x.workflow_id = w.workflow_id AND x.sequence > %(after)s"
                "   ORDER BY x.sequence LIMIT %(limit)s) e ON true"
                " WHERE w.workflow_id = %(id)s ORDER BY e.sequence",
                {"after": after, "limit": limit, "id": wid},
            )
            rows = await cur.fetchall()
        if not rows or (not scope.all_owners and rows[0]["owner_id"] != scope.owner_id):
            raise messages.not_found(str(wid))
        return rows[0], [r for r in rows if r["sequence"] is not None]

    async def stopped_among(self, ids: list[uuid.UUID]) -> list[str]:
        """Those of `ids` that name a workflow no longer active."""
        async with self._db.autocommit() as conn:
            cur = await conn.execute(
                "SELECT workflow_id FROM workflows WHERE workflow_id = ANY(%(ids)s)"
                f" AND state NOT IN ({sql(*ACTIVE)})",
                {"ids": ids},
            )
            return [str(r["workflow_id"]) for r in await cur.fetchall()]

    # --- the queue ------------------------------------------------------------------------

    @staticmethod
    async def overdue_workflows(conn: DictConnection, limit: int) -> list[uuid.UUID]:
        cur = await conn.execute(
            f"SELECT workflow_id FROM workflows WHERE state IN ({sql(*ACTIVE)})"
            " AND deadline_at < now() ORDER BY deadline_at LIMIT %(limit)s",
            {"limit": limit},
        )
        return [r["workflow_id"] for r in await cur.fetchall()]

    @staticmethod
    async def expire_leases(
        conn: DictConnection, error: str, timed_out: str, limit: int
    ) -> list[dict[str, Any]]:
        """Steps whose lease expired, made RETRYING with a failed attempt recorded (its
        error `timed_out` for a task past its attempt deadline, else `error`), in
        (workflow, name) order."""
        cur = await conn.execute(
            _EXPIRE_LEASES, {"error": error, "timed_out": timed_out, "limit": limit}
        )
        return sorted(await cur.fetchall(), key=lambda r: (r["workflow_id"], r["name"]))

    @staticmethod
    async def queue_depth(conn: DictConnection) -> int:
        cur = await conn.execute(
            f"SELECT count(*) AS n FROM workflow_steps WHERE state IN ({sql(*CLAIMABLE)})"
            " AND remaining_deps = 0 AND next_run_at <= now()"
        )
        depth = await cur.fetchone()
        return depth["n"] if depth else 0

    @staticmethod
    async def queued_workflows(conn: DictConnection) -> int:
        """Workflows waiting for a slot of their concurrency key (the partial index's)."""
        cur = await conn.execute(
            "SELECT count(*) AS n FROM workflows WHERE concurrency_key IS NOT NULL"
            f" AND NOT admitted AND state IN ({sql(*ACTIVE)})"
        )
        row = await cur.fetchone()
        return row["n"] if row else 0

    @staticmethod
    async def task_queues(conn: DictConnection, limit: int) -> list[dict[str, Any]]:
        """The deepest task queues: runnable steps and the oldest one's age in seconds."""
        cur = await conn.execute(
            "SELECT queue, count(*) AS depth,"
            "   extract(epoch FROM now() - min(next_run_at))::float8 AS oldest_age"
            f" FROM workflow_steps WHERE state IN ({sql(*CLAIMABLE)}) AND remaining_deps = 0"
            f"   AND next_run_at <= now() AND queue IS NOT NULL AND queue NOT IN {_INTERNAL}"
            " GROUP BY queue ORDER BY depth DESC LIMIT %(limit)s",
            {"limit": limit},
        )
        return await cur.fetchall()

    async def claim(
        self,
        conn: DictConnection,
        worker_id: str,
        max_steps: int,
        lease_seconds: float,
        queues: list[str] | None = None,
        types: list[str] | None = None,
    ) -> pb.ClaimStepsResponse:
        """Leases up to `max_steps` runnable steps to `worker_id`, highest priority first,
        with the outputs of the steps their inputs reference: built-in steps, or with
        `queues` the task steps of those queues (of `types`, if given)."""
        kind = _TASKS if queues else _BUILTIN
        args = {
            "max_steps": max_steps,
            "worker_id": worker_id,
            "lease_seconds": lease_seconds,
            "queues": queues or [],
            "types": types or [],
        }
        cur = await conn.execute(_CLAIM.replace("{kind}", kind), args)
        rows = sorted(await cur.fetchall(), key=lambda r: (-r["priority"], r["next_run_at"]))
        reply = pb.ClaimStepsResponse()
        if not rows:
            cur = await conn.execute(
                "SELECT min(next_run_at) AS t FROM workflow_steps"
                f" WHERE state IN ({sql(*CLAIMABLE)}) AND remaining_deps = 0 AND {kind}",
                args,
            )
            nxt = await cur.fetchone()
            if nxt and nxt["t"] is not None:
                reply.next_run_time.CopyFrom(messages.timestamp(nxt["t"]))
            return reply
        referencing = {r["workflow_id"] for r in rows if "${steps." in json.dumps(r["inputs"])}
        outputs: dict[uuid.UUID, dict[str, Any]] = {}
        if referencing:
            cur = await conn.execute(
                "SELECT workflow_id, name, output FROM workflow_steps"
                f" WHERE workflow_id = ANY(%(ids)s) AND state = {_SUCCEEDED}",
                {"ids": list(referencing)},
            )
            for o in await cur.fetchall():
                outputs.setdefault(o["workflow_id"], {})[o["name"]] = o["output"]
        await self.append_events(
            conn,
            [
                NewEvent(r["workflow_id"], r["name"], StepState.RUNNING, f"attempt {r['attempt']}")
                for r in rows
            ],
            promote_pending=True,
        )
        for r in rows:
            step = reply.steps.add(
                ref=pb.StepRef(
                    workflow_id=str(r["workflow_id"]), step_name=r["name"], attempt=r["attempt"]
                ),
                op=r["op"],
                inputs=messages.struct(r["inputs"]),
                timeout_seconds=r["timeout_seconds"],
                owner=pb.WorkflowOwner(
                    user_id=r["owner_id"], username=r["owner_username"], roles=r["owner_roles"]
                ),
                lease_expire_time=messages.timestamp(r["lease_expires_at"]),
            )
            if r["queue"] is not None:
                step.queue, step.task_type = r["queue"], r["task_type"] or ""
                step.heartbeat_timeout_seconds = r["heartbeat_timeout"] or 0.0
                step.attempt_deadline.CopyFrom(messages.timestamp(r["attempt_deadline_at"]))
            if r["workflow_id"] in outputs:
                step.dependency_outputs.CopyFrom(messages.struct(outputs[r["workflow_id"]]))
            messages.set_trace_context(step, r["trace_context"], r["submitted_at"])
        return reply

    async def extend_leases(
        self,
        worker_id: str,
        refs: StepRefs,
        lease_seconds: float,
        details: list[str | None] | None = None,
    ) -> set[tuple[str, str, int]]:
        """The (workflow, step, attempt) leases still held by `worker_id`, now extended
        (never past a task's attempt deadline); `details` (JSON, parallel to `refs`)
        replace the steps' progress details where given."""
        async with self._db.pool.connection() as conn:
            cur = await conn.execute(
                "UPDATE workflow_steps s SET lease_expires_at = least("
                "   now() + %(lease_seconds)s * interval '1 second', s.attempt_deadline_at),"
                "   details = coalesce(u.details, s.details)"
                " FROM unnest(%(workflow_ids)s::uuid[], %(names)s::text[], %(attempts)s::int[],"
                "   %(details)s::jsonb[]) AS u(wf, name, attempt, details)"
                " WHERE s.workflow_id = u.wf AND s.name = u.name AND s.attempt = u.attempt"
                f"   AND s.lease_owner = %(worker_id)s AND s.state = {_RUNNING}"
                " RETURNING s.workflow_id, s.name, s.attempt",
                {
                    "lease_seconds": lease_seconds,
                    "worker_id": worker_id,
                    "details": details or [None] * len(refs.names),
                    **refs._asdict(),
                },
            )
            return {(str(r["workflow_id"]), r["name"], r["attempt"]) for r in await cur.fetchall()}

    async def complete(
        self, conn: DictConnection, worker_id: str, refs: StepRefs, outputs: list[str]
    ) -> tuple[list[dict[str, Any]], Woken]:
        """Records results where the lease is still `worker_id`'s, one row per attempt (its
        primary key makes "recorded once" a database guarantee), counts down dependents'
        unmet dependencies and finishes workflows whose last step this was. Returns the
        recorded rows (`ord` is the 1-based position in `refs`) and what kinds of dependent
        became runnable."""
        cur = await conn.execute(
            _COMPLETE, {"worker_id": worker_id, "outputs": outputs, **refs._asdict()}
        )
        rows = await cur.fetchall()
        done = sorted(
            (r for r in rows if r["ord"] is not None),
            key=lambda r: (r["workflow_id"], r["name"]),
        )
        if not done:
            return done, Woken(False, set())
        woke = woken(r for r in rows if r["ord"] is None and r["remaining"] == 0)
        # Completions of sibling steps serialise on the workflow row, and the check runs
        # after the lock so it sees them: the last step to finish finishes the workflow.
        touched = sorted({r["workflow_id"] for r in done})
        cur = await conn.execute(
            f"SELECT workflow_id, owner_id, {_SLOT_KEY} FROM workflows"
            " WHERE workflow_id = ANY(%(ids)s) ORDER BY workflow_id FOR NO KEY UPDATE",
            {"ids": touched},
        )
        held = {r["workflow_id"]: (r["owner_id"], r["slot_key"]) for r in await cur.fetchall()}
        cur = await conn.execute(
            "SELECT workflow_id FROM workflow_steps WHERE workflow_id = ANY(%(ids)s)"
            f" GROUP BY workflow_id HAVING bool_and(state = {_SUCCEEDED})",
            {"ids": touched},
        )
        finished = [r["workflow_id"] for r in await cur.fetchall()]
        events = [
            NewEvent(r["workflow_id"], r["name"], StepState.SUCCEEDED, f"attempt {r['attempt']}")
            for r in done
        ]
        events += [NewEvent(w, "", WORKFLOW_EVENT, "workflow succeeded") for w in finished]
        await self.append_events(
            conn,
            events,
            {w: (WorkflowState.SUCCEEDED, "") for w in finished},
            locked=True,
            slots={held[w] for w in finished if held[w][1] is not None},
        )
        # A wait_for_signal step just reached takes a signal kept for it (under the lock).
        reached = sorted(
            {
                r["workflow_id"]
                for r in rows
                if r["ord"] is None and r["remaining"] == 0 and r["queue"] == SIGNAL_QUEUE
            }
        )
        if reached:
            _, more = await self.deliver_signals(conn, reached, SIGNAL_WORKER)
            woke = Woken(woke.builtin or more.builtin, woke.queues | more.queues)
        return done, woke

    @staticmethod
    async def record_failure(
        conn: DictConnection,
        worker_id: str,
        ref: pb.StepRef,
        wid: uuid.UUID,
        error: str,
        details: str | None = None,
    ) -> dict[str, Any] | None:
        """Counts a failed attempt (if the lease is still `worker_id`'s) and records its
        attempt row; returns the step's retry policy and failure count, or None."""
        key = {"id": wid, "step": ref.step_name, "attempt": ref.attempt, "worker_id": worker_id}
        cur = await conn.execute(
            "UPDATE workflow_steps SET failures = failures + 1, error = %(error)s,"
            " updated_at = now()"
            " WHERE workflow_id = %(id)s AND name = %(step)s AND attempt = %(attempt)s"
            f"   AND lease_owner = %(worker_id)s AND state = {_RUNNING}"
            " RETURNING op, failures, max_attempts, initial_backoff, backoff_multiplier,"
            "   max_backoff, jitter",
            {"error": error, **key},
        )
        row = await cur.fetchone()
        if row is not None:
            await conn.execute(
                "INSERT INTO workflow_step_attempts"
                " (workflow_id, step_name, attempt, worker_id, succeeded, error, details)"
                " VALUES (%(id)s, %(step)s, %(attempt)s, %(worker_id)s, false, %(error)s,"
                " %(details)s)",
                {"error": error, "details": details, **key},
            )
        return row

    @staticmethod
    async def schedule_retry(
        conn: DictConnection, wid: uuid.UUID, step: str, delay_seconds: float
    ) -> datetime:
        """Makes the step RETRYING, runnable `delay_seconds` from now (the statement's
        clock, so after any event appended before it); returns when."""
        cur = await conn.execute(
            f"UPDATE workflow_steps SET state = {_RETRYING}, lease_owner = NULL,"
            " lease_expires_at = NULL,"
            " next_run_at = clock_timestamp() + %(delay)s * interval '1 second'"
            " WHERE workflow_id = %(id)s AND name = %(step)s RETURNING next_run_at",
            {"delay": delay_seconds, "id": wid, "step": step},
        )
        row = await cur.fetchone()
        if row is None:  # the caller holds the step's row lock since record_failure
            raise RuntimeError(f"step {step!r} of {wid} vanished under its lock")
        return row["next_run_at"]

    async def release(
        self, conn: DictConnection, worker_id: str, refs: StepRefs
    ) -> tuple[int, bool, set[str]]:
        """Hands leased steps back (PENDING, runnable now) without counting an attempt;
        returns how many, and what kinds became runnable (`Woken`)."""
        cur = await conn.execute(
            f"UPDATE workflow_steps s SET state = {_PENDING}, lease_owner = NULL,"
            "   lease_expires_at = NULL, next_run_at = now(), updated_at = now()"
            " FROM unnest(%(workflow_ids)s::uuid[], %(names)s::text[], %(attempts)s::int[])"
            "   AS u(wf, name, attempt)"
            " WHERE s.workflow_id = u.wf AND s.name = u.name AND s.attempt = u.attempt"
            f"   AND s.lease_owner = %(worker_id)s AND s.state = {_RUNNING}"
            " RETURNING s.workflow_id, s.name, s.attempt, s.queue",
            {"worker_id": worker_id, **refs._asdict()},
        )
        rows = sorted(await cur.fetchall(), key=lambda r: (r["workflow_id"], r["name"]))
        await self.append_events(
            conn,
            [
                NewEvent(
                    r["workflow_id"],
                    r["name"],
                    StepState.PENDING,
                    f"attempt {r['attempt']} released",
                )
                for r in rows
            ],
        )
        return len(rows), *woken(rows)

    # --- timers and signals ---------------------------------------------------------------

    async def take(
        self, conn: DictConnection, worker_id: str, wids: list[uuid.UUID], names: list[str]
    ) -> StepRefs:
        """Leases these runnable steps to `worker_id` (dataplatform itself, which completes
        them in the same transaction); returns the attempts it holds."""
        cur = await conn.execute(
            f"UPDATE workflow_steps s SET state = {_RUNNING}, attempt = s.attempt + 1,"
            "   lease_owner = %(worker_id)s, lease_expires_at = now() + interval '1 minute',"
            "   updated_at = now()"
            " FROM unnest(%(ids)s::uuid[], %(names)s::text[]) AS u(wf, name)"
            " WHERE s.workflow_id = u.wf AND s.name = u.name"
            f"   AND s.state IN ({sql(*CLAIMABLE)}) AND s.remaining_deps = 0"
            " RETURNING s.workflow_id, s.name, s.attempt",
            {"worker_id": worker_id, "ids": wids, "names": names},
        )
        rows = sorted(await cur.fetchall(), key=lambda r: (r["workflow_id"], r["name"]))
        await self.append_events(
            conn,
            [
                NewEvent(r["workflow_id"], r["name"], StepState.RUNNING, f"attempt {r['attempt']}")
                for r in rows
            ],
            promote_pending=True,
        )
        return StepRefs(
            [r["workflow_id"] for r in rows],
            [r["name"] for r in rows],
            [r["attempt"] for r in rows],
        )

    @staticmethod
    async def signal_sent(conn: DictConnection, wid: uuid.UUID, signal_id: str) -> bool:
        cur = await conn.execute(
            "SELECT 1 FROM workflow_signals WHERE workflow_id = %(id)s"
            " AND signal_id = %(signal_id)s",
            {"id": wid, "signal_id": signal_id},
        )
        return await cur.fetchone() is not None

    @staticmethod
    async def store_signal(
        conn: DictConnection, wid: uuid.UUID, name: str, signal_id: str | None, payload: str
    ) -> bool:
        """Keeps a signal; False when its signal_id was used before (nothing stored)."""
        cur = await conn.execute(
            "INSERT INTO workflow_signals (workflow_id, name, signal_id, payload)"
            " VALUES (%(id)s, %(name)s, %(signal_id)s, %(payload)s)"
            " ON CONFLICT (workflow_id, signal_id) WHERE signal_id IS NOT NULL DO NOTHING"
            " RETURNING seq",
            {"id": wid, "name": name, "signal_id": signal_id, "payload": payload},
        )
        return await cur.fetchone() is not None

    async def deliver_signals(
        self, conn: DictConnection, wids: list[uuid.UUID], worker_id: str
    ) -> tuple[set[str], Woken]:
        """Hands kept signals to the runnable wait_for_signal steps of these workflows,
        oldest signal to the first step (spec order); the callers hold the workflows' row
        locks, so a signal and the step reaching it never miss each other. Returns the
        signal names delivered and what the completed steps made runnable."""
        cur = await conn.execute(
            "SELECT workflow_id, name, inputs->>'name' AS signal FROM workflow_steps"
            f" WHERE workflow_id = ANY(%(ids)s) AND queue = '{SIGNAL_QUEUE}'"
            f"   AND state IN ({sql(*CLAIMABLE)}) AND remaining_deps = 0"
            " ORDER BY workflow_id, position",
            {"ids": wids},
        )
        waiting = await cur.fetchall()
        if not waiting:
            return set(), Woken(False, set())
        cur = await conn.execute(
            "SELECT workflow_id, seq, name, payload FROM workflow_signals"
            " WHERE workflow_id = ANY(%(ids)s) AND consumed_by IS NULL"
            " ORDER BY workflow_id, seq FOR UPDATE",
            {"ids": list({w["workflow_id"] for w in waiting})},
        )
        kept: dict[tuple[uuid.UUID, str], list[dict[str, Any]]] = {}
        for g in await cur.fetchall():
            kept.setdefault((g["workflow_id"], g["name"]), []).append(g)
        pairs = [
            (w, kept[w["workflow_id"], w["signal"]].pop(0))
            for w in waiting
            if kept.get((w["workflow_id"], w["signal"]))
        ]
        if not pairs:
            return set(), Woken(False, set())
        refs = await self.take(
            conn, worker_id, [w["workflow_id"] for w, _ in pairs], [w["name"] for w, _ in pairs]
        )
        payloads = {(w["workflow_id"], w["name"]): g for w, g in pairs}
        taken = [payloads[key] for key in zip(refs.workflow_ids, refs.names, strict=True)]
        await conn.execute(
            "UPDATE workflow_signals g SET consumed_by = u.step"
            " FROM unnest(%(ids)s::uuid[], %(seqs)s::bigint[], %(steps)s::text[])"
            "   AS u(wf, seq, step) WHERE g.workflow_id = u.wf AND g.seq = u.seq",
            {
                "ids": refs.workflow_ids,
                "seqs": [g["seq"] for g in taken],
                "steps": refs.names,
            },
        )
        outputs = [json.dumps(g["payload"]) for g in taken]
        _, woke = await self.complete(conn, worker_id, refs, outputs)
        return {g["name"] for g in taken}, woke
