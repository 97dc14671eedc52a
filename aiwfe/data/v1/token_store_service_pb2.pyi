import datetime

from aiwfe.data.v1 import user_store_service_pb2 as _user_store_service_pb2
from aiwfe.options.v1 import options_pb2 as _options_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RotateOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROTATE_OUTCOME_UNSPECIFIED: _ClassVar[RotateOutcome]
    ROTATE_OUTCOME_ROTATED: _ClassVar[RotateOutcome]
    ROTATE_OUTCOME_REUSED: _ClassVar[RotateOutcome]
    ROTATE_OUTCOME_INVALID: _ClassVar[RotateOutcome]
ROTATE_OUTCOME_UNSPECIFIED: RotateOutcome
ROTATE_OUTCOME_ROTATED: RotateOutcome
ROTATE_OUTCOME_REUSED: RotateOutcome
ROTATE_OUTCOME_INVALID: RotateOutcome

class RevokedAccessToken(_message.Message):
    __slots__ = ("jti", "expire_time")
    JTI_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    jti: str
    expire_time: _timestamp_pb2.Timestamp
    def __init__(self, jti: _Optional[str] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Revocation(_message.Message):
    __slots__ = ("id", "access_token", "user_id", "not_before", "expire_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    ACCESS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: int
    access_token: RevokedAccessToken
    user_id: str
    not_before: _timestamp_pb2.Timestamp
    expire_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[int] = ..., access_token: _Optional[_Union[RevokedAccessToken, _Mapping]] = ..., user_id: _Optional[str] = ..., not_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("user_id", "family_id", "refresh_token_hash", "refresh_expire_time", "access_token")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    FAMILY_ID_FIELD_NUMBER: _ClassVar[int]
    REFRESH_TOKEN_HASH_FIELD_NUMBER: _ClassVar[int]
    REFRESH_EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    ACCESS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    family_id: str
    refresh_token_hash: bytes
    refresh_expire_time: _timestamp_pb2.Timestamp
    access_token: RevokedAccessToken
    def __init__(self, user_id: _Optional[str] = ..., family_id: _Optional[str] = ..., refresh_token_hash: _Optional[bytes] = ..., refresh_expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., access_token: _Optional[_Union[RevokedAccessToken, _Mapping]] = ...) -> None: ...

class CreateSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RotateRefreshTokenRequest(_message.Message):
    __slots__ = ("refresh_token_hash", "new_refresh_token_hash", "refresh_expire_time", "access_token")
    REFRESH_TOKEN_HASH_FIELD_NUMBER: _ClassVar[int]
    NEW_REFRESH_TOKEN_HASH_FIELD_NUMBER: _ClassVar[int]
    REFRESH_EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    ACCESS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    refresh_token_hash: bytes
    new_refresh_token_hash: bytes
    refresh_expire_time: _timestamp_pb2.Timestamp
    access_token: RevokedAccessToken
    def __init__(self, refresh_token_hash: _Optional[bytes] = ..., new_refresh_token_hash: _Optional[bytes] = ..., refresh_expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., access_token: _Optional[_Union[RevokedAccessToken, _Mapping]] = ...) -> None: ...

class RotateRefreshTokenResponse(_message.Message):
    __slots__ = ("outcome", "family_id", "user_id", "username", "roles", "revoked")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    outcome: RotateOutcome
    family_id: str
    user_id: str
    username: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    revoked: _containers.RepeatedCompositeFieldContainer[RevokedAccessToken]
    def __init__(self, outcome: _Optional[_Union[RotateOutcome, str]] = ..., family_id: _Optional[str] = ..., user_id: _Optional[str] = ..., username: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., revoked: _Optional[_Iterable[_Union[RevokedAccessToken, _Mapping]]] = ...) -> None: ...

class RevokeTokensRequest(_message.Message):
    __slots__ = ("access_tokens", "family_ids", "user_id", "revoke_user_families", "watermark_expire_time", "reason")
    ACCESS_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FAMILY_IDS_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    REVOKE_USER_FAMILIES_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    access_tokens: _containers.RepeatedCompositeFieldContainer[RevokedAccessToken]
    family_ids: _containers.RepeatedScalarFieldContainer[str]
    user_id: str
    revoke_user_families: bool
    watermark_expire_time: _timestamp_pb2.Timestamp
    reason: str
    def __init__(self, access_tokens: _Optional[_Iterable[_Union[RevokedAccessToken, _Mapping]]] = ..., family_ids: _Optional[_Iterable[str]] = ..., user_id: _Optional[str] = ..., revoke_user_families: _Optional[bool] = ..., watermark_expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class RevokeTokensResponse(_message.Message):
    __slots__ = ("revoked", "not_before")
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    revoked: _containers.RepeatedCompositeFieldContainer[RevokedAccessToken]
    not_before: _timestamp_pb2.Timestamp
    def __init__(self, revoked: _Optional[_Iterable[_Union[RevokedAccessToken, _Mapping]]] = ..., not_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListRevocationsRequest(_message.Message):
    __slots__ = ("after_id", "page_size", "lookback_seconds")
    AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    LOOKBACK_SECONDS_FIELD_NUMBER: _ClassVar[int]
    after_id: int
    page_size: int
    lookback_seconds: int
    def __init__(self, after_id: _Optional[int] = ..., page_size: _Optional[int] = ..., lookback_seconds: _Optional[int] = ...) -> None: ...

class ListRevocationsResponse(_message.Message):
    __slots__ = ("revocations", "last_id", "more")
    REVOCATIONS_FIELD_NUMBER: _ClassVar[int]
    LAST_ID_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    revocations: _containers.RepeatedCompositeFieldContainer[Revocation]
    last_id: int
    more: bool
    def __init__(self, revocations: _Optional[_Iterable[_Union[Revocation, _Mapping]]] = ..., last_id: _Optional[int] = ..., more: _Optional[bool] = ...) -> None: ...

class StoredApiKey(_message.Message):
    __slots__ = ("key_id", "account_id", "name", "secret_hash", "create_time", "expire_time", "revoke_time", "last_used_time")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SECRET_HASH_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    REVOKE_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_TIME_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    account_id: str
    name: str
    secret_hash: bytes
    create_time: _timestamp_pb2.Timestamp
    expire_time: _timestamp_pb2.Timestamp
    revoke_time: _timestamp_pb2.Timestamp
    last_used_time: _timestamp_pb2.Timestamp
    def __init__(self, key_id: _Optional[str] = ..., account_id: _Optional[str] = ..., name: _Optional[str] = ..., secret_hash: _Optional[bytes] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoke_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_used_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateApiKeyRequest(_message.Message):
    __slots__ = ("key_id", "account_id", "name", "secret_hash", "expire_time")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SECRET_HASH_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    account_id: str
    name: str
    secret_hash: bytes
    expire_time: _timestamp_pb2.Timestamp
    def __init__(self, key_id: _Optional[str] = ..., account_id: _Optional[str] = ..., name: _Optional[str] = ..., secret_hash: _Optional[bytes] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateApiKeyResponse(_message.Message):
    __slots__ = ("api_key",)
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    api_key: StoredApiKey
    def __init__(self, api_key: _Optional[_Union[StoredApiKey, _Mapping]] = ...) -> None: ...

class GetApiKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class GetApiKeyResponse(_message.Message):
    __slots__ = ("api_key", "account", "read_time")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    READ_TIME_FIELD_NUMBER: _ClassVar[int]
    api_key: StoredApiKey
    account: _user_store_service_pb2.StoredUser
    read_time: _timestamp_pb2.Timestamp
    def __init__(self, api_key: _Optional[_Union[StoredApiKey, _Mapping]] = ..., account: _Optional[_Union[_user_store_service_pb2.StoredUser, _Mapping]] = ..., read_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListApiKeysRequest(_message.Message):
    __slots__ = ("account_id", "page_size", "page_token")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    page_size: int
    page_token: str
    def __init__(self, account_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListApiKeysResponse(_message.Message):
    __slots__ = ("api_keys", "next_page_token")
    API_KEYS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    api_keys: _containers.RepeatedCompositeFieldContainer[StoredApiKey]
    next_page_token: str
    def __init__(self, api_keys: _Optional[_Iterable[_Union[StoredApiKey, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RevokeApiKeyRequest(_message.Message):
    __slots__ = ("key_id", "access_token")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ACCESS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    access_token: RevokedAccessToken
    def __init__(self, key_id: _Optional[str] = ..., access_token: _Optional[_Union[RevokedAccessToken, _Mapping]] = ...) -> None: ...

class RevokeApiKeyResponse(_message.Message):
    __slots__ = ("api_key", "revoked")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    api_key: StoredApiKey
    revoked: _containers.RepeatedCompositeFieldContainer[RevokedAccessToken]
    def __init__(self, api_key: _Optional[_Union[StoredApiKey, _Mapping]] = ..., revoked: _Optional[_Iterable[_Union[RevokedAccessToken, _Mapping]]] = ...) -> None: ...

class ApiKeyUse(_message.Message):
    __slots__ = ("key_id", "last_used_time")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_TIME_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    last_used_time: _timestamp_pb2.Timestamp
    def __init__(self, key_id: _Optional[str] = ..., last_used_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RecordApiKeyUseRequest(_message.Message):
    __slots__ = ("uses",)
    USES_FIELD_NUMBER: _ClassVar[int]
    uses: _containers.RepeatedCompositeFieldContainer[ApiKeyUse]
    def __init__(self, uses: _Optional[_Iterable[_Union[ApiKeyUse, _Mapping]]] = ...) -> None: ...

class RecordApiKeyUseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
