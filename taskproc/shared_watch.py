"""One dataplatform watch per workflow and scope in this replica, shared by all its watchers;
the watches of different workflows multiplexed on one stream.

A thousand users following the same long workflow cost dataplatform one watch (one
database read per poll interval instead of a thousand) and taskproc one list of events.
The shared watch reads the workflow's events from the first one, so a watcher joining
later with any `after_sequence` is served from that list and then live; it ends when the
workflow is terminal and every event was read, or when its last watcher leaves. Its
failure (NOT_FOUND, UNAVAILABLE, ...) is every watcher's, and the next watcher opens a
fresh one. Sharing is per scope (owner, or all owners for the admin role), so visibility
is decided by dataplatform exactly as for a watch of one's own.

Watches of *different* workflows share one `WatchWorkflowEventsMany` call (`_Mux`), each
under a watch_id of its own, instead of a `WatchWorkflowEvents` call each (a grpc.aio call
costs ≈ 25-33 KB on each side). A watch's end (OK, or its own status with its details) is
that watch's alone; the call's failure (dataplatform restarted) is every watch's on it, as
UNAVAILABLE attributed to dataplatform, and the next watcher opens a new call. A call
carries at most `taskproc.watches_per_stream` watches; past it another is opened. A
dataplatform without the method (UNIMPLEMENTED: an older replica during a rolling upgrade)
is watched with one `WatchWorkflowEvents` stream per workflow from then on.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import AsyncGenerator, AsyncIterator

import grpc
from google.rpc import status_pb2

from aiwfe.data.v1 import workflow_store_service_pb2 as store_pb
from aiwfe.runtime.channels import MANY_RUNS_HEADER
from aiwfe.runtime.errors import attribute, rpc_error_of
from aiwfe.taskproc.v1 import workflow_service_pb2 as pb
from taskproc.streams import RENEW_SECONDS, StreamPool, WatchSlots

_Key = tuple[str, str, bool]  # workflow id, owner id, all owners
_METHOD = "WatchWorkflowEventsMany"
# The call ended while watches were open on it (dataplatform should only end it with them).
_ENDED = status_pb2.Status(
    code=grpc.StatusCode.UNAVAILABLE.value[0], message=f"{_METHOD} ended with watches open"
)


class _Shared:
    """One upstream watch and the events it brought, for any number of readers."""

    __slots__ = (
        "changed", "error", "events", "finished", "key", "mux", "readers", "stored", "task",
        "watch_id",
    )  # fmt: skip

    def __init__(self, key: _Key) -> None:
        self.key = key
        self.events: list[pb.WatchWorkflowResponse] = []
        self.changed = asyncio.Event()  # replaced each time something arrives
        self.finished = False
        self.error: BaseException | None = None
        self.readers = 0
        self.task: asyncio.Task[None] | None = None  # its own stream (the fallback)
        self.mux: _Mux | None = None  # the multiplexed call carrying it, while it does
        self.watch_id = 0  # its id on `mux`
        self.stored: store_pb.CreateWorkflowResponse | None = None  # a run's, once stored

    @property
    def open(self) -> bool:
        return self.mux is not None or (self.task is not None and not self.task.done())

    def _notify(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    def end(self, error: BaseException | None) -> None:
        if error is None:
            self.finished = True
        else:
            self.error = error
        self._notify()

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


class _Mux:
    """One WatchWorkflowEventsMany call: its watches (and runs) by watch_id, the requests
    to send."""

    __slots__ = ("ended", "opened", "requests", "retired", "takes_runs", "task", "watches")

    def __init__(self) -> None:
        self.watches: dict[int, _Shared] = {}
        # None ends the requests (the call ends once its last watch has).
        self.requests: asyncio.Queue[store_pb.WatchWorkflowEventsManyRequest | None] = (
            asyncio.Queue()
        )
        self.ended = False  # the call failed or ended: no watch is added
        self.opened = time.monotonic()
        self.retired = False  # too old for new watches: it ends with its last one
        self.task: asyncio.Task[None] | None = None
        # Set once dataplatform answered the call: whether it takes runs (its header).
        self.takes_runs: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def answered(self, headers: grpc.aio.Metadata | None) -> None:
        if not self.takes_runs.done():
            self.takes_runs.set_result(headers is not None and headers.get(MANY_RUNS_HEADER) == "1")

    async def sending(self) -> AsyncIterator[store_pb.WatchWorkflowEventsManyRequest]:
        while (request := await self.requests.get()) is not None:
            yield request


class SharedWatches:
    """This replica's shared watches, by workflow and scope."""

    def __init__(self, streams: StreamPool, watches_per_stream: int = 10_000) -> None:
        self._streams = streams
        self._shared: dict[_Key, _Shared] = {}
        self._per_mux = watches_per_stream
        self._muxes: list[_Mux] = []
        self._next_id = 0
        self._own_streams = False  # dataplatform lacks WatchWorkflowEventsMany

    @property
    def upstreams(self) -> int:
        """Shared watches open to dataplatform."""
        return sum(1 for s in self._shared.values() if s.open)

    @property
    def calls(self) -> int:
        """WatchWorkflowEventsMany calls open to dataplatform."""
        return sum(1 for mux in self._muxes if not mux.ended)

    def _open(self, key: _Key) -> _Shared:
        shared = self._shared.get(key)
        if shared is None or shared.error is not None:
            shared = _Shared(key)
            self._shared[key] = shared
            if self._own_streams:
                self._stream(shared)
            else:
                self._multiplex(shared)
        return shared

    def _request(self, key: _Key) -> store_pb.WatchWorkflowEventsRequest:
        return store_pb.WatchWorkflowEventsRequest(
            workflow_id=key[0],
            scope=store_pb.WorkflowScope(owner_id=key[1], all_owners=key[2]),
            poll_interval_seconds=self._streams.poll_interval(),
        )

    def _stream(self, shared: _Shared) -> None:
        """`shared` on a WatchWorkflowEvents stream of its own."""
        upstream = self._streams.stream(
            "WatchWorkflowEvents",
            self._request(shared.key),
            bounded=False,  # it outlives the watcher that opened it
        )
        shared.task = asyncio.create_task(shared.follow(upstream), name=f"watch-{shared.key[0]}")

    def _mux(self) -> _Mux:
        """A multiplexed call with room that is not due for renewal (a new call if none)."""
        for mux in list(self._muxes):
            if self._due(mux):
                self._retire(mux)
            elif not mux.ended and len(mux.watches) < self._per_mux:
                return mux
        mux = _Mux()
        self._muxes.append(mux)
        # In a context of its own: the call outlives the watcher that opened it.
        mux.task = asyncio.create_task(
            self._read(mux), name="watch-many", context=contextvars.Context()
        )
        return mux

    @staticmethod
    def _due(mux: _Mux) -> bool:
        return time.monotonic() - mux.opened > RENEW_SECONDS

    def _retire(self, mux: _Mux) -> None:
        """No new watch goes on `mux`: it was opened with an identity assertion that is no
        longer fresh (new runs write on the caller's behalf). Its open watches go on; the
        call ends cleanly (dataplatform answers OK) once the last has ended."""
        mux.retired = True
        if mux in self._muxes:
            self._muxes.remove(mux)
        if not mux.watches and not mux.ended:
            mux.ended = True
            mux.requests.put_nowait(None)

    def _end_if_idle(self, mux: _Mux) -> None:
        """A call whose last watch left ends if it is retired or due for renewal."""
        if not mux.watches and (mux.retired or self._due(mux)):
            self._retire(mux)

    def _attach(self, mux: _Mux, shared: _Shared) -> int:
        """`shared` on `mux` under a new watch_id (its request is the caller's to send)."""
        self._next_id += 1
        watch_id = self._next_id
        mux.watches[watch_id] = shared
        shared.mux = mux
        shared.watch_id = watch_id
        self._streams.multiplexed += 1
        return watch_id

    def _multiplex(self, shared: _Shared) -> None:
        """`shared` as a watch of a multiplexed call with room."""
        mux = self._mux()
        watch_id = self._attach(mux, shared)
        mux.requests.put_nowait(
            store_pb.WatchWorkflowEventsManyRequest(
                watch=store_pb.WorkflowWatch(watch_id=watch_id, request=self._request(shared.key))
            )
        )

    def _detach(self, mux: _Mux, watch_id: int) -> _Shared | None:
        shared = mux.watches.pop(watch_id, None)
        if shared is not None:
            shared.mux = None
            self._streams.multiplexed -= 1
        return shared

    async def _read(self, mux: _Mux) -> None:
        """Routes the call's responses to their watches until it ends; then every watch
        still on it fails with the call's error (or moves to a stream of its own when
        dataplatform lacks the method)."""
        error: BaseException = self._error(_ENDED)  # also for a failure of our own
        try:
            async for reply in self._streams.bidi(_METHOD, mux.sending(), mux.answered):
                if reply.HasField("events"):
                    shared = mux.watches.get(reply.watch_id)
                    if shared is not None:  # else cancelled meanwhile
                        shared.events.extend(reply.events.events)
                        shared._notify()
                elif reply.HasField("stored"):
                    shared = mux.watches.get(reply.watch_id)
                    if shared is not None:
                        shared.stored = reply.stored
                        shared.events.extend(reply.run_events.events)  # its first ones
                        shared._notify()
                elif (shared := self._detach(mux, reply.watch_id)) is not None:
                    shared.events.extend(reply.run_events.events)  # a run's last ones
                    shared.end(self._error(reply.end) if reply.end.code else None)
                    self._end_if_idle(mux)
        except grpc.aio.AioRpcError as exc:  # attributed to dataplatform by `bidi`
            error = exc
            if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                self._own_streams = True
        finally:
            mux.ended = True
            mux.answered(None)  # never answered: no run waits for it
            if mux in self._muxes:
                self._muxes.remove(mux)
            for watch_id in list(mux.watches):
                shared = self._detach(mux, watch_id)
                if shared is None:
                    continue
                if self._own_streams and self._shared.get(shared.key) is shared:
                    self._stream(shared)  # nothing was read yet: it starts from the first
                else:
                    shared.end(error)

    def _error(self, status: status_pb2.Status) -> grpc.aio.AioRpcError:
        """What a stream of the watch's own would have raised on ending with `status`."""
        return attribute(rpc_error_of(status), self._streams.store_name)

    async def events(
        self, workflow_id: str, scope: store_pb.WorkflowScope, after: int, slots: WatchSlots
    ) -> AsyncGenerator[pb.WatchWorkflowResponse, None]:
        """The workflow's events after `after` until it is terminal and all are sent,
        holding one of `slots` meanwhile. Each open watch keeps this frame alone: no
        locals beyond what it reads with (thousands of them stay open)."""
        with slots:
            shared = self._open((workflow_id, scope.owner_id, scope.all_owners))
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

    async def run(
        self, request: store_pb.RunStoredWorkflowRequest
    ) -> AsyncIterator[store_pb.RunStoredWorkflowResponse]:
        """RunStoredWorkflow's messages for `request` (the caller holds a slot): a run on a
        multiplexed call when dataplatform takes runs there, else a call of its own."""
        run = _Shared(("", request.create.owner.user_id, False))  # its reader's alone
        while not self._own_streams:
            mux = self._mux()
            if not await mux.takes_runs:
                break
            if mux.ended or mux.retired or len(mux.watches) >= self._per_mux:
                continue  # filled, or retired, while dataplatform answered
            watch_id = self._attach(mux, run)
            mux.requests.put_nowait(
                store_pb.WatchWorkflowEventsManyRequest(
                    run=store_pb.WorkflowRun(watch_id=watch_id, request=request)
                )
            )
            break
        if run.mux is None:
            async for update in self._streams.stream("RunStoredWorkflow", request):
                yield update
            return
        stored = False
        try:
            while True:
                changed = run.changed
                if not stored and run.stored is not None:
                    stored = True
                    yield store_pb.RunStoredWorkflowResponse(stored=run.stored)
                if run.events:
                    batch, run.events = run.events, []
                    yield store_pb.RunStoredWorkflowResponse(
                        events=store_pb.WatchWorkflowEventsResponse(events=batch)
                    )
                    continue
                if run.error is not None:
                    raise run.error
                if run.finished:
                    return
                await changed.wait()
        finally:
            self._close(run)

    def _close(self, shared: _Shared) -> None:
        """Its last watcher left: forget it and end its upstream watch."""
        if self._shared.get(shared.key) is shared:
            del self._shared[shared.key]
        mux = shared.mux
        if mux is not None:
            self._detach(mux, shared.watch_id)
            mux.requests.put_nowait(store_pb.WatchWorkflowEventsManyRequest(cancel=shared.watch_id))
            self._end_if_idle(mux)
        if shared.task is not None:
            shared.task.cancel()  # its stream's own clean-up ends the upstream call
