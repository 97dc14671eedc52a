"""The task processor service. Its WorkflowService RPCs answer UNIMPLEMENTED until the
workflows issue builds durable execution; it already starts, serves health and reflection,
and accepts only calls carrying a valid internal identity."""

from __future__ import annotations

import grpc

from aiwfe.config import Settings
from aiwfe.identity import InternalIdentity
from aiwfe.interceptors import InternalIdentityInterceptor
from aiwfe.server import Service
from aiwfe.taskproc.v1 import workflow_service_pb2 as pb
from aiwfe.taskproc.v1 import workflow_service_pb2_grpc as pb_grpc


class TaskProcService(Service):
    name = "taskproc"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.identity = InternalIdentity.from_settings(settings)

    def register(self, server: grpc.aio.Server) -> list[str]:
        pb_grpc.add_WorkflowServiceServicer_to_server(pb_grpc.WorkflowServiceServicer(), server)
        return [pb.DESCRIPTOR.services_by_name["WorkflowService"].full_name]

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [InternalIdentityInterceptor(self.identity)]
