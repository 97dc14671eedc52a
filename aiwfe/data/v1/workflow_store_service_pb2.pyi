import datetime

from aiwfe.options.v1 import options_pb2 as _options_pb2
from aiwfe.taskproc.v1 import workflow_service_pb2 as _workflow_service_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkflowOwner(_message.Message):
    __slots__ = ("user_id", "username", "roles")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    username: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, user_id: _Optional[str] = ..., username: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ...) -> None: ...

class WorkflowScope(_message.Message):
    __slots__ = ("owner_id", "all_owners")
    OWNER_ID_FIELD_NUMBER: _ClassVar[int]
    ALL_OWNERS_FIELD_NUMBER: _ClassVar[int]
    owner_id: str
    all_owners: bool
    def __init__(self, owner_id: _Optional[str] = ..., all_owners: _Optional[bool] = ...) -> None: ...

class CreateWorkflowRequest(_message.Message):
    __slots__ = ("owner", "spec", "idempotency_key", "trace_context", "schedule_id", "eager_worker_id", "eager_max_steps", "eager_lease_seconds", "eager_task_steps", "eager_task_lease_id")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_ID_FIELD_NUMBER: _ClassVar[int]
    EAGER_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    EAGER_MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    EAGER_LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EAGER_TASK_STEPS_FIELD_NUMBER: _ClassVar[int]
    EAGER_TASK_LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    owner: WorkflowOwner
    spec: _workflow_service_pb2.WorkflowSpec
    idempotency_key: str
    trace_context: TraceContext
    schedule_id: str
    eager_worker_id: str
    eager_max_steps: int
    eager_lease_seconds: float
    eager_task_steps: _containers.RepeatedScalarFieldContainer[str]
    eager_task_lease_id: str
    def __init__(self, owner: _Optional[_Union[WorkflowOwner, _Mapping]] = ..., spec: _Optional[_Union[_workflow_service_pb2.WorkflowSpec, _Mapping]] = ..., idempotency_key: _Optional[str] = ..., trace_context: _Optional[_Union[TraceContext, _Mapping]] = ..., schedule_id: _Optional[str] = ..., eager_worker_id: _Optional[str] = ..., eager_max_steps: _Optional[int] = ..., eager_lease_seconds: _Optional[float] = ..., eager_task_steps: _Optional[_Iterable[str]] = ..., eager_task_lease_id: _Optional[str] = ...) -> None: ...

class TraceContext(_message.Message):
    __slots__ = ("traceparent", "tracestate")
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    TRACESTATE_FIELD_NUMBER: _ClassVar[int]
    traceparent: str
    tracestate: str
    def __init__(self, traceparent: _Optional[str] = ..., tracestate: _Optional[str] = ...) -> None: ...

class CreateWorkflowResponse(_message.Message):
    __slots__ = ("workflow", "created", "eager_steps")
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    EAGER_STEPS_FIELD_NUMBER: _ClassVar[int]
    workflow: _workflow_service_pb2.Workflow
    created: bool
    eager_steps: _containers.RepeatedCompositeFieldContainer[ClaimedStep]
    def __init__(self, workflow: _Optional[_Union[_workflow_service_pb2.Workflow, _Mapping]] = ..., created: _Optional[bool] = ..., eager_steps: _Optional[_Iterable[_Union[ClaimedStep, _Mapping]]] = ...) -> None: ...

class GetStoredWorkflowRequest(_message.Message):
    __slots__ = ("workflow_id", "scope")
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    workflow_id: str
    scope: WorkflowScope
    def __init__(self, workflow_id: _Optional[str] = ..., scope: _Optional[_Union[WorkflowScope, _Mapping]] = ...) -> None: ...

class GetStoredWorkflowResponse(_message.Message):
    __slots__ = ("workflow",)
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    workflow: _workflow_service_pb2.Workflow
    def __init__(self, workflow: _Optional[_Union[_workflow_service_pb2.Workflow, _Mapping]] = ...) -> None: ...

