import datetime

from aiwfe.options.v1 import options_pb2 as _options_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkflowState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKFLOW_STATE_UNSPECIFIED: _ClassVar[WorkflowState]
    WORKFLOW_STATE_PENDING: _ClassVar[WorkflowState]
    WORKFLOW_STATE_RUNNING: _ClassVar[WorkflowState]
    WORKFLOW_STATE_SUCCEEDED: _ClassVar[WorkflowState]
    WORKFLOW_STATE_FAILED: _ClassVar[WorkflowState]
    WORKFLOW_STATE_CANCELLED: _ClassVar[WorkflowState]
    WORKFLOW_STATE_TIMED_OUT: _ClassVar[WorkflowState]

class StepState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STEP_STATE_UNSPECIFIED: _ClassVar[StepState]
    STEP_STATE_PENDING: _ClassVar[StepState]
    STEP_STATE_RUNNING: _ClassVar[StepState]
    STEP_STATE_SUCCEEDED: _ClassVar[StepState]
    STEP_STATE_FAILED: _ClassVar[StepState]
    STEP_STATE_CANCELLED: _ClassVar[StepState]
    STEP_STATE_RETRYING: _ClassVar[StepState]
    STEP_STATE_SKIPPED: _ClassVar[StepState]

class DependencySkipPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEPENDENCY_SKIP_POLICY_UNSPECIFIED: _ClassVar[DependencySkipPolicy]
    DEPENDENCY_SKIP_POLICY_SKIP: _ClassVar[DependencySkipPolicy]
    DEPENDENCY_SKIP_POLICY_RUN: _ClassVar[DependencySkipPolicy]

class ItemFailurePolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ITEM_FAILURE_POLICY_UNSPECIFIED: _ClassVar[ItemFailurePolicy]
    ITEM_FAILURE_POLICY_FAIL_FAST: _ClassVar[ItemFailurePolicy]
    ITEM_FAILURE_POLICY_COLLECT: _ClassVar[ItemFailurePolicy]
WORKFLOW_STATE_UNSPECIFIED: WorkflowState
WORKFLOW_STATE_PENDING: WorkflowState
WORKFLOW_STATE_RUNNING: WorkflowState
WORKFLOW_STATE_SUCCEEDED: WorkflowState
WORKFLOW_STATE_FAILED: WorkflowState
WORKFLOW_STATE_CANCELLED: WorkflowState
WORKFLOW_STATE_TIMED_OUT: WorkflowState
STEP_STATE_UNSPECIFIED: StepState
STEP_STATE_PENDING: StepState
STEP_STATE_RUNNING: StepState
STEP_STATE_SUCCEEDED: StepState
STEP_STATE_FAILED: StepState
STEP_STATE_CANCELLED: StepState
STEP_STATE_RETRYING: StepState
STEP_STATE_SKIPPED: StepState
DEPENDENCY_SKIP_POLICY_UNSPECIFIED: DependencySkipPolicy
DEPENDENCY_SKIP_POLICY_SKIP: DependencySkipPolicy
DEPENDENCY_SKIP_POLICY_RUN: DependencySkipPolicy
ITEM_FAILURE_POLICY_UNSPECIFIED: ItemFailurePolicy
ITEM_FAILURE_POLICY_FAIL_FAST: ItemFailurePolicy
ITEM_FAILURE_POLICY_COLLECT: ItemFailurePolicy

class RetryPolicy(_message.Message):
    __slots__ = ("max_attempts", "initial_backoff_seconds", "backoff_multiplier", "max_backoff_seconds", "jitter")
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_BACKOFF_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BACKOFF_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    MAX_BACKOFF_SECONDS_FIELD_NUMBER: _ClassVar[int]
    JITTER_FIELD_NUMBER: _ClassVar[int]
    max_attempts: int
    initial_backoff_seconds: float
    backoff_multiplier: float
    max_backoff_seconds: float
    jitter: float
    def __init__(self, max_attempts: _Optional[int] = ..., initial_backoff_seconds: _Optional[float] = ..., backoff_multiplier: _Optional[float] = ..., max_backoff_seconds: _Optional[float] = ..., jitter: _Optional[float] = ...) -> None: ...

