"""Scheduling policy: what happens to a step that fails or whose lease expires (retry
after an exponential backoff, or the dead letter once its attempts are spent), when
overdue workflows time out, and how often the sweep that finds both runs.

The repository carries these decisions out in SQL; keeping them here means a change of
policy (a new backoff, a different sweep cadence) touches one small module.
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from google.protobuf import json_format

from aiwfe.runtime import metrics
from dataplatform.db import DictConnection
from dataplatform.workflows.repository import (
    MAX_ERROR_CHARS,
    SIGNAL_QUEUE,
    SIGNAL_WORKER,
    TIMER_QUEUE,
    TIMER_WORKER,
    NewEvent,
    Woken,
    WorkflowRepository,
    item_parent,
    step_refs,
)
from dataplatform.workflows.states import StepState, WorkflowState

log = logging.getLogger("aiwfe.dataplatform.workflows")

MAX_LEASE_SECONDS = 3600.0
# The error of an attempt whose lease expired: its step's error and its attempt row.
LEASE_LOST = "lease expired (worker lost)"
TASK_TIMED_OUT = "attempt timed out (task not completed by its deadline)"
SWEEP_INTERVAL = 0.25  # expired leases and workflow deadlines, at most this often
SWEEP_BATCH = 100  # rows per kind per sweep; the next sweep takes the rest
MAX_QUEUE_SERIES = 100  # task queues with a gauge series (the deepest); queue names are free


def backoff_seconds(
    failures: int, initial: float, multiplier: float, maximum: float, jitter: float
) -> float:
    """The wait before the retry after the `failures`-th failure: exponential, capped, then
    stretched by up to `jitter` (a fraction) so retrying workers spread out."""
    base = min(maximum, initial * multiplier ** max(0, failures - 1))
    return base * (1 + random.random() * jitter)


def out_of_attempts(step: dict[str, Any]) -> bool:
    return bool(step["failures"] >= step["max_attempts"])


@dataclass(frozen=True)
class FailureOutcome:
    """What a failed attempt led to: a retry at `next_run_at`, or the dead letter (which
    `stopped` the workflow, unless the step was an item of a fan-out that collects)."""

    will_retry: bool
    next_run_at: datetime | None = None
    stopped: bool = False


class Scheduler:
    """Retries, dead letters, timeouts and the sweep, over the repository."""

    def __init__(self, repo: WorkflowRepository) -> None:
        self._repo = repo
        repo.dead_letter = self.dead_letter
        self._next_sweep = 0.0
        self._queues: set[str] = set()  # queues with a gauge series

    async def dead_letter(
        self, conn: DictConnection, wid: uuid.UUID, step: str, attempts: int, error: str
    ) -> bool:
        """The step FAILED, the rest cancelled, the workflow FAILED; returns whether the
        workflow stopped. A fan-out's item (ItemFailurePolicy): under COLLECT it is FAILED
        and the workflow goes on (its error becomes its output entry); under FAIL_FAST its
        fan-out step FAILED too, naming the item."""
        parent = item_parent(step)
        if parent is None:
            reason = f"step {step!r} failed after {attempts} attempt(s): {error}"
            await self._repo.fail_step(conn, wid, step, error, reason[:MAX_ERROR_CHARS])
        elif await self._repo.fan_out_collects(conn, wid, parent):
            await self._repo.fail_item(conn, wid, step, error)
            return False
        else:
            step_error = f"item {step} failed after {attempts} attempt(s): {error}"
            reason = f"step {parent!r} failed: {step_error}"[:MAX_ERROR_CHARS]
            await self._repo.fail_fan_out(conn, wid, step, error, step_error, reason)
        metrics.workflow_dead_letters.inc()
        return True

    async def failed(
        self,
        conn: DictConnection,
        wid: uuid.UUID,
        step_name: str,
        attempt: int,
        step: dict[str, Any],
        error: str,
        retryable: bool,
    ) -> FailureOutcome:
        """A recorded failed attempt: schedules the retry after its backoff, or ends the
        workflow when the error is permanent or the attempts are spent."""
        msg = f"attempt {attempt} failed: {error}"
        if not retryable or out_of_attempts(step):
            stopped = await self.dead_letter(conn, wid, step_name, step["failures"], msg)
            return FailureOutcome(will_retry=False, stopped=stopped)
        delay = backoff_seconds(
            step["failures"],
            step["initial_backoff"],
            step["backoff_multiplier"],
            step["max_backoff"],
            step["jitter"],
        )
        await self._repo.append_events(
            conn, [NewEvent(wid, step_name, StepState.RETRYING, f"{msg}; retry in {delay:.3f}s")]
        )
        # Counted from after the RETRYING event's time, so the recorded schedule never
        # shows a retry earlier than its backoff.
        next_run_at = await self._repo.schedule_retry(conn, wid, step_name, delay)
        metrics.workflow_step_retries.labels(step["op"]).inc()
        return FailureOutcome(will_retry=True, next_run_at=next_run_at)

    async def _task_queue_gauges(self, conn: DictConnection) -> None:
        """Depth and oldest-task age per task queue (the deepest MAX_QUEUE_SERIES); a
        queue that drained loses its series, so queue names cannot grow them unbounded."""
        rows = await self._repo.task_queues(conn, MAX_QUEUE_SERIES)
        seen = set()
        for r in rows:
            seen.add(r["queue"])
            metrics.workflow_task_queue_depth.labels(r["queue"]).set(r["depth"])
            metrics.workflow_task_queue_oldest_age.labels(r["queue"]).set(r["oldest_age"])
        for gone in self._queues - seen:
            metrics.workflow_task_queue_depth.remove(gone)
            metrics.workflow_task_queue_oldest_age.remove(gone)
        self._queues = seen

    def sweep_due(self) -> bool:
        """Whether a sweep is due (at most one per SWEEP_INTERVAL); claims the slot."""
        now = time.monotonic()
        if now < self._next_sweep:
            return False
        self._next_sweep = now + SWEEP_INTERVAL
        return True

    async def fire_timers(self, conn: DictConnection, stopped: list[str]) -> Woken:
        """Completes the due `sleep` steps and the timed-out `wait_for_signal` ones (with
        their `default`, or failed for good); adds workflows that failed to `stopped`."""
        woke = Woken(False, set())
        timers = await self._repo.claim(conn, TIMER_WORKER, SWEEP_BATCH, 60, [TIMER_QUEUE])
        if timers.steps:
            outputs = [
                json.dumps({"slept_seconds": s.inputs.fields["seconds"].number_value})
                for s in timers.steps
            ]
            _, woke = await self._repo.complete(
                conn, TIMER_WORKER, step_refs([s.ref for s in timers.steps]), outputs
            )
        waits = await self._repo.claim(conn, SIGNAL_WORKER, SWEEP_BATCH, 60, [SIGNAL_QUEUE])
        defaults = [s for s in waits.steps if "default" in s.inputs.fields]
        if defaults:
            outputs = [
                json.dumps(json_format.MessageToDict(s.inputs.fields["default"])) for s in defaults
            ]
            _, more = await self._repo.complete(
                conn, SIGNAL_WORKER, step_refs([s.ref for s in defaults]), outputs
            )
            woke = Woken(woke.builtin or more.builtin, woke.queues | more.queues)
        for s in waits.steps:
            if "default" in s.inputs.fields:
                continue
            name = s.inputs.fields["name"].string_value
            error = (
                f"no signal {name!r} within {s.inputs.fields['timeout_seconds'].number_value:g} s"
            )
            wid = uuid.UUID(s.ref.workflow_id)
            step = await self._repo.record_failure(conn, SIGNAL_WORKER, s.ref, wid, error)
            if step is not None:
                await self.failed(conn, wid, s.ref.step_name, s.ref.attempt, step, error, False)
                stopped.append(s.ref.workflow_id)
        return woke

    async def sweep(self, conn: DictConnection) -> list[str]:
        """Times out overdue workflows and makes expired leases claimable again (counting a
        failed attempt); returns the ids of workflows stopped. (Timers fire in their own
        loop, `timers.TimerLoop`.)"""
        stopped: list[str] = []
        for wid in await self._repo.overdue_workflows(conn, SWEEP_BATCH):
            if await self._repo.stop(conn, wid, WorkflowState.TIMED_OUT, "workflow timed out"):
                stopped.append(str(wid))
        expired = await self._repo.expire_leases(conn, LEASE_LOST, TASK_TIMED_OUT, SWEEP_BATCH)
        events = []
        for r in expired:
            msg = f"attempt {r['attempt']}: {r['error']}"
            if r["queue"] is not None and r["error"] == LEASE_LOST:
                metrics.task_heartbeat_timeouts.labels(r["queue"], r["task_type"]).inc()
            if out_of_attempts(r):
                if await self.dead_letter(conn, r["workflow_id"], r["name"], r["failures"], msg):
                    stopped.append(str(r["workflow_id"]))
            else:
                events.append(NewEvent(r["workflow_id"], r["name"], StepState.RETRYING, msg))
        await self._repo.append_events(conn, events)
        metrics.workflow_queue_depth.set(await self._repo.queue_depth(conn))
        metrics.workflow_concurrency_queued.set(await self._repo.queued_workflows(conn))
        await self._task_queue_gauges(conn)
        if expired:
            log.warning("reclaimed %d steps with expired leases", len(expired))
        return stopped