class ListStoredWorkflowsRequest(_message.Message):
    __slots__ = ("scope", "state", "page_size", "page_token", "name", "schedule_id", "create_after", "create_before")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_ID_FIELD_NUMBER: _ClassVar[int]
    CREATE_AFTER_FIELD_NUMBER: _ClassVar[int]
    CREATE_BEFORE_FIELD_NUMBER: _ClassVar[int]
    scope: WorkflowScope
    state: _workflow_service_pb2.WorkflowState
    page_size: int
    page_token: str
    name: str
    schedule_id: str
    create_after: _timestamp_pb2.Timestamp
    create_before: _timestamp_pb2.Timestamp
    def __init__(self, scope: _Optional[_Union[WorkflowScope, _Mapping]] = ..., state: _Optional[_Union[_workflow_service_pb2.WorkflowState, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., name: _Optional[str] = ..., schedule_id: _Optional[str] = ..., create_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., create_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListStoredWorkflowsResponse(_message.Message):
    __slots__ = ("workflows", "next_page_token")
    WORKFLOWS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    workflows: _containers.RepeatedCompositeFieldContainer[_workflow_service_pb2.Workflow]
    next_page_token: str
    def __init__(self, workflows: _Optional[_Iterable[_Union[_workflow_service_pb2.Workflow, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelStoredWorkflowRequest(_message.Message):
    __slots__ = ("workflow_id", "scope")
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    workflow_id: str
    scope: WorkflowScope
    def __init__(self, workflow_id: _Optional[str] = ..., scope: _Optional[_Union[WorkflowScope, _Mapping]] = ...) -> None: ...

class CancelStoredWorkflowResponse(_message.Message):
    __slots__ = ("workflow",)
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    workflow: _workflow_service_pb2.Workflow
    def __init__(self, workflow: _Optional[_Union[_workflow_service_pb2.Workflow, _Mapping]] = ...) -> None: ...

class RetryStoredWorkflowRequest(_message.Message):
    __slots__ = ("workflow_id", "scope")
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    workflow_id: str
    scope: WorkflowScope
    def __init__(self, workflow_id: _Optional[str] = ..., scope: _Optional[_Union[WorkflowScope, _Mapping]] = ...) -> None: ...

class RetryStoredWorkflowResponse(_message.Message):
    __slots__ = ("workflow",)
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    workflow: _workflow_service_pb2.Workflow
    def __init__(self, workflow: _Optional[_Union[_workflow_service_pb2.Workflow, _Mapping]] = ...) -> None: ...

class ListWorkflowEventsRequest(_message.Message):
    __slots__ = ("workflow_id", "scope", "after_sequence", "limit")
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    workflow_id: str
    scope: WorkflowScope
    after_sequence: int
    limit: int
    def __init__(self, workflow_id: _Optional[str] = ..., scope: _Optional[_Union[WorkflowScope, _Mapping]] = ..., after_sequence: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class WatchWorkflowEventsRequest(_message.Message):
    __slots__ = ("workflow_id", "scope", "after_sequence", "poll_interval_seconds")
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    POLL_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    workflow_id: str
    scope: WorkflowScope
    after_sequence: int
    poll_interval_seconds: float
    def __init__(self, workflow_id: _Optional[str] = ..., scope: _Optional[_Union[WorkflowScope, _Mapping]] = ..., after_sequence: _Optional[int] = ..., poll_interval_seconds: _Optional[float] = ...) -> None: ...

class WatchWorkflowEventsResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[_workflow_service_pb2.WatchWorkflowResponse]
    def __init__(self, events: _Optional[_Iterable[_Union[_workflow_service_pb2.WatchWorkflowResponse, _Mapping]]] = ...) -> None: ...

class WatchWorkflowEventsManyRequest(_message.Message):
    __slots__ = ("watch", "cancel", "run")
    WATCH_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    watch: WorkflowWatch
    cancel: int
    run: WorkflowRun
    def __init__(self, watch: _Optional[_Union[WorkflowWatch, _Mapping]] = ..., cancel: _Optional[int] = ..., run: _Optional[_Union[WorkflowRun, _Mapping]] = ...) -> None: ...

class WorkflowRun(_message.Message):
    __slots__ = ("watch_id", "request")
    WATCH_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    watch_id: int
    request: RunStoredWorkflowRequest
    def __init__(self, watch_id: _Optional[int] = ..., request: _Optional[_Union[RunStoredWorkflowRequest, _Mapping]] = ...) -> None: ...

class WorkflowWatch(_message.Message):
    __slots__ = ("watch_id", "request")
    WATCH_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    watch_id: int
    request: WatchWorkflowEventsRequest
    def __init__(self, watch_id: _Optional[int] = ..., request: _Optional[_Union[WatchWorkflowEventsRequest, _Mapping]] = ...) -> None: ...

class WatchWorkflowEventsManyResponse(_message.Message):
    __slots__ = ("watch_id", "events", "end", "stored", "run_events")
    WATCH_ID_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    RUN_EVENTS_FIELD_NUMBER: _ClassVar[int]
    watch_id: int
    events: WatchWorkflowEventsResponse
    end: _status_pb2.Status
    stored: CreateWorkflowResponse
    run_events: WatchWorkflowEventsResponse
    def __init__(self, watch_id: _Optional[int] = ..., events: _Optional[_Union[WatchWorkflowEventsResponse, _Mapping]] = ..., end: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., stored: _Optional[_Union[CreateWorkflowResponse, _Mapping]] = ..., run_events: _Optional[_Union[WatchWorkflowEventsResponse, _Mapping]] = ...) -> None: ...

class RunStoredWorkflowRequest(_message.Message):
    __slots__ = ("create", "poll_interval_seconds")
    CREATE_FIELD_NUMBER: _ClassVar[int]
    POLL_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    create: CreateWorkflowRequest
    poll_interval_seconds: float
    def __init__(self, create: _Optional[_Union[CreateWorkflowRequest, _Mapping]] = ..., poll_interval_seconds: _Optional[float] = ...) -> None: ...

class RunStoredWorkflowResponse(_message.Message):
    __slots__ = ("stored", "events")
    STORED_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    stored: CreateWorkflowResponse
    events: WatchWorkflowEventsResponse
    def __init__(self, stored: _Optional[_Union[CreateWorkflowResponse, _Mapping]] = ..., events: _Optional[_Union[WatchWorkflowEventsResponse, _Mapping]] = ...) -> None: ...

class ListWorkflowEventsResponse(_message.Message):
    __slots__ = ("events", "workflow_state", "last_sequence")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[_workflow_service_pb2.WatchWorkflowResponse]
    workflow_state: _workflow_service_pb2.WorkflowState
    last_sequence: int
    def __init__(self, events: _Optional[_Iterable[_Union[_workflow_service_pb2.WatchWorkflowResponse, _Mapping]]] = ..., workflow_state: _Optional[_Union[_workflow_service_pb2.WorkflowState, str]] = ..., last_sequence: _Optional[int] = ...) -> None: ...

class StepRef(_message.Message):
    __slots__ = ("workflow_id", "step_name", "attempt")
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_NAME_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    workflow_id: str
    step_name: str
    attempt: int
    def __init__(self, workflow_id: _Optional[str] = ..., step_name: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class ClaimedStep(_message.Message):
    __slots__ = ("ref", "op", "inputs", "timeout_seconds", "owner", "lease_expire_time", "dependency_outputs", "queue", "task_type", "heartbeat_timeout_seconds", "attempt_deadline", "trace_context", "submit_time", "item")
    REF_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    DEPENDENCY_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    TASK_TYPE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_DEADLINE_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    SUBMIT_TIME_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    ref: StepRef
    op: str
    inputs: _struct_pb2.Struct
    timeout_seconds: float
    owner: WorkflowOwner
    lease_expire_time: _timestamp_pb2.Timestamp
    dependency_outputs: _struct_pb2.Struct
    queue: str
    task_type: str
    heartbeat_timeout_seconds: float
    attempt_deadline: _timestamp_pb2.Timestamp
    trace_context: TraceContext
    submit_time: _timestamp_pb2.Timestamp
    item: _struct_pb2.Value
    def __init__(self, ref: _Optional[_Union[StepRef, _Mapping]] = ..., op: _Optional[str] = ..., inputs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., timeout_seconds: _Optional[float] = ..., owner: _Optional[_Union[WorkflowOwner, _Mapping]] = ..., lease_expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., dependency_outputs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., queue: _Optional[str] = ..., task_type: _Optional[str] = ..., heartbeat_timeout_seconds: _Optional[float] = ..., attempt_deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., trace_context: _Optional[_Union[TraceContext, _Mapping]] = ..., submit_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., item: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...

class ClaimStepsRequest(_message.Message):
    __slots__ = ("worker_id", "max_steps", "lease_seconds", "queues", "types")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    TYPES_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    max_steps: int
    lease_seconds: float
    queues: _containers.RepeatedScalarFieldContainer[str]
    types: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_id: _Optional[str] = ..., max_steps: _Optional[int] = ..., lease_seconds: _Optional[float] = ..., queues: _Optional[_Iterable[str]] = ..., types: _Optional[_Iterable[str]] = ...) -> None: ...

class ClaimStepsResponse(_message.Message):
    __slots__ = ("steps", "next_run_time")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    NEXT_RUN_TIME_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedCompositeFieldContainer[ClaimedStep]
    next_run_time: _timestamp_pb2.Timestamp
    def __init__(self, steps: _Optional[_Iterable[_Union[ClaimedStep, _Mapping]]] = ..., next_run_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ExtendLeasesRequest(_message.Message):
    __slots__ = ("worker_id", "steps", "lease_seconds", "progress")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    steps: _containers.RepeatedCompositeFieldContainer[StepRef]
    lease_seconds: float
    progress: _containers.RepeatedCompositeFieldContainer[StepProgress]
    def __init__(self, worker_id: _Optional[str] = ..., steps: _Optional[_Iterable[_Union[StepRef, _Mapping]]] = ..., lease_seconds: _Optional[float] = ..., progress: _Optional[_Iterable[_Union[StepProgress, _Mapping]]] = ...) -> None: ...

class StepProgress(_message.Message):
    __slots__ = ("ref", "details")
    REF_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    ref: StepRef
    details: _struct_pb2.Struct
    def __init__(self, ref: _Optional[_Union[StepRef, _Mapping]] = ..., details: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ExtendLeasesResponse(_message.Message):
    __slots__ = ("lost",)
    LOST_FIELD_NUMBER: _ClassVar[int]
    lost: _containers.RepeatedCompositeFieldContainer[StepRef]
    def __init__(self, lost: _Optional[_Iterable[_Union[StepRef, _Mapping]]] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("ref", "output")
    REF_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ref: StepRef
    output: _struct_pb2.Struct
    def __init__(self, ref: _Optional[_Union[StepRef, _Mapping]] = ..., output: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class CompleteStepsRequest(_message.Message):
    __slots__ = ("worker_id", "results", "eager_max_steps", "eager_lease_seconds")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    EAGER_MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    EAGER_LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    results: _containers.RepeatedCompositeFieldContainer[StepResult]
    eager_max_steps: int
    eager_lease_seconds: float
    def __init__(self, worker_id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[StepResult, _Mapping]]] = ..., eager_max_steps: _Optional[int] = ..., eager_lease_seconds: _Optional[float] = ...) -> None: ...

class CompleteStepsResponse(_message.Message):
    __slots__ = ("accepted", "eager_steps")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    EAGER_STEPS_FIELD_NUMBER: _ClassVar[int]
    accepted: _containers.RepeatedScalarFieldContainer[bool]
    eager_steps: _containers.RepeatedCompositeFieldContainer[ClaimedStep]
    def __init__(self, accepted: _Optional[_Iterable[bool]] = ..., eager_steps: _Optional[_Iterable[_Union[ClaimedStep, _Mapping]]] = ...) -> None: ...

class CompleteStepsStreamRequest(_message.Message):
    __slots__ = ("complete",)
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    complete: CompleteStepsRequest
    def __init__(self, complete: _Optional[_Union[CompleteStepsRequest, _Mapping]] = ...) -> None: ...

class CompleteStepsStreamResponse(_message.Message):
    __slots__ = ("complete",)
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    complete: CompleteStepsResponse
    def __init__(self, complete: _Optional[_Union[CompleteStepsResponse, _Mapping]] = ...) -> None: ...

class FailStepRequest(_message.Message):
    __slots__ = ("worker_id", "ref", "error", "retryable", "details")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    ref: StepRef
    error: str
    retryable: bool
    details: _struct_pb2.Struct
    def __init__(self, worker_id: _Optional[str] = ..., ref: _Optional[_Union[StepRef, _Mapping]] = ..., error: _Optional[str] = ..., retryable: _Optional[bool] = ..., details: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class FailStepResponse(_message.Message):
    __slots__ = ("accepted", "will_retry", "next_run_time")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    WILL_RETRY_FIELD_NUMBER: _ClassVar[int]
    NEXT_RUN_TIME_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    will_retry: bool
    next_run_time: _timestamp_pb2.Timestamp
    def __init__(self, accepted: _Optional[bool] = ..., will_retry: _Optional[bool] = ..., next_run_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ReleaseStepsRequest(_message.Message):
    __slots__ = ("worker_id", "steps")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    steps: _containers.RepeatedCompositeFieldContainer[StepRef]
    def __init__(self, worker_id: _Optional[str] = ..., steps: _Optional[_Iterable[_Union[StepRef, _Mapping]]] = ...) -> None: ...

class ReleaseStepsResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...

class WaitForWorkRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class WaitForWorkResponse(_message.Message):
    __slots__ = ("work_available", "stopped_workflow_ids", "builtin_work", "task_queues")
    WORK_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    STOPPED_WORKFLOW_IDS_FIELD_NUMBER: _ClassVar[int]
    BUILTIN_WORK_FIELD_NUMBER: _ClassVar[int]
    TASK_QUEUES_FIELD_NUMBER: _ClassVar[int]
    work_available: bool
    stopped_workflow_ids: _containers.RepeatedScalarFieldContainer[str]
    builtin_work: bool
    task_queues: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, work_available: _Optional[bool] = ..., stopped_workflow_ids: _Optional[_Iterable[str]] = ..., builtin_work: _Optional[bool] = ..., task_queues: _Optional[_Iterable[str]] = ...) -> None: ...

class SignalStoredWorkflowRequest(_message.Message):
    __slots__ = ("workflow_id", "scope", "name", "payload", "signal_id")
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_ID_FIELD_NUMBER: _ClassVar[int]
    workflow_id: str
    scope: WorkflowScope
    name: str
    payload: _struct_pb2.Struct
    signal_id: str
    def __init__(self, workflow_id: _Optional[str] = ..., scope: _Optional[_Union[WorkflowScope, _Mapping]] = ..., name: _Optional[str] = ..., payload: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., signal_id: _Optional[str] = ...) -> None: ...

class SignalStoredWorkflowResponse(_message.Message):
    __slots__ = ("delivered", "duplicate")
    DELIVERED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    delivered: bool
    duplicate: bool
    def __init__(self, delivered: _Optional[bool] = ..., duplicate: _Optional[bool] = ...) -> None: ...
