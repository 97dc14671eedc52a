"""A relay in front of the echo back end of tests/gateway/test_relay.py, and its port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from gateway.relay import Relay
from tests.gateway.test_relay import Backend, Harness, _backend


@dataclass
class Relayed:
    relay: Relay
    port: int
    backend: Backend
    harness: Harness


@pytest.fixture
async def relayed_port() -> AsyncIterator[Relayed]:
    server, backend, port = await _backend()
    harness = Harness(port)
    relay_port = await harness.relay.start("127.0.0.1", 0)
    yield Relayed(harness.relay, relay_port, backend, harness)
    await harness.relay.stop(0.5)
    await server.stop(0)
