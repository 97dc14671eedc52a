"""One dataplatform watch per workflow and scope in this replica, shared by all its watchers.

A thousand users following the same long workflow cost dataplatform one stream (one
database read per poll interval instead of a thousand) and taskproc one list of events.
The shared stream reads the workflow's events from the first one, so a watcher joining
later with any `after_sequence` is served from that list and then live; it ends when the
workflow is terminal and every event was read, or when its last watcher leaves. Its
failure (NOT_FOUND, UNAVAILABLE, ...) is every watcher's, and the next watcher opens a
fresh one. Sharing is per scope (owner, or all owners for the admin role), so visibility
is decided by dataplatform exactly as for a watch of one's own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiwfe.data.v1 import workflow_store_service_pb2 as store_pb
from aiwfe.taskproc.v1 import workflow_service_pb2 as pb
from taskproc.streams import StreamPool, WatchSlots

_Key = tuple[str, str, bool]  # workflow id, owner id, all owners


class _Shared:
    """One upstream stream and the events it brought, for any number of readers."""

    def __init__(self, key: _Key) -> None:
        self.key = key
        self.events: list[pb.WatchWorkflowResponse] = []
        self.changed = asyncio.Event()  # replaced each time something arrives
        self.finished = False
        self.error: BaseException | None = None
        self.readers = 0
        self.task: asyncio.Task[None] | None = None

    def _notify(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    async def follow(self, upstream: AsyncIterator[store_pb.WatchWorkflowEventsResponse]) -> None:
        try:
            async for batch in upstream:
                self.events.extend(batch.events)
                self._notify()
            self.finished = True
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every reader raises it
            self.error = exc
        finally:
            self._notify()


class SharedWatches:
    """This replica's shared watches, by workflow and scope."""

    def __init__(self, streams: StreamPool) -> None:
        self._streams = streams
        self._shared: dict[_Key, _Shared] = {}

    @property
    def upstreams(self) -> int:
        """Shared streams open to dataplatform."""
        return sum(1 for s in self._shared.values() if s.task and not s.task.done())

    def _open(self, key: _Key, scope: store_pb.WorkflowScope) -> _Shared:
        shared = self._shared.get(key)
        if shared is None or shared.error is not None:
            shared = _Shared(key)
            self._shared[key] = shared
            upstream = self._streams.stream(
                "WatchWorkflowEvents",
                store_pb.WatchWorkflowEventsRequest(
                    workflow_id=key[0],
                    scope=scope,
                    poll_interval_seconds=self._streams.poll_interval(),
                ),
                bounded=False,  # it outlives the watcher that opened it
            )
            shared.task = asyncio.create_task(shared.follow(upstream), name=f"watch-{key[0]}")
        return shared

    async def events(
        self, workflow_id: str, scope: store_pb.WorkflowScope, after: int, slots: WatchSlots
    ) -> AsyncIterator[pb.WatchWorkflowResponse]:
        """The workflow's events after `after` until it is terminal and all are sent,
        holding one of `slots` meanwhile. Each open watch keeps this frame alone: no
        locals beyond what it reads with (thousands of them stay open)."""
        with slots:
            shared = self._open((workflow_id, scope.owner_id, scope.all_owners), scope)
            del workflow_id, scope
            shared.readers += 1
            sent = 0  # index into shared.events
            try:
                while True:
                    changed = shared.changed
                    while sent < len(shared.events):
                        event = shared.events[sent]
                        sent += 1
                        if event.sequence > after:
                            yield event
                    if shared.error is not None:
                        raise shared.error
                    if shared.finished:
                        return
                    await changed.wait()
            finally:
                shared.readers -= 1
                if shared.readers == 0:
                    self._close(shared)

    def _close(self, shared: _Shared) -> None:
        """Its last watcher left: forget it and end its upstream stream."""
        if self._shared.get(shared.key) is shared:
            del self._shared[shared.key]
        if shared.task is not None:
            shared.task.cancel()  # its stream's own clean-up ends the upstream call
