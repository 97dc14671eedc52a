"""TokenStoreService: refresh-token families, API keys and the revocation record in PostgreSQL.

Refresh tokens are stored as their SHA-256 only. Rotation spends a token under a row lock;
presenting a spent token revokes its whole family and the access tokens issued from it
(RFC 9700). Every revocation is an event in `token_revocations`, which gateway replicas
replay at start-up and poll when their push channel (Redis pub/sub) is down.

API keys (migration 007) are stored as the SHA-256 of the whole key; the gateway compares
hashes (in constant time) and builds the principal from GetApiKey's answer.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import grpc
import psycopg
from google.protobuf.timestamp_pb2 import Timestamp

from aiwfe.data.v1 import token_store_service_pb2 as pb
from aiwfe.data.v1 import token_store_service_pb2_grpc as pb_grpc
from aiwfe.runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from aiwfe.runtime.validation import Violations
from dataplatform.db import Database, DictConnection
from dataplatform.users import COLUMNS as USER_COLUMNS
from dataplatform.users import to_proto as user_proto

MAX_ITEMS = 100
MAX_JTI_CHARS = 128
MAX_PAGE = 10_000
MAX_KEY_ID_CHARS = 64
MAX_KEY_NAME_CHARS = 64
MAX_USES = 10_000
_KEY_COLUMNS = "key_id, account_id, name, created_at, expires_at, revoked_at, last_used_at"


def _ts(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def _dt(ts: Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


def _uuid(value: str, field: str, v: Violations) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        v.add(field, "must be a UUID")
        return ""


def _check_hash(value: bytes, field: str, v: Violations) -> None:
    v.check(len(value) == 32, field, "must be a SHA-256 digest (32 bytes)")


def _check_access(token: pb.RevokedAccessToken, field: str, v: Violations) -> None:
    v.text(token.jti, f"{field}.jti", max_chars=MAX_JTI_CHARS)
    v.check(token.HasField("expire_time"), f"{field}.expire_time", "is required")


def _revoked(row: dict[str, Any]) -> pb.RevokedAccessToken:
    return pb.RevokedAccessToken(jti=row["jti"], expire_time=_ts(row["expires_at"]))


def _api_key(row: dict[str, Any], with_hash: bool = False) -> pb.StoredApiKey:
    key = pb.StoredApiKey(
        key_id=row["key_id"],
        account_id=str(row["account_id"]),
        name=row["name"],
        secret_hash=row["secret_hash"] if with_hash else b"",
        create_time=_ts(row["created_at"]),
    )
    for field, column in (
        ("expire_time", "expires_at"),
        ("revoke_time", "revoked_at"),
        ("last_used_time", "last_used_at"),
    ):
        if row[column] is not None:
            getattr(key, field).CopyFrom(_ts(row[column]))
    return key


def _key_not_found(key_id: str) -> NotFound:
    return NotFound("API key not found", reason="API_KEY_NOT_FOUND", metadata={"keyId": key_id})


class TokenStore(pb_grpc.TokenStoreServiceServicer):
    def __init__(self, db: Database) -> None:
        self._db = db

    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateSessionResponse:
        v = Violations()
        user_id = _uuid(request.user_id, "user_id", v)
        family_id = _uuid(request.family_id, "family_id", v)
        _check_hash(request.refresh_token_hash, "refresh_token_hash", v)
        v.check(request.HasField("refresh_expire_time"), "refresh_expire_time", "is required")
        _check_access(request.access_token, "access_token", v)
        v.raise_if_any()
        try:
            async with self._db.pool.connection() as conn:
                await conn.execute(
                    "INSERT INTO token_families (family_id, user_id) VALUES (%s, %s)",
                    (family_id, user_id),
                )
                await conn.execute(
                    "INSERT INTO refresh_tokens (token_hash, family_id, expires_at)"
                    " VALUES (%s, %s, %s)",
                    (request.refresh_token_hash, family_id, _dt(request.refresh_expire_time)),
                )
                await conn.execute(
                    "INSERT INTO family_access_tokens (jti, family_id, expires_at)"
                    " VALUES (%s, %s, %s)",
                    (request.access_token.jti, family_id, _dt(request.access_token.expire_time)),
                )
        except psycopg.errors.UniqueViolation:
            raise AlreadyExists("session already exists", reason="SESSION_ALREADY_EXISTS") from None
        except psycopg.errors.ForeignKeyViolation:
            raise InvalidArgument([("user_id", "no such user")]) from None
        return pb.CreateSessionResponse()

    async def RotateRefreshToken(
        self, request: pb.RotateRefreshTokenRequest, context: grpc.aio.ServicerContext
    ) -> pb.RotateRefreshTokenResponse:
        v = Violations()
        _check_hash(request.refresh_token_hash, "refresh_token_hash", v)
        _check_hash(request.new_refresh_token_hash, "new_refresh_token_hash", v)
        v.check(request.HasField("refresh_expire_time"), "refresh_expire_time", "is required")
        _check_access(request.access_token, "access_token", v)
        v.raise_if_any()
        invalid = pb.RotateRefreshTokenResponse(outcome=pb.ROTATE_OUTCOME_INVALID)
        async with self._db.pool.connection() as conn, conn.transaction():
            # The row lock serialises concurrent presentations of one token: exactly one
            # rotates, every other one sees it spent.
            cur = await conn.execute(
                "SELECT t.family_id, t.expires_at, t.spent_at, f.revoked_at, f.user_id,"
                " u.username, u.roles, u.disabled"
                " FROM refresh_tokens t JOIN token_families f USING (family_id)"
                " JOIN users u ON u.user_id = f.user_id"
                " WHERE t.token_hash = %s FOR UPDATE OF t, f",
                (request.refresh_token_hash,),
            )
            row = await cur.fetchone()
            if row is None or row["revoked_at"] is not None:
                return invalid
            family_id = row["family_id"]
            if row["spent_at"] is not None:
                revoked = await self._revoke_families(conn, [family_id], "refresh_reuse")
                return pb.RotateRefreshTokenResponse(
                    outcome=pb.ROTATE_OUTCOME_REUSED,
                    family_id=str(family_id),
                    user_id=str(row["user_id"]),
                    revoked=revoked,
                )
            if row["expires_at"] <= datetime.now(UTC) or row["disabled"]:
                return invalid
            await conn.execute(
                "UPDATE refresh_tokens SET spent_at = now() WHERE token_hash = %s",
                (request.refresh_token_hash,),
            )
            await conn.execute(
                "INSERT INTO refresh_tokens (token_hash, family_id, expires_at)"
                " VALUES (%s, %s, %s)",
                (request.new_refresh_token_hash, family_id, _dt(request.refresh_expire_time)),
            )
            await conn.execute(
                "INSERT INTO family_access_tokens (jti, family_id, expires_at) VALUES (%s, %s, %s)",
                (request.access_token.jti, family_id, _dt(request.access_token.expire_time)),
            )
        return pb.RotateRefreshTokenResponse(
            outcome=pb.ROTATE_OUTCOME_ROTATED,
            family_id=str(family_id),
            user_id=str(row["user_id"]),
            username=row["username"],
            roles=row["roles"],
        )

    async def _revoke_families(
        self, conn: DictConnection, family_ids: list[Any], reason: str
    ) -> list[pb.RevokedAccessToken]:
        """Marks families revoked and records a revocation of each live access token."""
        if not family_ids:
            return []
        await conn.execute(
            "UPDATE token_families SET revoked_at = now(), revoke_reason = %s"
            " WHERE family_id = ANY(%s) AND revoked_at IS NULL",
            (reason, family_ids),
        )
        cur = await conn.execute(
            "INSERT INTO token_revocations (jti, expires_at, reason)"
            " SELECT jti, expires_at, %s FROM family_access_tokens"
            " WHERE family_id = ANY(%s) AND expires_at > now()"
            " RETURNING jti, expires_at",
            (reason, family_ids),
        )
        return [_revoked(r) for r in await cur.fetchall()]

    async def RevokeTokens(
        self, request: pb.RevokeTokensRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeTokensResponse:
        v = Violations()
        v.check(len(request.access_tokens) <= MAX_ITEMS, "access_tokens", f"at most {MAX_ITEMS}")
        v.check(len(request.family_ids) <= MAX_ITEMS, "family_ids", f"at most {MAX_ITEMS}")
        for i, token in enumerate(request.access_tokens):
            _check_access(token, f"access_tokens[{i}]", v)
        families = [_uuid(f, f"family_ids[{i}]", v) for i, f in enumerate(request.family_ids)]
        user_id = _uuid(request.user_id, "user_id", v) if request.user_id else ""
        if user_id:
            v.check(
                request.HasField("watermark_expire_time"), "watermark_expire_time", "is required"
            )
        v.check(len(request.reason) <= 64, "reason", "at most 64 characters")
        v.raise_if_any()
        reason = request.reason or "revoked"
        response = pb.RevokeTokensResponse()
        async with self._db.pool.connection() as conn, conn.transaction():
            for token in request.access_tokens:
                await conn.execute(
                    "INSERT INTO token_revocations (jti, expires_at, reason) VALUES (%s, %s, %s)",
                    (token.jti, _dt(token.expire_time), reason),
                )
                response.revoked.append(token)
            if user_id and request.revoke_user_families:
                cur = await conn.execute(
                    "SELECT family_id FROM token_families"
                    " WHERE user_id = %s AND revoked_at IS NULL",
                    (user_id,),
                )
                families += [str(r["family_id"]) for r in await cur.fetchall()]
            response.revoked.extend(await self._revoke_families(conn, families, reason))
            if user_id:
                cur = await conn.execute(
                    "INSERT INTO token_revocations (user_id, not_before, expires_at, reason)"
                    " VALUES (%s, now(), %s, %s) RETURNING not_before",
                    (user_id, _dt(request.watermark_expire_time), reason),
                )
                row = await cur.fetchone()
                if row is None:  # INSERT ... RETURNING returns its row or raises
                    raise RuntimeError("revocation insert returned no row")
                response.not_before.CopyFrom(_ts(row["not_before"]))
        return response

    async def ListRevocations(
        self, request: pb.ListRevocationsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRevocationsResponse:
        v = Violations()
        v.check(request.after_id >= 0, "after_id", "must not be negative")
        v.check(0 <= request.page_size <= MAX_PAGE, "page_size", f"must be 0 to {MAX_PAGE}")
        v.check(0 <= request.lookback_seconds <= 60, "lookback_seconds", "must be 0 to 60")
        v.raise_if_any()
        size = request.page_size or 1000
        async with self._db.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT id, jti, user_id, not_before, expires_at FROM token_revocations"
                " WHERE expires_at > now() AND (id > %s"
                "   OR created_at > now() - %s * interval '1 second')"
                " ORDER BY id LIMIT %s",
                (request.after_id, request.lookback_seconds, size + 1),
            )
            rows = await cur.fetchall()
        more = len(rows) > size
        rows = rows[:size]
        response = pb.ListRevocationsResponse(
            more=more, last_id=max([request.after_id, *(r["id"] for r in rows)])
        )
        for r in rows:
            event = pb.Revocation(id=r["id"])
            if r["jti"] is not None:
                event.access_token.CopyFrom(_revoked(r))
            else:
                event.user_id = str(r["user_id"])
                event.not_before.CopyFrom(_ts(r["not_before"]))
                event.expire_time.CopyFrom(_ts(r["expires_at"]))
            response.revocations.append(event)
        return response

    # --- API keys ---------------------------------------------------------------------------

    async def CreateApiKey(
        self, request: pb.CreateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateApiKeyResponse:
        v = Violations()
        v.text(request.key_id, "key_id", max_chars=MAX_KEY_ID_CHARS)
        account_id = _uuid(request.account_id, "account_id", v)
        v.text(request.name, "name", max_chars=MAX_KEY_NAME_CHARS, required=False)
        _check_hash(request.secret_hash, "secret_hash", v)
        v.raise_if_any()
        expires = _dt(request.expire_time) if request.HasField("expire_time") else None
        try:
            async with self._db.pool.connection() as conn, conn.transaction():
                # Locks the account row: a concurrent DisableUser cannot slip in between
                # the check and the insert.
                cur = await conn.execute(
                    "SELECT username, disabled FROM users"
                    " WHERE user_id = %s AND kind = 'service' FOR SHARE",
                    (account_id,),
                )
                account = await cur.fetchone()
                if account is None:
                    raise NotFound(
                        "service account not found",
                        reason="SERVICE_ACCOUNT_NOT_FOUND",
                        metadata={"userId": account_id},
                    )
                if account["disabled"]:
                    raise FailedPrecondition(
                        "the service account is disabled",
                        reason="SERVICE_ACCOUNT_DISABLED",
                        metadata={"serviceAccount": account["username"]},
                    )
                cur = await conn.execute(
                    f"INSERT INTO api_keys (key_id, account_id, name, secret_hash, expires_at)"
                    f" VALUES (%s, %s, %s, %s, %s) RETURNING {_KEY_COLUMNS}",
                    (request.key_id, account_id, request.name, request.secret_hash, expires),
                )
                row = await cur.fetchone()
        except psycopg.errors.UniqueViolation:
            raise AlreadyExists("API key id taken", reason="API_KEY_ALREADY_EXISTS") from None
        if row is None:  # INSERT ... RETURNING returns its row or raises
            raise RuntimeError("API key insert returned no row")
        return pb.CreateApiKeyResponse(api_key=_api_key(row))

    async def GetApiKey(
        self, request: pb.GetApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetApiKeyResponse:
        v = Violations()
        v.text(request.key_id, "key_id", max_chars=MAX_KEY_ID_CHARS)
        v.raise_if_any()
        names = [c.strip() for c in USER_COLUMNS.split(",")]
        columns = ", ".join(f"u.{c} AS u_{c}" for c in names)  # keys share column names
        async with self._db.autocommit() as conn:
            cur = await conn.execute(
                f"SELECT k.key_id, k.account_id, k.name, k.secret_hash, k.created_at,"
                f" k.expires_at, k.revoked_at, k.last_used_at, now() AS read_at, {columns}"
                f" FROM api_keys k JOIN users u ON u.user_id = k.account_id"
                f" WHERE k.key_id = %s",
                (request.key_id,),
            )
            row = await cur.fetchone()
        if row is None:
            raise _key_not_found(request.key_id)
        return pb.GetApiKeyResponse(
            api_key=_api_key(row, with_hash=True),
            account=user_proto({c: row[f"u_{c}"] for c in names}),
            read_time=_ts(row["read_at"]),
        )

    async def ListApiKeys(
        self, request: pb.ListApiKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListApiKeysResponse:
        v = Violations()
        account_id = _uuid(request.account_id, "account_id", v)
        v.check(0 <= request.page_size <= 1000, "page_size", "must be between 0 and 1000")
        v.text(request.page_token, "page_token", max_chars=MAX_KEY_ID_CHARS, required=False)
        v.raise_if_any()
        size = request.page_size or 100
        async with self._db.autocommit() as conn:
            # Keyset paging on (created_at, key_id); the token is the last key_id returned.
            cur = await conn.execute(
                f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE account_id = %(account)s"
                f" AND (%(after)s = '' OR (created_at, key_id) >"
                f"  (SELECT created_at, key_id FROM api_keys WHERE key_id = %(after)s))"
                f" ORDER BY created_at, key_id LIMIT %(limit)s",
                {"account": account_id, "after": request.page_token, "limit": size + 1},
            )
            rows = await cur.fetchall()
        more = len(rows) > size
        rows = rows[:size]
        return pb.ListApiKeysResponse(
            api_keys=[_api_key(r) for r in rows],
            next_page_token=rows[-1]["key_id"] if more else "",
        )

    async def RevokeApiKey(
        self, request: pb.RevokeApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeApiKeyResponse:
        v = Violations()
        v.text(request.key_id, "key_id", max_chars=MAX_KEY_ID_CHARS)
        _check_access(request.access_token, "access_token", v)
        v.raise_if_any()
        response = pb.RevokeApiKeyResponse()
        async with self._db.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_id = %s FOR UPDATE",
                (request.key_id,),
            )
            row = await cur.fetchone()
            if row is None:
                raise _key_not_found(request.key_id)
            if row["revoked_at"] is None:
                cur = await conn.execute(
                    f"UPDATE api_keys SET revoked_at = now() WHERE key_id = %s"
                    f" RETURNING {_KEY_COLUMNS}",
                    (request.key_id,),
                )
                row = await cur.fetchone()
                if row is None:  # the row is locked: the update finds it
                    raise RuntimeError("API key vanished under its lock")
                # The event lives until the key's own expiry if that comes first.
                cur = await conn.execute(
                    "INSERT INTO token_revocations (jti, expires_at, reason)"
                    " VALUES (%s, LEAST(%s::timestamptz, %s::timestamptz), 'api_key_revoked')"
                    " RETURNING jti, expires_at",
                    (request.access_token.jti, _dt(request.access_token.expire_time),
                     row["expires_at"]),
                )  # fmt: skip
                event = await cur.fetchone()
                if event is None:  # INSERT ... RETURNING returns its row or raises
                    raise RuntimeError("revocation insert returned no row")
                response.revoked.append(_revoked(event))
        response.api_key.CopyFrom(_api_key(row))
        return response

    async def RecordApiKeyUse(
        self, request: pb.RecordApiKeyUseRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordApiKeyUseResponse:
        v = Violations()
        v.check(len(request.uses) <= MAX_USES, "uses", f"at most {MAX_USES}")
        for i, use in enumerate(request.uses[:MAX_USES]):
            v.text(use.key_id, f"uses[{i}].key_id", max_chars=MAX_KEY_ID_CHARS)
            v.check(use.HasField("last_used_time"), f"uses[{i}].last_used_time", "is required")
        v.raise_if_any()
        if not request.uses:
            return pb.RecordApiKeyUseResponse()
        async with self._db.autocommit() as conn:
            # One statement for the batch; a use never moves last_used_at back (replicas
            # flush independently and out of order).
            await conn.execute(
                "UPDATE api_keys k SET last_used_at = GREATEST(k.last_used_at, u.at)"
                " FROM unnest(%s::text[], %s::timestamptz[]) AS u(key_id, at)"
                " WHERE k.key_id = u.key_id",
                (
                    [use.key_id for use in request.uses],
                    [_dt(use.last_used_time) for use in request.uses],
                ),
            )
        return pb.RecordApiKeyUseResponse()

    async def purge_expired(self) -> int:
        """Forgets expired tokens, families with nothing left and revocations past expiry."""
        async with self._db.pool.connection() as conn:
            cur = await conn.execute("DELETE FROM token_revocations WHERE expires_at <= now()")
            n = cur.rowcount
            await conn.execute("DELETE FROM family_access_tokens WHERE expires_at <= now()")
            cur = await conn.execute("DELETE FROM refresh_tokens WHERE expires_at <= now()")
            n += cur.rowcount
            await conn.execute(
                "DELETE FROM token_families f WHERE NOT EXISTS"
                " (SELECT 1 FROM refresh_tokens t WHERE t.family_id = f.family_id)"
            )
        return n
