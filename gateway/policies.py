"""Access policy read from the contract: each RPC's `aiwfe.options.v1.policy` option.

The gateway builds this table from descriptors at start-up; there is no second list of
method names to keep in sync. An RPC with no declared permission is denied.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from google.protobuf.descriptor import Descriptor, FileDescriptor, MethodDescriptor

from aiwfe.auth.v1 import auth_service_pb2
from aiwfe.cognitive.v1 import cognitive_service_pb2
from aiwfe.data.v1 import (
    cache_store_service_pb2,
    schedule_store_service_pb2,
    token_store_service_pb2,
    user_store_service_pb2,
    vector_store_service_pb2,
    workflow_store_service_pb2,
)
from aiwfe.options.v1 import options_pb2
from aiwfe.system.v1 import system_service_pb2
from aiwfe.taskproc.v1 import schedule_service_pb2, worker_service_pb2, workflow_service_pb2

# Every contract the gateway knows. Packages other than auth are proxied to their owner.
CONTRACTS: tuple[FileDescriptor, ...] = (
    auth_service_pb2.DESCRIPTOR,
    system_service_pb2.DESCRIPTOR,
    cognitive_service_pb2.DESCRIPTOR,
    workflow_service_pb2.DESCRIPTOR,
    worker_service_pb2.DESCRIPTOR,
    schedule_service_pb2.DESCRIPTOR,
    user_store_service_pb2.DESCRIPTOR,
    cache_store_service_pb2.DESCRIPTOR,
    vector_store_service_pb2.DESCRIPTOR,
    workflow_store_service_pb2.DESCRIPTOR,
    token_store_service_pb2.DESCRIPTOR,
    schedule_store_service_pb2.DESCRIPTOR,
)


@dataclass(frozen=True, slots=True)
class MethodInfo:
    """One RPC as the gateway sees it: where it goes and who may call it."""

    path: str  # "/aiwfe.cognitive.v1.CognitiveService/Embed"
    package: str
    service: str
    permission: str
    public: bool
    authenticated: bool
    cache_ttl_seconds: int
    idempotent: bool
    client_streaming: bool
    server_streaming: bool
    # A request field naming the resources `permission` is completed with (gateway/resources.py).
    resource_field: str = ""
    input_type: Descriptor | None = None
    # Whether the contract grants access at all (deny by default). A field, not a property:
    # admission reads it on every call, and a property runs Python through C each time.
    declared: bool = field(init=False)

    def __post_init__(self) -> None:
        declared = self.public or self.authenticated or bool(self.permission)
        object.__setattr__(self, "declared", declared)


def _info(method: MethodDescriptor) -> MethodInfo:
    policy = method.GetOptions().Extensions[options_pb2.policy]
    service = method.containing_service
    return MethodInfo(
        path=f"/{service.full_name}/{method.name}",
        package=service.file.package,
        service=service.full_name,
        permission=policy.permission,
        public=policy.public,
        authenticated=policy.authenticated,
        cache_ttl_seconds=policy.cache_ttl_seconds,
        idempotent=policy.idempotent,
        client_streaming=method.client_streaming,
        server_streaming=method.server_streaming,
        resource_field=policy.resource_field,
        input_type=method.input_type,
    )


def method_table(files: Iterable[FileDescriptor] = CONTRACTS) -> dict[str, MethodInfo]:
    """Method path → MethodInfo for every RPC in `files`."""
    return {
        info.path: info
        for file in files
        for service in file.services_by_name.values()
        for info in (_info(m) for m in service.methods)
    }


def public_services(files: Iterable[FileDescriptor] = CONTRACTS) -> list[str]:
    """Services with at least one RPC a caller may reach (listed over reflection)."""
    table = method_table(files)
    return sorted({m.service for m in table.values() if m.declared})
