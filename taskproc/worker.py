"""The worker pool of one taskproc process: claims leased steps from dataplatform, runs them
with a per-process concurrency limit, extends leases while they run, and records results.

- Wakes on dataplatform's `WaitForWork` stream (pushed on submit/complete/cancel) and falls
  back to polling every `poll_interval` (or sooner when a retry is due).
- Results are sent in batches: whatever finished while the previous CompleteSteps call was
  in flight goes in the next one, so an idle worker adds no delay and a busy one few calls.
- A step stops when its workflow is cancelled or timed out (pushed, or found when a lease
  extension reports it lost); its result is then discarded by the store's lease check.
- Lease extensions have a budget of their own: every third of a lease, attempts with a
  deadline of a sixth of a lease, retried with backoff until the earliest lease among the
  running steps would run out. A step whose lease ran out unextended is stopped, since
  another worker may have claimed it. Calls go on the control connection (watches never
  share it, see taskproc/streams.py) and through no breaker.
- `stop()` (SIGTERM): stop claiming, let running steps finish within the grace period, then
  cancel the rest and release their leases so another worker takes them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from aiwfe.data.v1 import workflow_store_service_pb2 as store_pb
from aiwfe.data.v1 import workflow_store_service_pb2_grpc as store_grpc
from aiwfe.runtime import metrics
from aiwfe.runtime.aio import wait_event
from aiwfe.runtime.channels import Upstream
from aiwfe.runtime.config import TaskProcSettings, TelemetrySettings
from aiwfe.runtime.identity import Principal, current_principal
from aiwfe.runtime.telemetry import quiet
from taskproc.completions import CompletionStream
from taskproc.ops import OPS, PERMANENT_CODES, StepContext, StepError
from taskproc.spec import claimed_inputs
from taskproc.tracing import mark_failed, step_attempt

log = logging.getLogger("aiwfe.taskproc.worker")
StepKey = tuple[str, str, int]  # workflow_id, step name, attempt
_STREAM_SECONDS = 300.0  # WaitForWork streams are re-opened this often
_RPC_RETRY_SECONDS = 0.5
_LEASE_RETRY_SECONDS = 0.1  # first back-off between lease extension attempts (x2, cap 1 s)


@dataclass
class _Running:
    step: store_pb.ClaimedStep
    task: asyncio.Task[None] | None = None
    stop_reason: str = ""  # why we cancelled it: "stopped", "lost" or "shutdown"
    started: float = field(default_factory=time.monotonic)
    held_until: float = 0.0  # monotonic time our lease surely lasts until (from the send)


class Worker:
    """Runs claimed steps; one per taskproc process."""

    def __init__(
        self,
        cfg: TaskProcSettings,
        grace_seconds: float,
        store: Upstream,
        cognitive: Upstream,
        telemetry: TelemetrySettings | None = None,
    ) -> None:
        self.cfg = cfg
        self.telemetry = telemetry or TelemetrySettings()
        self.grace = grace_seconds
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._store = store
        self._stub = store_grpc.WorkflowStoreServiceStub(store.channel)
        self._completions = CompletionStream(self._stub, store.metadata)
        self._cognitive = cognitive
        self._running: dict[StepKey, _Running] = {}
        self._wake = asyncio.Event()
        self._results: list[tuple[store_pb.StepResult, asyncio.Future[bool]]] = []
        self._results_ready = asyncio.Event()
        self._completing = False  # a CompleteSteps call not yet answered
        self._releasing: set[asyncio.Task[Any]] = set()  # eager steps given back on stop
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = False
        self._reserved = 0  # slots promised to eager dispatch calls in flight
        self._owed = False  # a claim was cut short (or skipped) for want of a free slot
        self.eager_steps = 0  # steps this worker got from eager dispatch, not a claim
        # Called with the task queues of every push that names some ("*": any), for the
        # external workers' task dispatcher.
        self.work_listeners: list[Callable[[Sequence[str]], None]] = []

    async def _call(self, rpc: Any, request: Any, timeout: float) -> Any:
        """A queue call with the service identity and a deadline but no circuit breaker: the
        worker's own polling is the back-off, and an open breaker would stall the queue for
        its whole open period after a short dataplatform blip. Untraced (quiet) unless
        `telemetry.trace_polling`: claims, batches and leases are the queue's cost."""
        with quiet(not self.telemetry.trace_polling):
            return await rpc(request, timeout=timeout, metadata=self._store.metadata())

    async def _send_completion(
        self, request: store_pb.CompleteStepsRequest
    ) -> store_pb.CompleteStepsResponse:
        """CompleteSteps on the worker's completion stream (taskproc/completions.py), quiet
        as `_call`'s calls are."""
        with quiet(not self.telemetry.trace_polling):
            return await self._completions.complete(request, timeout=10)

    @property
    def running_count(self) -> int:
        return len(self._running)

    def _free(self) -> int:
        return self.cfg.worker_concurrency - len(self._running) - self._reserved

    # --- eager dispatch -------------------------------------------------------------------

    def reserve(self, wanted: int, freeing: int = 0) -> int:
        """Up to `wanted` free slots (counting `freeing` running steps about to finish)
        promised to a store call that may lease steps to this worker (eager dispatch:
        CreateWorkflow, CompleteSteps); `adopt` or `unreserve` them once it answers. 0
        while stopping, when full, or with `taskproc.eager_dispatch` off."""
        if self._stopping or not self.cfg.eager_dispatch:
            return 0
        n = max(0, min(wanted, self._free() + freeing, self.cfg.claim_batch))
        self._reserved += n
        return n

    def reserve_for_results(self, finished: int) -> int:
        """The slots a CompleteSteps of `finished` results offers for the dependants it
        makes runnable: the results' own slots and half of the free ones. Not all the free
        ones: a submission arriving while the call is in flight must still find a slot
        for its root, or it is left to a ClaimSteps (then about half of the steps at 32 in
        flight went through a claim)."""
        return self.reserve(finished + max(0, self._free()) // 2, freeing=finished)

    def unreserve(self, n: int) -> None:
        self._reserved -= n
        if n and self._owed:
            self._owed = False
            self._wake.set()

    def adopt(self, steps: Sequence[store_pb.ClaimedStep], reserved: int, sent: float) -> None:
        """Runs steps a store call leased to this worker (eager dispatch) as if claimed at
        `sent` (monotonic, before the call), and frees the rest of the `reserved` slots."""
        self._reserved -= reserved
        if self._stopping and steps:  # asked for before stop(): claimable again at once
            release = store_pb.ReleaseStepsRequest(worker_id=self.id, steps=[s.ref for s in steps])
            task = asyncio.create_task(self._call(self._stub.ReleaseSteps, release, timeout=5))
            self._releasing.add(task)
            task.add_done_callback(self._released)
            return
        self.eager_steps += len(steps)
        for step in steps:
            self._launch(step, sent + self.cfg.lease_seconds)
        if len(steps) < reserved and self._owed:
            self._owed = False
            self._wake.set()

    def _released(self, task: asyncio.Task[Any]) -> None:
        self._releasing.discard(task)
        if not task.cancelled() and task.exception():
            log.warning("releasing eager steps on shutdown failed: %s", task.exception())

    def start(self) -> None:
        self._loops = [
            asyncio.create_task(self._claim_loop(), name="taskproc-claim"),
            asyncio.create_task(self._wake_loop(), name="taskproc-wake"),
            asyncio.create_task(self._lease_loop(), name="taskproc-lease"),
            asyncio.create_task(self._complete_loop(), name="taskproc-complete"),
        ]

    # --- claiming -------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            wait = self.cfg.poll_interval
            free = self._free()
            self._owed = free <= 0  # a slot freed later claims at once
            if free > 0:
                want = min(free, self.cfg.claim_batch)
                sent = time.monotonic()

                try:
                    reply = await self._call(
                        self._stub.ClaimSteps,
                        store_pb.ClaimStepsRequest(
                            worker_id=self.id, max_steps=want, lease_seconds=self.cfg.lease_seconds
                        ),
                        timeout=10,
                    )
                except Exception as exc:  # dataplatform down or breaker open: poll later
                    log.warning("claim failed: %s", exc)
                else:
                    for step in reply.steps:
                        self._launch(step, sent + self.cfg.lease_seconds)
                    if len(reply.steps) == want:
                        self._owed = True
                        continue  # probably more waiting
                    if reply.HasField("next_run_time"):
                        due = reply.next_run_time.ToDatetime().timestamp() - time.time()
                        wait = max(0.001, min(wait, due))
            await wait_event(self._wake, wait)

    def _launch(self, step: store_pb.ClaimedStep, held_until: float) -> None:
        key = (step.ref.workflow_id, step.ref.step_name, step.ref.attempt)
        running = _Running(step, held_until=held_until)
        self._running[key] = running
        running.task = asyncio.create_task(self._traced_run(key, running), name=f"step-{key[1]}")

    # --- running a step -------------------------------------------------------------------

    async def _traced_run(self, key: StepKey, running: _Running) -> None:
        """`_run` in the attempt's span: the submit's child or linked (taskproc/tracing.py)."""
        with step_attempt(running.step, self.telemetry.step_link_after_seconds):
            await self._run(key, running)

    async def _run(self, key: StepKey, running: _Running) -> None:
        step = running.step
        op = OPS.get(step.op)
        outcome = "failed"
        try:
            try:
                if op is None:
                    raise StepError(f"unknown op {step.op!r}", retryable=False)
                inputs = claimed_inputs(step)
                # The step acts for the workflow's owner: the service identity plus theirs.
                current_principal.set(
                    Principal(
                        user_id=step.owner.user_id,
                        username=step.owner.username,
                        roles=tuple(step.owner.roles),
                    )
                )
                ctx = StepContext(step.ref.attempt, self.id, self._cognitive, step.timeout_seconds)
                async with asyncio.timeout(step.timeout_seconds):
                    output = await op.run(ctx, inputs)
                size = len(json.dumps(output))
                if size > self.cfg.max_output_bytes:
                    raise StepError(
                        f"output of {size} bytes exceeds {self.cfg.max_output_bytes}", False
                    )
            except asyncio.CancelledError:
                outcome = "cancelled"
                raise
            except StepError as exc:
                await self._fail(step, str(exc), exc.retryable)
            except TimeoutError:
                await self._fail(step, f"timed out after {step.timeout_seconds:g}s", True)
            except grpc.aio.AioRpcError as exc:
                await self._fail(
                    step, f"{exc.code().name}: {exc.details()}", exc.code() not in PERMANENT_CODES
                )
            except Exception as exc:  # an op bug: retry, the error text is recorded
                log.exception("step %s/%s crashed", key[0], key[1])
                await self._fail(step, f"{type(exc).__name__}: {exc}", True)
            else:
                outcome = "succeeded" if await self._complete(step, output) else "lost"
        finally:
            metrics.workflow_step_latency.labels(step.op if op else "unknown", outcome).observe(
                time.monotonic() - running.started
            )
            self._running.pop(key, None)
            if self._owed:  # a slot is free for work a claim had to leave
                self._owed = False
                self._wake.set()

    async def _retrying(self, what: str, call: Any) -> Any:
        """Calls the store until it answers, while our lease keeps the step ours."""
        delay = _RPC_RETRY_SECONDS
        while True:
            try:
                return await call()
            except (grpc.aio.AioRpcError, Exception) as exc:
                if isinstance(exc, grpc.aio.AioRpcError) and exc.code() in PERMANENT_CODES:
                    raise
                log.warning("%s failed, retrying: %s", what, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.cfg.lease_seconds / 3)

    async def _complete(self, step: store_pb.ClaimedStep, output: dict[str, Any]) -> bool:
        result = store_pb.StepResult(ref=step.ref)
        result.output.update(output)
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._results.append((result, done))
        self._results_ready.set()
        return await done

    async def _complete_loop(self) -> None:
        while True:
            await self._results_ready.wait()
            self._results_ready.clear()
            batch, self._results = self._results[:1000], self._results[1000:]
            if self._results:
                self._results_ready.set()
            if not batch:
                continue
            # The batch's steps are done: their slots may take the dependants it makes
            # runnable, leased in the same transaction (eager dispatch).
            reserved = self.reserve_for_results(len(batch))
            request = store_pb.CompleteStepsRequest(
                worker_id=self.id,
                results=[r for r, _ in batch],
                eager_max_steps=reserved,
                eager_lease_seconds=self.cfg.lease_seconds if reserved else 0.0,
            )
            sent = time.monotonic()
            self._completing = True
            try:
                reply = await self._retrying(
                    "complete",
                    lambda req=request: self._send_completion(req),
                )
            except Exception as exc:
                self._completing = False
                self.unreserve(reserved)
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self._completing = False
            self.adopt(reply.eager_steps, reserved, sent)
            for (_, fut), ok in zip(batch, reply.accepted, strict=True):
                if not fut.done():
                    fut.set_result(ok)
            if discarded := sum(1 for ok in reply.accepted if not ok):
                log.warning("%d results discarded: lease lost", discarded)

    async def _fail(self, step: store_pb.ClaimedStep, error: str, retryable: bool) -> None:
        mark_failed(error)
        request = store_pb.FailStepRequest(
            worker_id=self.id, ref=step.ref, error=error, retryable=retryable
        )
        await self._retrying("fail", lambda: self._call(self._stub.FailStep, request, timeout=10))

    # --- leases, wake-ups, cancellation ---------------------------------------------------

    def _cancel(self, key: StepKey, reason: str) -> None:
        running = self._running.get(key)
        if running and running.task and not running.task.done():
            running.stop_reason = reason
            running.task.cancel()

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.lease_seconds / 3)
            await self._extend_leases()

    async def _extend_leases(self) -> None:
        """One round: extends every running step's lease, retrying until the earliest of
        them would run out; then stops the steps whose lease did run out."""
        runs = list(self._running.items())
        if not runs:
            return
        lease = self.cfg.lease_seconds
        request = store_pb.ExtendLeasesRequest(
            worker_id=self.id, steps=[r.step.ref for _, r in runs], lease_seconds=lease
        )
        until = min(r.held_until for _, r in runs)
        delay = _LEASE_RETRY_SECONDS
        while (budget := until - time.monotonic()) > 0:
            sent = time.monotonic()
            try:
                reply = await self._call(
                    self._stub.ExtendLeases, request, timeout=min(lease / 6, budget)
                )
            except Exception as exc:
                if isinstance(exc, grpc.aio.AioRpcError) and exc.code() in PERMANENT_CODES:
                    log.error("lease extension refused: %s", exc)
                    break
                log.warning("lease extension failed, retrying: %s", exc)
                await asyncio.sleep(min(delay, max(0.0, until - time.monotonic())))
                delay = min(delay * 2, 1.0)
                continue
            lost = {(r.workflow_id, r.step_name, r.attempt) for r in reply.lost}
            for key, running in runs:
                if key in lost:
                    self._cancel(key, "lost")
                else:
                    running.held_until = sent + lease
            return
        now = time.monotonic()
        for key, running in runs:
            if running.held_until <= now and key in self._running:
                log.warning("lease of %s/%s ran out unextended: stopping it", key[0], key[1])
                self._cancel(key, "lost")

    async def _wake_loop(self) -> None:
        while True:
            try:
                stream = self._stub.WaitForWork(
                    store_pb.WaitForWorkRequest(worker_id=self.id),
                    timeout=_STREAM_SECONDS,
                    metadata=self._store.metadata(),
                )
                async for wake in stream:
                    if wake.builtin_work:
                        self._wake.set()
                    if wake.task_queues:
                        for listener in self.work_listeners:
                            listener(wake.task_queues)
                    stopped = set(wake.stopped_workflow_ids)
                    for key in [k for k in self._running if k[0] in stopped]:
                        self._cancel(key, "stopped")
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    log.info("wake-up stream ended (%s); polling meanwhile", exc.code().name)
                    await asyncio.sleep(self.cfg.poll_interval)

    # --- shutdown -------------------------------------------------------------------------

    async def stop(self) -> None:
        """Stops claiming, lets running steps finish within the grace, releases the rest."""
        self._stopping = True
        self._wake.set()
        tasks = [r.task for r in self._running.values() if r.task]
        if tasks:
            await asyncio.wait(tasks, timeout=self.grace)
        leftover = list(self._running.items())
        for key, _ in leftover:
            self._cancel(key, "shutdown")
        pending = [r.task for _, r in leftover if r.task]
        if pending:
            await asyncio.wait(pending, timeout=5)
        if leftover:
            with contextlib.suppress(Exception):
                reply = await self._call(
                    self._stub.ReleaseSteps,
                    store_pb.ReleaseStepsRequest(
                        worker_id=self.id, steps=[r.step.ref for _, r in leftover]
                    ),
                    timeout=5,
                )
                log.info("released %d running steps on shutdown", reply.released)
        # Let the last results reach the store (queued, or in a call not yet answered)
        # before the loops go, and the steps their answers leased us go back.
        for _ in range(100):
            if not self._results and not self._completing:
                break
            await asyncio.sleep(0.01)
        if self._releasing:
            await asyncio.wait(self._releasing, timeout=5)
        for loop in self._loops:
            loop.cancel()
        for loop in self._loops:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await loop
        await self._completions.close()
