"""AuthService (Login, Refresh, Logout, WhoAmI) and UserAdminService, served by the gateway.

Nothing secret is ever logged or returned in an error: not passwords, tokens or hashes.
Login never reveals whether a username exists (one argon2 verification either way, one
message), and failed logins are rate limited per username and per client address.
"""

from __future__ import annotations

import logging
import re
from typing import TypeVar

import grpc

from aiwfe.auth.v1 import auth_service_pb2 as pb
from aiwfe.auth.v1 import auth_service_pb2_grpc as pb_grpc
from aiwfe.data.v1 import user_store_service_pb2 as user_pb
from aiwfe.data.v1 import user_store_service_pb2_grpc as user_grpc
from aiwfe.runtime import metrics
from aiwfe.runtime.channels import Upstream
from aiwfe.runtime.config import PasswordPolicySettings
from aiwfe.runtime.errors import NotFound, ResourceExhausted, Unauthenticated
from aiwfe.runtime.identity import require_principal
from aiwfe.runtime.passwords import hash_password_async, policy_violation, verify_password_async
from aiwfe.runtime.rbac import Rbac
from aiwfe.runtime.validation import Violations
from gateway.ratelimit import LoginLimiter, caller_peer, client_address
from gateway.sessions import MAX_REFRESH_CHARS, SessionManager, TokenPair

log = logging.getLogger("aiwfe.gateway.auth")
MAX_USERNAME_CHARS = 64
MAX_PASSWORD_CHARS = 256
MAX_ROLES = 32
_USERNAME = re.compile(r"[A-Za-z0-9._-]{3,64}")
_BAD_CREDENTIALS = "invalid username or password"
# Login and Refresh answer the same token-pair fields.
_PairResponse = TypeVar("_PairResponse", pb.LoginResponse, pb.RefreshResponse)

_login_ok = metrics.authentication_success_rate.labels("login", "success")
_login_failed = metrics.authentication_success_rate.labels("login", "failure")
_login_limited = metrics.authentication_success_rate.labels("login", "rate_limited")
_refresh_ok = metrics.authentication_success_rate.labels("refresh", "success")
_refresh_failed = metrics.authentication_success_rate.labels("refresh", "failure")


def _not_found(exc: grpc.aio.AioRpcError) -> bool:
    return exc.code() == grpc.StatusCode.NOT_FOUND


