"""External workers: your own functions as workflow steps (`op: "task"`), served over the
gateway's `aiwfe.taskproc.v1.WorkerService`.

    from aiwfe.sdk import Worker, task

    @task("summarize")
    async def summarize(text: str, max_words: int = 50) -> dict:
        return {"summary": " ".join(text.split()[:max_words])}

    Worker("127.0.0.1:50051", api_key, queues=["default"], tasks=[summarize]).run()

How a task's input reaches the function and its result comes back:
- a JSON object as input binds to keyword parameters (defaults apply; `**kwargs` takes the
  rest); any other JSON value (string, number, list, bool, null) binds to the single
  positional parameter. Whole JSON numbers arrive as `int`. Input that cannot be bound
  fails the task at once, not retryable, saying why.
- a returned dict is the step's output; any other value `v` becomes `{"result": v}`.
- an exception fails the attempt, retried by the step's retry policy, unless it is a
  `NonRetryableError` (the workflow fails at once).
- `async def` functions run on the worker's event loop, plain ones in a thread pool of
  `concurrency` threads. `current_task()` gives either kind the task's details, its
  `cancelled` flag and `heartbeat(details)`.

The worker heartbeats every running task at a third of its heartbeat timeout. When the
answer says the workflow was cancelled (or timed out), an async function is cancelled
(`asyncio.CancelledError` at its next await); a sync one sees `current_task().cancelled`
turn true and `raise_if_cancelled()` raise `TaskCancelled`. When the gateway says the
token is stale (FAILED_PRECONDITION: the lease expired and the task went to another
worker), the task is dropped without an answer.

It polls only while a slot is free (at most `concurrency` tasks at once, with up to
`pollers` long-polls open), reconnects with exponential backoff (capped at 5 s) while the
gateway is unavailable, and on `stop()` (SIGTERM/SIGINT under `run()`) stops polling, lets
running tasks finish for `shutdown_grace` seconds, then cancels the rest and fails them
as retryable ("worker shutting down") so they are dispatched again at once. Its waiting
polls are not cancelled: ShutdownWorker has the server answer them, so a task handed to
one as the worker stops is run rather than lost in a cancelled call until its lease
lapses (a server without ShutdownWorker gets them cancelled).

With the OpenTelemetry API importable (it is optional), each task runs in a span that is
a child of the step's `traceparent`, so one trace covers submit, step and worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import logging
import os
import queue
import random
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from aiwfe.sdk.channel import channel_credentials, channel_options
from aiwfe.sdk.tasks import (
    CURRENT_TASK,
    InputBindingError,
    NonRetryableError,
    TaskCancelled,
    TaskDefinition,
    TaskInfo,
    current_task,
    definition,
    details_struct,
    from_value,
    output_struct,
    task,
    tasks_in_module,
)
from aiwfe.taskproc.v1 import worker_service_pb2 as pb
from aiwfe.taskproc.v1 import worker_service_pb2_grpc as pb_grpc

log = logging.getLogger("aiwfe.sdk.worker")

__all__ = [
    "InputBindingError",
    "NonRetryableError",
    "TaskCancelled",
    "TaskDefinition",
    "TaskInfo",
    "Worker",
    "WorkerError",
    "current_task",
    "definition",
    "from_value",
    "heartbeat_interval",
    "output_struct",
    "task",
    "tasks_in_module",
]

# Reconnection backoff while the gateway is unavailable: 0.1 s doubling to 5 s, jittered.
BACKOFF_INITIAL = 0.1
BACKOFF_MAX = 5.0
# The contract's bounds: 64 types per poll; queue and type names.
MAX_POLL_TYPES = 64
NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
# A heartbeat asked for by heartbeat(details) goes out at most this often.
MIN_HEARTBEAT_INTERVAL = 0.5
# Codes worth retrying a token call on while its token may still be good: the gateway is
# down or slow, or it shed the call (after its `retry-after` delay).
RETRY_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# Codes that will not heal by retrying the same call: stop the worker, saying why.
FATAL_POLL_CODES = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNIMPLEMENTED,
}


class WorkerError(Exception):
    """The worker cannot go on (refused credentials or permission, invalid queue names)."""


# --- a pool of daemon threads for sync functions -----------------------------------------


_Work = queue.SimpleQueue[tuple[concurrent.futures.Future[Any], Callable[[], Any]] | None]


class _ThreadPool:
    """Runs sync task functions. Daemon threads, unlike ThreadPoolExecutor's: a sync
    function that ignores cancellation must not keep the process alive after shutdown
    handed its task back."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._fresh()

    def _fresh(self) -> None:
        self._work: _Work = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting for work (never more than len(_threads))

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            work = self._work
            if self._idle == 0 and len(self._threads) < self._size:
                t = threading.Thread(target=self._run, args=(work,), name="aiwfe-task",
                                     daemon=True)  # fmt: skip
                self._threads.append(t)
                t.start()
            else:  # a waiting thread takes it, or the next one to finish (all busy)
                self._idle = max(0, self._idle - 1)
        work.put((future, fn))
        return future

    def _run(self, work: _Work) -> None:
        while True:
            item = work.get()
            if item is None:
                return
            future, fn = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)
            with self._lock:
                if work is self._work:
                    self._idle += 1

    def shutdown(self) -> None:
        """Ends the threads (busy ones after their function); a later submit starts anew."""
        with self._lock:
            old, count = self._work, len(self._threads)
            self._fresh()
        for _ in range(count):
            old.put(None)


