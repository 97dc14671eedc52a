"""Fixtures for the workflow tests."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from aiwfe.app.suite import start_suite
from aiwfe.data.v1 import workflow_store_service_pb2_grpc as store_grpc
from aiwfe.runtime.identity import IDENTITY_METADATA_KEY, InternalIdentity


@pytest.fixture
async def store(private_overrides) -> Any:
    """dataplatform alone on a database of its own (these tests claim from the whole
    queue), and a WorkflowStoreService stub with a service identity."""
    running = await start_suite(private_overrides, only=("dataplatform",))
    identity = InternalIdentity.from_settings(running.settings)
    metadata = ((IDENTITY_METADATA_KEY, identity.assertion(None, "taskproc")),)
    async with grpc.aio.insecure_channel(running.address("dataplatform")) as ch:
        yield store_grpc.WorkflowStoreServiceStub(ch), metadata, running
    await running.stop()
