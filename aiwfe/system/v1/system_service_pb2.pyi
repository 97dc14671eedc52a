from aiwfe.options.v1 import options_pb2 as _options_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BreakerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BREAKER_STATE_UNSPECIFIED: _ClassVar[BreakerState]
    BREAKER_STATE_CLOSED: _ClassVar[BreakerState]
    BREAKER_STATE_OPEN: _ClassVar[BreakerState]
    BREAKER_STATE_HALF_OPEN: _ClassVar[BreakerState]
BREAKER_STATE_UNSPECIFIED: BreakerState
BREAKER_STATE_CLOSED: BreakerState
BREAKER_STATE_OPEN: BreakerState
BREAKER_STATE_HALF_OPEN: BreakerState

class CircuitBreaker(_message.Message):
    __slots__ = ("service", "downstream", "state", "failure_count", "open_remaining_seconds")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    DOWNSTREAM_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FAILURE_COUNT_FIELD_NUMBER: _ClassVar[int]
    OPEN_REMAINING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    service: str
    downstream: str
    state: BreakerState
    failure_count: int
    open_remaining_seconds: float
    def __init__(self, service: _Optional[str] = ..., downstream: _Optional[str] = ..., state: _Optional[_Union[BreakerState, str]] = ..., failure_count: _Optional[int] = ..., open_remaining_seconds: _Optional[float] = ...) -> None: ...

class ListCircuitBreakersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListCircuitBreakersResponse(_message.Message):
    __slots__ = ("breakers", "unreachable_services")
    BREAKERS_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_SERVICES_FIELD_NUMBER: _ClassVar[int]
    breakers: _containers.RepeatedCompositeFieldContainer[CircuitBreaker]
    unreachable_services: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, breakers: _Optional[_Iterable[_Union[CircuitBreaker, _Mapping]]] = ..., unreachable_services: _Optional[_Iterable[str]] = ...) -> None: ...
