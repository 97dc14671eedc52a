"""The client SDK: channel, auth with token refresh, typed helpers over the
generated contracts, and the worker that serves your own functions as workflow steps.
Needs only grpcio, protobuf and PyJWT (distribution aiwfe-sdk, sdk/pyproject.toml); never
imports the runtime, a service or the app."""

from aiwfe.sdk.client import AsyncClient, Client, CredentialStore, Tokens
from aiwfe.sdk.worker import (
    NonRetryableError,
    TaskCancelled,
    TaskInfo,
    Worker,
    WorkerError,
    current_task,
    task,
)

__all__ = [
    "AsyncClient",
    "Client",
    "CredentialStore",
    "NonRetryableError",
    "TaskCancelled",
    "TaskInfo",
    "Tokens",
    "Worker",
    "WorkerError",
    "current_task",
    "task",
]
