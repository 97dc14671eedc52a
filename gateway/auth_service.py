"""AuthService at the gateway: Login and WhoAmI. Refresh, Logout and UserAdminService are
completed by the gateway-security issue (token rotation, revocation, admin RPCs)."""

from __future__ import annotations

import grpc

from aiwfe.auth.v1 import auth_service_pb2 as pb
from aiwfe.auth.v1 import auth_service_pb2_grpc as pb_grpc
from aiwfe.channels import Downstream
from aiwfe.data.v1 import user_store_service_pb2 as user_pb
from aiwfe.data.v1 import user_store_service_pb2_grpc as user_grpc
from aiwfe.errors import Unauthenticated
from aiwfe.identity import require_principal
from aiwfe.passwords import verify_password_async
from aiwfe.validation import Violations
from gateway.rbac import Rbac
from gateway.tokens import TokenService

MAX_USERNAME_CHARS = 64
MAX_PASSWORD_CHARS = 256
_BAD_CREDENTIALS = "invalid username or password"


class AuthServicer(pb_grpc.AuthServiceServicer):
    def __init__(self, tokens: TokenService, rbac: Rbac, dataplatform: Downstream) -> None:
        self._tokens = tokens
        self._rbac = rbac
        self._dp = dataplatform
        self._users = user_grpc.UserStoreServiceStub(dataplatform.channel)

    async def Login(
        self, request: pb.LoginRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoginResponse:
        v = Violations()
        v.text(request.username, "username", max_chars=MAX_USERNAME_CHARS)
        v.text(request.password, "password", max_chars=MAX_PASSWORD_CHARS)
        v.raise_if_any()
        try:
            reply = await self._dp.call(
                self._users.GetUser, user_pb.GetUserRequest(username=request.username)
            )
            user = reply.user
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            user = None
        # Always one argon2 verification, so an unknown username costs what a wrong password does.
        ok = await verify_password_async(user.password_hash if user else None, request.password)
        if not ok or user is None or user.disabled:
            raise Unauthenticated(_BAD_CREDENTIALS)
        token = self._tokens.issue(user.user_id, user.username, list(user.roles))
        return pb.LoginResponse(
            access_token=token, token_type="Bearer", expires_in=self._tokens.access_ttl
        )

    async def WhoAmI(
        self, request: pb.WhoAmIRequest, context: grpc.aio.ServicerContext
    ) -> pb.WhoAmIResponse:
        principal = require_principal()
        return pb.WhoAmIResponse(
            user_id=principal.user_id,
            username=principal.username,
            roles=principal.roles,
            permissions=self._rbac.permissions(principal.roles),
        )
