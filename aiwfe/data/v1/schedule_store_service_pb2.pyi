from aiwfe.data.v1 import workflow_store_service_pb2 as _workflow_store_service_pb2
from aiwfe.options.v1 import options_pb2 as _options_pb2
from aiwfe.taskproc.v1 import schedule_service_pb2 as _schedule_service_pb2
from aiwfe.taskproc.v1 import workflow_service_pb2 as _workflow_service_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateStoredScheduleRequest(_message.Message):
    __slots__ = ("owner", "schedule")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    owner: _workflow_store_service_pb2.WorkflowOwner
    schedule: _schedule_service_pb2.Schedule
    def __init__(self, owner: _Optional[_Union[_workflow_store_service_pb2.WorkflowOwner, _Mapping]] = ..., schedule: _Optional[_Union[_schedule_service_pb2.Schedule, _Mapping]] = ...) -> None: ...

class CreateStoredScheduleResponse(_message.Message):
    __slots__ = ("schedule",)
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    schedule: _schedule_service_pb2.Schedule
    def __init__(self, schedule: _Optional[_Union[_schedule_service_pb2.Schedule, _Mapping]] = ...) -> None: ...

class GetStoredScheduleRequest(_message.Message):
    __slots__ = ("schedule_id", "scope")
    SCHEDULE_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    schedule_id: str
    scope: _workflow_store_service_pb2.WorkflowScope
    def __init__(self, schedule_id: _Optional[str] = ..., scope: _Optional[_Union[_workflow_store_service_pb2.WorkflowScope, _Mapping]] = ...) -> None: ...

class GetStoredScheduleResponse(_message.Message):
    __slots__ = ("schedule",)
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    schedule: _schedule_service_pb2.Schedule
    def __init__(self, schedule: _Optional[_Union[_schedule_service_pb2.Schedule, _Mapping]] = ...) -> None: ...

class ListStoredSchedulesRequest(_message.Message):
    __slots__ = ("scope", "page_size", "page_token")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    scope: _workflow_store_service_pb2.WorkflowScope
    page_size: int
    page_token: str
    def __init__(self, scope: _Optional[_Union[_workflow_store_service_pb2.WorkflowScope, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListStoredSchedulesResponse(_message.Message):
    __slots__ = ("schedules", "next_page_token")
    SCHEDULES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    schedules: _containers.RepeatedCompositeFieldContainer[_schedule_service_pb2.Schedule]
    next_page_token: str
    def __init__(self, schedules: _Optional[_Iterable[_Union[_schedule_service_pb2.Schedule, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class PauseStoredScheduleRequest(_message.Message):
    __slots__ = ("schedule_id", "scope", "paused")
    SCHEDULE_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    schedule_id: str
    scope: _workflow_store_service_pb2.WorkflowScope
    paused: bool
    def __init__(self, schedule_id: _Optional[str] = ..., scope: _Optional[_Union[_workflow_store_service_pb2.WorkflowScope, _Mapping]] = ..., paused: _Optional[bool] = ...) -> None: ...

class PauseStoredScheduleResponse(_message.Message):
    __slots__ = ("schedule",)
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    schedule: _schedule_service_pb2.Schedule
    def __init__(self, schedule: _Optional[_Union[_schedule_service_pb2.Schedule, _Mapping]] = ...) -> None: ...

class DeleteStoredScheduleRequest(_message.Message):
    __slots__ = ("schedule_id", "scope")
    SCHEDULE_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    schedule_id: str
    scope: _workflow_store_service_pb2.WorkflowScope
    def __init__(self, schedule_id: _Optional[str] = ..., scope: _Optional[_Union[_workflow_store_service_pb2.WorkflowScope, _Mapping]] = ...) -> None: ...

class DeleteStoredScheduleResponse(_message.Message):
    __slots__ = ("schedule",)
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    schedule: _schedule_service_pb2.Schedule
    def __init__(self, schedule: _Optional[_Union[_schedule_service_pb2.Schedule, _Mapping]] = ...) -> None: ...

class TriggerStoredScheduleRequest(_message.Message):
    __slots__ = ("schedule_id", "scope")
    SCHEDULE_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    schedule_id: str
    scope: _workflow_store_service_pb2.WorkflowScope
    def __init__(self, schedule_id: _Optional[str] = ..., scope: _Optional[_Union[_workflow_store_service_pb2.WorkflowScope, _Mapping]] = ...) -> None: ...

class TriggerStoredScheduleResponse(_message.Message):
    __slots__ = ("workflow", "schedule")
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    workflow: _workflow_service_pb2.Workflow
    schedule: _schedule_service_pb2.Schedule
    def __init__(self, workflow: _Optional[_Union[_workflow_service_pb2.Workflow, _Mapping]] = ..., schedule: _Optional[_Union[_schedule_service_pb2.Schedule, _Mapping]] = ...) -> None: ...
