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
import contextlib
import json
import random
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, TypeVar

import psycopg
from google.protobuf import json_format
from psycopg.pq import TransactionStatus
from psycopg.types.json import Jsonb

from aiwfe.data.v1 import workflow_store_service_pb2 as pb
from aiwfe.runtime import conditions, hops, metrics
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from dataplatform.db import Database, DictConnection
from dataplatform.workflows import messages, watches
from dataplatform.workflows.states import (
    ACTIVE,
    CLAIMABLE,
    DONE,
    FINISHED,
    RERUN,
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
# A fan-out step (for_each) waits here, never claimed, while its items run as steps of
# their own named "<step>[<i>]"; dataplatform completes it once the last one finished.
FAN_OUT_QUEUE = "$fanout"
FAN_OUT_WORKER = "dataplatform:fan-out"
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
    """A StepSpec's `queue` column: a task's queue, an internal one for timers, signals
    and fan-outs, None for a built-in op."""
    if step.for_each:
        return FAN_OUT_QUEUE
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


def eager_roots(request: pb.CreateWorkflowRequest, excluded: bool) -> list[Any]:
    """The root steps CreateWorkflow may lease to its caller's worker (eager dispatch): at
    most `eager_max_steps` built-in ones, runnable at once (no timer, no not_before, no
    condition: those wait for their time or their evaluation), in spec order; none for a
    workflow with conditions on its roots, fan-outs or a concurrency key (`excluded`),
    which are admitted and reached in a transaction of their own."""
    if excluded:
        return []
    builtin = request.eager_max_steps if request.eager_worker_id else 0
    tasks = set(request.eager_task_steps) if request.eager_task_lease_id else set()
    picked: list[Any] = []
    for st in request.spec.steps:
        if st.depends_on or st.when or st.HasField("not_before") or timer_seconds(st):
            continue
        if step_queue(st) is None and builtin > 0:
            picked.append(st)
            builtin -= 1
        elif st.op == "task" and not st.for_each and st.name in tasks:
            picked.append(st)
    return picked


def _event_row(r: dict[str, Any]) -> dict[str, Any]:
    """An event row of `wf_complete_steps` (its step in `name`) as `wf_append_events` has it."""
    return {
        "workflow_id": r["workflow_id"],
        "sequence": r["sequence"],
        "workflow_state": r["workflow_state"],
        "step_name": r["name"],
        "step_state": r["step_state"],
        "message": r["message"],
        "created_at": r["created_at"],
    }


def _running_events(rows: list[dict[str, Any]]) -> list[NewEvent]:
    return [
        NewEvent(r["workflow_id"], r["name"], StepState.RUNNING, f"attempt {r['attempt']}")
        for r in rows
    ]


@dataclass
class Eager:
    """Eager dispatch asked of a CompleteSteps: lease up to `max_steps` of the built-in
    steps it makes runnable to the completing worker; `steps` receives them."""

    max_steps: int
    lease_seconds: float
    steps: list[pb.ClaimedStep] = field(default_factory=list)


class ListFilter(NamedTuple):
    """What a listing keeps: a state (0: any), a spec name ("": any), a schedule's
    workflows (None: any) and a create-time range [create_after, create_before)."""

    state: int = 0
    name: str = ""
    schedule_id: uuid.UUID | None = None
    create_after: datetime | None = None
    create_before: datetime | None = None


def item_parent(step_name: str) -> str | None:
    """The fan-out step of an item step ("<step>[<i>]"; step names cannot hold '['), or
    None for any other step."""
    return step_name.split("[", 1)[0] if "[" in step_name else None


def for_each_source(step: Any) -> tuple[str | None, list[str]]:
    """A validated for_each (taskproc/spec.py checked its form): the step whose output
    holds the list (None: the workflow input) and the path to it."""
    parts = step.for_each[2:-1].split(".")
    return (None, parts[1:]) if parts[0] == "input" else (parts[1], parts[3:])


@dataclass
class _Later:
    """Wake-ups a transaction owes once it commits (work made runnable, stopped
    workflows), so no worker looks for rows before they are visible."""

    builtin: bool = False
    queues: set[str] = field(default_factory=set)
    stopped: list[str] = field(default_factory=list)


_later: ContextVar[_Later | None] = ContextVar("aiwfe_wf_later", default=None)


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


# Migration 015's function: one statement, its plan cached per connection.
_APPEND_EVENTS = (
    "SELECT * FROM wf_append_events(%(workflow_ids)s::uuid[], %(step_names)s::text[],"
    " %(step_states)s::smallint[], %(messages)s::text[], %(moved_ids)s::uuid[],"
    " %(moved_states)s::smallint[], %(moved_errors)s::text[], %(promote_pending)s)"
)

# One statement (migration 015's function, its plan cached per connection): the workflow,
# its steps and its first event; with eager dispatch (`eager_names`, chosen by `_insert`)
# runnable root steps leased to the caller as a ClaimSteps would leave them.
_CREATE = (
    "SELECT * FROM wf_create_workflow(%(workflow_id)s::uuid, %(owner_id)s::text,"
    " %(owner_username)s::text, %(owner_roles)s::text[], %(idempotency_key)s::text,"
    " %(spec)s::bytea, %(priority)s::int, %(timeout_seconds)s::float8,"
    " %(step_names)s::text[], %(step_ops)s::text[], %(step_inputs)s::jsonb[],"
    " %(step_deps)s::jsonb[], %(max_attempts)s::int[], %(initial_backoffs)s::float8[],"
    " %(backoff_multipliers)s::float8[], %(max_backoffs)s::float8[], %(jitters)s::float8[],"
    " %(step_timeouts)s::float8[], %(step_timers)s::float8[],"
    " %(step_not_befores)s::timestamptz[], %(step_conditions)s::text[],"
    " %(step_run_skipped)s::bool[], %(submitted)s::text, %(default_heartbeat)s::float8,"
    " %(trace_context)s::jsonb, %(name)s::text, %(schedule_id)s::uuid,"
    " %(eager_names)s::text[], %(eager_worker)s::text, %(eager_task_lease)s::text,"
    " %(eager_queues)s::text[], %(eager_lease)s::float8)"
)

# A workflow's concurrency key if it holds one of its key's slots (admitted), else NULL.
_SLOT_KEY = "CASE WHEN admitted THEN concurrency_key END AS slot_key"
# One transaction at a time decides a key's admissions (the two-int advisory lock form: its
# own key space; a hash collision of two keys only serialises them).
_LOCK_KEY = "SELECT pg_advisory_xact_lock(20014, hashtext(%(owner)s || chr(31) || %(key)s))"
_INTERNAL = f"('{TIMER_QUEUE}', '{SIGNAL_QUEUE}', '{FAN_OUT_QUEUE}')"
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
    "   w.trace_context, w.created_at AS submitted_at, s.item_index, s.item"
)

