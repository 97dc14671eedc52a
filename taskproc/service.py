"""The task processor: WorkflowService (the public API, owner-scoped) and the worker pool.

Durable state lives in PostgreSQL behind dataplatform's WorkflowStoreService; this process
holds no state a crash could lose. Users see only their own workflows (another user's is
NOT_FOUND); the `admin` role sees all.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format
from google.rpc import status_pb2
from jsonschema import Draft202012Validator

from aiwfe.cognitive.v1 import cognitive_service_pb2
from aiwfe.data.v1 import schedule_store_service_pb2 as schedule_store_pb
from aiwfe.data.v1 import workflow_store_service_pb2 as store_pb
from aiwfe.data.v1 import workflow_store_service_pb2_grpc as store_grpc
from aiwfe.runtime.channels import Upstream
from aiwfe.runtime.config import Settings
from aiwfe.runtime.errors import rpc_status_of
from aiwfe.runtime.identity import InternalIdentity
from aiwfe.runtime.interceptors import InternalIdentityInterceptor, status_of
from aiwfe.runtime.many import Many
from aiwfe.runtime.page_tokens import PageTokens
from aiwfe.runtime.server import Service
from aiwfe.runtime.telemetry import quiet
from aiwfe.runtime.validation import Violations
from aiwfe.taskproc.v1 import schedule_service_pb2 as schedule_pb
from aiwfe.taskproc.v1 import schedule_service_pb2_grpc as schedule_pb_grpc
from aiwfe.taskproc.v1 import worker_service_pb2 as worker_pb
from aiwfe.taskproc.v1 import worker_service_pb2_grpc as worker_pb_grpc
from aiwfe.taskproc.v1 import workflow_service_pb2 as pb
from aiwfe.taskproc.v1 import workflow_service_pb2_grpc as pb_grpc
from taskproc import owners
from taskproc.ops.timers import check_signal_name
from taskproc.schedules import ScheduleServicer
from taskproc.shared_watch import SharedWatches
from taskproc.spec import validate
from taskproc.streams import StreamPool, WatchSlots
from taskproc.tasks import TaskDispatcher, WorkerServicer
from taskproc.tracing import submit_trace_context
from taskproc.worker import Worker

MAX_IDEMPOTENCY_KEY = 256
MAX_WORKFLOW_ID = 64
MAX_SIGNAL_ID = 128
_FINISHED = status_pb2.Status()  # a watch's end once its workflow is done: OK
_Many = Many[pb.WatchWorkflowsResponse]
_MIN_SECONDS, _MAX_SECONDS = -62135596800, 253402300799  # 0001-01-01 .. 9999-12-31 (UTC)


def _check_id(workflow_id: str) -> None:
    v = Violations()
    v.text(workflow_id, "workflow_id", max_chars=MAX_WORKFLOW_ID)
    v.raise_if_any()


def _check_watch(request: pb.WatchWorkflowRequest) -> None:
    _check_id(request.workflow_id)
    v = Violations()
    v.check(request.after_sequence >= 0, "after_sequence", "must not be negative")
    v.raise_if_any()


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _time(v: Violations, request: pb.ListWorkflowsRequest, field: str) -> int | None:
    """A set Timestamp field as nanoseconds, or None; out of Timestamp's range (years
    1-9999) or nanos it is a field violation."""
    if not request.HasField(field):
        return None
    stamp = getattr(request, field)
    ok = _MIN_SECONDS <= stamp.seconds <= _MAX_SECONDS and 0 <= stamp.nanos < 1_000_000_000
    v.check(ok, field, "is not a valid timestamp")
    return int(stamp.ToNanoseconds()) if ok else None


@dataclass
class _Eager:
    """What a submission offered for eager dispatch: worker slots and task pollers."""

    reserved: int = 0
    promised: list[tuple[str, Any]] = dataclasses.field(default_factory=list)
    sent: float = dataclasses.field(default_factory=time.monotonic)


class WorkflowServicer(pb_grpc.WorkflowServiceServicer):
    def __init__(
        self,
        settings: Settings,
        store: Upstream,
        identity: InternalIdentity,
        streams: StreamPool,
        watches: SharedWatches,
        slots: WatchSlots,
        worker: Worker | None = None,
        tasks: TaskDispatcher | None = None,
    ) -> None:
        self._limits = settings.taskproc
        self._worker = worker
        self._tasks = tasks
        self._store = store
        self._pages = PageTokens(identity.derived_key("page-tokens"), "ListWorkflows")
        self._stub = store_grpc.WorkflowStoreServiceStub(store.channel)
        self._streams = streams
        self._slots = slots
        self._watches = watches

    def _create_request(
        self, spec: pb.WorkflowSpec, idempotency_key: str
    ) -> store_pb.CreateWorkflowRequest:
        """The store request for a submission, once the spec and key are valid."""
        principal = owners.user()
        v = Violations()
        v.text(idempotency_key, "idempotency_key", max_chars=MAX_IDEMPOTENCY_KEY, required=False)
        v.raise_if_any()
        return store_pb.CreateWorkflowRequest(
            owner=store_pb.WorkflowOwner(
                user_id=principal.user_id,
                username=principal.username,
                roles=list(principal.roles),
            ),
            spec=validate(spec, self._limits),
            idempotency_key=idempotency_key,
            trace_context=submit_trace_context(),
        )

    def _eager(self, create: store_pb.CreateWorkflowRequest) -> _Eager:
        """Asks the store to lease the new workflow's runnable root steps to this process:
        built-in ones to its worker, as many as it has free slots for, and task steps to
        the dispatcher when one of its pollers waits for them (eager dispatch)."""
        eager = _Eager()
        if self._worker is not None:
            roots = sum(1 for st in create.spec.steps if not st.depends_on)
            eager.reserved = self._worker.reserve(roots)
            if eager.reserved:
                create.eager_worker_id = self._worker.id
                create.eager_max_steps = eager.reserved
                create.eager_lease_seconds = self._limits.lease_seconds
        if self._tasks is not None:
            tasks = [
                (
                    st.name,
                    st.inputs.fields["queue"].string_value,
                    st.inputs.fields["type"].string_value,
                )
                for st in create.spec.steps
                if st.op == "task"
                and not st.depends_on
                and not st.when
                and not st.for_each
                and not st.HasField("not_before")
            ]
            eager.promised = self._tasks.offer(tasks) if tasks else []
            if eager.promised:
                create.eager_task_steps.extend(name for name, _ in eager.promised)
                create.eager_task_lease_id = self._tasks.lease_id
        return eager

    async def _adopt(self, eager: _Eager, steps: Sequence[store_pb.ClaimedStep]) -> None:
        if self._worker is not None:
            self._worker.adopt([s for s in steps if not s.queue], eager.reserved, eager.sent)
        if self._tasks is not None and eager.promised:
            await self._tasks.deliver(eager.promised, [s for s in steps if s.queue])
        eager.reserved, eager.promised = 0, []

    def _unreserve(self, eager: _Eager) -> None:
        if self._worker is not None:
            self._worker.unreserve(eager.reserved)
        if self._tasks is not None:
            self._tasks.withdraw(eager.promised)
        eager.reserved, eager.promised = 0, []

    async def SubmitWorkflow(
        self, request: pb.SubmitWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitWorkflowResponse:
        create = self._create_request(request.spec, request.idempotency_key)
        eager = self._eager(create)
        try:
            reply = await self._store.call(self._stub.CreateWorkflow, create)
        except BaseException:
            self._unreserve(eager)
            raise
        await self._adopt(eager, reply.eager_steps)
        return pb.SubmitWorkflowResponse(workflow=reply.workflow)

    async def GetWorkflow(
        self, request: pb.GetWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetWorkflowResponse:
        scope = owners.scope(owners.user())
        _check_id(request.workflow_id)
        reply = await self._store.call(
            self._stub.GetStoredWorkflow,
            store_pb.GetStoredWorkflowRequest(workflow_id=request.workflow_id, scope=scope),
        )
        return pb.GetWorkflowResponse(workflow=reply.workflow)

    async def ListWorkflows(
        self, request: pb.ListWorkflowsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListWorkflowsResponse:
        scope = owners.scope(owners.user())
        v = Violations()
        v.check(0 <= request.page_size <= 1000, "page_size", "must be between 0 and 1000")
        v.text(request.page_token, "page_token", max_chars=512, required=False)
        v.check(
            request.state in pb.WorkflowState.values(), "state", "is not a known workflow state"
        )
        v.text(request.name, "name", max_chars=self._limits.max_name_chars, required=False)
        v.text(request.schedule_id, "schedule_id", max_chars=MAX_WORKFLOW_ID, required=False)
        if request.schedule_id and not _is_uuid(request.schedule_id):
            v.add("schedule_id", "is not a schedule id")
        since = _time(v, request, "create_after")
        until = _time(v, request, "create_before")
        v.check(
            since is None or until is None or since <= until,
            "create_before",
            "must not be before create_after",
        )
        v.raise_if_any()
        # A token is bound to its caller and every filter (page_size may change between
        # pages): reused with another filter it is INVALID_ARGUMENT, not a wrong page.
        filter_ = json.dumps(
            [int(request.state), request.name, request.schedule_id.lower(), since, until]
        )
        bound = {"caller": scope.owner_id, "filter_": filter_}
        store_request = store_pb.ListStoredWorkflowsRequest(
            scope=scope,
            state=request.state,
            page_size=request.page_size,
            page_token=self._pages.open(request.page_token, **bound),
            name=request.name,
            schedule_id=request.schedule_id,
        )
        for field in ("create_after", "create_before"):
            if request.HasField(field):
                getattr(store_request, field).CopyFrom(getattr(request, field))
        reply = await self._store.call(self._stub.ListStoredWorkflows, store_request)
        return pb.ListWorkflowsResponse(
            workflows=reply.workflows,
            next_page_token=self._pages.seal(reply.next_page_token, **bound),
        )

    async def CancelWorkflow(
        self, request: pb.CancelWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelWorkflowResponse:
        scope = owners.scope(owners.user())
        _check_id(request.workflow_id)
        reply = await self._store.call(
            self._stub.CancelStoredWorkflow,
            store_pb.CancelStoredWorkflowRequest(workflow_id=request.workflow_id, scope=scope),
        )
        return pb.CancelWorkflowResponse(workflow=reply.workflow)

    async def RetryWorkflow(
        self, request: pb.RetryWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> pb.RetryWorkflowResponse:
        scope = owners.scope(owners.user())
        _check_id(request.workflow_id)
        reply = await self._store.call(
            self._stub.RetryStoredWorkflow,
            store_pb.RetryStoredWorkflowRequest(workflow_id=request.workflow_id, scope=scope),
        )
        return pb.RetryWorkflowResponse(workflow=reply.workflow)

    def WatchWorkflow(
        self, request: pb.WatchWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchWorkflowResponse]:
        """Streams events after `after_sequence` until the workflow is terminal and every
        event up to the last has been sent, from this replica's one dataplatform stream
        for the workflow (taskproc/shared_watch.py). Holds one of the replica's slots.

        A plain function that checks the request and returns the shared watch's reader:
        the stream is that one generator, not a second one re-yielding it (each open
        watch would keep both frames; the interceptors iterate whatever is returned)."""
        _check_watch(request)
        return self._watches.events(
            request.workflow_id, owners.scope(owners.user()), request.after_sequence, self._slots
        )

    async def WatchWorkflows(
        self,
        requests: AsyncIterator[pb.WatchWorkflowsRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.WatchWorkflowsResponse]:
        """Many WatchWorkflow on one stream (aiwfe/runtime/many.py): a task per watch reads
        the shared watch of its workflow, as WatchWorkflow does, and holds one of the
        replica's slots; at most `taskproc.watches_per_stream` open at once."""
        many: _Many = Many("WatchWorkflows", self._limits.watches_per_stream,
                           "taskproc.watches_per_stream")  # fmt: skip
        scope = owners.scope(owners.user())
        # Headers at once: the stream is answered (a relay keeps no replay of it after).
        await context.send_initial_metadata(())
        handle = functools.partial(self._handle_watch, scope=scope, many=many)
        async with aclosing(many.responses(many.read(requests, handle))) as out:
            async for reply in out:
                yield reply

    def _handle_watch(
        self, request: pb.WatchWorkflowsRequest, scope: store_pb.WorkflowScope, many: _Many
    ) -> None:
        """Starts or cancels one watch of the stream, as `request` asks."""
        if request.HasField("watch"):
            wid, watch = request.watch.watch_id, request.watch.request
            many.start(wid, self._serve_watch(wid, watch, scope, many))
        elif request.HasField("cancel"):
            many.cancel(request.cancel)

    async def _serve_watch(
        self,
        watch_id: int,
        request: pb.WatchWorkflowRequest,
        scope: store_pb.WorkflowScope,
        many: _Many,
    ) -> None:
        """One watch of a WatchWorkflows stream, to its end message (none when cancelled)."""
        try:
            _check_watch(request)
            events = self._watches.events(
                request.workflow_id, scope, request.after_sequence, self._slots
            )
            del request
            async with aclosing(events):
                async for event in events:
                    await many.out.put(
                        pb.WatchWorkflowsResponse(
                            watch_id=watch_id, events=pb.WorkflowEvents(events=(event,))
                        )
                    )
            end = _FINISHED
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # that watch's status, as WatchWorkflow would end
            end = rpc_status_of(status_of(exc))
        await many.ended(watch_id, pb.WatchWorkflowsResponse(watch_id=watch_id, end=end))

    async def RunWorkflow(
        self, request: pb.RunWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RunWorkflowResponse]:
        """SubmitWorkflow then WatchWorkflow in one call, relayed from one dataplatform
        run: a message on this replica's multiplexed call (`SharedWatches.run`), no call
        of its own to set up."""

        create = self._create_request(request.spec, request.idempotency_key)
        with self._slots:
            eager = self._eager(create)
            try:
                async for update in self._watches.run(
                    store_pb.RunStoredWorkflowRequest(
                        create=create, poll_interval_seconds=self._streams.poll_interval()
                    )
                ):
                    if update.HasField("stored"):
                        await self._adopt(eager, update.stored.eager_steps)
                        yield pb.RunWorkflowResponse(workflow=update.stored.workflow)
                    for event in update.events.events:
                        yield pb.RunWorkflowResponse(event=event)
            finally:
                self._unreserve(eager)  # the stream ended before `stored`: give them back

    async def SignalWorkflow(
        self, request: pb.SignalWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> pb.SignalWorkflowResponse:
        """Checks the signal against the workflow's wait_for_signal steps of its name (one
        must exist; a payload must meet their schemas), then has the store keep or deliver
        it. Decision: the owner (or an admin) signals a workflow, with api:workflow:signal
        (the contract's permission): with the seed `user` role's api:workflow:*, "owner or
        api:workflow:signal" would let every user signal every workflow."""
        scope = owners.scope(owners.user())
        _check_id(request.workflow_id)
        v = Violations()
        v.check(
            check_signal_name(request.name) is None, "name", check_signal_name(request.name) or ""
        )
        v.text(request.signal_id, "signal_id", max_chars=MAX_SIGNAL_ID, required=False)
        v.raise_if_any()
        stored = await self._store.call(
            self._stub.GetStoredWorkflow,
            store_pb.GetStoredWorkflowRequest(workflow_id=request.workflow_id, scope=scope),
        )
        waits = [
            json_format.MessageToDict(st.inputs)
            for st in stored.workflow.spec.steps
            if st.op == "wait_for_signal" and st.inputs.fields["name"].string_value == request.name
        ]
        if not waits:
            v.add("name", f"no wait_for_signal step of this workflow waits for {request.name!r}")
        payload = json_format.MessageToDict(request.payload)
        for inputs in waits:
            if "schema" in inputs:
                error = next(Draft202012Validator(inputs["schema"]).iter_errors(payload), None)
                if error is not None:
                    path = "".join(f"[{p!r}]" for p in error.absolute_path)
                    v.add(f"payload{path}", error.message[:500])
        v.raise_if_any()
        reply = await self._store.call(
            self._stub.SignalStoredWorkflow,
            store_pb.SignalStoredWorkflowRequest(
                workflow_id=request.workflow_id,
                scope=scope,
                name=request.name,
                payload=request.payload,
                signal_id=request.signal_id,
            ),
        )
        return pb.SignalWorkflowResponse(delivered=reply.delivered, duplicate=reply.duplicate)


class TaskProcService(Service):
    name = "taskproc"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.identity = InternalIdentity.from_settings(settings)
        self.store = Upstream(
            "dataplatform",
            settings.services.dataplatform.address,
            settings,
            self.identity,
            caller=self.name,
            files=[store_pb.DESCRIPTOR, schedule_store_pb.DESCRIPTOR],
        )
        self.cognitive = Upstream(
            "cognitive",
            settings.services.cognitive.address,
            settings,
            self.identity,
            caller=self.name,
            files=[cognitive_service_pb2.DESCRIPTOR],
        )
        # Watches ride connections of their own, never the control connection above.
        self.streams = StreamPool(self.store, settings, [store_pb.DESCRIPTOR])
        self.watches = SharedWatches(self.streams, settings.taskproc.watches_per_stream)
        self.watch_slots = WatchSlots(settings.taskproc.max_watch_streams)
        self.worker = Worker(
            settings.taskproc,
            settings.grpc.shutdown_grace_seconds,
            self.store,
            self.cognitive,
            settings.telemetry,
        )
        self.tasks = TaskDispatcher(settings.taskproc, self.store, settings.telemetry)
        self.worker.work_listeners.append(self.tasks.wake)

    async def start(self) -> None:
        with quiet(not self.settings.telemetry.trace_polling):  # its loops: untraced
            self.worker.start()

    def register(self, server: grpc.aio.Server) -> list[str]:
        pb_grpc.add_WorkflowServiceServicer_to_server(
            WorkflowServicer(
                self.settings,
                self.store,
                self.identity,
                self.streams,
                self.watches,
                self.watch_slots,
                self.worker,
                self.tasks,
            ),
            server,
        )
        worker_pb_grpc.add_WorkerServiceServicer_to_server(
            WorkerServicer(
                self.settings.taskproc,
                self.store,
                self.identity,
                self.tasks,
                self.settings.telemetry,
            ),
            server,
        )
        schedule_pb_grpc.add_ScheduleServiceServicer_to_server(
            ScheduleServicer(self.settings, self.store, self.identity), server
        )
        return [
            pb.DESCRIPTOR.services_by_name["WorkflowService"].full_name,
            worker_pb.DESCRIPTOR.services_by_name["WorkerService"].full_name,
            schedule_pb.DESCRIPTOR.services_by_name["ScheduleService"].full_name,
        ]

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [InternalIdentityInterceptor(self.identity)]

    async def stop(self) -> None:
        await self.worker.stop()
        await self.streams.close()
        await self.store.close()
        await self.cognitive.close()
