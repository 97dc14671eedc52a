"""An in-process WorkerService that follows the contract closely enough to pin the SDK
worker's own behaviour (binding, heartbeats, cancellation, shutdown, reconnection)
without the engine; the engine's behaviour is proven against the real suite."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from aiwfe.taskproc.v1 import worker_service_pb2 as pb
from aiwfe.taskproc.v1 import worker_service_pb2_grpc as pb_grpc


@dataclass
class FakeWorkerService(pb_grpc.WorkerServiceServicer):
    """Tasks put with `offer()` are handed out by PollTask; every call is recorded."""

    heartbeat_timeout: float = 3.0
    tasks: asyncio.Queue[pb.PollTaskResponse] = field(default_factory=asyncio.Queue)
    polls_open: int = 0
    max_polls_open: int = 0
    heartbeats: list[pb.HeartbeatTaskRequest] = field(default_factory=list)
    completed: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: dict[str, pb.FailTaskRequest] = field(default_factory=dict)
    cancel: set[str] = field(default_factory=set)
    stale: set[str] = field(default_factory=set)
    shed_completes: int = 0  # refuse this many CompleteTask calls (RESOURCE_EXHAUSTED)
    completes_refused: int = 0
    metadata: list[dict[str, str]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    heard: set[str] = field(default_factory=set)  # tokens a worker has reported on

    def offer(self, type: str, value: Any, **fields: Any) -> str:
        token = uuid.uuid4().hex
        reply = pb.PollTaskResponse(
            task_token=token,
            workflow_id="wf-" + token[:6],
            step_name="s",
            queue="default",
            type=type,
            attempt=1,
            heartbeat_timeout_seconds=fields.pop("heartbeat_timeout", self.heartbeat_timeout),
            **fields,
        )
        json_format.ParseDict(value, reply.input)
        self.tasks.put_nowait(reply)
        return token

    async def answered(self, token: str, within: float = 10.0) -> None:
        """Waits until the task was completed or failed."""
        async with asyncio.timeout(within):
            while token not in self.completed and token not in self.failed:
                self.changed.clear()
                await self.changed.wait()

    def _seen(self, context: grpc.aio.ServicerContext) -> None:
        self.metadata.append(dict(context.invocation_metadata() or ()))
        self.changed.set()

    async def PollTask(
        self, request: pb.PollTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.PollTaskResponse:
        self._seen(context)
        self.polls_open += 1
        self.max_polls_open = max(self.max_polls_open, self.polls_open)
        try:
            async with asyncio.timeout(request.wait_seconds):
                reply = await self.tasks.get()
        except TimeoutError:
            return pb.PollTaskResponse()
        finally:
            self.polls_open -= 1
        if context.cancelled():  # the worker gave up this poll: keep the task
            self.tasks.put_nowait(reply)
        else:
            # As the engine's lease does: a task no worker reports on within twice its
            # heartbeat timeout is handed out again. A poll the worker cancelled can still
            # look live here (its cancellation not yet seen), and its reply is then lost.
            lease = 2 * (reply.heartbeat_timeout_seconds or 30.0)  # the worker's default too
            asyncio.get_running_loop().call_later(lease, self._expire, reply)
        return reply

    def _expire(self, reply: pb.PollTaskResponse) -> None:
        if reply.task_token not in self.heard:
            self.tasks.put_nowait(reply)

    async def HeartbeatTask(
        self, request: pb.HeartbeatTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatTaskResponse:
        self._seen(context)
        self.heard.add(request.task_token)
        self.heartbeats.append(request)
        if request.task_token in self.stale:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "stale task token")
        return pb.HeartbeatTaskResponse(cancel_requested=request.task_token in self.cancel)

    async def CompleteTask(
        self, request: pb.CompleteTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.CompleteTaskResponse:
        self._seen(context)
        self.heard.add(request.task_token)
        if request.task_token in self.stale:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "stale task token")
        if self.completes_refused < self.shed_completes:
            self.completes_refused += 1
            context.set_trailing_metadata((("retry-after", "1"),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded")
        self.completed[request.task_token] = json_format.MessageToDict(request.output)
        return pb.CompleteTaskResponse()

    async def FailTask(
        self, request: pb.FailTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.FailTaskResponse:
        self._seen(context)
        self.heard.add(request.task_token)
        if request.task_token in self.stale:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "stale task token")
        self.failed[request.task_token] = request
        return pb.FailTaskResponse(will_retry=request.retryable)


async def serve(service: FakeWorkerService, port: int = 0) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    pb_grpc.add_WorkerServiceServicer_to_server(service, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, bound


def value(v: Any) -> struct_pb2.Value:
    out = struct_pb2.Value()
    json_format.ParseDict(v, out)
    return out
