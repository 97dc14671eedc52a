"""gRPC server reflection under both names tools use: grpc.reflection.v1 and v1alpha.

grpcio-reflection 1.85.1 ships only v1alpha. The v1 protocol is the same messages under
another package (wire-identical), so the one servicer is registered under both service
names, and the v1 file descriptor is derived from v1alpha's by renaming its package, so
that a client asking for the v1 service's own file gets it.

Symbol lookup also resolves members: `pkg.Service.Method` names the file of its service
(the library resolves only services, messages and enums), as grpcurl and buf ask for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer as _AsyncReflection

V1ALPHA = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name
V1 = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """Adds grpc/reflection/v1/reflection.proto (v1alpha's, renamed) to `pool` once."""
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = _V1_FILE
    proto.package = "grpc.reflection.v1"
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(".v1alpha.", ".v1.")
            method.output_type = method.output_type.replace(".v1alpha.", ".v1.")
    for message in proto.message_type:
        for field in message.field:
            if field.type_name:
                field.type_name = field.type_name.replace(".v1alpha.", ".v1.")
    pool.AddSerializedFile(proto.SerializeToString())


class ReflectionServicer(_AsyncReflection):
    """The library's asyncio servicer, resolving method and field symbols too."""

    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        pool = self._pool
        for find in (pool.FindMethodByName, pool.FindFieldByName):
            try:
                member = find(fully_qualified_name)
            except KeyError:
                continue
            parent = getattr(member, "containing_service", None) or member.containing_type
            return super()._file_containing_symbol(request, parent.full_name)
        return super()._file_containing_symbol(request, fully_qualified_name)


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serves reflection v1 and v1alpha on `server`, listing `service_names` and both
    reflection services."""
    pool = descriptor_pool.Default()
    _add_v1_descriptor(pool)
    servicer = ReflectionServicer([*service_names, V1, V1ALPHA], pool=pool)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler})
            for name in (V1, V1ALPHA)
        ]
    )
