"""Fail fast while PostgreSQL is unreachable: the database-backed RPCs answer UNAVAILABLE at
once instead of each waiting out its deadline for a pool connection, and a connection lost
mid-call is UNAVAILABLE too (never INTERNAL), as is a call in flight when a probe finds the
database down (`Database.run`): it ends then, not at its deadline. The vector store does
not need PostgreSQL and is left alone.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Any

import grpc
import psycopg

from aiwfe.runtime.errors import Unavailable
from aiwfe.runtime.interceptors import Behavior, HandlerCache, MethodInterceptor, rejecting_handler
from dataplatform.db import Database

_DOWN = "the database is unavailable; retry later"


def database_unavailable() -> Unavailable:
    """What a call, or one watch of a multiplexed stream, ends with when PostgreSQL is lost."""
    return Unavailable(_DOWN, reason="DATABASE_UNAVAILABLE", metadata={"dependency": "postgresql"})


def _unavailable_on_db_errors(db: Database, behavior: Behavior, streaming: bool) -> Behavior:
    """`behavior` with lost connections and pool timeouts turned into UNAVAILABLE; a unary
    call also ends UNAVAILABLE as soon as a probe finds the database down mid-call."""
    if streaming:

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
            try:
                async for item in behavior(request, context):
                    yield item
            except psycopg.OperationalError:
                raise database_unavailable() from None

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await db.run(behavior(request, context))
        except psycopg.OperationalError:  # DatabaseLost included
            raise database_unavailable() from None

    return unary


class DatabaseGuard(MethodInterceptor):
    """Guards the RPCs of `services` (full names) by the database's last health probe."""

    def __init__(self, db: Database, services: list[str]) -> None:
        self._db = db
        self._prefixes = tuple(f"/{name}/" for name in services)
        self._cache = HandlerCache(lambda _: functools.partial(_unavailable_on_db_errors, db))

    async def intercept(
        self, method: str, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        if not method.startswith(self._prefixes):
            return handler
        if not self._db.reachable:
            return rejecting_handler(handler, database_unavailable())
        return self._cache.get(method, handler)
