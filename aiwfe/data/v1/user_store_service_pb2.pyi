import datetime

from aiwfe.options.v1 import options_pb2 as _options_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AccountKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACCOUNT_KIND_UNSPECIFIED: _ClassVar[AccountKind]
    ACCOUNT_KIND_USER: _ClassVar[AccountKind]
    ACCOUNT_KIND_SERVICE: _ClassVar[AccountKind]
ACCOUNT_KIND_UNSPECIFIED: AccountKind
ACCOUNT_KIND_USER: AccountKind
ACCOUNT_KIND_SERVICE: AccountKind

class StoredUser(_message.Message):
    __slots__ = ("user_id", "username", "password_hash", "roles", "disabled", "create_time", "update_time", "kind")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_HASH_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    DISABLED_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    username: str
    password_hash: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    disabled: bool
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    kind: AccountKind
    def __init__(self, user_id: _Optional[str] = ..., username: _Optional[str] = ..., password_hash: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., disabled: _Optional[bool] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., kind: _Optional[_Union[AccountKind, str]] = ...) -> None: ...

class CreateUserRequest(_message.Message):
    __slots__ = ("username", "password_hash", "roles", "kind")
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_HASH_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    username: str
    password_hash: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    kind: AccountKind
    def __init__(self, username: _Optional[str] = ..., password_hash: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., kind: _Optional[_Union[AccountKind, str]] = ...) -> None: ...

class CreateUserResponse(_message.Message):
    __slots__ = ("user",)
    USER_FIELD_NUMBER: _ClassVar[int]
    user: StoredUser
    def __init__(self, user: _Optional[_Union[StoredUser, _Mapping]] = ...) -> None: ...

class GetUserRequest(_message.Message):
    __slots__ = ("username", "user_id")
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    username: str
    user_id: str
    def __init__(self, username: _Optional[str] = ..., user_id: _Optional[str] = ...) -> None: ...

class GetUserResponse(_message.Message):
    __slots__ = ("user",)
    USER_FIELD_NUMBER: _ClassVar[int]
    user: StoredUser
    def __init__(self, user: _Optional[_Union[StoredUser, _Mapping]] = ...) -> None: ...

class ListUsersRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "kind")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    kind: AccountKind
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., kind: _Optional[_Union[AccountKind, str]] = ...) -> None: ...

class ListUsersResponse(_message.Message):
    __slots__ = ("users", "next_page_token")
    USERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    users: _containers.RepeatedCompositeFieldContainer[StoredUser]
    next_page_token: str
    def __init__(self, users: _Optional[_Iterable[_Union[StoredUser, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UpdateUserRequest(_message.Message):
    __slots__ = ("username", "roles", "set_roles", "disabled", "set_disabled")
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    SET_ROLES_FIELD_NUMBER: _ClassVar[int]
    DISABLED_FIELD_NUMBER: _ClassVar[int]
    SET_DISABLED_FIELD_NUMBER: _ClassVar[int]
    username: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    set_roles: bool
    disabled: bool
    set_disabled: bool
    def __init__(self, username: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., set_roles: _Optional[bool] = ..., disabled: _Optional[bool] = ..., set_disabled: _Optional[bool] = ...) -> None: ...

class UpdateUserResponse(_message.Message):
    __slots__ = ("user",)
    USER_FIELD_NUMBER: _ClassVar[int]
    user: StoredUser
    def __init__(self, user: _Optional[_Union[StoredUser, _Mapping]] = ...) -> None: ...
