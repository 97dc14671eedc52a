"""ScheduleService: the public, owner-scoped API of schedules (validation here, storage and
ticking in dataplatform's ScheduleStoreService, dataplatform/workflows/schedules.py).

A schedule's spec is validated exactly as SubmitWorkflow validates a spec
(`taskproc.spec.validate`), and every mistake of the request, in the spec or not, comes back
as one INVALID_ARGUMENT listing each field. Its workflows run as its owner: the owner's
id, name and roles are stored with it at create.
"""

from __future__ import annotations

import grpc

from aiwfe.data.v1 import schedule_store_service_pb2 as store_pb
from aiwfe.data.v1 import schedule_store_service_pb2_grpc as store_grpc
from aiwfe.data.v1 import workflow_store_service_pb2 as wf_store_pb
from aiwfe.runtime import cron
from aiwfe.runtime.channels import Upstream
from aiwfe.runtime.config import Settings
from aiwfe.runtime.errors import InvalidArgument
from aiwfe.runtime.identity import InternalIdentity
from aiwfe.runtime.page_tokens import PageTokens
from aiwfe.runtime.validation import Violations
from aiwfe.taskproc.v1 import schedule_service_pb2 as pb
from aiwfe.taskproc.v1 import schedule_service_pb2_grpc as pb_grpc
from taskproc import owners
from taskproc.spec import validate

MAX_SCHEDULE_NAME = 200
MAX_SCHEDULE_ID = 64
MAX_PAGE_SIZE = 1000


def _check_id(schedule_id: str) -> None:
    v = Violations()
    v.text(schedule_id, "schedule_id", max_chars=MAX_SCHEDULE_ID)
    v.raise_if_any()


class ScheduleServicer(pb_grpc.ScheduleServiceServicer):
    def __init__(self, settings: Settings, store: Upstream, identity: InternalIdentity) -> None:
        self._limits = settings.taskproc
        self._store = store
        self._stub = store_grpc.ScheduleStoreServiceStub(store.channel)
        self._pages = PageTokens(identity.derived_key("page-tokens"), "ListSchedules")

    def _validated(self, request: pb.CreateScheduleRequest) -> pb.Schedule:
        """The schedule to store (spec with its defaults), or every violation at once."""
        v = Violations()
        v.text(request.name, "name", max_chars=MAX_SCHEDULE_NAME)
        for field, problem in cron.problems(request.cron, request.time_zone):
            v.add(field, problem)
        v.check(
            request.overlap_policy in pb.OverlapPolicy.values(),
            "overlap_policy",
            f"unknown overlap policy {request.overlap_policy}",
        )
        v.check(
            request.catch_up_policy in pb.CatchUpPolicy.values(),
            "catch_up_policy",
            f"unknown catch-up policy {request.catch_up_policy}",
        )
        try:
            spec = validate(request.spec, self._limits)
        except InvalidArgument as exc:
            raise InvalidArgument([*v.items, *exc.violations]) from None
        v.raise_if_any()
        return pb.Schedule(
            name=request.name,
            cron=request.cron,
            time_zone=request.time_zone,
            spec=spec,
            overlap_policy=request.overlap_policy or pb.OVERLAP_POLICY_SKIP,
            catch_up_policy=request.catch_up_policy or pb.CATCH_UP_POLICY_SKIP_MISSED,
            paused=request.paused,
        )

    async def CreateSchedule(
        self, request: pb.CreateScheduleRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateScheduleResponse:
        principal = owners.user()
        schedule = self._validated(request)
        reply = await self._store.call(
            self._stub.CreateStoredSchedule,
            store_pb.CreateStoredScheduleRequest(
                owner=wf_store_pb.WorkflowOwner(
                    user_id=principal.user_id,
                    username=principal.username,
                    roles=list(principal.roles),
                ),
                schedule=schedule,
            ),
        )
        return pb.CreateScheduleResponse(schedule=reply.schedule)

    async def GetSchedule(
        self, request: pb.GetScheduleRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetScheduleResponse:
        scope = owners.scope(owners.user())
        _check_id(request.schedule_id)
        reply = await self._store.call(
            self._stub.GetStoredSchedule,
            store_pb.GetStoredScheduleRequest(schedule_id=request.schedule_id, scope=scope),
        )
        return pb.GetScheduleResponse(schedule=reply.schedule)

    async def ListSchedules(
        self, request: pb.ListSchedulesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSchedulesResponse:
        scope = owners.scope(owners.user())
        v = Violations()
        v.check(
            0 <= request.page_size <= MAX_PAGE_SIZE,
            "page_size",
            f"must be between 0 and {MAX_PAGE_SIZE}",
        )
        v.text(request.page_token, "page_token", max_chars=512, required=False)
        v.raise_if_any()
        bound = {"caller": scope.owner_id, "filter_": ""}
        reply = await self._store.call(
            self._stub.ListStoredSchedules,
            store_pb.ListStoredSchedulesRequest(
                scope=scope,
                page_size=request.page_size,
                page_token=self._pages.open(request.page_token, **bound),
            ),
        )
        return pb.ListSchedulesResponse(
            schedules=reply.schedules,
            next_page_token=self._pages.seal(reply.next_page_token, **bound),
        )

    async def PauseSchedule(
        self, request: pb.PauseScheduleRequest, context: grpc.aio.ServicerContext
    ) -> pb.PauseScheduleResponse:
        scope = owners.scope(owners.user())
        _check_id(request.schedule_id)
        reply = await self._store.call(
            self._stub.PauseStoredSchedule,
            store_pb.PauseStoredScheduleRequest(
                schedule_id=request.schedule_id, scope=scope, paused=request.paused
            ),
        )
        return pb.PauseScheduleResponse(schedule=reply.schedule)

    async def DeleteSchedule(
        self, request: pb.DeleteScheduleRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteScheduleResponse:
        scope = owners.scope(owners.user())
        _check_id(request.schedule_id)
        reply = await self._store.call(
            self._stub.DeleteStoredSchedule,
            store_pb.DeleteStoredScheduleRequest(schedule_id=request.schedule_id, scope=scope),
        )
        return pb.DeleteScheduleResponse(schedule=reply.schedule)

    async def TriggerSchedule(
        self, request: pb.TriggerScheduleRequest, context: grpc.aio.ServicerContext
    ) -> pb.TriggerScheduleResponse:
        scope = owners.scope(owners.user())
        _check_id(request.schedule_id)
        reply = await self._store.call(
            self._stub.TriggerStoredSchedule,
            store_pb.TriggerStoredScheduleRequest(schedule_id=request.schedule_id, scope=scope),
        )
        return pb.TriggerScheduleResponse(workflow=reply.workflow, schedule=reply.schedule)
