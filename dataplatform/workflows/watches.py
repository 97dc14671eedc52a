"""Watches and wake-ups: who hears about committed events, runnable work and stopped
workflows, on this replica and (through `replica_bus`) on the others.

Events a transaction appends are collected per workflow (`collecting`) and pushed to this
replica's watchers once it commits; a watcher follows its workflow from pushed rows and
reads the database only when a push may be missing rows (another replica's commit, an
overflow, a poll without a push). A poll without a push first asks `SequenceProbe`, which
checks every watch whose poll is due in one query per `PROBE_WINDOW_SECONDS` (workflow id →
last sequence), so a thousand idle watches of different workflows cost a few small queries
a second, and only a watch whose workflow did change (a push that never came) reads events.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from operator import itemgetter
from typing import Any

from aiwfe.data.v1 import workflow_store_service_pb2 as pb
from aiwfe.runtime.aio import wait_event
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from dataplatform.replica_bus import ReplicaBus
from dataplatform.workflows import messages
from dataplatform.workflows.states import ACTIVE

MAX_STOPPED_PER_WAKE = 1000
ANY_QUEUE = "*"  # a wake-up for every task queue (WaitForWorkResponse.task_queues)
MAX_QUEUES_PER_WAKE = 100  # more distinct queues in one wake-up become ANY_QUEUE
EVENT_PAGE = 500
DEFAULT_POLL_SECONDS = 1.0
_RECENT_SECONDS = 5.0  # how long a new workflow's events wait for a watcher to adopt them
_RECENT_MAX = 10_000
# How long a due check waits for others to share its query, and how many ids one query has.
PROBE_WINDOW_SECONDS = 0.05
PROBE_MAX_IDS = 1000

# Events the current transaction appended, by workflow, pushed to watchers once it commits;
# None where nobody watched when they were appended (rows not fetched: watchers re-read).
Appended = dict[uuid.UUID, list[dict[str, Any]] | None]
_appended: ContextVar[Appended | None] = ContextVar("aiwfe_wf_touched", default=None)


@contextmanager
def collecting() -> Iterator[Appended]:
    """Collects the events appended inside (one transaction attempt) for `appended()`."""
    appended: Appended = {}
    token = _appended.set(appended)
    try:
        yield appended
    finally:
        _appended.reset(token)


def current_appended() -> Appended | None:
    """The collection of the transaction running now, if any."""
    return _appended.get()


class Wakeups:
    """Fan-out to WaitForWork and WatchWorkflowEvents streams: work may be runnable,
    workflows stopped, events committed. This replica's commits wake its own streams in
    process and are told to the other replicas through `peers` when there are any."""

    def __init__(self) -> None:
        self._subscribers: set[Subscriber] = set()
        self._watchers: dict[uuid.UUID, set[Watch]] = {}
        self.peers: ReplicaBus | None = None

    def watch(self, workflow_id: uuid.UUID) -> Watch:
        """Receives the events this process commits for `workflow_id` (`unwatch` after)."""
        watch = Watch()
        self._watchers.setdefault(workflow_id, set()).add(watch)
        return watch

    def unwatch(self, workflow_id: uuid.UUID, watch: Watch) -> None:
        watches = self._watchers.get(workflow_id)
        if watches is not None:
            watches.discard(watch)
            if not watches:
                del self._watchers[workflow_id]

    def watching(self, workflow_ids: set[uuid.UUID]) -> bool:
        return not self._watchers.keys().isdisjoint(workflow_ids)

    def subscribe(self) -> Subscriber:
        sub = Subscriber()
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)

    # --- this replica committed -----------------------------------------------------------

    def appended(self, events: Appended) -> None:
        if not events:
            return
        self.deliver(events)
        if self.peers is not None:
            self.peers.events(events.keys())

    def work(self, builtin: bool = True, queues: Iterable[str] = (ANY_QUEUE,)) -> None:
        """Work may be runnable: built-in steps, task steps of `queues`, or both. Other
        replicas hear only that there is work (they wake everything)."""
        queues = set(queues)
        if not builtin and not queues:
            return
        self.wake_work(builtin, queues)
        if self.peers is not None:
            self.peers.work()

    def stopped(self, workflow_ids: list[str]) -> None:
        self.wake_stopped(workflow_ids)
        if self.peers is not None:
            self.peers.stopped(workflow_ids)

    # --- this replica's streams only (also what another replica's notice wakes) ----------

    def wake_work(self, builtin: bool = True, queues: Iterable[str] = (ANY_QUEUE,)) -> None:
        queues = set(queues)
        if not builtin and not queues:
            return
        for sub in self._subscribers:
            sub.work = sub.work or builtin
            sub.queues |= queues
            if len(sub.queues) > MAX_QUEUES_PER_WAKE:
                sub.queues = {ANY_QUEUE}
            sub.event.set()

    def wake_stopped(self, workflow_ids: list[str]) -> None:
        if not workflow_ids:
            return
        for sub in self._subscribers:
            if len(sub.stopped) < MAX_STOPPED_PER_WAKE:
                sub.stopped.update(workflow_ids)
            sub.event.set()

    def deliver(self, events: Appended) -> None:
        """Committed rows (None: unknown, re-read) to this replica's watchers."""
        for wid, rows in events.items():
            for watch in self._watchers.get(wid, ()):
                watch.push(rows)

    def wake_watchers(self, workflow_ids: set[uuid.UUID] | None) -> None:
        """Watchers of these workflows (None: all) re-read from the database."""
        if workflow_ids is None:
            watches = [w for ws in self._watchers.values() for w in ws]
        else:
            watches = [w for wid in workflow_ids for w in self._watchers.get(wid, ())]
        for watch in watches:
            watch.push(None)


