"""WorkerService: task steps (op `task`) handed to external workers over long polls.

- A PollTask joins the waiters of its (queues, types). One claim round per group serves
  them all: on a wake-up (dataplatform's WaitForWork push, heard by taskproc's Worker), on
  a due retry, or every `poll_interval` as a fallback, the group claims as many tasks as it
  has waiters in one ClaimSteps call and hands one to each. N idle pollers cost one claim
  per wake-up, not N.
- The store leases a task for its heartbeat timeout, never past its attempt deadline, to
  a lease id of this claim. The task token seals (AES-GCM) the attempt and its lease id,
  bound to the caller and the queue: it cannot be forged, read, or used by another
  principal or with another queue (INVALID_ARGUMENT). The attempt number is the fencing
  token: once the lease lapsed and the task was dispatched again, the old token is
  FAILED_PRECONDITION (TASK_TOKEN_STALE), so a late worker never completes a step twice.
- Authorization (worker:queue:<queue>) is the gateway's, from the contract's
  `resource_field` policy; the sealed queue ties each token call to the checked queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from google.protobuf import json_format, struct_pb2

from aiwfe.data.v1 import workflow_store_service_pb2 as store_pb
from aiwfe.data.v1 import workflow_store_service_pb2_grpc as store_grpc
from aiwfe.runtime import hops, metrics
from aiwfe.runtime.channels import Upstream
from aiwfe.runtime.config import TaskProcSettings, TelemetrySettings
from aiwfe.runtime.errors import FailedPrecondition, ResourceExhausted
from aiwfe.runtime.identity import InternalIdentity, require_principal
from aiwfe.runtime.page_tokens import PageTokens
from aiwfe.runtime.telemetry import quiet
from aiwfe.runtime.validation import Violations
from aiwfe.taskproc.v1 import worker_service_pb2 as pb
from aiwfe.taskproc.v1 import worker_service_pb2_grpc as pb_grpc
from taskproc.ops import StepError
from taskproc.ops.task import QUEUE_NAME, name_problem
from taskproc.spec import claimed_inputs
from taskproc.streams import RETRY_AFTER_SECONDS
from taskproc.tracing import dispatch_traceparent

log = logging.getLogger("aiwfe.taskproc.tasks")

MAX_QUEUES = 16
MAX_TYPES = 64
MAX_WAIT_SECONDS = 60.0
DEFAULT_WAIT_SECONDS = 30.0
MAX_IDENTITY_CHARS = 200
MAX_ENDED_SESSIONS = 10_000  # ShutdownWorker calls remembered at once (oldest forgotten)
# How long polls of an ended session are answered at once: those the worker sent before
# ShutdownWorker but that arrive after it. Short, because a worker that reuses its
# session after a restart gets nothing meanwhile.
ENDED_SESSION_SECONDS = 10.0
MAX_TOKEN_CHARS = 2048
MAX_MESSAGE_CHARS = 4000
_ANSWER_MARGIN = 0.5  # answer an empty poll this long before the caller's deadline
_ACTIVE = (1, 2)  # WorkflowState PENDING, RUNNING
_INVALID_TOKEN = "is not a task token issued to this caller for this queue"
ANY_QUEUE = "*"  # in WaitForWorkResponse.task_queues: every queue

_Waiter = asyncio.Future[store_pb.ClaimedStep | None]  # a poll: its task, or None (empty)
_Session = tuple[str, str]  # (principal, poll_session)


@dataclass(frozen=True)
class TaskToken:
    """What a task token seals: the attempt, its lease and how long the lease lasts."""

    workflow_id: str
    step_name: str
    attempt: int
    lease_id: str
    task_type: str
    heartbeat_seconds: float

    @property
    def ref(self) -> store_pb.StepRef:
        return store_pb.StepRef(
            workflow_id=self.workflow_id, step_name=self.step_name, attempt=self.attempt
        )


@dataclass
class _Group:
    """The pollers of one (queues, types), served by one claim round at a time."""

    queues: list[str]
    types: list[str]
    waiting: deque[_Waiter] = field(default_factory=deque)
    dirty: bool = True  # work may have arrived since the last claim found none
    claiming: bool = False
    retry_at: float = 0.0  # monotonic time of the earliest scheduled retry, 0 if none
    claimed_at: float = 0.0  # monotonic time of the group's last claim
    offered: int = 0  # waiters promised to submissions in flight (eager dispatch)
    fall_back: asyncio.TimerHandle | None = None  # the next fall-back claim while polled

    def takes(self, queue: str, task_type: str) -> bool:
        return queue in self.queues and (not self.types or task_type in self.types)


class TaskDispatcher:
    """Claims task steps for the waiting pollers of this replica."""

    def __init__(
        self, cfg: TaskProcSettings, store: Upstream, telemetry: TelemetrySettings | None = None
    ) -> None:
        self._cfg = cfg
        self._telemetry = telemetry or TelemetrySettings()
        self._store = store
        self._stub = store_grpc.WorkflowStoreServiceStub(store.channel)
        self._groups: dict[tuple[tuple[str, ...], tuple[str, ...]], _Group] = {}
        self.lease_id = f"task:{uuid.uuid4().hex}"  # this replica's claims
        self.waiting = 0  # PollTask calls held, bounded by cfg.max_task_polls
        self.eager_tasks = 0  # tasks handed to pollers by eager dispatch, not a claim
        # Poll sessions: their waiting polls, and those ended by ShutdownWorker with when
        # that stops applying (insertion order = age).
        self._sessions: dict[_Session, set[_Waiter]] = {}
        self._ended: dict[_Session, float] = {}

    # --- eager dispatch ---------------------------------------------------------------

    def offer(self, steps: Sequence[tuple[str, str, str]]) -> list[tuple[str, _Group]]:
        """Of (step name, queue, type) of a submission's root task steps, those a waiting
        poller of this replica would take, each promised one waiter (eager dispatch: the
        insert leases them to this replica's lease id); `deliver` or `withdraw` after."""
        if not self._cfg.eager_dispatch:
            return []
        promised = []
        for name, queue, task_type in steps:
            for group in self._groups.values():
                free = sum(1 for f in group.waiting if not f.done()) - group.offered
                if free > 0 and group.takes(queue, task_type):
                    group.offered += 1
                    promised.append((name, group))
                    break
        return promised

    def withdraw(self, promised: Sequence[tuple[str, _Group]]) -> None:
        for _, group in promised:
            group.offered -= 1
            self._kick(group)

    async def deliver(
        self, promised: Sequence[tuple[str, _Group]], steps: Sequence[store_pb.ClaimedStep]
    ) -> None:
        """Hands the task steps a submission leased to this replica to the waiters promised
        them (or any waiter of a group that takes them); the rest go back at once."""
        self.withdraw(promised)
        leftover = []
        for step in steps:
            if hops.ENABLED:
                hops.mark(step.ref.workflow_id, "leased_to_taskproc")
            group = next(
                (
                    g
                    for g in [*(g for _, g in promised), *self._groups.values()]
                    if g.takes(step.queue, step.task_type)
                ),
                None,
            )
            if group is None or not self._hand_out(group, step):
                leftover.append(step)
            else:
                self.eager_tasks += 1
        if leftover:  # every poller left meanwhile: claimable again at once
            await self._release(leftover)
        elif steps:
            # One loop turn first for the polls just handed a task: their answers go out
            # before the submission's own (the worker's start is what the workflow waits
            # for; the submitter only learns the id).
            await asyncio.sleep(0)

    def wake(self, queues: Sequence[str]) -> None:
        """Task steps of `queues` may have become runnable (a WaitForWork push; "*": any
        queue): the groups polling one of them claim again."""
        named = set(queues)
        every = ANY_QUEUE in named
        for group in list(self._groups.values()):
            if every or not named.isdisjoint(group.queues):
                group.dirty = True
                self._kick(group)

    def _kick(self, group: _Group) -> None:
        if group.dirty and group.waiting and not group.claiming:
            group.claiming = True
            with quiet(not self._telemetry.trace_polling):  # claims are polling: untraced
                asyncio.get_running_loop().create_task(self._claim_round(group))

    async def _claim_round(self, group: _Group) -> None:
        try:
            while (
                group.dirty
                and (want := sum(1 for f in group.waiting if not f.done()) - group.offered) > 0
            ):
                group.dirty = False
                group.claimed_at = time.monotonic()
                try:
                    reply = await self._store.call(
                        self._stub.ClaimSteps,
                        store_pb.ClaimStepsRequest(
                            worker_id=self.lease_id,
                            max_steps=min(want, self._cfg.claim_batch),
                            lease_seconds=self._cfg.lease_seconds,
                            queues=group.queues,
                            types=group.types,
                        ),
                        timeout=10,
                    )
                except Exception as exc:  # the pollers retry at their fallback interval
                    log.warning("task claim failed: %s", exc)
                    return
                leftover = [s for s in reply.steps if not self._hand_out(group, s)]
                if leftover:  # every poller left meanwhile: give them back at once
                    await self._release(leftover)
                if len(reply.steps) == min(want, self._cfg.claim_batch):
                    group.dirty = True  # probably more waiting
                elif reply.HasField("next_run_time"):
                    due = reply.next_run_time.ToDatetime().timestamp() - time.time()
                    self._retry_later(group, max(0.001, due))
        finally:
            group.claiming = False

    def _retry_later(self, group: _Group, delay: float) -> None:
        at = time.monotonic() + delay
        if group.retry_at and group.retry_at <= at:
            return
        group.retry_at = at

        def due() -> None:
            group.retry_at = 0.0
            group.dirty = True
            self._kick(group)

        asyncio.get_running_loop().call_later(delay, due)

    @staticmethod
    def _hand_out(group: _Group, step: store_pb.ClaimedStep) -> bool:
        while group.waiting:
            waiter = group.waiting.popleft()
            if not waiter.done():
                waiter.set_result(step)
                return True
        return False

    async def _release(self, steps: list[store_pb.ClaimedStep]) -> None:
        with contextlib.suppress(Exception):
            await self._store.call(
                self._stub.ReleaseSteps,
                store_pb.ReleaseStepsRequest(worker_id=self.lease_id, steps=[s.ref for s in steps]),
                timeout=5,
            )

    def end_session(self, session: _Session) -> int:
        """Answers the session's waiting polls empty, and its polls of the next
        ENDED_SESSION_SECONDS at once; how many were waiting."""
        now = time.monotonic()
        self._ended.pop(session, None)
        self._ended[session] = now + ENDED_SESSION_SECONDS
        while len(self._ended) > MAX_ENDED_SESSIONS or next(iter(self._ended.values())) <= now:
            del self._ended[next(iter(self._ended))]
        ended = 0
        for waiter in self._sessions.pop(session, ()):
            if not waiter.done():
                waiter.set_result(None)
                ended += 1
        return ended

    async def poll(
        self,
        queues: list[str],
        types: list[str],
        wait: float,
        session: _Session | None = None,
    ) -> store_pb.ClaimedStep | None:
        """One task of `queues` (of `types`), or None once `wait` seconds passed or the
        poll's `session` ended."""
        if self.waiting >= self._cfg.max_task_polls:
            limit = self._cfg.max_task_polls
            raise ResourceExhausted(
                f"this taskproc replica holds its limit of {limit} waiting polls;"
                f" retry in {RETRY_AFTER_SECONDS:g} s",
                retry_after=RETRY_AFTER_SECONDS,
                quota_violations=[("taskproc.max_task_polls", f"at most {limit}")],
                reason="TASK_POLLS_EXHAUSTED",
                metadata={"limit": str(limit)},
            )
        self.waiting += 1
        try:
            return await self._poll(queues, types, wait, session)
        finally:
            self.waiting -= 1

    async def _poll(
        self,
        queues: list[str],
        types: list[str],
        wait: float,
        session: _Session | None,
    ) -> store_pb.ClaimedStep | None:
        if wait <= 0 or (session is not None and self._ended.get(session, 0) > time.monotonic()):
            return None
        key = (tuple(sorted(set(queues))), tuple(sorted(set(types))))
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(list(key[0]), list(key[1]))
        loop = asyncio.get_running_loop()
        # The waiter itself is awaited (no wait_for, no shield): a task handed to it
        # resumes the poll on the loop's next turn, not three turns later. Its timer ends
        # it empty (None); the group's fall-back claims run on the group's own timer.
        waiter: _Waiter = loop.create_future()
        group.waiting.append(waiter)
        if session is not None:
            self._sessions.setdefault(session, set()).add(waiter)
        timer = loop.call_later(wait, _empty, waiter)
        self._kick(group)
        self._fall_back_later(group)
        try:
            return await waiter
        except asyncio.CancelledError:  # the caller left: a task handed to it goes back
            if waiter.done() and not waiter.cancelled() and (step := waiter.result()) is not None:
                await self._release([step])
            raise
        finally:
            timer.cancel()
            waiter.cancel()
            if session is not None and (polls := self._sessions.get(session)) is not None:
                polls.discard(waiter)
                if not polls:
                    del self._sessions[session]
            if not any(not f.done() for f in group.waiting):
                group.waiting.clear()
                if not group.claiming and not group.offered and self._groups.get(key) is group:
                    del self._groups[key]
                    if group.fall_back is not None:
                        group.fall_back.cancel()

    def _fall_back_later(self, group: _Group) -> None:
        """The fall-back for a missed wake-up: while the group has pollers, one claim per
        `poll_interval` for the whole group (none if a claim ran meanwhile)."""
        if group.fall_back is not None:
            return
        interval = self._cfg.poll_interval

        def due() -> None:
            group.fall_back = None
            if not any(not f.done() for f in group.waiting):
                return
            if time.monotonic() - group.claimed_at >= 0.9 * interval:
                group.dirty = True
                self._kick(group)
            self._fall_back_later(group)

        group.fall_back = asyncio.get_running_loop().call_later(interval, due)


def _empty(waiter: _Waiter) -> None:
    """A poll's time is up: it answers empty, unless a task reached it first."""
    if not waiter.done():
        waiter.set_result(None)


class CompletionBatcher:
    """CompleteTask calls to one lease id (a replica's claims) share CompleteSteps calls:
    the first goes at once, and whatever arrives while one is in flight goes in the next,
    so a busy replica spends one store call and one transaction on many completions and
    an idle one adds no delay (as taskproc's own workers do)."""

    MAX_BATCH = 1000

    def __init__(self, store: Upstream) -> None:
        self._store = store
        self._stub = store_grpc.WorkflowStoreServiceStub(store.channel)
        self._pending: dict[str, list[tuple[store_pb.StepResult, asyncio.Future[bool]]]] = {}

    async def complete(self, lease_id: str, result: store_pb.StepResult) -> bool:
        """Whether the store recorded `result` (False: the lease was no longer held)."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        queued = self._pending.get(lease_id)
        if queued is None:
            self._pending[lease_id] = [(result, done)]
            asyncio.get_running_loop().create_task(self._drain(lease_id))
        else:
            queued.append((result, done))
        return await done

    async def _drain(self, lease_id: str) -> None:
        while batch := self._pending.get(lease_id):
            self._pending[lease_id] = batch[self.MAX_BATCH :]
            batch = batch[: self.MAX_BATCH]
            try:
                reply = await self._store.call(
                    self._stub.CompleteSteps,
                    store_pb.CompleteStepsRequest(
                        worker_id=lease_id, results=[r for r, _ in batch]
                    ),
                )
            except Exception as exc:  # each caller gets the store's error
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for (_, done), ok in zip(batch, reply.accepted, strict=True):
                if not done.done():
                    done.set_result(ok)
        self._pending.pop(lease_id, None)


class WorkerServicer(pb_grpc.WorkerServiceServicer):
    """The public WorkerService: long polls, heartbeats, completions and failures."""

    def __init__(
        self,
        cfg: TaskProcSettings,
        store: Upstream,
        identity: InternalIdentity,
        dispatcher: TaskDispatcher,
        telemetry: TelemetrySettings | None = None,
    ) -> None:
        self._cfg = cfg
        self._telemetry = telemetry or TelemetrySettings()
        self._store = store
        self._stub = store_grpc.WorkflowStoreServiceStub(store.channel)
        self._tokens = PageTokens(
            identity.derived_key("task-tokens"), "task", "task_token", _INVALID_TOKEN
        )
        self._dispatcher = dispatcher
        self._completions = CompletionBatcher(store)

    # --- tokens ---------------------------------------------------------------------------

    def _seal(self, step: store_pb.ClaimedStep, lease_id: str, caller: str) -> str:
        body = json.dumps(
            [
                step.ref.workflow_id,
                step.ref.step_name,
                step.ref.attempt,
                lease_id,
                step.task_type,
                step.heartbeat_timeout_seconds,
            ]
        )
        return self._tokens.seal(body, caller=caller, filter_=step.queue)

    def _open(self, token: str, queue: str) -> TaskToken:
        v = Violations()
        v.text(token, "task_token", max_chars=MAX_TOKEN_CHARS)
        v.text(queue, "queue", max_chars=64)
        v.raise_if_any()
        caller = require_principal().user_id
        body = self._tokens.open(token, caller=caller, filter_=queue)
        wid, step, attempt, lease_id, task_type, heartbeat = json.loads(body)
        return TaskToken(wid, step, attempt, lease_id, task_type, heartbeat)

    @staticmethod
    def _stale(token: TaskToken, why: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"task token is stale: {why}",
            reason="TASK_TOKEN_STALE",
            metadata={
                "workflowId": token.workflow_id,
                "stepName": token.step_name,
                "attempt": str(token.attempt),
            },
        )

    # --- RPCs -----------------------------------------------------------------------------

    async def PollTask(
        self, request: pb.PollTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.PollTaskResponse:
        caller = require_principal().user_id
        v = Violations()
        v.check(1 <= len(request.queues) <= MAX_QUEUES, "queues", f"must list 1 to {MAX_QUEUES}")
        for i, queue in enumerate(request.queues):
            problem = name_problem(queue, "queue")
            v.check(problem is None, f"queues[{i}]", problem or "")
        v.check(len(request.types) <= MAX_TYPES, "types", f"at most {MAX_TYPES}")
        for i, task_type in enumerate(request.types):
            problem = name_problem(task_type, "type")
            v.check(problem is None, f"types[{i}]", problem or "")
        v.check(
            0 <= request.wait_seconds <= MAX_WAIT_SECONDS,
            "wait_seconds",
            f"must be between 0 (default {DEFAULT_WAIT_SECONDS:g}) and {MAX_WAIT_SECONDS:g}",
        )
        v.text(
            request.worker_identity,
            "worker_identity",
            max_chars=MAX_IDENTITY_CHARS,
            required=False,
        )
        if request.poll_session:
            _check_session(v, request.poll_session)
        v.raise_if_any()
        wait = request.wait_seconds or DEFAULT_WAIT_SECONDS
        remaining = context.time_remaining()
        if remaining is not None:
            wait = min(wait, remaining - _ANSWER_MARGIN)
        session = (caller, request.poll_session) if request.poll_session else None
        step = await self._dispatcher.poll(list(request.queues), list(request.types), wait, session)
        if step is None:
            return pb.PollTaskResponse()
        try:
            reply = self._task(step, caller, request.worker_identity)
        except StepError as exc:  # e.g. a fan-out item without the ${item.PATH} it names
            await self._unresolvable(step, str(exc))
            return pb.PollTaskResponse()
        metrics.workflow_tasks_dispatched.labels(step.queue, step.task_type).inc()
        if hops.ENABLED:
            hops.mark(step.ref.workflow_id, "poll_answered")
        return reply

    async def _unresolvable(self, step: store_pb.ClaimedStep, error: str) -> None:
        """Fails for good a task whose input references cannot be resolved: no worker could
        run it, and holding it until its lease lapsed would hide the reason."""
        await self._store.call(
            self._stub.FailStep,
            store_pb.FailStepRequest(
                worker_id=self._dispatcher.lease_id, ref=step.ref, error=error, retryable=False
            ),
        )

    def _task(
        self, step: store_pb.ClaimedStep, caller: str, worker_identity: str
    ) -> pb.PollTaskResponse:
        inputs = claimed_inputs(step)
        value = struct_pb2.Value()
        json_format.ParseDict(inputs.get("input"), value)
        reply = pb.PollTaskResponse(
            task_token=self._seal(step, self._dispatcher.lease_id, caller),
            workflow_id=step.ref.workflow_id,
            step_name=step.ref.step_name,
            queue=step.queue,
            type=step.task_type,
            input=value,
            attempt=step.ref.attempt,
            attempt_deadline=step.attempt_deadline,
            heartbeat_timeout_seconds=step.heartbeat_timeout_seconds,
        )
        # The dispatch span, in the workflow's trace: the worker's span is its child.
        reply.traceparent = dispatch_traceparent(
            step, worker_identity, self._telemetry.step_link_after_seconds
        )
        return reply

    async def HeartbeatTask(
        self, request: pb.HeartbeatTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatTaskResponse:
        token = self._open(request.task_token, request.queue)
        extend = store_pb.ExtendLeasesRequest(
            worker_id=token.lease_id, steps=[token.ref], lease_seconds=token.heartbeat_seconds
        )
        if request.HasField("details"):
            extend.progress.add(ref=token.ref, details=request.details)
        reply = await self._store.call(self._stub.ExtendLeases, extend)
        if not reply.lost:
            return pb.HeartbeatTaskResponse()
        # Lost: the workflow stopped (cancel the task) or the lease lapsed (stale).
        stored = await self._store.call(
            self._stub.GetStoredWorkflow,
            store_pb.GetStoredWorkflowRequest(
                workflow_id=token.workflow_id, scope=store_pb.WorkflowScope(all_owners=True)
            ),
        )
        if stored.workflow.state not in _ACTIVE:
            return pb.HeartbeatTaskResponse(cancel_requested=True)
        raise self._stale(token, "its lease expired and the task was dispatched again")

    async def CompleteTask(
        self, request: pb.CompleteTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.CompleteTaskResponse:
        token = self._open(request.task_token, request.queue)
        size = len(json.dumps(json_format.MessageToDict(request.output)))
        v = Violations()
        v.check(
            size <= self._cfg.max_output_bytes,
            "output",
            f"must be at most {self._cfg.max_output_bytes} bytes as JSON (got {size})",
        )
        v.raise_if_any()
        recorded = await self._completions.complete(
            token.lease_id, store_pb.StepResult(ref=token.ref, output=request.output)
        )
        if not recorded:
            raise self._stale(token, "the task is no longer held (lease expired or stopped)")
        metrics.workflow_tasks_completed.labels(request.queue, token.task_type).inc()
        return pb.CompleteTaskResponse()

    async def FailTask(
        self, request: pb.FailTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.FailTaskResponse:
        token = self._open(request.task_token, request.queue)
        v = Violations()
        v.text(request.message, "message", max_chars=MAX_MESSAGE_CHARS, required=False)
        v.raise_if_any()
        fail = store_pb.FailStepRequest(
            worker_id=token.lease_id,
            ref=token.ref,
            error=request.message or "task failed",
            retryable=request.retryable,
        )
        if request.HasField("details"):
            fail.details.CopyFrom(request.details)
        reply = await self._store.call(self._stub.FailStep, fail)
        if not reply.accepted:
            raise self._stale(token, "the task is no longer held (lease expired or stopped)")
        metrics.workflow_tasks_failed.labels(request.queue, token.task_type).inc()
        answer = pb.FailTaskResponse(will_retry=reply.will_retry)
        if reply.HasField("next_run_time"):
            answer.next_attempt_time.CopyFrom(reply.next_run_time)
        return answer

    async def ShutdownWorker(
        self, request: pb.ShutdownWorkerRequest, context: grpc.aio.ServicerContext
    ) -> pb.ShutdownWorkerResponse:
        caller = require_principal().user_id
        v = Violations()
        _check_session(v, request.poll_session)
        v.raise_if_any()
        ended = self._dispatcher.end_session((caller, request.poll_session))
        return pb.ShutdownWorkerResponse(polls_ended=ended)


def _check_session(v: Violations, session: str) -> None:
    v.check(
        bool(QUEUE_NAME.fullmatch(session)),  # a session is spelled as a queue name
        "poll_session",
        "must be 1-64 characters of A-Z a-z 0-9 . _ -",
    )