# Migration 015's function: the completion, the dependants, the workflow row locks, the
# finished check, eager dispatch's leases and the events in one call (kinds of rows there).
_COMPLETE = (
    "SELECT * FROM wf_complete_steps(%(worker_id)s, %(workflow_ids)s::uuid[],"
    " %(names)s::text[], %(attempts)s::int[], %(outputs)s::jsonb[], %(eager_max)s,"
    " %(eager_lease)s, %(alone)s)"
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


# A reached fan-out step: RUNNING (attempt n, leased to dataplatform with no expiry), and,
# when for_each names a list within the bound, one step per item (the first
# `concurrency` runnable, the rest held by remaining_deps = 1; none before the step's
# not_before) and its workflow_fan_outs row. Returns what for_each named (kind, length)
# and the queues of the runnable items.
_EXPAND = (
    "WITH src AS (SELECT CASE WHEN %(source)s::text IS NULL"
    "   THEN %(input)s::jsonb #> %(path)s::text[]"
    "   ELSE (SELECT output #> %(path)s::text[] FROM workflow_steps"
    "     WHERE workflow_id = %(id)s AND name = %(source)s) END AS items),"
    " ok AS (SELECT items, jsonb_array_length(items) AS n FROM src"
    "   WHERE CASE WHEN jsonb_typeof(items) = 'array'"  # no length of a scalar is asked
    "     THEN jsonb_array_length(items) <= %(max_items)s ELSE false END),"
    f" p AS (UPDATE workflow_steps SET state = {_RUNNING}, attempt = attempt + 1,"
    "   lease_owner = %(worker)s, lease_expires_at = NULL, updated_at = now()"
    "   WHERE workflow_id = %(id)s AND name = %(name)s"
    f"   AND state IN ({sql(*CLAIMABLE)}) AND remaining_deps = 0 RETURNING *),"
    " c AS (INSERT INTO workflow_steps (workflow_id, name, position, op, inputs, depends_on,"
    "   remaining_deps, state, priority, max_attempts, initial_backoff, backoff_multiplier,"
    "   max_backoff, jitter, timeout_seconds, queue, task_type, heartbeat_timeout,"
    "   not_before_at, next_run_at, parent, item_index, item, attempt)"
    "   SELECT p.workflow_id, p.name || '[' || (e.ord - 1) || ']', p.position, p.op,"
    "   p.inputs, ARRAY[]::text[], CASE WHEN e.ord <= %(concurrency)s THEN 0 ELSE 1 END,"
    f"   {_PENDING}, p.priority, p.max_attempts, p.initial_backoff, p.backoff_multiplier,"
    "   p.max_backoff, p.jitter, p.timeout_seconds,"
    "   CASE WHEN p.op = 'task' THEN p.inputs->>'queue' END, p.task_type,"
    "   p.heartbeat_timeout, p.not_before_at, greatest(now(), p.not_before_at),"
    "   p.name, e.ord - 1, e.value,"
    # Expanded again (RetryWorkflow): an item's attempts continue after its recorded ones.
    "   CASE WHEN p.attempt > 1 THEN coalesce((SELECT max(a.attempt)"
    "     FROM workflow_step_attempts a WHERE a.workflow_id = p.workflow_id"
    "     AND a.step_name = p.name || '[' || (e.ord - 1) || ']'), 0) ELSE 0 END"
    "   FROM p, ok, jsonb_array_elements(ok.items) WITH ORDINALITY AS e(value, ord)"
    "   RETURNING queue, remaining_deps),"
    " f AS (INSERT INTO workflow_fan_outs (workflow_id, step_name, total, released,"
    "   unfinished, collect) SELECT p.workflow_id, p.name, ok.n,"
    "   least(ok.n, %(concurrency)s), ok.n, %(collect)s FROM p, ok)"
    " SELECT (SELECT attempt FROM p) AS attempt, jsonb_typeof(items) AS kind,"
    "   CASE WHEN jsonb_typeof(items) = 'array' THEN jsonb_array_length(items) END AS n,"
    "   ARRAY(SELECT DISTINCT coalesce(queue, '') FROM c WHERE remaining_deps = 0)"
    "   AS queues FROM src"
)

# Items that finished (succeeded, or failed for good under COLLECT), k per fan-out: each
# releases the next held item; returns each fan-out's unfinished count and the queues of
# the released items. `o` reads `released` before the update (one snapshot).
_ITEMS_FINISHED = (
    "WITH u AS (SELECT * FROM unnest(%(ids)s::uuid[], %(names)s::text[], %(ks)s::int[])"
    "   AS u(wf, name, k)),"
    " o AS (SELECT f.workflow_id, f.step_name, f.released AS old FROM workflow_fan_outs f"
    "   JOIN u ON f.workflow_id = u.wf AND f.step_name = u.name),"
    " f AS (UPDATE workflow_fan_outs f SET unfinished = f.unfinished - u.k,"
    "   released = least(f.total, f.released + u.k) FROM u"
    "   WHERE f.workflow_id = u.wf AND f.step_name = u.name"
    "   RETURNING f.workflow_id, f.step_name, f.unfinished, f.released),"
    " r AS (UPDATE workflow_steps s SET remaining_deps = 0, next_run_at = now(),"
    "   updated_at = now() FROM f JOIN o USING (workflow_id, step_name),"
    "   generate_series(o.old, f.released - 1) AS i"
    "   WHERE s.workflow_id = f.workflow_id AND s.name = f.step_name || '[' || i || ']'"
    f"   AND s.state = {_PENDING} RETURNING s.queue)"
    " SELECT workflow_id, step_name, unfinished, NULL::text AS queue FROM f"
    " UNION ALL SELECT NULL, NULL, NULL, coalesce(queue, '') FROM r"
)

# The output of fan-out steps whose items all finished: the items' outputs in order (a
# failed item's entry {"error": ...}), and under COLLECT the count of failed ones.
_COLLECT = (
    "SELECT p.workflow_id, p.name, p.attempt, (jsonb_build_object('items',"
    f"   coalesce(jsonb_agg(CASE WHEN c.state = {_SUCCEEDED} THEN c.output"
    "     ELSE jsonb_build_object('error', c.error) END ORDER BY c.item_index)"
    "     FILTER (WHERE c.name IS NOT NULL), '[]'::jsonb))"
    "   || CASE WHEN f.collect THEN jsonb_build_object('failed',"
    f"     count(c.name) FILTER (WHERE c.state <> {_SUCCEEDED}))"
    "     ELSE '{}'::jsonb END)::text AS output"
    " FROM unnest(%(ids)s::uuid[], %(names)s::text[]) AS u(wf, name)"
    " JOIN workflow_steps p ON p.workflow_id = u.wf AND p.name = u.name"
    " JOIN workflow_fan_outs f ON f.workflow_id = u.wf AND f.step_name = u.name"
    " LEFT JOIN workflow_steps c ON c.workflow_id = u.wf AND c.parent = u.name"
    f" WHERE p.state = {_RUNNING} GROUP BY p.workflow_id, p.name, p.attempt, f.collect"
)


class WorkflowRepository:
    """The engine's reads and writes; `wakeups` hears what each transaction appended."""

    def __init__(
        self, db: Database, wakeups: watches.Wakeups, max_fan_out_items: int = 1000
    ) -> None:
        self._db = db
        self._wakeups = wakeups
        self.max_fan_out_items = max_fan_out_items
        # What a permanent failure found here (a fan-out's for_each naming no list) does:
        # the scheduler's dead letter, set by it; returns whether the workflow stopped.
        self.dead_letter: (
            Callable[[DictConnection, uuid.UUID, str, int, str], Awaitable[bool]] | None
        ) = None

    # --- transactions and events ----------------------------------------------------------

    async def tx(self, work: Callable[[DictConnection], Awaitable[T]], alone: bool = False) -> T:
        """Runs `work` in one transaction, retrying on deadlock/serialization failures;
        once it commits, the events it appended reach this replica's watchers. `alone`:
        `work` is one statement, run in autocommit (its own transaction, one round trip)."""
        for attempt in range(_TX_RETRIES):
            with watches.collecting() as appended, self._owing() as later:
                try:
                    connect = self._db.autocommit() if alone else self._db.pool.connection()
                    async with connect as conn:
                        result = await work(conn)
                except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                    if attempt == _TX_RETRIES - 1:
                        raise
                    await asyncio.sleep(random.uniform(0.001, 0.02) * (attempt + 1))
                    continue
            self._wakeups.appended(appended)
            self._wake(later)
            return result
        raise RuntimeError("unreachable: the last attempt returns or raises")

    @contextlib.contextmanager
    def _owing(self) -> Iterator[_Later]:
        """Collects the wake-ups of one transaction attempt (an enclosing one's, if any)."""
        outer = _later.get()
        if outer is not None:
            yield outer
            return
        later = _Later()
        token = _later.set(later)
        try:
            yield later
        finally:
            _later.reset(token)

    def _wake(self, later: _Later) -> None:
        self._wakeups.work(later.builtin, later.queues)
        if later.stopped:
            self._wakeups.stopped(later.stopped)

    def _wake_later(self, woke: Woken = Woken(False, set()), stopped: str | None = None) -> None:
        """Owes a wake-up to the current transaction (at once outside one)."""
        later = _later.get()
        now = later is None
        later = later or _Later()
        later.builtin = later.builtin or woke.builtin
        later.queues |= woke.queues
        if stopped is not None:
            later.stopped.append(stopped)
        if now:
            self._wake(later)

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
        wids = {e.workflow_id for e in events}
        watched = watches.current_appended() is not None and self._wakeups.watching(wids)
        # Parsing rows nobody reads costs the queue; a late watcher re-reads.
        self._to_watchers(wids, await cur.fetchall() if watched else [])
        finished = [w for w, (state, _) in new_states.items() if state not in ACTIVE]
        if finished:
            if slots is None:
                slots = await self.slots_held(conn, finished)
            if slots:
                await self.admit(conn, slots)

    def _to_watchers(self, wids: set[uuid.UUID], rows: list[dict[str, Any]]) -> None:
        """Appended event rows of these workflows, for the transaction's watchers (pushed
        once it commits); no rows while nobody watches them: a late watcher re-reads."""
        appended = watches.current_appended()
        if appended is None:
            return
        if not rows or not self._wakeups.watching(wids):
            appended.update(dict.fromkeys(wids))
            return
        for row in rows:
            got = appended.setdefault(row["workflow_id"], [])
            if got is not None:
                got.append(row)

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
        not announced. A workflow with a root step that has a condition is stored in a
        transaction that also evaluates those conditions (`reach`), so no one can claim
        such a step before its condition was evaluated.

        With `conn_in` it runs inside the caller's transaction (a schedule's tick) and
        wakes no one: the caller calls `Wakeups.work()` once it commits."""
        spec = request.spec
        steps = list(spec.steps)
        gated = [st.name for st in steps if st.when and not st.depends_on]
        if conn_in is not None:
            return (await self._insert(conn_in, request, wid, gated))[0]
        if gated or spec.concurrency.key or any(st.for_each for st in steps):  # in one tx
            stored, first, woke = await self.tx(
                lambda conn: self._insert(conn, request, wid, gated)
            )
        else:
            async with self._db.autocommit() as conn:
                stored, first, woke = await self._insert(conn, request, wid, gated)
            if first is not None:  # watched before the insert, if at all
                self._wakeups.deliver({wid: first})
        if woke is not None:
            self._wakeups.work(*woke)
        return stored

    async def _insert(
        self,
        conn: DictConnection,
        request: pb.CreateWorkflowRequest,
        wid: uuid.UUID,
        gated: list[str],
    ) -> tuple[pb.CreateWorkflowResponse, list[dict[str, Any]] | None, Woken | None]:
        """`create`'s statement (and the conditions of `gated` root steps, the set-up of
        fan-outs); returns the response, the first events of a new workflow (its first, and
        those of eagerly leased steps) and what became runnable. Inside a transaction that
        collects events, the first event goes with the transaction's own."""
        spec = request.spec
        steps = list(spec.steps)
        fan_outs = [st for st in steps if st.for_each]
        policies = [st.retry_policy for st in steps]
        key = request.idempotency_key or None
        eager = eager_roots(request, bool(gated or fan_outs or spec.concurrency.key))
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
            "step_conditions": [st.when or None for st in steps],
            "step_run_skipped": [
                st.on_dependency_skipped == wf_pb.DEPENDENCY_SKIP_POLICY_RUN for st in steps
            ],
            "submitted": SUBMITTED,
            "default_heartbeat": DEFAULT_HEARTBEAT_SECONDS,
            "trace_context": messages.trace_context_json(request),
            "name": spec.name,
            "schedule_id": uuid.UUID(request.schedule_id) if request.schedule_id else None,
            "eager_names": [st.name for st in eager],
            "eager_worker": request.eager_worker_id or None,
            "eager_task_lease": request.eager_task_lease_id or None,
            "eager_queues": sorted({q for st in eager if (q := step_queue(st)) is not None}),
            "eager_lease": request.eager_lease_seconds,
        }
        cur = await conn.execute(_CREATE, args)
        if hops.ENABLED and conn.info.transaction_status == TransactionStatus.IDLE:
            hops.mark(str(wid), "committed")  # autocommit: the reply follows the commit
        row = await cur.fetchone()
        if row is not None:
            first = {
                "sequence": 1,
                "workflow_state": WorkflowState.PENDING,
                "step_name": "",
                "step_state": WORKFLOW_EVENT,
                "message": SUBMITTED,
                "created_at": row["created_at"],
            }
            leased = {st.name for st in eager} if row["eager"] else set()
            roots = [
                st
                for st in steps
                if not st.depends_on
                and st.name not in gated
                and not st.for_each
                and st.name not in leased
            ]
            woke = woken({"queue": step_queue(st)} for st in roots)
            keyed = spec.concurrency.key
            appended = watches.current_appended()
            if (gated or fan_outs or keyed) and appended is not None:
                appended[wid] = [first]  # before the events appended below
            if keyed:  # first: its root steps wait for a slot (`_ungate` reaches them)
                await self.enqueue(conn, wid, request.owner.user_id, spec.concurrency)
                woke = Woken(False, set())
            if fan_outs:
                await self._set_up_fan_outs(conn, wid, spec, fan_outs, set(gated))
            if gated:
                more, waits = await self.reach(conn, [(wid, n) for n in gated])
                woke = Woken(woke.builtin or more.builtin, woke.queues | more.queues)
                if waits:
                    _, more = await self.deliver_signals(conn, sorted(waits), SIGNAL_WORKER)
                    woke = Woken(woke.builtin or more.builtin, woke.queues | more.queues)
                cur = await conn.execute(
                    f"SELECT {_WF_COLUMNS} FROM workflows WHERE workflow_id = %(id)s", {"id": wid}
                )
                now = await cur.fetchone()
                wf = (await self.load(conn, [now or row]))[0]
                return pb.CreateWorkflowResponse(workflow=wf, created=True), None, woke
            # nothing to read back: every step is PENDING, no attempts
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
            # The reply is the workflow as submitted (its first event); eagerly leased steps
            # follow as their own events and in `eager_steps`.
            wf = messages.workflow({**row, "state": WorkflowState.PENDING}, pending)
            reply = pb.CreateWorkflowResponse(workflow=wf, created=True)
            firsts = [first]
            if leased:
                firsts += [
                    {
                        **first,
                        "sequence": i,
                        "workflow_state": WorkflowState.RUNNING,
                        "step_name": st.name,
                        "step_state": StepState.RUNNING,
                        "message": "attempt 1",
                    }
                    for i, st in enumerate(eager, start=2)
                ]
                trace = messages.trace_context_json(request)
                now = row["tx_now"]
                for st in eager:
                    lease = request.eager_lease_seconds
                    step = reply.eager_steps.add(
                        ref=pb.StepRef(workflow_id=str(wid), step_name=st.name, attempt=1),
                        op=st.op,
                        inputs=st.inputs,
                        timeout_seconds=st.timeout_seconds,
                        owner=request.owner,
                    )
                    if st.op == "task":
                        fields = st.inputs.fields
                        heartbeat = DEFAULT_HEARTBEAT_SECONDS
                        if "heartbeat_timeout_seconds" in fields:
                            heartbeat = fields["heartbeat_timeout_seconds"].number_value
                        lease = min(heartbeat, st.timeout_seconds)
                        step.queue = fields["queue"].string_value
                        step.task_type = fields["type"].string_value
                        step.heartbeat_timeout_seconds = heartbeat
                        step.attempt_deadline.CopyFrom(
                            messages.timestamp(now + timedelta(seconds=st.timeout_seconds))
                        )
                    step.lease_expire_time.CopyFrom(
                        messages.timestamp(now + timedelta(seconds=lease))
                    )
                    messages.set_trace_context(
                        step, trace.obj if trace else None, row["created_at"]
                    )
            return reply, firsts, woke
        # The idempotency key was used before (or is being used right now: the insert
        # waited for that transaction, so its workflow is committed): the same workflow.
        cur = await conn.execute(
            f"SELECT {_WF_COLUMNS} FROM workflows"
            " WHERE owner_id = %(owner_id)s AND idempotency_key = %(idempotency_key)s",
            {"owner_id": request.owner.user_id, "idempotency_key": key},
        )
        existing = await cur.fetchone()
        if existing is None:  # the conflicting row committed before this read
            raise RuntimeError(f"workflow of idempotency key {key!r} vanished")
        wf = (await self.load(conn, [existing]))[0]
        return pb.CreateWorkflowResponse(workflow=wf), None, None

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
        await self.admit_or_queue(conn, wid, owner_id, concurrency.key, concurrency.max)

    async def admit_or_queue(
        self, conn: DictConnection, wid: uuid.UUID, owner_id: str, key: str, limit: int
    ) -> None:
        """Admits the gated workflow if a slot of its key is free, else says it waits."""
        if wid not in await self.admit(conn, {(owner_id, key)}):
            message = f"queued: concurrency key {key!r} (max {limit}): waiting for a slot"
            await self.append_events(conn, [NewEvent(wid, "", WORKFLOW_EVENT, message)])

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
        steps (timers start now) and owes the wake-up to the commit. Under the key's
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
        `stop` locks them in); a workflow stopped meanwhile is skipped. Its root steps are
        reached now: conditions evaluated, fan-outs expanded, kept signals delivered."""
        cur = await conn.execute(
            "UPDATE workflow_steps SET remaining_deps = remaining_deps - 1,"
            "   next_run_at = greatest(now() + coalesce(timer_seconds, 0) * interval '1 second',"
            "     not_before_at), updated_at = now()"
            # The gated steps: one unmet dependency more than their unfinished ones (the
            # roots of a new workflow, the reached steps of a retried one).
            " WHERE workflow_id = ANY(%(ids)s) AND parent IS NULL"
            f"   AND state = {_PENDING} AND remaining_deps > (SELECT count(*)"
            "     FROM workflow_steps d WHERE d.workflow_id = workflow_steps.workflow_id"
            f"     AND d.name = ANY(workflow_steps.depends_on) AND d.state NOT IN ({sql(*DONE)}))"
            " RETURNING workflow_id, name, queue, condition IS NOT NULL AS gated",
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
        ready = [r for r in steps if r["workflow_id"] in got]
        self._wake_later(woken(r for r in ready if not r["gated"] and r["queue"] != FAN_OUT_QUEUE))
        waiting = {r["workflow_id"] for r in ready if r["queue"] == SIGNAL_QUEUE}
        gated = [(r["workflow_id"], r["name"]) for r in ready if r["gated"]]
        if gated:
            more, waits = await self.reach(conn, gated)
            self._wake_later(more)
            waiting |= waits
        if waiting:  # signals sent while it was queued are kept for its steps
            _, more = await self.deliver_signals(conn, sorted(waiting), SIGNAL_WORKER)
            self._wake_later(more)
        fanned = sorted({r["workflow_id"] for r in ready if r["queue"] == FAN_OUT_QUEUE})
        if fanned:
            await self._expand_reached(conn, fanned)
        return got

    # --- conditions -----------------------------------------------------------------------

    async def reach(
        self, conn: DictConnection, reached: list[tuple[uuid.UUID, str]]
    ) -> tuple[Woken, set[uuid.UUID]]:
        """Evaluates the conditions of steps just reached (their dependencies all done), in
        the transaction that reached them, which holds their workflows' row locks. A false
        one makes its step SKIPPED, and the skip is followed through the dependants (SKIPPED
        too, or with policy RUN counted as done, which may reach more steps); an error
        fails the step and its workflow for good (the dead letter). Workflows left with
        only SUCCEEDED and SKIPPED steps succeed. Returns what became runnable and the
        workflows with a wait_for_signal step among it (for `deliver_signals`)."""
        builtin, queues, waits = False, set(), set()
        touched: set[uuid.UUID] = set()
        fanned: set[uuid.UUID] = set()
        inputs: dict[uuid.UUID, dict[str, Any]] = {}
        while reached:
            cur = await conn.execute(
                "SELECT s.workflow_id, s.name, s.condition, s.queue FROM workflow_steps s"
                " JOIN unnest(%(ids)s::uuid[], %(names)s::text[]) AS u(wf, name)"
                "   ON s.workflow_id = u.wf AND s.name = u.name"
                f" WHERE s.state = {_PENDING} AND s.remaining_deps = 0"
                " ORDER BY s.workflow_id, s.position",
                {"ids": [w for w, _ in reached], "names": [n for _, n in reached]},
            )
            rows = await cur.fetchall()
            touched |= {r["workflow_id"] for r in rows}
            gated = [r for r in rows if r["condition"] is not None]
            await self._load_inputs(conn, {r["workflow_id"] for r in gated} - set(inputs), inputs)
            seen = await self._ancestors_seen(conn, gated)
            skips: list[tuple[uuid.UUID, str, str]] = []
            failed: dict[uuid.UUID, tuple[str, str]] = {}
            for r in rows:
                wid, name, cond = r["workflow_id"], r["name"], r["condition"]
                run = True
                if cond is not None:
                    try:
                        run = conditions.evaluate(cond, inputs[wid], seen.get(wid, {}))
                    except conditions.ConditionError as exc:
                        failed.setdefault(wid, (name, str(exc)))
                        continue
                if not run:
                    skips.append((wid, name, f"condition false: {cond}"))
                elif r["queue"] is None:
                    builtin = True
                elif r["queue"] == SIGNAL_QUEUE:
                    waits.add(wid)
                elif r["queue"] == FAN_OUT_QUEUE:
                    fanned.add(wid)
                else:
                    queues.add(r["queue"])
            for wid, (name, error) in sorted(failed.items()):
                await self.fail_step(conn, wid, name, error, f"step {name!r} failed: {error}")
                metrics.workflow_dead_letters.inc()
            reached = await self._skip(conn, [s for s in skips if s[0] not in failed])
        finished = await self._finished(conn, sorted(touched))
        await self.append_events(
            conn,
            [NewEvent(w, "", WORKFLOW_EVENT, "workflow succeeded") for w in finished],
            {w: (WorkflowState.SUCCEEDED, "") for w in finished},
        )
        if fanned:  # fan-out steps whose condition held, or reached past a skip
            await self._expand_reached(conn, sorted(fanned))
        return Woken(builtin, queues), waits - set(finished)

    @staticmethod
    async def _load_inputs(
        conn: DictConnection, wids: set[uuid.UUID], into: dict[uuid.UUID, dict[str, Any]]
    ) -> None:
        """The workflows' inputs (from their stored specs), the conditions' `input`."""
        if not wids:
            return
        cur = await conn.execute(
            "SELECT workflow_id, spec FROM workflows WHERE workflow_id = ANY(%(ids)s)",
            {"ids": list(wids)},
        )
        for r in await cur.fetchall():
            spec = wf_pb.WorkflowSpec.FromString(r["spec"])
            into[r["workflow_id"]] = json_format.MessageToDict(spec.input)

    @staticmethod
    async def _ancestors_seen(
        conn: DictConnection, gated: list[dict[str, Any]]
    ) -> dict[uuid.UUID, dict[str, Any]]:
        """The conditions' `steps`: the state and output of each step they name (checked
        at submit to be ancestors, so SUCCEEDED or SKIPPED by now)."""
        names = {n for r in gated for n in conditions.check(r["condition"]).steps}
        if not names:
            return {}
        cur = await conn.execute(
            "SELECT workflow_id, name, state, output FROM workflow_steps"
            " WHERE workflow_id = ANY(%(ids)s) AND name = ANY(%(names)s)"
            f" AND state IN ({sql(*DONE)})",
            {"ids": list({r["workflow_id"] for r in gated}), "names": list(names)},
        )
        seen: dict[uuid.UUID, dict[str, Any]] = {}
        for r in await cur.fetchall():
            step: dict[str, Any] = {"state": conditions.STATE_SKIPPED}
            if r["state"] == _SUCCEEDED:
                step = {"state": conditions.STATE_SUCCEEDED, "output": r["output"]}
            seen.setdefault(r["workflow_id"], {})[r["name"]] = step
        return seen

    async def _skip(
        self, conn: DictConnection, skips: list[tuple[uuid.UUID, str, str]]
    ) -> list[tuple[uuid.UUID, str]]:
        """Marks PENDING steps SKIPPED (with their event's message) and follows the skip:
        dependants with policy SKIP are skipped too, those with policy RUN count the skipped
        dependency as done. Returns the steps that reached (no dependency left)."""
        reached: list[tuple[uuid.UUID, str]] = []
        while skips:
            messages_of = {(w, n): m for w, n, m in skips}
            cur = await conn.execute(
                f"UPDATE workflow_steps s SET state = {StepState.SKIPPED:d}, updated_at = now()"
                " FROM unnest(%(ids)s::uuid[], %(names)s::text[]) AS u(wf, name)"
                f" WHERE s.workflow_id = u.wf AND s.name = u.name AND s.state = {_PENDING}"
                " RETURNING s.workflow_id, s.name",
                {"ids": [w for w, _, _ in skips], "names": [n for _, n, _ in skips]},
            )
            done = sorted((r["workflow_id"], r["name"]) for r in await cur.fetchall())
            await self.append_events(
                conn, [NewEvent(w, n, StepState.SKIPPED, messages_of[w, n]) for w, n in done]
            )
            if not done:
                break
            cur = await conn.execute(
                "SELECT d.workflow_id, d.name, d.run_if_dependency_skipped AS run,"
                "   count(*) AS k, min(u.name) AS dep FROM workflow_steps d"
                " JOIN unnest(%(ids)s::uuid[], %(names)s::text[]) AS u(wf, name)"
                "   ON d.workflow_id = u.wf AND u.name = ANY(d.depends_on)"
                f" WHERE d.state = {_PENDING} GROUP BY 1, 2, 3 ORDER BY 1, 2",
                {"ids": [w for w, _ in done], "names": [n for _, n in done]},
            )
            dependants = await cur.fetchall()
            skips = [
                (d["workflow_id"], d["name"], f"dependency {d['dep']!r} was skipped")
                for d in dependants
                if not d["run"]
            ]
            run = [d for d in dependants if d["run"]]
            if run:
                cur = await conn.execute(
                    "UPDATE workflow_steps d SET remaining_deps = d.remaining_deps - u.k,"
                    "   next_run_at = greatest(now()"
                    "     + coalesce(d.timer_seconds, 0) * interval '1 second', d.not_before_at),"
                    "   updated_at = now()"
                    " FROM unnest(%(ids)s::uuid[], %(names)s::text[], %(ks)s::int[])"
                    "   AS u(wf, name, k) WHERE d.workflow_id = u.wf AND d.name = u.name"
                    " RETURNING d.workflow_id, d.name, d.remaining_deps",
                    {
                        "ids": [d["workflow_id"] for d in run],
                        "names": [d["name"] for d in run],
                        "ks": [d["k"] for d in run],
                    },
                )
                reached += [
                    (r["workflow_id"], r["name"])
                    for r in await cur.fetchall()
                    if r["remaining_deps"] == 0
                ]
        return reached

    @staticmethod
    async def _finished(conn: DictConnection, wids: list[uuid.UUID]) -> list[uuid.UUID]:
        """Those of these workflows whose steps all SUCCEEDED or were SKIPPED (so still
        active: a stopped workflow has a step FAILED or CANCELLED)."""
        if not wids:
            return []
        cur = await conn.execute(
            "SELECT workflow_id FROM workflow_steps WHERE workflow_id = ANY(%(ids)s)"
            f" AND parent IS NULL GROUP BY workflow_id HAVING bool_and(state IN ({sql(*DONE)}))",
            {"ids": wids},
        )
        return sorted(r["workflow_id"] for r in await cur.fetchall())

    async def _set_up_fan_outs(
        self, conn: DictConnection, wid: uuid.UUID, spec: Any, fan_outs: list[Any], gated: set[str]
    ) -> None:
        """Moves fan-out steps to their internal queue (no worker claims them) and expands
        those with no dependency (a list from the workflow input) and no condition (`reach`
        expands those once their condition holds)."""
        await conn.execute(
            f"UPDATE workflow_steps SET queue = '{FAN_OUT_QUEUE}'"
            " WHERE workflow_id = %(id)s AND name = ANY(%(names)s)",
            {"id": wid, "names": [st.name for st in fan_outs]},
        )
        roots = [st.name for st in fan_outs if not st.depends_on and st.name not in gated]
        if roots:
            await self.expand(conn, wid, spec, roots)

    async def load(self, conn: DictConnection, rows: list[dict[str, Any]]) -> list[Any]:
        """Workflow messages for workflow rows, with their steps in spec order; a fan-out's
        items are summarised in its step's details, not listed."""
        if not rows:
            return []
        ids = [r["workflow_id"] for r in rows]
        cur = await conn.execute(
            f"SELECT workflow_id, queue, {_STEP_COLUMNS} FROM workflow_steps"
            " WHERE workflow_id = ANY(%(ids)s) AND parent IS NULL"
            " ORDER BY workflow_id, position",
            {"ids": ids},
        )
        steps: dict[uuid.UUID, list[dict[str, Any]]] = {}
        fanned = False
        for s in await cur.fetchall():
            steps.setdefault(s["workflow_id"], []).append(s)
            fanned = fanned or s["queue"] == FAN_OUT_QUEUE
        if fanned:
            await self._summarise_items(conn, ids, steps)
        return [messages.workflow(r, steps.get(r["workflow_id"], [])) for r in rows]

    @staticmethod
    async def _summarise_items(
        conn: DictConnection, ids: list[uuid.UUID], steps: dict[uuid.UUID, list[dict[str, Any]]]
    ) -> None:
        """Each expanded fan-out step's details: how many of its items are in each state."""
        counts = ", ".join(
            f"count(*) FILTER (WHERE state = {int(st)}) AS {st.name.lower()}"
            for st in (
                StepState.PENDING,
                StepState.RUNNING,
                StepState.RETRYING,
                StepState.SUCCEEDED,
                StepState.FAILED,
                StepState.CANCELLED,
            )
        )
        cur = await conn.execute(
            f"SELECT workflow_id, parent, count(*) AS items, {counts} FROM workflow_steps"
            " WHERE workflow_id = ANY(%(ids)s) AND parent IS NOT NULL GROUP BY 1, 2",
            {"ids": ids},
        )
        summary = {(r["workflow_id"], r["parent"]): r for r in await cur.fetchall()}
        for wid, rows in steps.items():
            for s in rows:
                found = summary.get((wid, s["name"]))
                if found is not None:
                    s["details"] = {
                        k: v for k, v in found.items() if k not in ("workflow_id", "parent")
                    }

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

    @staticmethod
    def page_query(
        scope: pb.WorkflowScope,
        filters: ListFilter,
        after: tuple[datetime, uuid.UUID] | None,
        size: int,
    ) -> tuple[str, dict[str, Any]]:
        """The statement (and its arguments) of `page`, one row more than `size`. Each
        filter has its index (migration 013), so a user's listing is an index scan
        (tests/taskproc/test_lifecycle.py EXPLAINs it)."""
        where: list[str] = ["true"]
        args: dict[str, Any] = {"limit": size + 1}
        if not scope.all_owners:
            where.append("owner_id = %(owner_id)s")
            args["owner_id"] = scope.owner_id
        if filters.state:
            where.append("state = %(state)s")
            args["state"] = filters.state
        if filters.name:
            where.append("name = %(name)s")
            args["name"] = filters.name
        if filters.schedule_id is not None:
            where.append("schedule_id = %(schedule_id)s")
            args["schedule_id"] = filters.schedule_id
        if filters.create_after is not None:
            where.append("created_at >= %(create_after)s")
            args["create_after"] = filters.create_after
        if filters.create_before is not None:
            where.append("created_at < %(create_before)s")
            args["create_before"] = filters.create_before
        if after is not None:
            where.append("(created_at, workflow_id) < (%(after_created)s, %(after_id)s)")
            args["after_created"], args["after_id"] = after
        query = (
            f"SELECT {_WF_COLUMNS} FROM workflows WHERE {' AND '.join(where)}"
            " ORDER BY created_at DESC, workflow_id DESC LIMIT %(limit)s"
        )
        return query, args

    async def page(
        self,
        scope: pb.WorkflowScope,
        filters: ListFilter,
        after: tuple[datetime, uuid.UUID] | None,
        size: int,
    ) -> tuple[list[Any], str]:
        """A page of workflows, newest first, and the next page's token ("" at the end)."""
        query, args = self.page_query(scope, filters, after, size)
        async with self._db.pool.connection() as conn:
            cur = await conn.execute(query, args)
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

    async def retry(self, conn: DictConnection, wid: uuid.UUID, timeout_seconds: float) -> Woken:
        """Runs a finished workflow again (the caller holds its row lock and checked its
        state): its failed and cancelled steps become PENDING with a fresh attempts budget
        (`failures` 0; `attempt`, the fencing token, keeps counting), each waiting only for
        the dependencies that run again too; succeeded steps keep their outputs. The
        workflow is RUNNING with a new deadline. Returns what became runnable; nothing to
        re-run is RuntimeError (a finished unsuccessful workflow always has a step).

        A fan-out step run again runs all its items again: its item rows go (their attempt
        rows stay; a new item's attempt numbers continue after them, see `_EXPAND`), and it
        is expanded anew once reached. A step with a condition has it evaluated again. A
        workflow with a concurrency key queues again for a slot of its key (its reached
        steps gated as a new workflow's roots are) and runs when `admit` lets it."""
        await conn.execute(
            "WITH f AS (DELETE FROM workflow_fan_outs f USING workflow_steps p"
            "   WHERE f.workflow_id = %(id)s AND p.workflow_id = f.workflow_id"
            f"   AND p.name = f.step_name AND p.state IN ({sql(*RERUN)})"
            "   RETURNING f.step_name)"
            " DELETE FROM workflow_steps s USING f"
            " WHERE s.workflow_id = %(id)s AND s.parent = f.step_name",
            {"id": wid},
        )
        cur = await conn.execute(
            f"UPDATE workflow_steps s SET state = {_PENDING}, failures = 0, error = '',"
            "   output = NULL, details = NULL, lease_owner = NULL, lease_expires_at = NULL,"
            "   attempt_deadline_at = NULL, updated_at = now()"
            f" WHERE s.workflow_id = %(id)s AND s.state IN ({sql(*RERUN)}) AND s.parent IS NULL"
            " RETURNING s.name",
            {"id": wid},
        )
        names = [r["name"] for r in await cur.fetchall()]
        if not names:
            raise RuntimeError(f"workflow {wid} has no step to run again")
        cur = await conn.execute(
            "UPDATE workflow_steps s SET remaining_deps = cardinality(ARRAY("
            "   SELECT unnest(s.depends_on) INTERSECT SELECT unnest(%(names)s::text[]))),"
            # As at submit: a timer starts when its step is reached.
            "   next_run_at = greatest(now() + coalesce(s.timer_seconds, 0) * interval '1 second',"
            "     s.not_before_at)"
            " WHERE s.workflow_id = %(id)s AND s.name = ANY(%(names)s)"
            " RETURNING s.name, s.position, s.remaining_deps, s.queue,"
            "   s.condition IS NOT NULL AS gated",
            {"id": wid, "names": names},
        )
        rows = sorted(await cur.fetchall(), key=lambda r: r["position"])
        reached = [r for r in rows if r["remaining_deps"] == 0]
        cur = await conn.execute(
            "UPDATE workflows SET deadline_at = now() + %(timeout)s * interval '1 second',"
            "   admitted = CASE WHEN concurrency_key IS NULL THEN admitted ELSE false END"
            " WHERE workflow_id = %(id)s RETURNING owner_id, concurrency_key, concurrency_max",
            {"id": wid, "timeout": timeout_seconds},
        )
        keyed = await cur.fetchone()
        if keyed is not None and keyed["concurrency_key"] is not None:
            await conn.execute(
                "UPDATE workflow_steps SET remaining_deps = remaining_deps + 1"
                " WHERE workflow_id = %(id)s AND name = ANY(%(names)s)",
                {"id": wid, "names": [r["name"] for r in reached]},
            )
        else:
            keyed = None
        await self.append_events(
            conn,
            [
                NewEvent(
                    wid, "", WORKFLOW_EVENT, f"workflow retried: {len(rows)} step(s) run again"
                ),
                *(NewEvent(wid, r["name"], StepState.PENDING, "retried") for r in rows),
            ],
            {wid: (WorkflowState.RUNNING, "")},
            locked=True,
        )
        if keyed is not None:  # `admit` reaches its steps now or once a slot is free
            await self.admit_or_queue(
                conn, wid, keyed["owner_id"], keyed["concurrency_key"], keyed["concurrency_max"]
            )
            return Woken(False, set())
        woke = woken(r for r in reached if r["queue"] != FAN_OUT_QUEUE and not r["gated"])
        waits = {wid} if any(r["queue"] == SIGNAL_QUEUE for r in reached) else set()
        gated = [(wid, r["name"]) for r in reached if r["gated"]]
        if gated:
            more, waits_more = await self.reach(conn, gated)
            woke = Woken(woke.builtin or more.builtin, woke.queues | more.queues)
            waits |= waits_more
        if waits:  # signals kept unconsumed
            _, more = await self.deliver_signals(conn, [wid], SIGNAL_WORKER)
            woke = Woken(woke.builtin or more.builtin, woke.queues | more.queues)
        if any(r["queue"] == FAN_OUT_QUEUE for r in reached):
            await self._expand_reached(conn, [wid])
        return woke

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

    async def last_sequences(self, ids: list[uuid.UUID]) -> dict[uuid.UUID, tuple[int, str]]:
        """(last sequence, state) of those of `ids` that exist, in one autocommit query:
        what watches whose re-read is due check before reading their events."""
        async with self._db.autocommit() as conn:
            cur = await conn.execute(
                "SELECT workflow_id, last_sequence, state FROM workflows"
                " WHERE workflow_id = ANY(%(ids)s)",
                {"ids": ids},
            )
            rows = await cur.fetchall()
        return {r["workflow_id"]: (r["last_sequence"], r["state"]) for r in rows}

    async def stopped_among(self, ids: list[uuid.UUID]) -> list[str]:
        """Those of `ids` that name a workflow no longer active."""
        async with self._db.autocommit() as conn:
            cur = await conn.execute(
                "SELECT workflow_id FROM workflows WHERE workflow_id = ANY(%(ids)s)"
                f" AND state NOT IN ({sql(*ACTIVE)})",
                {"ids": ids},
            )
            return [str(r["workflow_id"]) for r in await cur.fetchall()]

    async def purge_finished(self, retention_seconds: float, batch: int) -> int:
        """Deletes up to `batch` workflows finished more than `retention_seconds` ago,
        oldest first, with everything referencing them (ON DELETE CASCADE: steps, attempts,
        events, signals); returns how many. One statement, so one short transaction; rows
        another replica is deleting, or a retry holds, are skipped (SKIP LOCKED), and the
        locked rows' state is re-checked, so a workflow retried meanwhile stays."""
        async with self._db.autocommit() as conn:
            cur = await conn.execute(
                "DELETE FROM workflows WHERE workflow_id IN (SELECT workflow_id FROM workflows"
                "   WHERE finished_at < now() - %(retention)s * interval '1 second'"
                "   ORDER BY finished_at LIMIT %(batch)s FOR UPDATE SKIP LOCKED)"
                f" AND state IN ({sql(*FINISHED)})",
                {"retention": retention_seconds, "batch": batch},
            )
            return cur.rowcount

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
        if rows:
            await self.append_events(conn, _running_events(rows), promote_pending=True)
            reply.steps.extend(await self._claimed(conn, rows))
            return reply
        cur = await conn.execute(
            "SELECT min(next_run_at) AS t FROM workflow_steps"
            f" WHERE state IN ({sql(*CLAIMABLE)}) AND remaining_deps = 0 AND {kind}",
            args,
        )
        nxt = await cur.fetchone()
        if nxt and nxt["t"] is not None:
            reply.next_run_time.CopyFrom(messages.timestamp(nxt["t"]))
        return reply

    async def _claimed(
        self, conn: DictConnection, rows: list[dict[str, Any]]
    ) -> list[pb.ClaimedStep]:
        """The ClaimedStep of each leased row, with the outputs its inputs reference."""
        referencing = {r["workflow_id"] for r in rows if "${steps." in json.dumps(r["inputs"])}
        outputs: dict[uuid.UUID, dict[str, Any]] = {}
        if referencing:
            cur = await conn.execute(
                "SELECT workflow_id, name, output FROM workflow_steps"
                f" WHERE workflow_id = ANY(%(ids)s) AND state = {_SUCCEEDED}"
                "   AND parent IS NULL",
                {"ids": list(referencing)},
            )
            for o in await cur.fetchall():
                outputs.setdefault(o["workflow_id"], {})[o["name"]] = o["output"]
        claimed = []
        for r in rows:
            step = pb.ClaimedStep(
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
            if r["workflow_id"] in referencing:  # even empty: every referenced step skipped
                step.dependency_outputs.SetInParent()
                step.dependency_outputs.CopyFrom(messages.struct(outputs.get(r["workflow_id"], {})))
            if r["item_index"] is not None:
                step.item.CopyFrom(messages.value(r["item"]))
            messages.set_trace_context(step, r["trace_context"], r["submitted_at"])
            claimed.append(step)
        return claimed

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
        self,
        conn: DictConnection,
        worker_id: str,
        refs: StepRefs,
        outputs: list[str],
        eager: Eager | None = None,
    ) -> tuple[list[dict[str, Any]], Woken]:
        """`complete_alone` inside the caller's transaction, where it always goes through."""
        got = await self.complete_alone(conn, worker_id, refs, outputs, eager, alone=False)
        if got is None:
            raise RuntimeError("unreachable: only a call alone is deferred")
        return got

    async def complete_alone(
        self,
        conn: DictConnection,
        worker_id: str,
        refs: StepRefs,
        outputs: list[str],
        eager: Eager | None = None,
        alone: bool = True,
    ) -> tuple[list[dict[str, Any]], Woken] | None:
        """Records results where the lease is still `worker_id`'s, one row per attempt (its
        primary key makes "recorded once" a database guarantee), counts down dependents'
        unmet dependencies and finishes workflows whose last step this was. Returns the
        recorded rows (`ord` is the 1-based position in `refs`) and what kinds of dependent
        became runnable. With `eager`, built-in dependants runnable now (no condition, no
        timer or not_before ahead) are leased to `worker_id` in this transaction (eager
        dispatch) into `eager.steps`, and need no wake-up.

        The common part is one call of migration 015's `wf_complete_steps`. `alone`: `conn`
        is in autocommit (`tx(..., alone=True)`), so that call is the whole transaction, one
        round trip, and a batch that needs more (conditions, signals, timers, fan-outs,
        concurrency keys) changes nothing and returns None: run `complete` in a
        transaction instead."""
        cur = await conn.execute(
            _COMPLETE,
            {
                "worker_id": worker_id,
                "outputs": outputs,
                "eager_max": eager.max_steps if eager is not None else 0,
                "eager_lease": eager.lease_seconds if eager is not None else 0.0,
                "alone": alone,
                **refs._asdict(),
            },
        )
        kinds: dict[str, list[dict[str, Any]]] = {}
        for r in await cur.fetchall():
            kinds.setdefault(r["kind"], []).append(r)
        if "whole" in kinds:
            return None
        done = kinds.get("done", [])
        if not done:
            return done, Woken(False, set())
        touched = sorted({r["workflow_id"] for r in done})
        self._to_watchers(set(touched), [_event_row(r) for r in kinds.get("event", [])])
        rows = kinds.get("dep", [])
        ready = [r for r in rows if r["remaining"] == 0]
        woke = woken(r for r in ready if r["queue"] != FAN_OUT_QUEUE)
        leased = kinds.get("leased", [])
        candidates = [r for r in ready if r["queue"] is None and not r["gated"]]
        if leased and len(leased) == len(candidates):  # every built-in one is taken
            woke = Woken(False, woke.queues)
        slots = {(r["owner_id"], r["slot_key"]) for r in kinds.get("slot", [])}
        if slots:  # finished workflows free their concurrency slots (append_events' rule)
            await self.admit(conn, slots)
        if leased and eager is not None:
            eager.steps.extend(await self._claimed(conn, leased))
        # A step just reached with a condition has it evaluated before anyone can claim it.
        gated = [(r["workflow_id"], r["name"]) for r in ready if r["gated"]]
        signals = {r["workflow_id"] for r in ready if r["queue"] == SIGNAL_QUEUE}
        if gated:
            more, waits = await self.reach(conn, gated)
            woke = Woken(woke.builtin or more.builtin, woke.queues | more.queues)
            signals |= waits
        # A wait_for_signal step just reached takes a signal kept for it (under the lock).
        reached = sorted(signals)
        if reached:
            _, more = await self.deliver_signals(conn, reached, SIGNAL_WORKER)
            woke = Woken(woke.builtin or more.builtin, woke.queues | more.queues)
        # Fan-outs last: completing a fan-out step finishes its workflow in a nested call.
        items: dict[tuple[uuid.UUID, str], int] = {}
        for r in done:
            parent = item_parent(r["name"])
            if parent is not None:
                items[r["workflow_id"], parent] = items.get((r["workflow_id"], parent), 0) + 1
        if items:
            await self.items_finished(conn, items)
        if any(r["queue"] == FAN_OUT_QUEUE for r in rows):
            await self._expand_reached(conn, touched)
        return done, woke

    # --- fan-out --------------------------------------------------------------------------

    async def _expand_reached(self, conn: DictConnection, wids: list[uuid.UUID]) -> None:
        """Expands the fan-out steps of these workflows whose dependencies are all done."""
        cur = await conn.execute(
            "SELECT s.workflow_id, s.name, w.spec FROM workflow_steps s"
            " JOIN workflows w ON w.workflow_id = s.workflow_id"
            f" WHERE s.workflow_id = ANY(%(ids)s) AND s.queue = '{FAN_OUT_QUEUE}'"
            f"   AND s.state IN ({sql(*CLAIMABLE)}) AND s.remaining_deps = 0"
            " ORDER BY s.workflow_id, s.position",
            {"ids": wids},
        )
        reached: dict[uuid.UUID, tuple[bytes, list[str]]] = {}
        for r in await cur.fetchall():
            reached.setdefault(r["workflow_id"], (r["spec"], []))[1].append(r["name"])
        for wid, (raw, names) in reached.items():
            spec = wf_pb.WorkflowSpec()
            spec.ParseFromString(raw)
            await self.expand(conn, wid, spec, names)

    async def expand(
        self, conn: DictConnection, wid: uuid.UUID, spec: Any, names: list[str]
    ) -> None:
        """Reached fan-out steps: each item becomes a step (the first max_concurrency
        runnable), or the step fails for good when for_each names no list or a longer one
        than taskproc.max_fan_out_items. An empty list completes the step at once."""
        steps = {st.name: st for st in spec.steps}
        empty: list[tuple[str, int]] = []
        for name in names:
            st = steps[name]
            source, path = for_each_source(st)
            cur = await conn.execute(
                _EXPAND,
                {
                    "id": wid,
                    "name": name,
                    "source": source,
                    "path": path,
                    "input": Jsonb(messages.as_dict(spec.input)) if source is None else None,
                    "max_items": self.max_fan_out_items,
                    "worker": FAN_OUT_WORKER,
                    "concurrency": max(1, st.max_concurrency),  # 0 would run none
                    "collect": st.item_failure == wf_pb.ITEM_FAILURE_POLICY_COLLECT,
                },
            )
            r = await cur.fetchone()
            if r is None or r["attempt"] is None:
                continue  # expanded already
            attempt, n = r["attempt"], r["n"]
            error = ""
            if r["kind"] != "array":
                error = f"for_each {st.for_each} is not a list (got {r['kind'] or 'nothing'})"
            elif n > self.max_fan_out_items:
                error = (
                    f"for_each {st.for_each} names {n} items; at most"
                    f" taskproc.max_fan_out_items ({self.max_fan_out_items})"
                )
            message = f"attempt {attempt}" + (
                "" if error else f": {n} items, {st.max_concurrency} at a time"
            )
            await self.append_events(conn, [NewEvent(wid, name, StepState.RUNNING, message)])
            if error:
                await self._fan_out_failed(conn, wid, name, attempt, error)
                continue
            queues = set(r["queues"])
            self._wake_later(Woken("" in queues, queues - {""}))
            if n == 0:
                empty.append((name, attempt))
        if empty:
            await self._collect(conn, [(wid, name) for name, _ in empty])

    async def _fan_out_failed(
        self, conn: DictConnection, wid: uuid.UUID, name: str, attempt: int, error: str
    ) -> None:
        """A fan-out step whose list is unusable: its attempt recorded, the dead letter."""
        ref = pb.StepRef(workflow_id=str(wid), step_name=name, attempt=attempt)
        row = await self.record_failure(conn, FAN_OUT_WORKER, ref, wid, error)
        if row is None or self.dead_letter is None:
            raise RuntimeError(f"fan-out step {name!r} of {wid} cannot be failed")
        if await self.dead_letter(
            conn, wid, name, row["failures"], f"attempt {attempt} failed: {error}"
        ):
            self._wake_later(stopped=str(wid))

    async def items_finished(
        self, conn: DictConnection, items: dict[tuple[uuid.UUID, str], int]
    ) -> None:
        """Counts finished items per fan-out step (the caller holds the workflow locks):
        each releases the next held item, and the last completes the fan-out step."""
        keys = sorted(items)
        cur = await conn.execute(
            _ITEMS_FINISHED,
            {
                "ids": [w for w, _ in keys],
                "names": [n for _, n in keys],
                "ks": [items[k] for k in keys],
            },
        )
        rows = await cur.fetchall()
        queues = {r["queue"] for r in rows if r["workflow_id"] is None}
        self._wake_later(Woken("" in queues, queues - {""}))
        done = [(r["workflow_id"], r["step_name"]) for r in rows if r["unfinished"] == 0]
        if done:
            await self._collect(conn, done)

    async def _collect(self, conn: DictConnection, fan_outs: list[tuple[uuid.UUID, str]]) -> None:
        """Completes fan-out steps whose items all finished, with their outputs in order."""
        cur = await conn.execute(
            _COLLECT, {"ids": [w for w, _ in fan_outs], "names": [n for _, n in fan_outs]}
        )
        rows = sorted(await cur.fetchall(), key=lambda r: (r["workflow_id"], r["name"]))
        if rows:
            refs = StepRefs(
                [r["workflow_id"] for r in rows],
                [r["name"] for r in rows],
                [r["attempt"] for r in rows],
            )
            _, woke = await self.complete(conn, FAN_OUT_WORKER, refs, [r["output"] for r in rows])
            self._wake_later(woke)

    @staticmethod
    async def fan_out_collects(conn: DictConnection, wid: uuid.UUID, step: str) -> bool:
        """Whether the fan-out step's failed items are collected (else they fail it)."""
        cur = await conn.execute(
            "SELECT collect FROM workflow_fan_outs"
            " WHERE workflow_id = %(id)s AND step_name = %(step)s",
            {"id": wid, "step": step},
        )
        row = await cur.fetchone()
        return bool(row and row["collect"])

    async def fail_item(self, conn: DictConnection, wid: uuid.UUID, item: str, error: str) -> None:
        """A collected item failed for good: FAILED, and it counts as finished."""
        await conn.execute(
            f"UPDATE workflow_steps SET state = {StepState.FAILED:d}, error = %(error)s,"
            " lease_owner = NULL, lease_expires_at = NULL, updated_at = now()"
            " WHERE workflow_id = %(id)s AND name = %(step)s",
            {"error": error[:MAX_ERROR_CHARS], "id": wid, "step": item},
        )
        await self.append_events(conn, [NewEvent(wid, item, StepState.FAILED, error)])
        parent = item_parent(item)
        if parent is not None:
            await self.items_finished(conn, {(wid, parent): 1})

    async def fail_fan_out(
        self,
        conn: DictConnection,
        wid: uuid.UUID,
        item: str,
        error: str,
        step_error: str,
        reason: str,
    ) -> None:
        """A fail-fast item failed for good: it and its fan-out step FAILED, every other
        unfinished step (its sibling items too) cancelled, the workflow FAILED."""
        parent = item_parent(item) or item
        await conn.execute(  # the workflow row first, as every transition takes it
            "SELECT 1 FROM workflows WHERE workflow_id = %(id)s FOR NO KEY UPDATE", {"id": wid}
        )
        await conn.execute(
            f"UPDATE workflow_steps SET state = {StepState.FAILED:d}, error = %(step_error)s,"
            " lease_owner = NULL, lease_expires_at = NULL, updated_at = now()"
            " WHERE workflow_id = %(id)s AND name = %(step)s",
            {"step_error": step_error[:MAX_ERROR_CHARS], "id": wid, "step": parent},
        )
        await self.append_events(conn, [NewEvent(wid, parent, StepState.FAILED, step_error)])
        await self.fail_step(conn, wid, item, error, reason)

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

    async def seconds_to_next_timer(self) -> float | None:
        """Seconds until the earliest runnable timer step is due (≤ 0: due now; None:
        none waits), by the database's clock."""
        async with self._db.autocommit() as conn:
            cur = await conn.execute(
                "SELECT extract(epoch FROM min(next_run_at) - clock_timestamp())::float8 AS s"
                " FROM workflow_steps"
                f" WHERE state IN ({sql(*CLAIMABLE)}) AND remaining_deps = 0"
                f"   AND queue IN ('{TIMER_QUEUE}', '{SIGNAL_QUEUE}')"
            )
            row = await cur.fetchone()
        return None if row is None or row["s"] is None else float(row["s"])

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