class Subscriber:
    """One WaitForWork stream's inbox (or the timer loop's)."""

    __slots__ = ("event", "queues", "stopped", "work")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.work = True  # a new subscriber looks for work at once: built-in steps
        self.queues = {ANY_QUEUE}  # and task steps of every queue
        self.stopped: set[str] = set()
        self.event.set()


class Watch:
    """One watcher's inbox: committed event rows pushed in process, and a wake-up."""

    __slots__ = ("event", "overflowed", "rows")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.rows: list[dict[str, Any]] = []
        self.overflowed = False

    def push(self, rows: list[dict[str, Any]] | None) -> None:
        if rows is None or len(self.rows) + len(rows) > EVENT_PAGE:
            self.rows.clear()  # unknown rows or a slow reader: re-read from the database
            self.overflowed = True
        elif not self.overflowed:
            self.rows.extend(rows)
        self.event.set()

    def reset(self) -> None:
        """Before a database read, which sees everything committed so far."""
        self.event.clear()
        self.rows.clear()
        self.overflowed = False

    def take(self, after: int) -> tuple[list[dict[str, Any]], bool]:
        """The pushed events that follow `after` without a gap, and whether any are missing
        (another replica's commit in between, or an overflow): then the caller re-reads."""
        self.event.clear()
        rows = sorted((r for r in self.rows if r["sequence"] > after), key=itemgetter("sequence"))
        self.rows.clear()
        run: list[dict[str, Any]] = []
        for row in rows:
            if row["sequence"] != after + len(run) + 1:
                break
            run.append(row)
        return run, self.overflowed or len(run) < len(rows)


class RecentWatches:
    """Watches CreateWorkflow leaves on new workflows for a few seconds, so the
    WatchWorkflowEvents that usually follows adopts their events with no read."""

    def __init__(self, wakeups: Wakeups) -> None:
        self._wakeups = wakeups
        # (expiry, owner, watch) by workflow, oldest first.
        self._recent: dict[uuid.UUID, tuple[float, str, Watch]] = {}

    def remember(self, wid: uuid.UUID, owner: str) -> None:
        now = time.monotonic()
        while self._recent:  # oldest first: they expire in insertion order
            oldest, (expires, _, _) = next(iter(self._recent.items()))
            if expires > now and len(self._recent) < _RECENT_MAX:
                break
            self.forget(oldest)
        self._recent[wid] = (now + _RECENT_SECONDS, owner, self._wakeups.watch(wid))

    def forget(self, wid: uuid.UUID) -> None:
        entry = self._recent.pop(wid, None)
        if entry is not None:
            self._wakeups.unwatch(wid, entry[2])

    def adopt(self, wid: uuid.UUID, scope: pb.WorkflowScope, after: int) -> Watch | None:
        """The watch left for `wid`, if this caller may see the workflow and follows it
        from the start (it holds every event this replica committed since)."""
        entry = self._recent.get(wid)
        if entry is None or after != 0 or not (scope.all_owners or scope.owner_id == entry[1]):
            return None
        del self._recent[wid]
        return entry[2]


