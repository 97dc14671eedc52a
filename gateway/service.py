"""The gateway service: AuthService served here, everything else proxied as raw bytes."""

from __future__ import annotations

import grpc

from aiwfe.auth.v1 import auth_service_pb2 as auth_pb
from aiwfe.auth.v1 import auth_service_pb2_grpc as auth_grpc
from aiwfe.channels import Downstream
from aiwfe.cognitive.v1 import cognitive_service_pb2
from aiwfe.config import Settings
from aiwfe.data.v1 import (
    cache_store_service_pb2,
    user_store_service_pb2,
    vector_store_service_pb2,
)
from aiwfe.identity import InternalIdentity
from aiwfe.server import Service
from aiwfe.taskproc.v1 import workflow_service_pb2
from gateway.auth_service import AuthServicer
from gateway.authn import AuthInterceptor
from gateway.policies import method_table, public_services
from gateway.proxy import ProxyHandler
from gateway.rbac import Rbac
from gateway.system import GatewaySystemServicer
from gateway.tokens import TokenService

_DATA_FILES = (
    user_store_service_pb2.DESCRIPTOR,
    cache_store_service_pb2.DESCRIPTOR,
    vector_store_service_pb2.DESCRIPTOR,
)


class GatewayService(Service):
    name = "gateway"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.identity = InternalIdentity.from_settings(settings)
        self.tokens = TokenService(settings.authentication)
        self.rbac = Rbac(settings.rbac)
        self.methods = method_table()
        s = settings.services

        def downstream(name: str, target: str, files: tuple) -> Downstream:
            return Downstream(name, target, settings, self.identity, caller="gateway", files=files)

        self.downstreams = {
            "aiwfe.cognitive.v1": downstream(
                "cognitive", s.cognitive.address, (cognitive_service_pb2.DESCRIPTOR,)
            ),
            "aiwfe.taskproc.v1": downstream(
                "taskproc", s.taskproc.address, (workflow_service_pb2.DESCRIPTOR,)
            ),
            "aiwfe.data.v1": downstream("dataplatform", s.dataplatform.address, _DATA_FILES),
        }

    def register(self, server: grpc.aio.Server) -> list[str]:
        auth_grpc.add_AuthServiceServicer_to_server(
            AuthServicer(self.tokens, self.rbac, self.downstreams["aiwfe.data.v1"]), server
        )
        auth_grpc.add_UserAdminServiceServicer_to_server(
            auth_grpc.UserAdminServiceServicer(), server
        )
        server.add_generic_rpc_handlers(
            (ProxyHandler(self.methods, self.downstreams, self.settings.grpc),)
        )
        return [
            auth_pb.DESCRIPTOR.services_by_name["AuthService"].full_name,
            auth_pb.DESCRIPTOR.services_by_name["UserAdminService"].full_name,
        ]

    def reflection_names(self, registered: list[str]) -> list[str]:
        return sorted(set(registered) | set(public_services()))

    def system_servicer(self) -> GatewaySystemServicer:
        return GatewaySystemServicer(list(self.downstreams.values()))

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [
            AuthInterceptor(
                self.methods, self.tokens, self.rbac, self.settings.authentication.enabled
            )
        ]

    async def stop(self) -> None:
        for downstream in self.downstreams.values():
            await downstream.close()
