"""AuthService (Login, Refresh, Logout, WhoAmI) and UserAdminService, served by the gateway.

Nothing secret is ever logged or returned in an error: not passwords, tokens or hashes.
Login never reveals whether a username exists (one argon2 verification either way, one
message), and failed logins are rate limited per username and per client address.
"""

from __future__ import annotations

import logging
import re
import time
from typing import TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from aiwfe.auth.v1 import auth_service_pb2 as pb
from aiwfe.auth.v1 import auth_service_pb2_grpc as pb_grpc
from aiwfe.data.v1 import token_store_service_pb2 as store_pb
from aiwfe.data.v1 import token_store_service_pb2_grpc as store_grpc
from aiwfe.data.v1 import user_store_service_pb2 as user_pb
from aiwfe.data.v1 import user_store_service_pb2_grpc as user_grpc
from aiwfe.runtime import metrics
from aiwfe.runtime.channels import Upstream
from aiwfe.runtime.config import PasswordPolicySettings
from aiwfe.runtime.errors import (
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
)
from aiwfe.runtime.identity import require_principal
from aiwfe.runtime.page_tokens import PageTokens
from aiwfe.runtime.passwords import hash_password_async, policy_violation, verify_password_async
from aiwfe.runtime.rbac import Rbac
from aiwfe.runtime.validation import Violations
from gateway.api_keys import KeyUseRecorder, new_key, token_id
from gateway.ratelimit import LoginLimiter, caller_peer, client_address
from gateway.revocation import RevocationSync
from gateway.sessions import MAX_REFRESH_CHARS, SessionManager, TokenPair

log = logging.getLogger("aiwfe.gateway.auth")
MAX_USERNAME_CHARS = 64
MAX_PASSWORD_CHARS = 256
MAX_ROLES = 32
MAX_KEY_NAME_CHARS = 64
MAX_KEY_ID_CHARS = 64
MAX_PAGE_TOKEN_CHARS = 512
MAX_KEY_TTL_SECONDS = 10 * 366 * 86400  # ten years: "does not expire" is the way past it
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
        # A service account has no password: it verifies against nothing, like a miss.
        if user is not None and user.kind == user_pb.ACCOUNT_KIND_SERVICE:
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
        principal = require_principal()
        if "key" in principal.claims:
            raise FailedPrecondition(
                "an API key is not a session: revoke it with RevokeApiKey",
                reason="API_KEY_NOT_A_SESSION",
            )
        await self._sessions.logout(principal)
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
        user_id=user.user_id,
        username=user.username,
        roles=user.roles,
        disabled=user.disabled,
        service_account=user.kind == user_pb.ACCOUNT_KIND_SERVICE,
    )
    out.create_time.CopyFrom(user.create_time)
    return out


def _public_key(key: store_pb.StoredApiKey, account: str) -> pb.ApiKey:
    """An API key as admins see it: never its secret or hash."""
    out = pb.ApiKey(
        key_id=key.key_id,
        name=key.name,
        service_account=account,
        service_account_id=key.account_id,
        revoked=key.HasField("revoke_time"),
    )
    for field in ("create_time", "expire_time", "last_used_time", "revoke_time"):
        if key.HasField(field):
            getattr(out, field).CopyFrom(getattr(key, field))
    return out


def _ts(epoch: float) -> Timestamp:
    ts = Timestamp()
    ts.FromMicroseconds(int(epoch * 1e6))
    return ts


