"""The data platform service: the only process holding database connections."""

from __future__ import annotations

import asyncio
import logging
import secrets
import sys

import grpc

from aiwfe.data.v1 import (
    cache_store_service_pb2,
    schedule_store_service_pb2,
    token_store_service_pb2,
    token_store_service_pb2_grpc,
    user_store_service_pb2,
    vector_store_service_pb2,
    vector_store_service_pb2_grpc,
    workflow_store_service_pb2,
)
from aiwfe.data.v1 import cache_store_service_pb2_grpc as cache_grpc
from aiwfe.data.v1 import schedule_store_service_pb2_grpc as schedule_store_grpc
from aiwfe.data.v1 import user_store_service_pb2_grpc as user_grpc
from aiwfe.data.v1 import workflow_store_service_pb2_grpc as workflow_store_grpc
from aiwfe.runtime.config import Settings
from aiwfe.runtime.errors import AlreadyExists
from aiwfe.runtime.identity import InternalIdentity
from aiwfe.runtime.interceptors import InternalIdentityInterceptor
from aiwfe.runtime.passwords import hash_password_async
from aiwfe.runtime.rbac import Rbac
from aiwfe.runtime.redis_client import RedisClient
from aiwfe.runtime.server import Service
from aiwfe.runtime.telemetry import quiet
from dataplatform.cache_store import CacheStore
from dataplatform.collection_access import CollectionAccessStore
from dataplatform.db import Database
from dataplatform.guard import DatabaseGuard
from dataplatform.replica_bus import ReplicaBus
from dataplatform.token_store import TokenStore
from dataplatform.users import UserStore
from dataplatform.vector_service import VectorService
from dataplatform.workflows import WorkflowStore
from dataplatform.workflows.retention import Retention
from dataplatform.workflows.schedules import ScheduleStore

log = logging.getLogger("aiwfe.dataplatform")
_PURGE_INTERVAL = 60.0
# Services answered from PostgreSQL (DatabaseGuard fails them fast while it is down). The
# vector store is one since collections' owners and grants live there: cognitive cannot
# authorize any collection call without them.
_DATABASE_BACKED = [
    user_store_service_pb2.DESCRIPTOR.services_by_name["UserStoreService"].full_name,
    cache_store_service_pb2.DESCRIPTOR.services_by_name["CacheStoreService"].full_name,
    workflow_store_service_pb2.DESCRIPTOR.services_by_name["WorkflowStoreService"].full_name,
    token_store_service_pb2.DESCRIPTOR.services_by_name["TokenStoreService"].full_name,
    vector_store_service_pb2.DESCRIPTOR.services_by_name["VectorStoreService"].full_name,
    schedule_store_service_pb2.DESCRIPTOR.services_by_name["ScheduleStoreService"].full_name,
]


class DataPlatformService(Service):
    name = "dataplatform"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.identity = InternalIdentity.from_settings(settings)
        self.db = Database(settings.require("database.postgres.dsn"), settings.database.postgres)
        self.users = UserStore(self.db)
        self.cache = CacheStore(self.db)
        self.workflows = WorkflowStore(
            self.db, settings.taskproc.max_fan_out_items, settings.taskproc.watches_per_stream
        )
        self.schedules = ScheduleStore(
            self.db,
            self.workflows.repo,
            self.workflows.wakeups,
            settings.taskproc,
            Rbac(settings.rbac),
        )
        self.retention = Retention(self.workflows.repo, settings.taskproc)
        self.redis = RedisClient(settings.redis)
        self.replicas = ReplicaBus(self.redis, self.workflows.wakeups, self.workflows.stopped_among)
        self.workflows.wakeups.peers = self.replicas
        self.tokens = TokenStore(self.db)
        self.vectors = VectorService(
            settings.qdrant,
            settings.home_path,
            access=CollectionAccessStore(self.db),
            log=settings.logging,
        )
        self._purger: asyncio.Task[None] | None = None
        self._maintainer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        with quiet(not self.settings.telemetry.trace_polling):  # the stall watch's probes
            await self.db.open()
        await self._bootstrap_admin()
        # Background loops are untraced (telemetry.trace_polling turns them on).
        with quiet(not self.settings.telemetry.trace_polling):
            self._purger = asyncio.create_task(self._purge_loop())
            interval = self.settings.database.connection_strategy.health_check_interval
            self._maintainer = asyncio.create_task(self.db.maintain(interval))
            self.replicas.start()
            self.schedules.ticker.start()
            self.retention.start()
            self.workflows.timers.start()

    async def _bootstrap_admin(self) -> None:
        """Creates the first admin on an empty user table (from config, or generated once)."""
        if await self.users.count():
            return
        admin = self.settings.authentication.admin
        password = admin.password
        generated = password is None
        if password is None:
            password = secrets.token_urlsafe(18)
        try:
            user = await self.users.create(
                admin.username, await hash_password_async(password), ["admin"]
            )
        except AlreadyExists:  # another replica (or process) created it in the meantime
            return
        log.info("created bootstrap admin %r", user.username)
        if generated:
            # Shown once on the terminal, never written to the logs.
            print(
                f"aiwfe: bootstrap admin '{admin.username}' created with generated password: "
                f"{password}  (shown once; set AIWFE_ADMIN_PASSWORD to choose it)",
                file=sys.stdout,
                flush=True,
            )

    async def _purge_loop(self) -> None:
        while True:
            await asyncio.sleep(_PURGE_INTERVAL)
            await self.purge_expired()

    async def purge_expired(self) -> None:
        """Deletes expired cache entries and tokens; a failure is logged and the next
        round retries (one failing purge never stops the other)."""
        for name, purge in (
            ("cache entries", self.cache.purge_expired),
            ("tokens", self.tokens.purge_expired),
        ):
            try:
                await purge()
            except Exception:
                log.warning("purging expired %s failed", name, exc_info=True)

    def register(self, server: grpc.aio.Server) -> list[str]:
        user_grpc.add_UserStoreServiceServicer_to_server(self.users, server)
        cache_grpc.add_CacheStoreServiceServicer_to_server(self.cache, server)
        workflow_store_grpc.add_WorkflowStoreServiceServicer_to_server(self.workflows, server)
        token_store_service_pb2_grpc.add_TokenStoreServiceServicer_to_server(self.tokens, server)
        vector_store_service_pb2_grpc.add_VectorStoreServiceServicer_to_server(self.vectors, server)
        schedule_store_grpc.add_ScheduleStoreServiceServicer_to_server(self.schedules, server)
        return list(_DATABASE_BACKED)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [
            InternalIdentityInterceptor(self.identity),
            DatabaseGuard(self.db, _DATABASE_BACKED),
        ]

    async def healthy(self) -> bool:
        """PostgreSQL answers; also exports database_connection_pool_usage on every probe."""
        ok = await self.db.ping()
        self.db.export_usage()
        return ok

    async def stop(self) -> None:
        await self.workflows.timers.stop()
        await self.schedules.ticker.stop()
        await self.retention.stop()
        if self._purger:
            self._purger.cancel()
        if self._maintainer:
            self._maintainer.cancel()
        await self.replicas.stop()
        await self.redis.close()
        await self.db.close()
        await self.vectors.close()
