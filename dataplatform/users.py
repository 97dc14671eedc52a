"""UserStoreService: accounts in PostgreSQL (parameterised queries only)."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import grpc
import psycopg

from aiwfe.data.v1 import user_store_service_pb2 as pb
from aiwfe.data.v1 import user_store_service_pb2_grpc as pb_grpc
from aiwfe.runtime.errors import AlreadyExists, InvalidArgument, NotFound
from aiwfe.runtime.validation import Violations
from dataplatform.db import Database

_COLUMNS = "user_id, username, password_hash, roles, disabled, created_at, updated_at, kind"
COLUMNS = _COLUMNS  # the API key store reads a key's account with them
_KINDS = {"user": pb.ACCOUNT_KIND_USER, "service": pb.ACCOUNT_KIND_SERVICE}
_KIND_NAMES = {pb.ACCOUNT_KIND_USER: "user", pb.ACCOUNT_KIND_SERVICE: "service"}
MAX_USERNAME = 64
MAX_ROLES = 32


def to_proto(row: dict[str, Any]) -> pb.StoredUser:
    user = pb.StoredUser(
        user_id=str(row["user_id"]),
        username=row["username"],
        password_hash=row["password_hash"],
        roles=row["roles"],
        disabled=row["disabled"],
        kind=_KINDS[row["kind"]],
    )
    user.create_time.FromDatetime(row["created_at"])
    user.update_time.FromDatetime(row["updated_at"])
    return user


def _page_token(username: str) -> str:
    return base64.urlsafe_b64encode(username.encode()).decode()


def _page_after(token: str) -> str:
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument([("page_token", "is not a token this service issued")]) from None


class UserStore(pb_grpc.UserStoreServiceServicer):
    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(
        self,
        username: str,
        password_hash: str,
        roles: list[str],
        kind: pb.AccountKind = pb.ACCOUNT_KIND_USER,
    ) -> pb.StoredUser:
        """Inserts an account; ALREADY_EXISTS when the username is taken (service accounts
        share the namespace)."""
        service = kind == pb.ACCOUNT_KIND_SERVICE
        v = Violations()
        v.text(username, "username", max_chars=MAX_USERNAME)
        if service:
            v.check(not password_hash, "password_hash", "a service account has no password")
        else:
            v.text(password_hash, "password_hash", max_chars=1024)
        v.check(len(roles) <= MAX_ROLES, "roles", f"at most {MAX_ROLES} roles")
        v.raise_if_any()
        try:
            async with self._db.pool.connection() as conn:
                cur = await conn.execute(
                    f"INSERT INTO users (user_id, username, password_hash, roles, kind)"
                    f" VALUES (%s, %s, %s, %s, %s) RETURNING {_COLUMNS}",
                    (uuid.uuid4(), username, password_hash, list(roles), _KIND_NAMES[kind]),
                )
                row = await cur.fetchone()
        except psycopg.errors.UniqueViolation:
            raise AlreadyExists(
                f"user {username!r} already exists",
                reason="USER_ALREADY_EXISTS",
                metadata={"username": username},
            ) from None
        if row is None:  # INSERT ... RETURNING returns its row or raises
            raise RuntimeError("user insert returned no row")
        return to_proto(row)

    async def count(self) -> int:
        async with self._db.autocommit() as conn:
            cur = await conn.execute("SELECT count(*) AS n FROM users")
            row = await cur.fetchone()
        return int(row["n"]) if row else 0

    async def CreateUser(
        self, request: pb.CreateUserRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateUserResponse:
        user = await self.create(
            request.username,
            request.password_hash,
            list(request.roles),
            request.kind or pb.ACCOUNT_KIND_USER,
        )
        return pb.CreateUserResponse(user=user)

    async def GetUser(
        self, request: pb.GetUserRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetUserResponse:
        if request.username:
            query, arg = f"SELECT {_COLUMNS} FROM users WHERE username = %s", request.username
        elif request.user_id:
            try:
                arg = str(uuid.UUID(request.user_id))
            except ValueError:
                raise InvalidArgument([("user_id", "must be a UUID")]) from None
            query = f"SELECT {_COLUMNS} FROM users WHERE user_id = %s"
        else:
            raise InvalidArgument([("username", "username or user_id is required")])
        async with self._db.autocommit() as conn:
            cur = await conn.execute(query, (arg,))
            row = await cur.fetchone()
        if row is None:
            raise NotFound(
                "user not found",
                reason="USER_NOT_FOUND",
                metadata={"username": request.username, "userId": request.user_id},
            )
        return pb.GetUserResponse(user=to_proto(row))

    async def ListUsers(
        self, request: pb.ListUsersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListUsersResponse:
        v = Violations()
        v.check(0 <= request.page_size <= 1000, "page_size", "must be between 0 and 1000")
        v.check(request.kind in (pb.ACCOUNT_KIND_UNSPECIFIED, *_KIND_NAMES), "kind", "unknown kind")
        v.raise_if_any()
        size = request.page_size or 100
        after = _page_after(request.page_token) if request.page_token else ""
        kind = _KIND_NAMES.get(request.kind)  # None: every kind
        async with self._db.autocommit() as conn:
            cur = await conn.execute(
                f"SELECT {_COLUMNS} FROM users WHERE username > %s"
                f" AND (%s::text IS NULL OR kind = %s) ORDER BY username LIMIT %s",
                (after, kind, kind, size + 1),
            )
            rows = await cur.fetchall()
        more = len(rows) > size
        rows = rows[:size]
        return pb.ListUsersResponse(
            users=[to_proto(r) for r in rows],
            next_page_token=_page_token(rows[-1]["username"]) if more else "",
        )

    async def UpdateUser(
        self, request: pb.UpdateUserRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateUserResponse:
        v = Violations()
        v.text(request.username, "username", max_chars=MAX_USERNAME)
        v.check(len(request.roles) <= MAX_ROLES, "roles", f"at most {MAX_ROLES} roles")
        v.check(request.set_roles or request.set_disabled, "set_roles", "nothing to update")
        v.raise_if_any()
        async with self._db.pool.connection() as conn:
            cur = await conn.execute(
                f"UPDATE users SET"
                f" roles = CASE WHEN %(set_roles)s THEN %(roles)s ELSE roles END,"
                f" disabled = CASE WHEN %(set_disabled)s THEN %(disabled)s ELSE disabled END,"
                f" updated_at = now()"
                f" WHERE username = %(username)s RETURNING {_COLUMNS}",
                {
                    "set_roles": request.set_roles,
                    "roles": list(request.roles),
                    "set_disabled": request.set_disabled,
                    "disabled": request.disabled,
                    "username": request.username,
                },
            )
            row = await cur.fetchone()
        if row is None:
            raise NotFound(
                "user not found", reason="USER_NOT_FOUND", metadata={"username": request.username}
            )
        return pb.UpdateUserResponse(user=to_proto(row))
