from google.protobuf import descriptor_pb2 as _descriptor_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor
POLICY_FIELD_NUMBER: _ClassVar[int]
policy: _descriptor.FieldDescriptor

class MethodPolicy(_message.Message):
    __slots__ = ("permission", "public", "authenticated", "cache_ttl_seconds", "idempotent", "resource_field", "long_poll")
    PERMISSION_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_FIELD_NUMBER: _ClassVar[int]
    AUTHENTICATED_FIELD_NUMBER: _ClassVar[int]
    CACHE_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENT_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_FIELD_NUMBER: _ClassVar[int]
    LONG_POLL_FIELD_NUMBER: _ClassVar[int]
    permission: str
    public: bool
    authenticated: bool
    cache_ttl_seconds: int
    idempotent: bool
    resource_field: str
    long_poll: bool
    def __init__(self, permission: _Optional[str] = ..., public: _Optional[bool] = ..., authenticated: _Optional[bool] = ..., cache_ttl_seconds: _Optional[int] = ..., idempotent: _Optional[bool] = ..., resource_field: _Optional[str] = ..., long_poll: _Optional[bool] = ...) -> None: ...
