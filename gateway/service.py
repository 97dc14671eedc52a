"""The gateway service: AuthService served here, everything else proxied as raw bytes."""

from __future__ import annotations

import asyncio

import grpc

from aiwfe.auth.v1 import auth_service_pb2 as auth_pb
from aiwfe.auth.v1 import auth_service_pb2_grpc as auth_grpc
from aiwfe.cognitive.v1 import cognitive_service_pb2
from aiwfe.data.v1 import (
    cache_store_service_pb2,
    token_store_service_pb2,
    user_store_service_pb2,
    vector_store_service_pb2,
)
from aiwfe.runtime.channels import Upstream
from aiwfe.runtime.config import Settings
from aiwfe.runtime.identity import InternalIdentity
from aiwfe.runtime.rbac import Rbac
from aiwfe.runtime.redis_client import RedisClient
from aiwfe.runtime.resilience.breaker import BreakerState
from aiwfe.runtime.server import Service
from aiwfe.runtime.telemetry import quiet
from aiwfe.taskproc.v1 import schedule_service_pb2, worker_service_pb2, workflow_service_pb2
from gateway.api_keys import ApiKeyVerifier, KeyUseRecorder
from gateway.auth_service import AuthServicer, UserAdminServicer
from gateway.authn import AuthInterceptor
from gateway.front import FrontDoor
from gateway.policies import method_table, public_services
from gateway.proxy import ProxyHandler
from gateway.ratelimit import ApiLimiter, LoginLimiter
from gateway.response_cache import ResponseCache
from gateway.revocation import RevocationState, RevocationSync
from gateway.sessions import SessionManager
from gateway.system import GatewaySystemServicer
from gateway.tokens import TokenService

_DATA_FILES = (
    user_store_service_pb2.DESCRIPTOR,
    cache_store_service_pb2.DESCRIPTOR,
    vector_store_service_pb2.DESCRIPTOR,
    token_store_service_pb2.DESCRIPTOR,
)


class GatewayService(Service):
    name = "gateway"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.identity = InternalIdentity.from_settings(settings)
        self.redis = RedisClient(settings.redis)
        self.revocation_state = RevocationState()
        self.tokens = TokenService(settings.authentication, self.redis, self.revocation_state)
        self.rbac = Rbac(settings.rbac)
        self.methods = method_table()
        s = settings.services

        def downstream(name: str, target: str, files: tuple) -> Upstream:
            return Upstream(name, target, settings, self.identity, caller="gateway", files=files)

        self.upstreams = {
            "aiwfe.cognitive.v1": downstream(
                "cognitive", s.cognitive.address, (cognitive_service_pb2.DESCRIPTOR,)
            ),
            "aiwfe.taskproc.v1": downstream(
                "taskproc",
                s.taskproc.address,
                (
                    workflow_service_pb2.DESCRIPTOR,
                    worker_service_pb2.DESCRIPTOR,
                    schedule_service_pb2.DESCRIPTOR,
                ),
            ),
            "aiwfe.data.v1": downstream("dataplatform", s.dataplatform.address, _DATA_FILES),
        }
        auth = settings.authentication
        data = self.upstreams["aiwfe.data.v1"]
        self.revocations = RevocationSync(self.revocation_state, self.redis, data, auth)
        self.sessions = SessionManager(self.tokens, data, self.revocations)
        self.tokens.api_keys = ApiKeyVerifier(data, self.revocation_state)
        self.key_uses = KeyUseRecorder(self.tokens.key_uses, data)
        self.login_limiter = LoginLimiter(auth.rate_limiting, self.redis)
        self.api_limiter = ApiLimiter(auth.rate_limiting, self.redis)
        self.response_cache = ResponseCache(self.redis, self.methods)
        self.admission = AuthInterceptor(
            self.methods,
            self.tokens,
            self.rbac,
            auth.enabled,
            limiter=self.api_limiter,
            cache=self.response_cache,
        )

    async def start(self) -> None:
        # Background polls and flushes are untraced (telemetry.trace_polling turns them on).
        with quiet(not self.settings.telemetry.trace_polling):
            await self.revocations.start()
            self.key_uses.start()

    def register(self, server: grpc.aio.Server) -> list[str]:
        data = self.upstreams["aiwfe.data.v1"]
        auth_grpc.add_AuthServiceServicer_to_server(
            AuthServicer(
                self.sessions, self.rbac, data, self.login_limiter, self.tokens.access_ttl
            ),
            server,
        )
        auth_grpc.add_UserAdminServiceServicer_to_server(
            UserAdminServicer(
                self.sessions,
                self.rbac,
                data,
                self.settings.authentication.password_policy,
                self.revocations,
                self.key_uses,
                self.tokens.cache_horizon,
                page_key=self.identity.derived_key("page-tokens"),
            ),
            server,
        )
        server.add_generic_rpc_handlers(
            (ProxyHandler(self.methods, self.upstreams, self.settings.grpc),)
        )
        return [
            auth_pb.DESCRIPTOR.services_by_name["AuthService"].full_name,
            auth_pb.DESCRIPTOR.services_by_name["UserAdminService"].full_name,
        ]

    async def routed_health(self) -> dict[str, bool]:
        """Each routed service is up while its back end's breaker is not open and the back
        end's own health answers SERVING (probed here, so an idle back end that went away
        is noticed without a call failing first)."""
        packages = list(self.upstreams)
        up = await asyncio.gather(*(_up(self.upstreams[p]) for p in packages))
        by_package = dict(zip(packages, up, strict=True))
        return {
            info.service: by_package[info.package]
            for info in self.methods.values()
            if info.declared and info.package in by_package
        }

    def reflection_names(self, registered: list[str]) -> list[str]:
        return sorted(set(registered) | set(public_services()))

    def system_servicer(self) -> GatewaySystemServicer:
        return GatewaySystemServicer(list(self.upstreams.values()))

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [self.admission]

    def front(self) -> FrontDoor | None:
        if not self.settings.gateway.relay:
            return None
        return FrontDoor(
            self.settings,
            self.methods,
            self.admission,
            self.response_cache,
            self.identity,
            self.upstreams,
        )

    async def stop(self) -> None:
        await self.api_limiter.close()
        await self.login_limiter.close()
        await self.key_uses.stop()
        await self.revocations.stop()
        for downstream in self.upstreams.values():
            await downstream.close()
        await self.redis.close()


async def _up(downstream: Upstream) -> bool:
    if downstream.breaker.state is BreakerState.OPEN:
        return False
    try:
        return await downstream.serving()
    except grpc.aio.AioRpcError:
        return False