# --- the worker ----------------------------------------------------------------------------


def backoff_delays(initial: float = BACKOFF_INITIAL, cap: float = BACKOFF_MAX) -> Iterator[float]:
    """Exponential backoff with full jitter in its upper half: ~0.1, 0.2, 0.4 ... 5 s."""
    delay = initial
    while True:
        yield delay * (0.5 + random.random() / 2)
        delay = min(cap, delay * 2)


SHUTTING_DOWN = "worker shutting down"


@dataclass
class _Running:
    info: TaskInfo
    call: asyncio.Future[Any]
    is_async: bool
    wake: asyncio.Future[None]  # done when the call ended or the task was cancelled
    reported: bool = False

    def wake_up(self, _: object = None) -> None:
        if not self.wake.done():
            self.wake.set_result(None)


class _Heartbeats:
    """Heartbeats of one task on timers, not a task per running task: a task that ends
    before its first heartbeat is due costs one timer. `request()` (heartbeat(details))
    brings the next one forward, at most one per MIN_HEARTBEAT_INTERVAL."""

    def __init__(self, send: Callable[[], Coroutine[Any, Any, bool]], interval: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._send = send  # one heartbeat; False: stop (cancelled or lost)
        self._interval = interval
        self._last = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None
        self._sending: asyncio.Task[bool] | None = None
        self._stopped = False
        self._schedule(interval)

    def _schedule(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(delay, self._fire)

    def request(self) -> None:
        if self._stopped or self._sending is not None:
            return
        self._schedule(max(0.0, self._last + min(MIN_HEARTBEAT_INTERVAL, self._interval)
                           - time.monotonic()))  # fmt: skip

    def _fire(self) -> None:
        self._timer = None
        if self._stopped:
            return
        self._last = time.monotonic()
        self._sending = self._loop.create_task(self._send())
        self._sending.add_done_callback(self._sent)

    def _sent(self, sending: asyncio.Task[bool]) -> None:
        self._sending = None
        go_on = not sending.cancelled() and sending.exception() is None and sending.result()
        if go_on and not self._stopped:
            self._schedule(max(0.0, self._last + self._interval - time.monotonic()))

    def stop(self) -> None:
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
        if self._sending is not None:
            self._sending.cancel()


class Worker:
    """Serves task functions from the gateway's WorkerService queues.

    Args:
        gateway: host:port of the gateway.
        api_key: sent as `authorization: Bearer <api_key>` on every call (an API key of a
            service account, or an access token); empty for none.
        queues: queues to poll (1-16).
        tasks: functions (decorated with @task or not) or TaskDefinitions.
        concurrency: tasks run at once; the worker polls only while a slot is free.
        pollers: long-polls open at once (default min(4, concurrency)).
        poll_wait: seconds one PollTask waits for a task (the contract allows up to 60).
        shutdown_grace: seconds running tasks get to finish after stop().
        identity: worker_identity sent with each poll (default host:pid).
        tls, ca_file, cert_file, key_file: TLS as for the client (aiwfe.sdk.channel).
        call_timeout: deadline of heartbeat, complete and fail calls.
        tracer_provider: an OpenTelemetry TracerProvider for the task spans (default: the
            global one, when the OpenTelemetry API is installed).
    """

    def __init__(
        self,
        gateway: str,
        api_key: str | None,
        *,
        queues: Iterable[str] = ("default",),
        tasks: Iterable[Callable[..., Any] | TaskDefinition],
        concurrency: int = 16,
        pollers: int | None = None,
        poll_wait: float = 30.0,
        shutdown_grace: float = 10.0,
        identity: str | None = None,
        tls: bool = False,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        call_timeout: float = 10.0,
        tracer_provider: Any = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        self.gateway = gateway
        self.queues = list(queues)
        if not self.queues:
            raise ValueError("queues: name at least one queue")
        for q in self.queues:
            if not NAME.fullmatch(q):
                raise ValueError(f"queue {q!r}: 1-64 characters of A-Z a-z 0-9 . _ -")
        self.tasks: dict[str, TaskDefinition] = {}
        for t in tasks:
            spec = t if isinstance(t, TaskDefinition) else definition(t)
            if not NAME.fullmatch(spec.name):
                raise ValueError(f"task {spec.name!r}: 1-64 characters of A-Z a-z 0-9 . _ -")
            if spec.name in self.tasks:
                raise ValueError(f"two functions serve task {spec.name!r}")
            self.tasks[spec.name] = spec
        if not self.tasks:
            raise ValueError("tasks: give at least one function")
        self.concurrency = concurrency
        self.pollers = max(1, min(pollers or 4, concurrency))
        self.poll_wait = poll_wait
        self.shutdown_grace = shutdown_grace
        self.identity = identity or f"{socket.gethostname()}:{os.getpid()}"
        self.call_timeout = call_timeout
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._tls = (tls or bool(ca_file or cert_file), ca_file, cert_file, key_file)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._stop_requested = False
        self._running: dict[str, _Running] = {}
        self._session = ""  # poll_session of this run's polls (ShutdownWorker ends them)
        self._in_poll: set[asyncio.Task[Any]] = set()  # pollers with a PollTask out
        self._executions: set[asyncio.Task[None]] = set()
        self._fatal: WorkerError | None = None
        self._pool = _ThreadPool(concurrency)
        self._tracer = _tracer(tracer_provider)

    # --- lifecycle ---------------------------------------------------------------------

    def run(self, install_signal_handlers: bool = True) -> None:
        """Serves until stop(), SIGTERM or SIGINT; raises WorkerError when it cannot go
        on (credentials or permission refused)."""
        asyncio.run(self.run_async(install_signal_handlers))

    async def run_async(self, install_signal_handlers: bool = False) -> None:
        """Serves on the running event loop until stop() (or a signal, when
        `install_signal_handlers`), then shuts down gracefully."""
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        if self._stop_requested:
            self._stopping.set()
        handled = []
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    self._loop.add_signal_handler(sig, self.stop)
                    handled.append(sig)
        slots = asyncio.Semaphore(self.concurrency)
        self._session = uuid.uuid4().hex
        async with self._channel() as channel:
            self._stub = pb_grpc.WorkerServiceStub(channel)
            log.info(
                "worker %s serving %s on %s (concurrency %d)",
                self.identity, ", ".join(self.tasks), ", ".join(self.queues), self.concurrency,
            )  # fmt: skip
            pollers = [asyncio.create_task(self._poll_loop(slots)) for _ in range(self.pollers)]
            try:
                await self._stopping.wait()
            finally:
                await self._end_polls(pollers)
                await self._drain()
                self._pool.shutdown()
                for sig in handled:
                    self._loop.remove_signal_handler(sig)
        self._stop_requested = False  # run_async may serve again
        fatal, self._fatal = self._fatal, None
        if fatal is not None:
            raise fatal

    def stop(self) -> None:
        """Begins a graceful shutdown (from any thread, or a signal handler)."""
        self._stop_requested = True
        loop, stopping = self._loop, self._stopping
        if loop is None or stopping is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            stopping.set()
        else:
            loop.call_soon_threadsafe(stopping.set)

    @property
    def in_flight(self) -> int:
        """Tasks running now."""
        return len(self._running)

    def _channel(self) -> grpc.aio.Channel:
        tls, ca_file, cert_file, key_file = self._tls
        options = channel_options()
        if tls:
            creds = channel_credentials(ca_file, cert_file, key_file)
            return grpc.aio.secure_channel(self.gateway, creds, options=options)
        return grpc.aio.insecure_channel(self.gateway, options=options)

    async def _drain(self) -> None:
        """Lets running tasks finish for shutdown_grace, then hands the rest back."""
        if not self._executions:
            return
        log.info("worker stopping: %d tasks running, %gs grace", len(self._executions),
                 self.shutdown_grace)  # fmt: skip
        _, pending = await asyncio.wait(set(self._executions), timeout=self.shutdown_grace)
        if pending:
            left = list(self._running.values())
            for running in left:
                self._cancel(running, SHUTTING_DOWN)
            await asyncio.gather(
                *(self._give_back(r) for r in left if not r.reported), return_exceptions=True
            )
            # Answers already on their way finish; sync functions are not waited for.
            if self._executions:
                await asyncio.wait(set(self._executions), timeout=self.call_timeout)

    async def _give_back(self, running: _Running) -> None:
        running.reported = True
        await self._fail(running.info, SHUTTING_DOWN, retryable=True)

    # --- polling -------------------------------------------------------------------------

    async def _end_polls(self, pollers: list[asyncio.Task[None]]) -> None:
        """Stops the pollers without cancelling a PollTask in flight: the server answers
        this run's polls (ShutdownWorker), and a task one of them brings runs in the
        drain. Cancelled instead: pollers between polls, and every poll when the server
        refuses ShutdownWorker or its polls are not back within call_timeout."""
        for p in pollers:
            if p not in self._in_poll:
                p.cancel()
        if self._in_poll:
            try:
                await self._stub.ShutdownWorker(
                    pb.ShutdownWorkerRequest(poll_session=self._session),
                    timeout=self.call_timeout,
                    metadata=self._metadata,
                )
            except grpc.aio.AioRpcError as exc:
                log.info("ShutdownWorker failed (%s): cancelling the polls", exc.code().name)
            else:
                await asyncio.wait(pollers, timeout=self.call_timeout)
        for p in pollers:
            p.cancel()
        await asyncio.gather(*pollers, return_exceptions=True)

    async def _poll_loop(self, slots: asyncio.Semaphore) -> None:
        types = list(self.tasks) if len(self.tasks) <= MAX_POLL_TYPES else []
        request = pb.PollTaskRequest(
            queues=self.queues, types=types, wait_seconds=self.poll_wait,
            worker_identity=self.identity, poll_session=self._session,
        )  # fmt: skip
        delays = backoff_delays()
        stopping = self._stopping or asyncio.Event()
        poller = asyncio.current_task()
        if poller is None:
            raise RuntimeError("the poll loop runs as a task of run_async")
        while not stopping.is_set():
            await slots.acquire()
            started = False
            try:
                if stopping.is_set():
                    return
                self._in_poll.add(poller)
                try:
                    reply = await self._stub.PollTask(
                        request, timeout=self.poll_wait + 10, metadata=self._metadata
                    )
                finally:
                    self._in_poll.discard(poller)
                delays = backoff_delays()
                if reply.task_token:
                    started = True
                    execution = asyncio.create_task(self._execute(reply, slots))
                    self._executions.add(execution)
                    execution.add_done_callback(self._executions.discard)
                    # One turn of the loop for the task to reach its function before this
                    # poller sets up its next PollTask (which would otherwise run first).
                    await asyncio.sleep(0)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in FATAL_POLL_CODES:
                    self._fatal = WorkerError(
                        f"PollTask refused: {exc.code().name}: {exc.details()}"
                    )
                    log.error("%s", self._fatal)
                    self.stop()
                    return
                if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    delay = retry_delay(exc, next(delays))
                    log.warning("PollTask failed (%s: %s): retrying in %.2fs",
                                exc.code().name, exc.details(), delay)  # fmt: skip
                    await asyncio.sleep(delay)
            finally:
                if not started:
                    slots.release()

    # --- running one task -------------------------------------------------------------------

    async def _execute(self, reply: pb.PollTaskResponse, slots: asyncio.Semaphore) -> None:
        info = TaskInfo(
            task_token=reply.task_token,
            workflow_id=reply.workflow_id,
            step_name=reply.step_name,
            queue=reply.queue,
            type=reply.type,
            attempt=reply.attempt,
            attempt_deadline=(
                reply.attempt_deadline.ToDatetime() if reply.HasField("attempt_deadline") else None
            ),
            heartbeat_timeout=reply.heartbeat_timeout_seconds or 30.0,
            traceparent=reply.traceparent,
        )
        try:
            spec = self.tasks.get(reply.type)
            if spec is None:  # only when serving more types than a poll can name
                await self._fail(info, f"this worker serves no task {reply.type!r}", True)
                return
            try:
                args, kwargs = spec.bind(from_value(reply.input))
            except InputBindingError as exc:
                await self._fail(info, str(exc), retryable=False)
                return
            await self._supervise(spec, info, args, kwargs)
        except Exception:
            log.exception("task %s of workflow %s: worker error", info.type, info.workflow_id)
        finally:
            slots.release()

    async def _supervise(
        self, spec: TaskDefinition, info: TaskInfo, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        loop = asyncio.get_running_loop()
        call = asyncio.ensure_future(self._call(spec, info, args, kwargs))
        running = _Running(info, call, spec.is_async, loop.create_future())
        call.add_done_callback(running.wake_up)
        self._running[info.task_token] = running
        beats = _Heartbeats(
            functools.partial(self._heartbeat, running),
            heartbeat_interval(info.heartbeat_timeout),
        )
        info._beat_now = functools.partial(loop.call_soon_threadsafe, beats.request)
        try:
            await running.wake
            if call.done() and not info.cancelled:
                beats.stop()
                await self._report(running)
                return
            await self._report_cancelled(running)
            if info.cancel_reason != SHUTTING_DOWN:
                # A sync function cannot be interrupted: its thread runs on, holding its
                # slot, until it returns (it can watch current_task().cancelled).
                await asyncio.wait({call})
        finally:
            beats.stop()
            self._running.pop(info.task_token, None)

    async def _call(
        self, spec: TaskDefinition, info: TaskInfo, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        CURRENT_TASK.set(info)
        with self._span(info):
            if spec.is_async:
                return await spec.fn(*args, **kwargs)
            ctx = contextvars.copy_context()
            future = self._pool.submit(functools.partial(ctx.run, spec.fn, *args, **kwargs))
            return await asyncio.wrap_future(future)

    async def _report(self, running: _Running) -> None:
        info, call = running.info, running.call
        running.reported = True
        exc = call.exception() if not call.cancelled() else asyncio.CancelledError()
        if exc is None:
            try:
                output = output_struct(call.result())
            except (TypeError, ValueError) as bad:
                await self._fail(info, f"task {info.type!r} returned no JSON: {bad}", False)
                return
            await self._token_call(
                info, "CompleteTask",
                pb.CompleteTaskRequest(task_token=info.task_token, queue=info.queue, output=output),
            )  # fmt: skip
        elif isinstance(exc, NonRetryableError):
            await self._fail(info, _describe(exc), retryable=False)
        else:
            await self._fail(info, _describe(exc), retryable=True)

    async def _report_cancelled(self, running: _Running) -> None:
        """Answers for a cancelled task: nothing when it was lost (its token is stale),
        retryable when the worker shuts down (_drain does it), else not retryable."""
        info = running.info
        if running.reported or info.cancel_reason.startswith("lost"):
            running.reported = True
            return
        if info.cancel_reason == SHUTTING_DOWN:
            return
        running.reported = True
        await self._fail(info, f"cancelled: {info.cancel_reason}", retryable=False)

    def _cancel(self, running: _Running, reason: str) -> None:
        """Tells the function to stop: an async one is cancelled, a sync one sees
        current_task().cancelled."""
        info = running.info
        if not info.cancelled:
            info.cancel_reason = reason
            info._cancelled.set()
        running.wake_up()
        if running.is_async:
            running.call.cancel()

    async def _heartbeat(self, running: _Running) -> bool:
        """Sends one heartbeat; False when the task must stop (cancelled, or lost)."""
        info = running.info
        request = pb.HeartbeatTaskRequest(task_token=info.task_token, queue=info.queue)
        details = details_struct(info._details)
        if details is not None:
            request.details.CopyFrom(details)
        interval = heartbeat_interval(info.heartbeat_timeout)
        try:
            reply = await self._stub.HeartbeatTask(
                request, timeout=max(1.0, min(self.call_timeout, interval)),
                metadata=self._metadata,
            )  # fmt: skip
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                log.warning("task %s of workflow %s lost (%s): dropped", info.type,
                            info.workflow_id, exc.details())  # fmt: skip
                self._cancel(running, f"lost: {exc.details()}")
                return False
            log.warning("HeartbeatTask failed (%s: %s)", exc.code().name, exc.details())
            return True
        if reply.cancel_requested:
            log.info("task %s of workflow %s: cancellation requested", info.type,
                     info.workflow_id)  # fmt: skip
            self._cancel(running, "the workflow was cancelled or timed out")
            return False
        return True

    async def _fail(self, info: TaskInfo, message: str, retryable: bool) -> None:
        request = pb.FailTaskRequest(
            task_token=info.task_token, queue=info.queue, message=message[:4000],
            retryable=retryable,
        )  # fmt: skip
        await self._token_call(info, "FailTask", request)

    async def _token_call(self, info: TaskInfo, method: str, request: Any) -> None:
        """CompleteTask or FailTask, retried while the gateway is unavailable and the
        token can still be good (until its heartbeat timeout has passed)."""
        rpc: Callable[..., Awaitable[Any]] = getattr(self._stub, method)
        give_up = time.monotonic() + max(info.heartbeat_timeout, self.call_timeout)
        delays = backoff_delays()
        while True:
            try:
                await rpc(request, timeout=self.call_timeout, metadata=self._metadata)
                return
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.FAILED_PRECONDITION:
                    log.warning("%s for task %s of workflow %s refused, the token is stale"
                                " (%s): dropped", method, info.type, info.workflow_id,
                                exc.details())  # fmt: skip
                    return
                retry = code in RETRY_CODES
                delay = retry_delay(exc, next(delays))
                if not retry or time.monotonic() + delay > give_up:
                    log.error("%s for task %s of workflow %s failed: %s: %s", method,
                              info.type, info.workflow_id, code.name, exc.details())  # fmt: skip
                    return
                await asyncio.sleep(delay)

    # --- tracing -------------------------------------------------------------------------

    def _span(self, info: TaskInfo) -> contextlib.AbstractContextManager[Any]:
        if self._tracer is None:
            return contextlib.nullcontext()
        return self._tracer(info)


def retry_delay(exc: grpc.aio.AioRpcError, backoff: float) -> float:
    """The backoff, or the server's `retry-after` (seconds) when it asks for longer."""
    for key, value in exc.trailing_metadata() or ():
        if key == "retry-after":
            try:
                return max(backoff, min(float(value), BACKOFF_MAX))
            except ValueError:
                break
    return backoff


def heartbeat_interval(heartbeat_timeout: float) -> float:
    """How often a task heartbeats: a third of its timeout (two may be lost in a row)."""
    return max(0.05, heartbeat_timeout / 3)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _tracer(
    provider: Any = None,
) -> Callable[[TaskInfo], contextlib.AbstractContextManager[Any]] | None:
    """Spans from the OpenTelemetry API when it is installed (optional): the task's span
    is a child of the step's traceparent."""
    try:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        return None
    tracer = trace.get_tracer("aiwfe.sdk.worker", tracer_provider=provider)
    propagator = TraceContextTextMapPropagator()

    def span(info: TaskInfo) -> contextlib.AbstractContextManager[Any]:
        parent = propagator.extract({"traceparent": info.traceparent}) if info.traceparent else None
        return tracer.start_as_current_span(
            f"task {info.type}",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "aiwfe.workflow_id": info.workflow_id,
                "aiwfe.step": info.step_name,
                "aiwfe.task.queue": info.queue,
                "aiwfe.task.type": info.type,
                "aiwfe.task.attempt": info.attempt,
            },
        )

    return span
