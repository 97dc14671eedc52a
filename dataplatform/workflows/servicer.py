"""The WorkflowStoreService servicer: validates each request, then runs it through the
repository (SQL), the scheduler (retries, dead letters, sweeps) and the wake-ups. It holds
no SQL and no policy of its own."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from datetime import UTC

import grpc
import psycopg
from google.protobuf.struct_pb2 import Struct
from google.rpc import status_pb2

from aiwfe.data.v1 import workflow_store_service_pb2 as pb
from aiwfe.data.v1 import workflow_store_service_pb2_grpc as pb_grpc
from aiwfe.runtime.aio import wait_event
from aiwfe.runtime.channels import MANY_RUNS_HEADER
from aiwfe.runtime.errors import (
    FailedPrecondition,
    rpc_status_of,
)
from aiwfe.runtime.interceptors import status_of
from aiwfe.runtime.many import Many
from aiwfe.runtime.validation import Violations
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from dataplatform.db import Database, DictConnection
from dataplatform.guard import database_unavailable
from dataplatform.workflows import messages
from dataplatform.workflows.repository import (
    MAX_CONCURRENCY,
    MAX_CONCURRENCY_KEY_CHARS,
    MAX_ERROR_CHARS,
    SIGNAL_WORKER,
    Eager,
    ListFilter,
    Woken,
    WorkflowRepository,
    step_refs,
)
from dataplatform.workflows.scheduling import MAX_LEASE_SECONDS, Scheduler
from dataplatform.workflows.states import ACTIVE, RETRYABLE, WorkflowState
from dataplatform.workflows.timers import TimerLoop
from dataplatform.workflows.watches import (
    EVENT_PAGE,
    Probe,
    ReadEvents,
    RecentWatches,
    SequenceProbe,
    Wakeups,
    follow,
)

MAX_STEPS = 1000
MAX_BATCH = 1000
MAX_ID_CHARS = 128
MAX_QUEUES = 16  # per task claim
MAX_TYPES = 64
MAX_NAME_CHARS = 64  # a queue or task type name
MAX_DETAILS_BYTES = 65536  # a task's progress or failure details, as JSON
MAX_IDEMPOTENCY_KEY_CHARS = 256
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 50
MAX_LIST_NAME_CHARS = 256  # taskproc.max_name_chars' own bound
_HEARTBEAT_SECONDS = 15.0
_MIN_POLL_SECONDS = 0.01
_MAX_POLL_SECONDS = 30.0


def _check_eager(v: Violations, max_steps: int, lease_seconds: float) -> None:
    v.check(0 <= max_steps <= MAX_BATCH, "eager_max_steps", f"must be 0 to {MAX_BATCH}")
    v.check(
        max_steps == 0 or 0 < lease_seconds <= MAX_LEASE_SECONDS,
        "eager_lease_seconds",
        f"must be in (0, {MAX_LEASE_SECONDS:.0f}]",
    )


def _check_poll(v: Violations, seconds: float) -> None:
    v.check(
        seconds == 0 or _MIN_POLL_SECONDS <= seconds <= _MAX_POLL_SECONDS,
        "poll_interval_seconds",
        f"must be 0 (default) or between {_MIN_POLL_SECONDS:g} and {_MAX_POLL_SECONDS:g}",
    )


_FINISHED = status_pb2.Status()  # a watch's end once its workflow is done: OK


class WorkflowStore(pb_grpc.WorkflowStoreServiceServicer):
    """taskproc's durable workflow state and step queue (see the package docstring)."""

    def __init__(
        self, db: Database, max_fan_out_items: int = 1000, watches_per_stream: int = 10_000
    ) -> None:
        self.watches_per_stream = watches_per_stream
        self._db = db
        self.wakeups = Wakeups()
        self.repo = WorkflowRepository(db, self.wakeups, max_fan_out_items)
        self.scheduler = Scheduler(self.repo)
        self.timers = TimerLoop(self.repo, self.scheduler, self.wakeups)
        self._recent = RecentWatches(self.wakeups)
        self.probe = SequenceProbe(self.repo.last_sequences)

    async def stopped_among(self, ids: list[uuid.UUID]) -> list[str]:
        """Those of `ids` that name a workflow no longer active (for `replica_bus`)."""
        return await self.repo.stopped_among(ids)

    # --- workflows ------------------------------------------------------------------------

    async def CreateWorkflow(
        self, request: pb.CreateWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateWorkflowResponse:
        """Stores a workflow. A new one is watched from before the insert for a few seconds,
        so the WatchWorkflowEvents that usually follows adopts its events with no read."""
        wid = uuid.uuid4()
        self._recent.remember(wid, request.owner.user_id)
        created = False
        try:
            stored = await self._create(request, wid)
            created = stored.created
        finally:
            if not created:
                self._recent.forget(wid)
        return stored

    async def _create(
        self, request: pb.CreateWorkflowRequest, wid: uuid.UUID
    ) -> pb.CreateWorkflowResponse:
        spec = request.spec
        v = Violations()
        v.text(request.owner.user_id, "owner.user_id", max_chars=MAX_ID_CHARS)
        v.text(
            request.idempotency_key,
            "idempotency_key",
            max_chars=MAX_IDEMPOTENCY_KEY_CHARS,
            required=False,
        )
        v.check(1 <= len(spec.steps) <= MAX_STEPS, "spec.steps", f"must list 1 to {MAX_STEPS}")
        v.check(spec.timeout_seconds > 0, "spec.timeout_seconds", "must be positive")
        v.check(not request.schedule_id, "schedule_id", "is the schedule ticker's to set")
        if spec.HasField("concurrency"):
            v.text(
                spec.concurrency.key, "spec.concurrency.key", max_chars=MAX_CONCURRENCY_KEY_CHARS
            )
            v.check(
                1 <= spec.concurrency.max <= MAX_CONCURRENCY,
                "spec.concurrency.max",
                f"must be between 1 and {MAX_CONCURRENCY}",
            )
        if request.eager_worker_id:
            _check_eager(v, request.eager_max_steps, request.eager_lease_seconds)
            v.text(request.eager_worker_id, "eager_worker_id", max_chars=MAX_ID_CHARS)
        if request.eager_task_steps:
            v.text(request.eager_task_lease_id, "eager_task_lease_id", max_chars=MAX_ID_CHARS)
        tc = request.trace_context  # W3C: a 55-char traceparent, tracestate up to 512
        v.text(tc.traceparent, "trace_context.traceparent", max_chars=64, required=False)
        v.text(tc.tracestate, "trace_context.tracestate", max_chars=512, required=False)
        v.raise_if_any()
        return await self.repo.create(request, wid)

    async def GetStoredWorkflow(
        self, request: pb.GetStoredWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetStoredWorkflowResponse:
        workflow = await self.repo.get(request.workflow_id, request.scope)
        return pb.GetStoredWorkflowResponse(workflow=workflow)

    async def ListStoredWorkflows(
        self, request: pb.ListStoredWorkflowsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListStoredWorkflowsResponse:
        v = Violations()
        v.check(
            0 <= request.page_size <= MAX_PAGE_SIZE,
            "page_size",
            f"must be between 0 and {MAX_PAGE_SIZE}",
        )
        v.text(request.name, "name", max_chars=MAX_LIST_NAME_CHARS, required=False)
        schedule_id = None
        if request.schedule_id:
            try:
                schedule_id = uuid.UUID(request.schedule_id)
            except ValueError:
                v.add("schedule_id", "is not a schedule id")
        since = (
            request.create_after.ToDatetime(tzinfo=UTC)
            if request.HasField("create_after")
            else None
        )
        until = (
            request.create_before.ToDatetime(tzinfo=UTC)
            if request.HasField("create_before")
            else None
        )
        v.check(
            since is None or until is None or since <= until,
            "create_before",
            "must not be before create_after",
        )
        v.raise_if_any()
        after = messages.page_after(request.page_token) if request.page_token else None
        filters = ListFilter(int(request.state), request.name, schedule_id, since, until)
        workflows, token = await self.repo.page(
            request.scope, filters, after, request.page_size or DEFAULT_PAGE_SIZE
        )
        return pb.ListStoredWorkflowsResponse(workflows=workflows, next_page_token=token)

    async def CancelStoredWorkflow(
        self, request: pb.CancelStoredWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelStoredWorkflowResponse:
        repo = self.repo

        async def work(
            conn: DictConnection,
        ) -> tuple[pb.CancelStoredWorkflowResponse, bool]:
            row = await repo.visible(conn, request.workflow_id, request.scope)
            stopped = False
            if row["state"] in ACTIVE:
                stopped = await repo.stop(
                    conn, row["workflow_id"], WorkflowState.CANCELLED, "cancelled"
                )
                row = await repo.visible(conn, request.workflow_id, request.scope)
            wf = (await repo.load(conn, [row]))[0]
            return pb.CancelStoredWorkflowResponse(workflow=wf), stopped

        reply, stopped = await repo.tx(work)
        if stopped:
            self.wakeups.stopped([reply.workflow.workflow_id])
        return reply

    async def RetryStoredWorkflow(
        self, request: pb.RetryStoredWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> pb.RetryStoredWorkflowResponse:
        """Re-runs a FAILED, CANCELLED or TIMED_OUT workflow under its row lock, so of two
        concurrent retries one re-runs it and the other finds it RUNNING."""
        repo = self.repo

        async def work(conn: DictConnection) -> tuple[pb.RetryStoredWorkflowResponse, Woken]:
            row = await repo.visible(conn, request.workflow_id, request.scope)
            cur = await conn.execute(
                "SELECT state FROM workflows WHERE workflow_id = %(id)s FOR NO KEY UPDATE",
                {"id": row["workflow_id"]},
            )
            locked = await cur.fetchone()
            if locked is None:  # purged since the read
                raise messages.not_found(request.workflow_id)
            if locked["state"] not in RETRYABLE:
                state = wf_pb.WorkflowState.Name(locked["state"])
                raise FailedPrecondition(
                    f"a {state.removeprefix('WORKFLOW_STATE_')} workflow cannot be retried:"
                    " only FAILED, CANCELLED and TIMED_OUT ones can",
                    reason="WORKFLOW_NOT_RETRYABLE",
                    metadata={"workflowId": request.workflow_id, "state": state},
                )
            spec = wf_pb.WorkflowSpec.FromString(row["spec"])
            woke = await repo.retry(conn, row["workflow_id"], spec.timeout_seconds)
            row = await repo.visible(conn, request.workflow_id, request.scope)
            workflow = (await repo.load(conn, [row]))[0]
            return pb.RetryStoredWorkflowResponse(workflow=workflow), woke

        reply, woke = await repo.tx(work)
        self.wakeups.work(*woke)
        return reply

    # --- events ---------------------------------------------------------------------------

    async def ListWorkflowEvents(
        self, request: pb.ListWorkflowEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListWorkflowEventsResponse:
        v = Violations()
        v.check(0 <= request.limit <= 1000, "limit", "must be between 0 and 1000")
        v.check(request.after_sequence >= 0, "after_sequence", "must not be negative")
        v.raise_if_any()
        row, events = await self.repo.events(
            messages.workflow_id(request.workflow_id),
            request.scope,
            request.after_sequence,
            request.limit or EVENT_PAGE,
        )
        return pb.ListWorkflowEventsResponse(
            events=[messages.event(e) for e in events],
            workflow_state=row["state"],
            last_sequence=row["last_sequence"],
        )

    async def WatchWorkflowEvents(
        self, request: pb.WatchWorkflowEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchWorkflowEventsResponse]:
        """One stream per watcher, until the workflow is terminal and every event is sent."""
        async with aclosing(self._watch(request)) as batches:  # unwatched as the call ends
            async for events in batches:
                yield pb.WatchWorkflowEventsResponse(events=events)

    async def _watch(
        self, request: pb.WatchWorkflowEventsRequest
    ) -> AsyncGenerator[list[wf_pb.WatchWorkflowResponse], None]:
        """One watch's batches of events: WatchWorkflowEvents' and each watch of
        WatchWorkflowEventsMany's (the same checks, adoption, wake-ups and re-reads)."""
        v = Violations()
        v.check(request.after_sequence >= 0, "after_sequence", "must not be negative")
        _check_poll(v, request.poll_interval_seconds)
        v.raise_if_any()
        wid = messages.workflow_id(request.workflow_id)
        watch = self._recent.adopt(wid, request.scope, request.after_sequence)
        adopted = watch is not None
        if watch is None:
            watch = self.wakeups.watch(wid)  # before the first read: nothing is missed
        try:
            async for events in follow(
                self._reader(wid, request.scope),
                request.after_sequence,
                request.poll_interval_seconds,
                watch,
                need_read=not adopted,
                probe=self._prober(wid),
            ):
                yield events
        finally:
            self.wakeups.unwatch(wid, watch)

    async def WatchWorkflowEventsMany(
        self,
        requests: AsyncIterator[pb.WatchWorkflowEventsManyRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.WatchWorkflowEventsManyResponse]:
        """Many watches and runs on one stream: a task per watch runs `_watch` (per run,
        `_run`) and queues its tagged messages and its end; this generator is the stream's
        one writer. A watch's error is its end alone; a stream-level mistake ends the
        stream (and so every watch)."""
        # Headers at once: the client sends its watches only once the call is answered,
        # and its runs only to a server that says it takes them.
        await context.send_initial_metadata(((MANY_RUNS_HEADER, "1"),))
        many: Many[pb.WatchWorkflowEventsManyResponse] = Many(
            "WatchWorkflowEventsMany", self.watches_per_stream, "taskproc.watches_per_stream"
        )
        async with aclosing(
            many.responses(many.read(requests, lambda r: self._handle(r, many)))
        ) as replies:
            async for reply in replies:
                yield reply

    def _handle(
        self,
        request: pb.WatchWorkflowEventsManyRequest,
        many: Many[pb.WatchWorkflowEventsManyResponse],
    ) -> None:
        """Starts or cancels one watch or run of the stream, as `request` asks."""
        if request.HasField("watch"):
            watch = request.watch
            many.start(
                watch.watch_id, self._serve(watch.watch_id, self._watch(watch.request), many)
            )
        elif request.HasField("run"):
            run = request.run
            many.start(run.watch_id, self._serve(run.watch_id, self._run(run.request), many))
        elif request.HasField("cancel"):
            many.cancel(request.cancel)

    async def _serve(
        self,
        watch_id: int,
        updates: AsyncGenerator[
            pb.CreateWorkflowResponse | list[wf_pb.WatchWorkflowResponse], None
        ],
        many: Many[pb.WatchWorkflowEventsManyResponse],
    ) -> None:
        """One watch or run of a WatchWorkflowEventsMany stream (`updates`: `_watch`'s or
        `_run`'s), to its end message (none when it is cancelled: by `cancel`, or by the
        stream's end). A run's first events go in its `stored` message (they follow at
        once: pushed by the insert, or one read for a reused key) and its last ones, those
        ending in the terminal event (after which `follow` returns at once), in its end."""
        run = False  # a run's updates begin with its stored workflow
        stored: pb.CreateWorkflowResponse | None = None  # a run's, until its first events
        last: list[wf_pb.WatchWorkflowResponse] = []  # a run's, for its end
        try:
            if not self._db.reachable:  # as DatabaseGuard refuses a call of its own
                raise database_unavailable()
            async with aclosing(updates):  # unwatched on cancel
                async for update in updates:
                    if isinstance(update, pb.CreateWorkflowResponse):
                        run, stored = True, update
                        continue
                    if stored is not None:
                        reply = pb.WatchWorkflowEventsManyResponse(
                            watch_id=watch_id,
                            stored=stored,
                            run_events=pb.WatchWorkflowEventsResponse(events=update),
                        )
                        stored = None
                    elif run and update[-1].workflow_state not in ACTIVE:
                        last = update
                        continue
                    else:
                        reply = pb.WatchWorkflowEventsManyResponse(
                            watch_id=watch_id, events=pb.WatchWorkflowEventsResponse(events=update)
                        )
                    await many.out.put(reply)
            end = _FINISHED
        except asyncio.CancelledError:
            raise
        except psycopg.OperationalError:
            end = rpc_status_of(database_unavailable().to_status())
        except Exception as exc:  # that watch's status, as WatchWorkflowEvents would end
            end = rpc_status_of(status_of(exc))
        if stored is not None:  # failed before its first events: the leases it holds go too
            await many.out.put(pb.WatchWorkflowEventsManyResponse(watch_id=watch_id, stored=stored))
        reply = pb.WatchWorkflowEventsManyResponse(watch_id=watch_id, end=end)
        if last:
            reply.run_events.events.extend(last)
        await many.ended(watch_id, reply)

    async def RunStoredWorkflow(
        self, request: pb.RunStoredWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RunStoredWorkflowResponse]:
        """CreateWorkflow, then its events (`_run`)."""
        async with aclosing(self._run(request)) as updates:  # unwatched as the call ends
            async for update in updates:
                if isinstance(update, pb.CreateWorkflowResponse):
                    yield pb.RunStoredWorkflowResponse(stored=update)
                else:
                    yield pb.RunStoredWorkflowResponse(
                        events=pb.WatchWorkflowEventsResponse(events=update)
                    )

    async def _run(
        self, request: pb.RunStoredWorkflowRequest
    ) -> AsyncGenerator[pb.CreateWorkflowResponse | list[wf_pb.WatchWorkflowResponse], None]:
        """A run's stored workflow, then its batches of events: RunStoredWorkflow's and each
        run of WatchWorkflowEventsMany's. The new id is watched before the insert, so every
        event is pushed here and none needs a read; a reused idempotency key follows the
        existing workflow from its first event, read from the database."""
        v = Violations()
        _check_poll(v, request.poll_interval_seconds)
        v.raise_if_any()
        wid = uuid.uuid4()

        watch = self.wakeups.watch(wid)
        try:
            stored = await self._create(request.create, wid)
            yield stored
            if not stored.created:
                self.wakeups.unwatch(wid, watch)
                wid = uuid.UUID(stored.workflow.workflow_id)
                watch = self.wakeups.watch(wid)
            scope = pb.WorkflowScope(owner_id=request.create.owner.user_id)
            async for events in follow(
                self._reader(wid, scope),
                0,
                request.poll_interval_seconds,
                watch,
                not stored.created,
                self._prober(wid),
            ):
                yield events
        finally:
            self.wakeups.unwatch(wid, watch)

    def _reader(self, wid: uuid.UUID, scope: pb.WorkflowScope) -> ReadEvents:
        return lambda after: self.repo.events(wid, scope, after, EVENT_PAGE)

    def _prober(self, wid: uuid.UUID) -> Probe:
        return lambda after: self.probe.changed(wid, after)

    # --- the queue ------------------------------------------------------------------------

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
        v.check(len(request.queues) <= MAX_QUEUES, "queues", f"at most {MAX_QUEUES}")
        v.check(len(request.types) <= MAX_TYPES, "types", f"at most {MAX_TYPES}")
        v.check(not request.types or bool(request.queues), "types", "needs queues")
        for i, name in enumerate([*request.queues, *request.types]):
            field = f"queues[{i}]" if i < len(request.queues) else "types"
            v.text(name, field, max_chars=MAX_NAME_CHARS)
        v.raise_if_any()

        if self.scheduler.sweep_due():
            self.wakeups.stopped(await self.repo.tx(self.scheduler.sweep))

        async def work(conn: DictConnection) -> pb.ClaimStepsResponse:
            return await self.repo.claim(
                conn,
                request.worker_id,
                request.max_steps,
                request.lease_seconds,
                list(request.queues),
                list(request.types),
            )

        return await self.repo.tx(work)

    async def ExtendLeases(
        self, request: pb.ExtendLeasesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExtendLeasesResponse:
        v = Violations()
        v.text(request.worker_id, "worker_id", max_chars=MAX_ID_CHARS)
        v.check(len(request.steps) <= MAX_BATCH, "steps", f"at most {MAX_BATCH}")
        v.check(0 < request.lease_seconds <= MAX_LEASE_SECONDS, "lease_seconds", "out of range")
        progress = {
            (p.ref.workflow_id, p.ref.step_name, p.ref.attempt): _details(v, p.details, "progress")
            for p in request.progress
        }
        v.raise_if_any()
        if not request.steps:
            return pb.ExtendLeasesResponse()
        details = [progress.get((r.workflow_id, r.step_name, r.attempt)) for r in request.steps]
        held = await self.repo.extend_leases(
            request.worker_id, step_refs(request.steps), request.lease_seconds, details
        )
        return pb.ExtendLeasesResponse(
            lost=[
                r
                for r in request.steps
                if (str(messages.workflow_id(r.workflow_id)), r.step_name, r.attempt) not in held
            ]
        )

    async def CompleteSteps(
        self, request: pb.CompleteStepsRequest, context: grpc.aio.ServicerContext
    ) -> pb.CompleteStepsResponse:
        return await self._complete_steps(request)

    async def CompleteStepsStream(
        self,
        requests: AsyncIterator[pb.CompleteStepsStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.CompleteStepsStreamResponse]:
        """CompleteSteps per message, answered in order: one request is handled at a time,
        so a stream that ends (an error's status, or OK) read no request it did not answer."""
        async for request in requests:
            reply = await self._complete_steps(request.complete)
            yield pb.CompleteStepsStreamResponse(complete=reply)

    async def _complete_steps(self, request: pb.CompleteStepsRequest) -> pb.CompleteStepsResponse:
        v = Violations()
        v.text(request.worker_id, "worker_id", max_chars=MAX_ID_CHARS)
        v.check(1 <= len(request.results) <= MAX_BATCH, "results", f"must list 1 to {MAX_BATCH}")
        _check_eager(v, request.eager_max_steps, request.eager_lease_seconds)
        v.raise_if_any()
        # A ref listed twice is recorded once: later duplicates are answered False.
        first: dict[tuple[str, str, int], int] = {}
        for i, r in enumerate(request.results):
            first.setdefault((r.ref.workflow_id, r.ref.step_name, r.ref.attempt), i)
        unique = list(first.values())
        results = [request.results[i] for i in unique]
        refs = step_refs([r.ref for r in results])
        outputs = [json.dumps(messages.as_dict(r.output)) for r in results]

        async def work(
            conn: DictConnection, alone: bool
        ) -> tuple[list[bool], Woken, Eager | None] | None:
            # Per attempt: a retried transaction leases afresh.
            eager = (
                Eager(request.eager_max_steps, request.eager_lease_seconds)
                if request.eager_max_steps
                else None
            )
            got = await self.repo.complete_alone(
                conn, request.worker_id, refs, outputs, eager, alone
            )
            if got is None:
                return None
            accepted = [False] * len(request.results)
            for r in got[0]:
                accepted[unique[r["ord"] - 1]] = True
            return accepted, got[1], eager

        # One statement in autocommit when it can do the whole batch, else a transaction.
        answer = await self.repo.tx(lambda conn: work(conn, True), alone=True)
        if answer is None:
            answer = await self.repo.tx(lambda conn: work(conn, False))
        if answer is None:
            raise RuntimeError("unreachable: a transaction completes the whole batch")
        accepted, woke, eager = answer
        self.wakeups.work(*woke)
        reply = pb.CompleteStepsResponse(accepted=accepted)
        if eager is not None:
            reply.eager_steps.extend(eager.steps)
        return reply

    async def FailStep(
        self, request: pb.FailStepRequest, context: grpc.aio.ServicerContext
    ) -> pb.FailStepResponse:
        v = Violations()
        v.text(request.worker_id, "worker_id", max_chars=MAX_ID_CHARS)
        details = _details(v, request.details, "details") if request.HasField("details") else None
        v.raise_if_any()
        ref = request.ref
        wid = messages.workflow_id(ref.workflow_id)
        error = request.error[:MAX_ERROR_CHARS] or "failed"

        async def work(conn: DictConnection) -> tuple[pb.FailStepResponse, bool]:
            step = await self.repo.record_failure(conn, request.worker_id, ref, wid, error, details)
            if step is None:
                return pb.FailStepResponse(accepted=False), False
            outcome = await self.scheduler.failed(
                conn, wid, ref.step_name, ref.attempt, step, error, request.retryable
            )
            reply = pb.FailStepResponse(accepted=True, will_retry=outcome.will_retry)
            if outcome.next_run_at is not None:
                reply.next_run_time.CopyFrom(messages.timestamp(outcome.next_run_at))
            return reply, outcome.stopped

        reply, stopped = await self.repo.tx(work)
        if stopped:
            self.wakeups.stopped([ref.workflow_id])
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
        refs = step_refs(request.steps)

        async def work(conn: DictConnection) -> tuple[int, bool, set[str]]:
            return await self.repo.release(conn, request.worker_id, refs)

        released, builtin, queues = await self.repo.tx(work)
        self.wakeups.work(builtin, queues)
        return pb.ReleaseStepsResponse(released=released)

    async def WaitForWork(
        self, request: pb.WaitForWorkRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WaitForWorkResponse]:
        sub = self.wakeups.subscribe()
        try:
            while True:
                await wait_event(sub.event, _HEARTBEAT_SECONDS)
                sub.event.clear()
                stopped = sorted(sub.stopped)
                sub.stopped.clear()
                work, sub.work = sub.work, False
                queues = sorted(sub.queues)
                sub.queues.clear()

                # A heartbeat (nothing set) keeps idle streams alive through proxies.
                yield pb.WaitForWorkResponse(
                    work_available=work or bool(queues),
                    builtin_work=work,
                    task_queues=queues,
                    stopped_workflow_ids=stopped,
                )
        finally:
            self.wakeups.unsubscribe(sub)

    async def SignalStoredWorkflow(
        self, request: pb.SignalStoredWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> pb.SignalStoredWorkflowResponse:
        v = Violations()
        v.text(request.name, "name", max_chars=MAX_NAME_CHARS)
        v.text(request.signal_id, "signal_id", max_chars=MAX_ID_CHARS, required=False)
        payload = _details(v, request.payload, "payload")
        v.raise_if_any()
        wid = messages.workflow_id(request.workflow_id)

        async def work(conn: DictConnection) -> tuple[pb.SignalStoredWorkflowResponse, Woken]:
            await self.repo.visible(conn, request.workflow_id, request.scope)
            cur = await conn.execute(
                "SELECT state FROM workflows WHERE workflow_id = %(id)s FOR NO KEY UPDATE",
                {"id": wid},
            )
            row = await cur.fetchone()
            # A resend is a duplicate even once the first delivery finished the workflow.
            if request.signal_id and await self.repo.signal_sent(conn, wid, request.signal_id):
                return pb.SignalStoredWorkflowResponse(duplicate=True), Woken(False, set())
            if row is None or row["state"] not in ACTIVE:
                raise FailedPrecondition(
                    "the workflow has finished: it takes no more signals",
                    reason="WORKFLOW_FINISHED",
                    metadata={"workflowId": request.workflow_id},
                )
            stored = await self.repo.store_signal(
                conn, wid, request.name, request.signal_id or None, payload
            )
            if not stored:
                return pb.SignalStoredWorkflowResponse(duplicate=True), Woken(False, set())
            names, woke = await self.repo.deliver_signals(conn, [wid], SIGNAL_WORKER)
            return pb.SignalStoredWorkflowResponse(delivered=request.name in names), woke

        reply, woke = await self.repo.tx(work)
        self.wakeups.work(*woke)
        return reply


def _details(v: Violations, details: Struct, field: str) -> str:
    """Progress or failure details as JSON, within MAX_DETAILS_BYTES."""
    text = json.dumps(messages.as_dict(details))
    v.check(len(text) <= MAX_DETAILS_BYTES, field, f"at most {MAX_DETAILS_BYTES} bytes as JSON")
    return text
