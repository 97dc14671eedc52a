"""Who owns each vector collection and whom it is shared with, in PostgreSQL.

The data platform only records; CognitiveService decides (it knows the caller). A collection
without an owner row predates ownership (migration 005) and answers an empty access.
"""

from __future__ import annotations

from typing import Any

from aiwfe.data.v1 import vector_store_service_pb2 as pb
from aiwfe.runtime.errors import NotFound
from aiwfe.runtime.validation import Violations
from dataplatform.db import Database, DictConnection

MAX_ROLE_CHARS = 64
MAX_USERNAME_CHARS = 64


def _grantee(username: str, role: str) -> Violations:
    v = Violations()
    if bool(username) == bool(role):
        v.add("username", "set exactly one of username and role")
    v.text(username, "username", max_chars=MAX_USERNAME_CHARS, required=False)
    v.text(role, "role", max_chars=MAX_ROLE_CHARS, required=False)
    return v


class CollectionAccessStore:
    """Owner rows and grants; every change answers the collection's access after it."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def set_owner(self, name: str, owner_id: str, owner_username: str) -> None:
        """Records a new collection's owner, dropping what a deleted namesake left behind."""
        async with self._db.pool.connection() as conn:
            await conn.execute("DELETE FROM collection_owners WHERE name = %s", (name,))
            await conn.execute(
                "INSERT INTO collection_owners (name, owner_id, owner_username)"
                " VALUES (%s, %s, %s)",
                (name, owner_id, owner_username),
            )

    async def forget(self, name: str) -> None:
        """Removes a deleted collection's owner row and grants."""
        async with self._db.pool.connection() as conn:
            await conn.execute("DELETE FROM collection_owners WHERE name = %s", (name,))

    async def get(self, name: str) -> pb.CollectionAccess:
        async with self._db.autocommit() as conn:
            return (await self._read(conn, [name]))[name]

    async def get_many(self, names: list[str]) -> dict[str, pb.CollectionAccess]:
        async with self._db.autocommit() as conn:
            return await self._read(conn, names)

    async def grant(self, name: str, username: str, role: str, write: bool) -> pb.CollectionAccess:
        """Adds or replaces a grant; a legacy collection gets an (unowned) row first.

        Raises:
            NotFound: when `username` names no user.
        """
        _grantee(username, role).raise_if_any()
        async with self._db.pool.connection() as conn:
            kind, grantee = "role", role
            if username:
                cur = await conn.execute(
                    "SELECT user_id FROM users WHERE username = %s", (username,)
                )
                row = await cur.fetchone()
                if row is None:
                    raise NotFound(
                        f"user {username!r} not found",
                        reason="USER_NOT_FOUND",
                        metadata={"username": username},
                    )
                kind, grantee = "user", str(row["user_id"])
            await conn.execute(
                "INSERT INTO collection_owners (name) VALUES (%s) ON CONFLICT DO NOTHING", (name,)
            )
            await conn.execute(
                "INSERT INTO collection_grants (name, grantee_kind, grantee, username, can_write)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (name, grantee_kind, grantee)"
                " DO UPDATE SET can_write = EXCLUDED.can_write, username = EXCLUDED.username",
                (name, kind, grantee, username, write),
            )
            return (await self._read(conn, [name]))[name]

    async def revoke(self, name: str, username: str, role: str) -> pb.CollectionAccess:
        """Removes a grant (nothing to remove is not an error: the call is idempotent)."""
        _grantee(username, role).raise_if_any()
        async with self._db.pool.connection() as conn:
            if username:
                await conn.execute(
                    "DELETE FROM collection_grants g USING users u WHERE g.name = %s"
                    " AND g.grantee_kind = 'user' AND g.grantee = u.user_id::text"
                    " AND u.username = %s",
                    (name, username),
                )
            else:
                await conn.execute(
                    "DELETE FROM collection_grants WHERE name = %s AND grantee_kind = 'role'"
                    " AND grantee = %s",
                    (name, role),
                )
            return (await self._read(conn, [name]))[name]

    @staticmethod
    async def _read(conn: DictConnection, names: list[str]) -> dict[str, pb.CollectionAccess]:
        """One round trip: a row per grant, or one grant-less row per owned collection."""
        out = {name: pb.CollectionAccess() for name in names}
        cur = await conn.execute(
            "SELECT o.name, o.owner_id, o.owner_username, g.grantee_kind, g.grantee,"
            " g.can_write, coalesce(u.username, g.username) AS username"
            " FROM collection_owners o"
            " LEFT JOIN collection_grants g ON g.name = o.name"
            " LEFT JOIN users u ON g.grantee_kind = 'user' AND u.user_id::text = g.grantee"
            " WHERE o.name = ANY(%s) ORDER BY o.name, g.grantee_kind DESC, 7, g.grantee",
            (names,),
        )
        for row in await cur.fetchall():
            access = out[row["name"]]
            access.owner_id, access.owner_username = row["owner_id"], row["owner_username"]
            if row["grantee_kind"] is not None:
                access.grants.append(_grant(row))
        return out


def _grant(row: dict[str, Any]) -> pb.CollectionGrant:
    if row["grantee_kind"] == "user":
        return pb.CollectionGrant(
            user_id=row["grantee"], username=row["username"], write=row["can_write"]
        )
    return pb.CollectionGrant(role=row["grantee"], write=row["can_write"])
