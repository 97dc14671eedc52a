"""The client half of every channel, for the SDK and the services alike: keepalive and
message-size options, the retry policy the contracts declare (idempotent RPCs only) and
TLS credentials.

Plain values, no settings model, so the SDK installs without the server's dependencies;
the runtime's channels (aiwfe/runtime/channels.py) build on these with its settings.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
from google.protobuf.descriptor import FileDescriptor

from aiwfe.options.v1 import options_pb2


class ConfigError(Exception):
    """Invalid or missing configuration; the message names the offending key.

    The one configuration error of the suite: the runtime's settings raise it too
    (`aiwfe.runtime.config.ConfigError` is this class)."""


class Tuning(Protocol):
    """What a client channel's options are made of (ChannelTuning, or the runtime's
    GrpcSettings, which takes its defaults from ChannelTuning)."""

    @property
    def keepalive_time_ms(self) -> int: ...
    @property
    def keepalive_timeout_ms(self) -> int: ...
    @property
    def keepalive_permit_without_calls(self) -> bool: ...
    @property
    def http2_max_pings_without_data(self) -> int: ...
    @property
    def http2_min_time_between_pings_ms(self) -> int: ...
    @property
    def http2_min_ping_interval_without_data_ms(self) -> int: ...
    @property
    def max_message_bytes(self) -> int: ...


@dataclass(frozen=True)
class ChannelTuning:
    """The seed's keepalive options for client channels, and message-size limits."""

    keepalive_time_ms: int = 30000
    keepalive_timeout_ms: int = 5000
    keepalive_permit_without_calls: bool = True
    http2_max_pings_without_data: int = 0
    http2_min_time_between_pings_ms: int = 10000
    http2_min_ping_interval_without_data_ms: int = 300000
    max_message_bytes: int = 4 * 1024 * 1024


DEFAULT_TUNING = ChannelTuning()


def shared_options(t: Tuning) -> list[tuple[str, Any]]:
    """What clients and servers both set: keepalive pings and message-size limits."""
    return [
        ("grpc.keepalive_time_ms", t.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", t.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", int(t.keepalive_permit_without_calls)),
        ("grpc.http2.max_pings_without_data", t.http2_max_pings_without_data),
        ("grpc.max_send_message_length", t.max_message_bytes),
        ("grpc.max_receive_message_length", t.max_message_bytes),
    ]


def channel_options(t: Tuning = DEFAULT_TUNING) -> list[tuple[str, Any]]:
    """A client channel's options: the seed's keepalive options plus message-size limits."""
    return [
        *shared_options(t),
        ("grpc.http2.min_time_between_pings_ms", t.http2_min_time_between_pings_ms),
        (
            "grpc.http2.min_ping_interval_without_data_ms",
            t.http2_min_ping_interval_without_data_ms,
        ),
    ]


def idempotent_methods(files: Iterable[FileDescriptor]) -> list[dict[str, str]]:
    """Service-config names of the RPCs whose contract declares them idempotent."""
    names = []
    for file in files:
        for service in file.services_by_name.values():
            for method in service.methods:
                policy = method.GetOptions().Extensions[options_pb2.policy]
                if policy.idempotent:
                    names.append({"service": service.full_name, "method": method.name})
    return names


def service_config(files: Iterable[FileDescriptor], retry_max_attempts: int) -> str:
    """Retry UNAVAILABLE for idempotent RPCs only, with retry throttling."""
    if not 1 <= retry_max_attempts <= 5:
        raise ValueError(f"retry_max_attempts must be 1 to 5, not {retry_max_attempts}")
    names = idempotent_methods(files)
    config: dict[str, Any] = {
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
        "methodConfig": [],
    }
    if names:
        config["methodConfig"].append(
            {
                "name": names,
                "retryPolicy": {
                    "maxAttempts": retry_max_attempts,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        )
    return json.dumps(config)


def read_pem(path: str | None, key: str) -> bytes | None:
    """The bytes of a PEM file, or ConfigError naming the configuration key."""
    if not path:
        return None
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"configuration key {key!r}: cannot read {path}: {exc.strerror}"
        ) from None


def channel_credentials(
    ca_file: str | None, cert_file: str | None = None, key_file: str | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials verifying the server against ca_file (system roots when None),
    presenting cert_file/key_file as the client certificate when given (mTLS)."""
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca_file, "tls.ca_file"),
        private_key=read_pem(key_file, "tls.client_key_file"),
        certificate_chain=read_pem(cert_file, "tls.client_cert_file"),
    )
