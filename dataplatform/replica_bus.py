"""Wake-ups across dataplatform replicas, over Redis pub/sub.

A replica pushes what it commits to its own WaitForWork and WatchWorkflowEvents streams in
process. With several replicas behind one address, a worker or watcher attached to replica
B would otherwise learn of replica A's commits only by polling. So each replica also
publishes a short notice on one channel (under `redis.key_prefix`): work may be runnable,
these workflows stopped, these workflows have new events. Notices carry ids, never rows:
a receiver wakes its own streams, which read the database as they do after a gap, and it
checks stopped ids against the database before workers cancel anything, so a forged notice
costs reads, never work.

Notices are coalesced (one publish per burst of commits) and skipped while no other
replica is subscribed (a publish returns its receiver count; a replica says hello when it
subscribes). Pub/sub loses messages while a subscription is down, so after every
(re)subscription a replica wakes all its streams; polling stays the fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Protocol

from aiwfe.runtime.redis_client import RedisClient, Subscription

log = logging.getLogger("aiwfe.dataplatform.replicas")
CHANNEL = "dataplatform:workflow_wakeups"
MAX_IDS = 1000  # per notice; beyond it, receivers wake every watcher instead


class LocalWakeups(Protocol):
    """What a notice wakes on this replica (dataplatform.workflows.watches.Wakeups)."""

    def wake_work(self) -> None: ...
    def wake_stopped(self, workflow_ids: list[str]) -> None: ...
    def wake_watchers(self, workflow_ids: set[uuid.UUID] | None) -> None: ...


class ReplicaBus:
    def __init__(
        self,
        redis: RedisClient,
        local: LocalWakeups,
        stopped_among: Callable[[list[uuid.UUID]], Awaitable[list[str]]],
    ) -> None:
        self._redis = redis
        self._local = local
        self._stopped_among = stopped_among
        self.replica = uuid.uuid4().hex
        self._subscription = Subscription(
            redis, CHANNEL, self._receive, self._subscribed, "replica wake-up"
        )
        self._peers = 0  # other replicas subscribed, as of the last publish or hello
        self._work = False
        self._stopped: set[str] = set()
        self._events: set[str] = set()
        self._all_events = False
        self._kick = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []

    def start(self) -> None:
        if self._redis.configured:
            self._tasks = [
                asyncio.create_task(self._subscription.run()),
                asyncio.create_task(self._send_loop()),
            ]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    @property
    def active(self) -> bool:
        """Worth telling: subscribed, with at least one other replica listening."""
        return self._subscription.up and self._peers > 0

    # --- outgoing ---------------------------------------------------------------------------

    def work(self) -> None:
        if self.active:
            self._work = True
            self._kick.set()

    def stopped(self, workflow_ids: list[str]) -> None:
        if self.active and workflow_ids:
            self._stopped.update(workflow_ids)
            self._kick.set()

    def events(self, workflow_ids: Collection[uuid.UUID]) -> None:
        if self.active and workflow_ids:
            if len(self._events) + len(workflow_ids) > MAX_IDS:
                self._all_events = True
                self._events.clear()
            elif not self._all_events:
                self._events.update(str(w) for w in workflow_ids)
            self._kick.set()

    async def _send_loop(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            notice: dict[str, Any] = {"r": self.replica}
            if self._work:
                notice["w"] = 1
            if self._stopped:
                notice["s"] = sorted(self._stopped)[:MAX_IDS]
            if self._all_events:
                notice["e"] = "*"
            elif self._events:
                notice["e"] = sorted(self._events)
            self._work, self._all_events = False, False
            self._stopped.clear()
            self._events.clear()
            await self._publish(notice)

    async def _publish(self, notice: dict[str, Any]) -> None:
        receivers = await self._redis.publish(CHANNEL, json.dumps(notice))
        # The count includes this replica's own subscription while it is up.
        self._peers = max(0, receivers - (1 if self._subscription.up else 0))

    # --- incoming ---------------------------------------------------------------------------

    async def _subscribed(self) -> None:
        """Notices may have been lost while unsubscribed: every stream re-reads. The hello
        tells the others (and, by its receiver count, this replica) who is listening."""
        self._local.wake_work()
        self._local.wake_watchers(None)
        await self._publish({"r": self.replica, "hello": 1})

    def _receive(self, data: bytes) -> None:
        try:
            notice = json.loads(data)
            if notice.get("r") == self.replica:
                return
            self._peers = max(self._peers, 1)
            if notice.get("w"):
                self._local.wake_work()
            events = notice.get("e")
            if events == "*":
                self._local.wake_watchers(None)
            elif events:
                self._local.wake_watchers({uuid.UUID(str(w)) for w in events[:MAX_IDS]})
            stopped = notice.get("s")
            if stopped:
                ids = [uuid.UUID(str(w)) for w in stopped[:MAX_IDS]]
                self._tasks.append(asyncio.create_task(self._confirm_stopped(ids)))
        except (ValueError, TypeError, AttributeError):
            log.warning("ignored a malformed replica wake-up notice")

    async def _confirm_stopped(self, ids: list[uuid.UUID]) -> None:
        try:
            self._local.wake_stopped(await self._stopped_among(ids))
        except Exception as exc:  # workers still learn it from their lease extensions
            log.debug("could not confirm stopped workflows: %s", type(exc).__name__)
        finally:
            task = asyncio.current_task()
            if task in self._tasks:
                self._tasks.remove(task)