class StepSpec(_message.Message):
    __slots__ = ("name", "op", "inputs", "depends_on", "retry_policy", "timeout_seconds", "not_before", "when", "on_dependency_skipped", "for_each", "max_concurrency", "item_failure")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    DEPENDS_ON_FIELD_NUMBER: _ClassVar[int]
    RETRY_POLICY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    WHEN_FIELD_NUMBER: _ClassVar[int]
    ON_DEPENDENCY_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    FOR_EACH_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    ITEM_FAILURE_FIELD_NUMBER: _ClassVar[int]
    name: str
    op: str
    inputs: _struct_pb2.Struct
    depends_on: _containers.RepeatedScalarFieldContainer[str]
    retry_policy: RetryPolicy
    timeout_seconds: float
    not_before: _timestamp_pb2.Timestamp
    when: str
    on_dependency_skipped: DependencySkipPolicy
    for_each: str
    max_concurrency: int
    item_failure: ItemFailurePolicy
    def __init__(self, name: _Optional[str] = ..., op: _Optional[str] = ..., inputs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., depends_on: _Optional[_Iterable[str]] = ..., retry_policy: _Optional[_Union[RetryPolicy, _Mapping]] = ..., timeout_seconds: _Optional[float] = ..., not_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., when: _Optional[str] = ..., on_dependency_skipped: _Optional[_Union[DependencySkipPolicy, str]] = ..., for_each: _Optional[str] = ..., max_concurrency: _Optional[int] = ..., item_failure: _Optional[_Union[ItemFailurePolicy, str]] = ...) -> None: ...

class WorkflowSpec(_message.Message):
    __slots__ = ("name", "steps", "timeout_seconds", "priority", "input", "concurrency")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    name: str
    steps: _containers.RepeatedCompositeFieldContainer[StepSpec]
    timeout_seconds: float
    priority: int
    input: _struct_pb2.Struct
    concurrency: ConcurrencySpec
    def __init__(self, name: _Optional[str] = ..., steps: _Optional[_Iterable[_Union[StepSpec, _Mapping]]] = ..., timeout_seconds: _Optional[float] = ..., priority: _Optional[int] = ..., input: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., concurrency: _Optional[_Union[ConcurrencySpec, _Mapping]] = ...) -> None: ...

class ConcurrencySpec(_message.Message):
    __slots__ = ("key", "max")
    KEY_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    key: str
    max: int
    def __init__(self, key: _Optional[str] = ..., max: _Optional[int] = ...) -> None: ...

