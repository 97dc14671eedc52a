"""Retention: finished workflows are kept `taskproc.retention_seconds`, then deleted in
batches by a loop on every dataplatform replica.

Each batch is one DELETE of at most `retention_batch` workflows (their steps, attempts,
events and signals go with them by ON DELETE CASCADE), so no transaction holds locks for
long; replicas skip each other's rows (SKIP LOCKED), so several purge side by side without
waiting or deleting a row twice.
"""

from __future__ import annotations

import asyncio
import logging

from opentelemetry.instrumentation.utils import suppress_instrumentation

from aiwfe.runtime import metrics
from aiwfe.runtime.aio import cancel_and_wait
from aiwfe.runtime.config import TaskProcSettings
from dataplatform.workflows.repository import WorkflowRepository

log = logging.getLogger("aiwfe.dataplatform.retention")
_ERROR_BACKOFF = 5.0


class Retention:
    """The purge loop of one replica (started by the service, off when retention is 0)."""

    def __init__(self, repo: WorkflowRepository, limits: TaskProcSettings) -> None:
        self._repo = repo
        self._limits = limits
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._limits.retention_seconds > 0:
            self._task = asyncio.create_task(self._run(), name="workflow-retention")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    async def purge_once(self) -> int:
        """Deletes expired workflows batch after batch until a batch comes back short;
        returns how many were deleted."""
        total = 0
        while True:
            n = await self._repo.purge_finished(
                self._limits.retention_seconds, self._limits.retention_batch
            )
            total += n
            if n:
                metrics.workflow_purged.inc(n)
            if n < self._limits.retention_batch:
                return total
            await asyncio.sleep(0)  # other work runs between batches

    async def _run(self) -> None:
        # A polling loop is not traced (its statements would each be a root span).
        with suppress_instrumentation():
            while True:
                try:
                    purged = await self.purge_once()
                    if purged:
                        log.info("purged %d finished workflows past retention", purged)
                    sleep = self._limits.retention_interval
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.warning("purging finished workflows failed; retrying", exc_info=True)
                    sleep = max(_ERROR_BACKOFF, self._limits.retention_interval)
                await asyncio.sleep(sleep)