# Reads (workflow row, events after `after`) from the database, at most one page.
ReadEvents = Callable[[int], Awaitable[tuple[dict[str, Any], list[dict[str, Any]]]]]
# Whether the database may hold events after `after` that were never pushed.
Probe = Callable[[int], Awaitable[bool]]
# (last sequence, state) by workflow id, of those that exist.
LastSequences = Callable[[list[uuid.UUID]], Awaitable[dict[uuid.UUID, tuple[int, str]]]]


class SequenceProbe:
    """The watches' safety-net checks, batched: a watch whose poll interval passed without
    a push asks `changed(wid, after)`; the checks arriving within `window` seconds share
    one query (at most `max_ids` workflows; one query at a time), so their cost does not
    grow with the number of watches the way one events read per watch and interval did."""

    def __init__(
        self,
        lookup: LastSequences,
        window: float = PROBE_WINDOW_SECONDS,
        max_ids: int = PROBE_MAX_IDS,
    ) -> None:
        self._lookup = lookup
        self._window = window
        self._max_ids = max_ids
        self._pending: dict[uuid.UUID, list[asyncio.Future[tuple[int, str] | None]]] = {}
        self._task: asyncio.Task[None] | None = None
        self.queries = 0  # how many lookups ran (tests, metrics)

    async def changed(self, wid: uuid.UUID, after: int) -> bool:
        """Whether `wid` may have events after `after` (or is gone, or stopped): then its
        watch reads them (and the read decides visibility, NOT_FOUND and the end)."""
        future: asyncio.Future[tuple[int, str] | None] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(wid, []).append(future)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="watch-probe")
        found = await future
        return found is None or found[0] > after or found[1] not in ACTIVE

    async def _run(self) -> None:
        while self._pending:
            await asyncio.sleep(self._window)
            batch = dict(list(self._pending.items())[: self._max_ids])
            for wid in batch:
                del self._pending[wid]
            found: dict[uuid.UUID, tuple[int, str]] = {}
            try:
                self.queries += 1
                found = await self._lookup(list(batch))
            except Exception:  # each watch reads, and that read reports the failure
                found = {}
            finally:  # a missing id (or a failed query) means: read
                for wid, futures in batch.items():
                    for future in futures:
                        if not future.done():
                            future.set_result(found.get(wid))


async def follow(
    read: ReadEvents,
    after: int,
    poll_seconds: float,
    watch: Watch,
    need_read: bool = True,
    probe: Probe | None = None,
) -> AsyncIterator[list[wf_pb.WatchWorkflowResponse]]:
    """Batches of events after `after` until the workflow is terminal. Commits pushed
    to `watch` need no read; a gap in their sequences (another replica's commit) or an
    overflow makes it read from the database, and so does `poll_seconds` without a push
    when `probe` finds events it was never pushed (without a probe: always)."""
    poll = poll_seconds or DEFAULT_POLL_SECONDS
    while True:
        if need_read:
            watch.reset()
            row, events = await read(after)
            last = events[-1]["sequence"] if events else after
            finished = row["state"] not in ACTIVE and last >= row["last_sequence"]
            need_read = len(events) == EVENT_PAGE  # more are waiting
        else:
            events, need_read = watch.take(after)
            # A terminal event is its workflow's last: every transition after it would
            # need an active workflow.
            finished = bool(events) and events[-1]["workflow_state"] not in ACTIVE
        if events:
            after = events[-1]["sequence"]
            yield [messages.event(e) for e in events]
        if finished:
            return
        if need_read:
            continue
        if not await wait_event(watch.event, poll):
            # A push arriving while the probe runs stays in `watch` for the next round.
            need_read = probe is None or await probe(after)