class StepStatus(_message.Message):
    __slots__ = ("name", "state", "attempts", "output", "error", "details")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: StepState
    attempts: int
    output: _struct_pb2.Struct
    error: str
    details: _struct_pb2.Struct
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[StepState, str]] = ..., attempts: _Optional[int] = ..., output: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., error: _Optional[str] = ..., details: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class Workflow(_message.Message):
    __slots__ = ("workflow_id", "owner", "state", "spec", "steps", "create_time", "update_time", "error")
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    workflow_id: str
    owner: str
    state: WorkflowState
    spec: WorkflowSpec
    steps: _containers.RepeatedCompositeFieldContainer[StepStatus]
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    error: str
    def __init__(self, workflow_id: _Optional[str] = ..., owner: _Optional[str] = ..., state: _Optional[_Union[WorkflowState, str]] = ..., spec: _Optional[_Union[WorkflowSpec, _Mapping]] = ..., steps: _Optional[_Iterable[_Union[StepStatus, _Mapping]]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class SubmitWorkflowRequest(_message.Message):
    __slots__ = ("spec", "idempotency_key")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    spec: WorkflowSpec
    idempotency_key: str
    def __init__(self, spec: _Optional[_Union[WorkflowSpec, _Mapping]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class RunWorkflowRequest(_message.Message):
    __slots__ = ("spec", "idempotency_key")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    spec: WorkflowSpec
    idempotency_key: str
    def __init__(self, spec: _Optional[_Union[WorkflowSpec, _Mapping]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class RunWorkflowResponse(_message.Message):
    __slots__ = ("workflow", "event")
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    workflow: Workflow
    event: WatchWorkflowResponse
    def __init__(self, workflow: _Optional[_Union[Workflow, _Mapping]] = ..., event: _Optional[_Union[WatchWorkflowResponse, _Mapping]] = ...) -> None: ...

class SubmitWorkflowResponse(_message.Message):
    __slots__ = ("workflow",)
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    workflow: Workflow
    def __init__(self, workflow: _Optional[_Union[Workflow, _Mapping]] = ...) -> None: ...

class GetWorkflowRequest(_message.Message):
    __slots__ = ("workflow_id",)
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    workflow_id: str
    def __init__(self, workflow_id: _Optional[str] = ...) -> None: ...

class GetWorkflowResponse(_message.Message):
    __slots__ = ("workflow",)
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    workflow: Workflow
    def __init__(self, workflow: _Optional[_Union[Workflow, _Mapping]] = ...) -> None: ...

class ListWorkflowsRequest(_message.Message):
    __slots__ = ("state", "page_size", "page_token", "name", "schedule_id", "create_after", "create_before")
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_ID_FIELD_NUMBER: _ClassVar[int]
    CREATE_AFTER_FIELD_NUMBER: _ClassVar[int]
    CREATE_BEFORE_FIELD_NUMBER: _ClassVar[int]
    state: WorkflowState
    page_size: int
    page_token: str
    name: str
    schedule_id: str
    create_after: _timestamp_pb2.Timestamp
    create_before: _timestamp_pb2.Timestamp
    def __init__(self, state: _Optional[_Union[WorkflowState, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., name: _Optional[str] = ..., schedule_id: _Optional[str] = ..., create_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., create_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListWorkflowsResponse(_message.Message):
    __slots__ = ("workflows", "next_page_token")
    WORKFLOWS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    workflows: _containers.RepeatedCompositeFieldContainer[Workflow]
    next_page_token: str
    def __init__(self, workflows: _Optional[_Iterable[_Union[Workflow, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelWorkflowRequest(_message.Message):
    __slots__ = ("workflow_id",)
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    workflow_id: str
    def __init__(self, workflow_id: _Optional[str] = ...) -> None: ...

class CancelWorkflowResponse(_message.Message):
    __slots__ = ("workflow",)
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    workflow: Workflow
    def __init__(self, workflow: _Optional[_Union[Workflow, _Mapping]] = ...) -> None: ...

class RetryWorkflowRequest(_message.Message):
    __slots__ = ("workflow_id",)
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    workflow_id: str
    def __init__(self, workflow_id: _Optional[str] = ...) -> None: ...

class RetryWorkflowResponse(_message.Message):
    __slots__ = ("workflow",)
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    workflow: Workflow
    def __init__(self, workflow: _Optional[_Union[Workflow, _Mapping]] = ...) -> None: ...

class WatchWorkflowRequest(_message.Message):
    __slots__ = ("workflow_id", "after_sequence")
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    workflow_id: str
    after_sequence: int
    def __init__(self, workflow_id: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class WatchWorkflowResponse(_message.Message):
    __slots__ = ("sequence", "workflow_state", "step_name", "step_state", "message", "event_time")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_NAME_FIELD_NUMBER: _ClassVar[int]
    STEP_STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    workflow_state: WorkflowState
    step_name: str
    step_state: StepState
    message: str
    event_time: _timestamp_pb2.Timestamp
    def __init__(self, sequence: _Optional[int] = ..., workflow_state: _Optional[_Union[WorkflowState, str]] = ..., step_name: _Optional[str] = ..., step_state: _Optional[_Union[StepState, str]] = ..., message: _Optional[str] = ..., event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class WatchWorkflowsRequest(_message.Message):
    __slots__ = ("watch", "cancel")
    WATCH_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    watch: WorkflowWatch
    cancel: int
    def __init__(self, watch: _Optional[_Union[WorkflowWatch, _Mapping]] = ..., cancel: _Optional[int] = ...) -> None: ...

class WorkflowWatch(_message.Message):
    __slots__ = ("watch_id", "request")
    WATCH_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    watch_id: int
    request: WatchWorkflowRequest
    def __init__(self, watch_id: _Optional[int] = ..., request: _Optional[_Union[WatchWorkflowRequest, _Mapping]] = ...) -> None: ...

class WatchWorkflowsResponse(_message.Message):
    __slots__ = ("watch_id", "events", "end")
    WATCH_ID_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    watch_id: int
    events: WorkflowEvents
    end: _status_pb2.Status
    def __init__(self, watch_id: _Optional[int] = ..., events: _Optional[_Union[WorkflowEvents, _Mapping]] = ..., end: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class WorkflowEvents(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[WatchWorkflowResponse]
    def __init__(self, events: _Optional[_Iterable[_Union[WatchWorkflowResponse, _Mapping]]] = ...) -> None: ...

class SignalWorkflowRequest(_message.Message):
    __slots__ = ("workflow_id", "name", "payload", "signal_id")
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_ID_FIELD_NUMBER: _ClassVar[int]
    workflow_id: str
    name: str
    payload: _struct_pb2.Struct
    signal_id: str
    def __init__(self, workflow_id: _Optional[str] = ..., name: _Optional[str] = ..., payload: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., signal_id: _Optional[str] = ...) -> None: ...

class SignalWorkflowResponse(_message.Message):
    __slots__ = ("delivered", "duplicate")
    DELIVERED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    delivered: bool
    duplicate: bool
    def __init__(self, delivered: _Optional[bool] = ..., duplicate: _Optional[bool] = ...) -> None: ...
