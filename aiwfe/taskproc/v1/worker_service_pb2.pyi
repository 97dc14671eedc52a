import datetime

from aiwfe.options.v1 import options_pb2 as _options_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PollTaskRequest(_message.Message):
    __slots__ = ("queues", "types", "wait_seconds", "worker_identity", "poll_session")
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    TYPES_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WORKER_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    POLL_SESSION_FIELD_NUMBER: _ClassVar[int]
    queues: _containers.RepeatedScalarFieldContainer[str]
    types: _containers.RepeatedScalarFieldContainer[str]
    wait_seconds: float
    worker_identity: str
    poll_session: str
    def __init__(self, queues: _Optional[_Iterable[str]] = ..., types: _Optional[_Iterable[str]] = ..., wait_seconds: _Optional[float] = ..., worker_identity: _Optional[str] = ..., poll_session: _Optional[str] = ...) -> None: ...

class PollTaskResponse(_message.Message):
    __slots__ = ("task_token", "workflow_id", "step_name", "queue", "type", "input", "attempt", "attempt_deadline", "heartbeat_timeout_seconds", "traceparent")
    TASK_TOKEN_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_NAME_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_DEADLINE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    task_token: str
    workflow_id: str
    step_name: str
    queue: str
    type: str
    input: _struct_pb2.Value
    attempt: int
    attempt_deadline: _timestamp_pb2.Timestamp
    heartbeat_timeout_seconds: float
    traceparent: str
    def __init__(self, task_token: _Optional[str] = ..., workflow_id: _Optional[str] = ..., step_name: _Optional[str] = ..., queue: _Optional[str] = ..., type: _Optional[str] = ..., input: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., attempt: _Optional[int] = ..., attempt_deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., heartbeat_timeout_seconds: _Optional[float] = ..., traceparent: _Optional[str] = ...) -> None: ...

class HeartbeatTaskRequest(_message.Message):
    __slots__ = ("task_token", "queue", "details")
    TASK_TOKEN_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    task_token: str
    queue: str
    details: _struct_pb2.Struct
    def __init__(self, task_token: _Optional[str] = ..., queue: _Optional[str] = ..., details: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class HeartbeatTaskResponse(_message.Message):
    __slots__ = ("cancel_requested",)
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    cancel_requested: bool
    def __init__(self, cancel_requested: _Optional[bool] = ...) -> None: ...

class CompleteTaskRequest(_message.Message):
    __slots__ = ("task_token", "queue", "output")
    TASK_TOKEN_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    task_token: str
    queue: str
    output: _struct_pb2.Struct
    def __init__(self, task_token: _Optional[str] = ..., queue: _Optional[str] = ..., output: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class CompleteTaskResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FailTaskRequest(_message.Message):
    __slots__ = ("task_token", "queue", "message", "retryable", "details")
    TASK_TOKEN_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    task_token: str
    queue: str
    message: str
    retryable: bool
    details: _struct_pb2.Struct
    def __init__(self, task_token: _Optional[str] = ..., queue: _Optional[str] = ..., message: _Optional[str] = ..., retryable: _Optional[bool] = ..., details: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class FailTaskResponse(_message.Message):
    __slots__ = ("will_retry", "next_attempt_time")
    WILL_RETRY_FIELD_NUMBER: _ClassVar[int]
    NEXT_ATTEMPT_TIME_FIELD_NUMBER: _ClassVar[int]
    will_retry: bool
    next_attempt_time: _timestamp_pb2.Timestamp
    def __init__(self, will_retry: _Optional[bool] = ..., next_attempt_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ShutdownWorkerRequest(_message.Message):
    __slots__ = ("poll_session",)
    POLL_SESSION_FIELD_NUMBER: _ClassVar[int]
    poll_session: str
    def __init__(self, poll_session: _Optional[str] = ...) -> None: ...

class ShutdownWorkerResponse(_message.Message):
    __slots__ = ("polls_ended",)
    POLLS_ENDED_FIELD_NUMBER: _ClassVar[int]
    polls_ended: int
    def __init__(self, polls_ended: _Optional[int] = ...) -> None: ...