class UserAdminServicer(pb_grpc.UserAdminServiceServicer):
    """Account administration (permission `system:users`, i.e. admins)."""

    def __init__(
        self,
        sessions: SessionManager,
        rbac: Rbac,
        dataplatform: Upstream,
        policy: PasswordPolicySettings,
        revocations: RevocationSync | None = None,
        key_uses: KeyUseRecorder | None = None,
        revocation_horizon: float = 0.0,
        *,
        page_key: bytes,
    ) -> None:
        self._sessions = sessions
        self._rbac = rbac
        self._dp = dataplatform
        self._users = user_grpc.UserStoreServiceStub(dataplatform.channel)
        self._tokens = store_grpc.TokenStoreServiceStub(dataplatform.channel)
        self._policy = policy
        self._revocations = revocations
        self._key_uses = key_uses
        # How long a key's revocation must be remembered: it outlives every cached copy.
        self._revocation_horizon = revocation_horizon
        # The store's cursors (a username, a key id) sealed as in ListWorkflows (AIP-158).
        self._pages = {
            kind: PageTokens(page_key, kind)
            for kind in ("ListUsers", "ListServiceAccounts", "ListApiKeys")
        }

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
        reply, next_page = await self._list(
            request.page_size, request.page_token, user_pb.ACCOUNT_KIND_USER
        )
        return pb.ListUsersResponse(
            users=[_public(u) for u in reply.users], next_page_token=next_page
        )

    async def _list(
        self, page_size: int, page_token: str, kind: user_pb.AccountKind
    ) -> tuple[user_pb.ListUsersResponse, str]:
        """One page of accounts of `kind`, and the sealed token of the next."""
        v = Violations()
        v.check(0 <= page_size <= 1000, "page_size", "must be between 0 and 1000")
        v.text(page_token, "page_token", max_chars=MAX_PAGE_TOKEN_CHARS, required=False)
        v.raise_if_any()
        pages = self._pages[
            "ListUsers" if kind == user_pb.ACCOUNT_KIND_USER else "ListServiceAccounts"
        ]
        bound = {"caller": require_principal().user_id, "filter_": ""}
        reply = await self._dp.call(
            self._users.ListUsers,
            user_pb.ListUsersRequest(
                page_size=page_size, page_token=pages.open(page_token, **bound), kind=kind
            ),
        )
        return reply, pages.seal(reply.next_page_token, **bound)

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

    # --- service accounts and API keys --------------------------------------------------

    async def CreateServiceAccount(
        self, request: pb.CreateServiceAccountRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateServiceAccountResponse:
        v = Violations()
        v.check(
            bool(_USERNAME.fullmatch(request.name)),
            "name",
            "must be 3-64 characters: letters, digits, '.', '_', '-'",
        )
        roles = list(dict.fromkeys(request.roles))
        self._check_roles(roles, v, required=True)
        v.raise_if_any()
        reply = await self._dp.call(
            self._users.CreateUser,
            user_pb.CreateUserRequest(
                username=request.name, roles=roles, kind=user_pb.ACCOUNT_KIND_SERVICE
            ),
        )
        log.info("service account %r created with roles %s", reply.user.username, roles)
        return pb.CreateServiceAccountResponse(service_account=_public(reply.user))

    async def ListServiceAccounts(
        self, request: pb.ListServiceAccountsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListServiceAccountsResponse:
        reply, next_page = await self._list(
            request.page_size, request.page_token, user_pb.ACCOUNT_KIND_SERVICE
        )
        return pb.ListServiceAccountsResponse(
            service_accounts=[_public(u) for u in reply.users], next_page_token=next_page
        )

    async def _service_account(self, name: str, field: str) -> user_pb.StoredUser:
        """The named service account; SERVICE_ACCOUNT_NOT_FOUND for a user or nobody."""
        v = Violations()
        v.text(name, field, max_chars=MAX_USERNAME_CHARS)
        v.raise_if_any()
        try:
            reply = await self._dp.call(self._users.GetUser, user_pb.GetUserRequest(username=name))
        except grpc.aio.AioRpcError as exc:
            if not _not_found(exc):
                raise
        else:
            if reply.user.kind == user_pb.ACCOUNT_KIND_SERVICE:
                return reply.user
        raise NotFound(
            "service account not found",
            reason="SERVICE_ACCOUNT_NOT_FOUND",
            metadata={"serviceAccount": name},
        )

    async def CreateApiKey(
        self, request: pb.CreateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateApiKeyResponse:
        v = Violations()
        v.text(request.service_account, "service_account", max_chars=MAX_USERNAME_CHARS)
        v.text(request.name, "name", max_chars=MAX_KEY_NAME_CHARS, required=False)
        now = time.time()
        expires: float | None = None
        if request.HasField("expire_time") and request.HasField("ttl"):
            v.add("ttl", "give expire_time or ttl, not both")
        elif request.HasField("ttl"):
            ttl = request.ttl.ToMicroseconds() / 1e6
            v.check(0 < ttl <= MAX_KEY_TTL_SECONDS, "ttl", "must be positive and at most 10 years")
            expires = now + ttl
        elif request.HasField("expire_time"):
            expires = request.expire_time.ToMicroseconds() / 1e6
            v.check(
                now < expires <= now + MAX_KEY_TTL_SECONDS,
                "expire_time",
                "must be in the future and at most 10 years ahead",
            )
        v.raise_if_any()
        account = await self._service_account(request.service_account, "service_account")
        if account.disabled:
            raise FailedPrecondition(
                "the service account is disabled",
                reason="SERVICE_ACCOUNT_DISABLED",
                metadata={"serviceAccount": account.username},
            )
        key = new_key()
        store_request = store_pb.CreateApiKeyRequest(
            key_id=key.key_id, account_id=account.user_id, name=request.name, secret_hash=key.digest
        )
        if expires is not None:
            store_request.expire_time.CopyFrom(_ts(expires))
        reply = await self._dp.call(self._tokens.CreateApiKey, store_request)
        log.info("API key %s created for service account %r", key.key_id, account.username)
        return pb.CreateApiKeyResponse(
            api_key=_public_key(reply.api_key, account.username), key=key.key
        )

    async def ListApiKeys(
        self, request: pb.ListApiKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListApiKeysResponse:
        v = Violations()
        v.check(0 <= request.page_size <= 1000, "page_size", "must be between 0 and 1000")
        v.text(request.page_token, "page_token", max_chars=MAX_PAGE_TOKEN_CHARS, required=False)
        v.raise_if_any()
        account = await self._service_account(request.service_account, "service_account")
        # Bound to the account listed: a token of one account's keys is no cursor for another's.
        bound = {"caller": require_principal().user_id, "filter_": account.user_id}
        pages = self._pages["ListApiKeys"]
        if self._key_uses is not None:
            # This replica's uses reach the record first (others' within a flush interval).
            await self._key_uses.flush()
        reply = await self._dp.call(
            self._tokens.ListApiKeys,
            store_pb.ListApiKeysRequest(
                account_id=account.user_id,
                page_size=request.page_size,
                page_token=pages.open(request.page_token, **bound),
            ),
        )
        return pb.ListApiKeysResponse(
            api_keys=[_public_key(k, account.username) for k in reply.api_keys],
            next_page_token=pages.seal(reply.next_page_token, **bound),
        )

    async def RevokeApiKey(
        self, request: pb.RevokeApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeApiKeyResponse:
        v = Violations()
        v.text(request.key_id, "key_id", max_chars=MAX_KEY_ID_CHARS)
        v.raise_if_any()
        event = store_pb.RevokedAccessToken(
            jti=token_id(request.key_id), expire_time=_ts(time.time() + self._revocation_horizon)
        )
        reply = await self._dp.call(
            self._tokens.RevokeApiKey,
            store_pb.RevokeApiKeyRequest(key_id=request.key_id, access_token=event),
        )
        if self._revocations is not None:
            await self._revocations.publish(reply.revoked)
        account = await self._dp.call(
            self._users.GetUser, user_pb.GetUserRequest(user_id=reply.api_key.account_id)
        )
        log.info("API key %s of %r revoked", request.key_id, account.user.username)
        return pb.RevokeApiKeyResponse(api_key=_public_key(reply.api_key, account.user.username))