class AuthServicer(pb_grpc.AuthServiceServicer):
    def __init__(
        self,
        sessions: SessionManager,
        rbac: Rbac,
        dataplatform: Upstream,
        limiter: LoginLimiter,
        access_ttl: int,
    ) -> None:
        self._sessions = sessions
        self._rbac = rbac
        self._dp = dataplatform
        self._users = user_grpc.UserStoreServiceStub(dataplatform.channel)
        self._limiter = limiter
        self._access_ttl = access_ttl

    def _pair(self, pair: TokenPair, cls: type[_PairResponse]) -> _PairResponse:
        return cls(
            access_token=pair.access.token,
            refresh_token=pair.refresh,
            token_type="Bearer",
            expires_in=self._access_ttl,
        )

    async def Login(
        self, request: pb.LoginRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoginResponse:
        v = Violations()
        v.text(request.username, "username", max_chars=MAX_USERNAME_CHARS)
        v.text(request.password, "password", max_chars=MAX_PASSWORD_CHARS)
        v.raise_if_any()
        address = client_address(caller_peer(context))
        try:
            async with self._limiter.check(request.username, address) as attempt:
                user = await self._verified_user(request)
                if user is None:
                    attempt.failed()
        except ResourceExhausted:  # only the limiter refuses with it here
            _login_limited.inc()
            raise
        if user is None:
            _login_failed.inc()
            raise Unauthenticated(_BAD_CREDENTIALS, reason="CREDENTIALS_INVALID")
        pair = await self._sessions.create(user.user_id, user.username, list(user.roles))
        _login_ok.inc()
        return self._pair(pair, pb.LoginResponse)

    async def _verified_user(self, request: pb.LoginRequest) -> user_pb.StoredUser | None:
        """The account if the password is right and it may log in, else None; a failing
        user store raises (that is not a failed login)."""
        try:
            reply = await self._dp.call(
                self._users.GetUser, user_pb.GetUserRequest(username=request.username)
            )
            user = reply.user
        except grpc.aio.AioRpcError as exc:
            if not _not_found(exc):
                raise
            user = None
        # Always one argon2 verification, so an unknown username costs what a wrong password does.
        ok = await verify_password_async(user.password_hash if user else None, request.password)
        return user if ok and user is not None and not user.disabled else None

    async def Refresh(
        self, request: pb.RefreshRequest, context: grpc.aio.ServicerContext
    ) -> pb.RefreshResponse:
        v = Violations()
        v.text(request.refresh_token, "refresh_token", max_chars=MAX_REFRESH_CHARS)
        v.raise_if_any()
        try:
            pair = await self._sessions.rotate(request.refresh_token)
        except Unauthenticated:
            _refresh_failed.inc()
            raise
        _refresh_ok.inc()
        return self._pair(pair, pb.RefreshResponse)

    async def Logout(
        self, request: pb.LogoutRequest, context: grpc.aio.ServicerContext
    ) -> pb.LogoutResponse:
        await self._sessions.logout(require_principal())
        return pb.LogoutResponse()

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


def _public(user: user_pb.StoredUser) -> pb.User:
    """An account as admins see it: never its password hash."""
    out = pb.User(
        user_id=user.user_id, username=user.username, roles=user.roles, disabled=user.disabled
    )
    out.create_time.CopyFrom(user.create_time)
    return out


class UserAdminServicer(pb_grpc.UserAdminServiceServicer):
    """Account administration (permission `system:users`, i.e. admins)."""

    def __init__(
        self,
        sessions: SessionManager,
        rbac: Rbac,
        dataplatform: Upstream,
        policy: PasswordPolicySettings,
    ) -> None:
        self._sessions = sessions
        self._rbac = rbac
        self._dp = dataplatform
        self._users = user_grpc.UserStoreServiceStub(dataplatform.channel)
        self._policy = policy

    def _check_roles(self, roles: list[str], v: Violations, *, required: bool) -> None:
        if required:
            v.check(bool(roles), "roles", "at least one role is required")
        v.check(len(roles) <= MAX_ROLES, "roles", f"at most {MAX_ROLES} roles")
        for i, role in enumerate(roles[:MAX_ROLES]):
            v.check(self._rbac.known_role(role), f"roles[{i}]", "is not a configured role")

    def _check_username(self, username: str, v: Violations) -> None:
        v.check(
            bool(_USERNAME.fullmatch(username)),
            "username",
            "must be 3-64 characters: letters, digits, '.', '_', '-'",
        )

    async def CreateUser(
        self, request: pb.CreateUserRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateUserResponse:
        v = Violations()
        self._check_username(request.username, v)
        problem = policy_violation(request.password, self._policy)
        v.check(problem is None, "password", problem or "")
        roles = list(dict.fromkeys(request.roles))
        self._check_roles(roles, v, required=True)
        v.raise_if_any()
        reply = await self._dp.call(
            self._users.CreateUser,
            user_pb.CreateUserRequest(
                username=request.username,
                password_hash=await hash_password_async(request.password),
                roles=roles,
            ),
        )
        log.info("user %r created with roles %s", reply.user.username, roles)
        return pb.CreateUserResponse(user=_public(reply.user))

    async def ListUsers(
        self, request: pb.ListUsersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListUsersResponse:
        v = Violations()
        v.check(0 <= request.page_size <= 1000, "page_size", "must be between 0 and 1000")
        v.text(request.page_token, "page_token", max_chars=512, required=False)
        v.raise_if_any()
        reply = await self._dp.call(
            self._users.ListUsers,
            user_pb.ListUsersRequest(page_size=request.page_size, page_token=request.page_token),
        )
        return pb.ListUsersResponse(
            users=[_public(u) for u in reply.users], next_page_token=reply.next_page_token
        )

    async def _update(self, request: user_pb.UpdateUserRequest) -> user_pb.StoredUser:
        try:
            reply = await self._dp.call(self._users.UpdateUser, request)
        except grpc.aio.AioRpcError as exc:
            if _not_found(exc):
                raise NotFound(
                    "user not found",
                    reason="USER_NOT_FOUND",
                    metadata={"username": request.username},
                ) from None
            raise
        return reply.user

    async def SetUserRoles(
        self, request: pb.SetUserRolesRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetUserRolesResponse:
        v = Violations()
        v.text(request.username, "username", max_chars=MAX_USERNAME_CHARS)
        roles = list(dict.fromkeys(request.roles))
        self._check_roles(roles, v, required=False)
        v.raise_if_any()
        user = await self._update(
            user_pb.UpdateUserRequest(username=request.username, roles=roles, set_roles=True)
        )
        # Tokens carry roles: every access token issued before now dies; the refresh family
        # lives on, so the user's next Refresh carries the new roles.
        await self._sessions.revoke_user(user.user_id, families=False, reason="roles_changed")
        log.info("user %r roles set to %s", user.username, roles)
        return pb.SetUserRolesResponse(user=_public(user))

    async def DisableUser(
        self, request: pb.DisableUserRequest, context: grpc.aio.ServicerContext
    ) -> pb.DisableUserResponse:
        v = Violations()
        v.text(request.username, "username", max_chars=MAX_USERNAME_CHARS)
        v.raise_if_any()
        user = await self._update(
            user_pb.UpdateUserRequest(username=request.username, disabled=True, set_disabled=True)
        )
        await self._sessions.revoke_user(user.user_id, families=True, reason="user_disabled")
        log.info("user %r disabled and its sessions revoked", user.username)
        return pb.DisableUserResponse(user=_public(user))
