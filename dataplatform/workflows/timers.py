"""The timer loop: fires due `sleep` steps and timed-out `wait_for_signal` steps on time,
whether or not any worker polls.

Timers used to fire in the sweep that ClaimSteps runs, so only while a taskproc polled with
a free slot. Measured with `python -m benchmarks.workflows --phases timers` (100 timers due
at once, 2026-11-30): late by p99 0.56 s on the idle suite (the worker's 0.5 s poll), by
6.1 s with every worker slot taken by long steps (a full worker does not poll), and never
fired with no taskproc running. So each dataplatform replica runs this loop: it sleeps until
the earliest due timer (at most MAX_NAP_SECONDS, which also finds timers another replica
stored), wakes at once when this replica makes a timer step runnable, and claims due
timers with FOR UPDATE SKIP LOCKED in the transaction that completes them, so several
replicas never fire one twice.
"""

from __future__ import annotations

import asyncio
import logging
import time

from opentelemetry.instrumentation.utils import suppress_instrumentation

from aiwfe.runtime.aio import cancel_and_wait, wait_event
from dataplatform.db import DictConnection
from dataplatform.workflows.repository import (
    SIGNAL_QUEUE,
    TIMER_QUEUE,
    Woken,
    WorkflowRepository,
)
from dataplatform.workflows.scheduling import Scheduler
from dataplatform.workflows.watches import Wakeups

log = logging.getLogger("aiwfe.dataplatform.workflows")

MAX_NAP_SECONDS = 1.0  # the longest wait without a look: timers other replicas stored
MIN_NAP_SECONDS = 0.01  # a due timer another replica holds locked is retried this often
ERROR_BACKOFF_SECONDS = 1.0
# Wake-ups naming these queues mean this replica made a timer step runnable. Not ANY_QUEUE:
# another replica's notice wakes everything here, and its timers are its own loop's (the
# MAX_NAP_SECONDS look covers a replica that died).
_TIMER_QUEUES = frozenset({TIMER_QUEUE, SIGNAL_QUEUE})


class TimerLoop:
    """One replica's timer loop (`start` / `stop`)."""

    def __init__(self, repo: WorkflowRepository, scheduler: Scheduler, wakeups: Wakeups) -> None:
        self._repo = repo
        self._scheduler = scheduler
        self._wakeups = wakeups
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="timer-loop")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    async def fire_due(self) -> float | None:
        """Fires every due timer (in batches); returns the seconds until the next one
        (None: no timer waits)."""
        while True:

            async def work(conn: DictConnection) -> tuple[list[str], Woken]:
                stopped: list[str] = []
                woke = await self._scheduler.fire_timers(conn, stopped)
                return stopped, woke

            stopped, woke = await self._repo.tx(work)
            self._wakeups.stopped(stopped)
            self._wakeups.work(*woke)
            until = await self._repo.seconds_to_next_timer()
            if until is None or until > 0:
                return until
            await asyncio.sleep(MIN_NAP_SECONDS)  # due but locked elsewhere, or a full batch

    async def _run(self) -> None:
        # Not traced, as the schedule ticker: its queries would each be a root span.
        with suppress_instrumentation():
            await self._loop()

    async def _loop(self) -> None:
        inbox = self._wakeups.subscribe()
        try:
            while True:
                try:
                    until = await self.fire_due()
                    nap = MAX_NAP_SECONDS if until is None else min(MAX_NAP_SECONDS, until)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.warning("firing timers failed; retrying", exc_info=True)
                    nap = ERROR_BACKOFF_SECONDS
                wake_at = time.monotonic() + max(MIN_NAP_SECONDS, nap)
                while (left := wake_at - time.monotonic()) > 0:
                    await wait_event(inbox.event, left)
                    inbox.event.clear()
                    inbox.stopped.clear()
                    inbox.work = False
                    nearer = not _TIMER_QUEUES.isdisjoint(inbox.queues)
                    inbox.queues.clear()
                    if nearer:  # a timer step became runnable here: it may be due sooner
                        break
        finally:
            self._wakeups.unsubscribe(inbox)
