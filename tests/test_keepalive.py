"""The keepalive policy end to end: servers permit the pings clients are configured to send
(ours every 30 s even when idle, grpc-js users' every 10 s), so an idle channel lives on
without a GOAWAY too_many_pings.

Time is scaled: every millisecond setting of the `grpc` block is divided by
AIWFE_KEEPALIVE_TEST_SCALE (default 15), and the channel is watched for 120 s / scale.
`AIWFE_KEEPALIVE_TEST_SCALE=1` runs the real two minutes with the real settings.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from typing import Any

import grpc
import pytest

from aiwfe.app.suite import start_suite
from aiwfe.runtime.channels import create_channel
from aiwfe.runtime.config import ConfigError, GrpcSettings, load_settings
from aiwfe.runtime.server import Service, start_service
from tests.test_up import ROOT

SCALE = float(os.environ.get("AIWFE_KEEPALIVE_TEST_SCALE", "15"))
GRPC_JS_KEEPALIVE_MS = 10_000  # a common grpc-js setting (keepaliveTimeMs)


def scaled_grpc_block() -> dict[str, Any]:
    """The default `grpc` block with every *_ms value divided by SCALE."""
    defaults = GrpcSettings()
    return {
        name: max(1, round(getattr(defaults, name) / SCALE))
        for name in GrpcSettings.model_fields
        if name.endswith("_ms") and getattr(defaults, name) > 0
    }


class _Idle(Service):
    """A service with nothing but health, reflection and SystemService."""

    name = "cognitive"


async def _stays_ready(channel: grpc.aio.Channel, seconds: float) -> None:
    await channel.channel_ready()
    assert channel.get_state() is grpc.ChannelConnectivity.READY
    try:
        await asyncio.wait_for(
            channel.wait_for_state_change(grpc.ChannelConnectivity.READY), timeout=seconds
        )
    except TimeoutError:
        return  # still READY: no GOAWAY, no reconnect
    pytest.fail(f"idle channel left READY ({channel.get_state()}): the server sent GOAWAY")


@pytest.mark.timeout(120 / SCALE + 60)
async def test_idle_channels_with_keepalive_pings_live_without_goaway(base_overrides) -> None:
    """An idle channel pinging as ours do (keepalive_time_ms, permitted without calls) and
    one pinging as often as a grpc-js client with a 10 s keepalive both stay READY (no
    GOAWAY) for two (scaled) minutes against a server configured by the same settings."""
    block = scaled_grpc_block()
    settings = load_settings(env={}, overrides={**base_overrides, "grpc": block})
    running = await start_service(_Idle(settings), host="127.0.0.1", port=0, probe_interval=60)
    js_like = load_settings(
        env={},
        overrides={
            **base_overrides,
            "grpc": {**block, "keepalive_time_ms": max(1, round(GRPC_JS_KEEPALIVE_MS / SCALE))},
        },
    )
    ours = create_channel(running.address, settings)
    grpc_js = create_channel(running.address, js_like)
    try:
        await asyncio.gather(_stays_ready(ours, 120 / SCALE), _stays_ready(grpc_js, 120 / SCALE))
    finally:
        await ours.close()
        await grpc_js.close()
        await running.stop(grace=0)


@pytest.mark.timeout(120 / SCALE + 90)
async def test_idle_channels_to_the_gateways_relay_live_without_goaway(base_overrides) -> None:
    """The same two idle channels against the gateway's public port, where the HTTP/2
    relay (not gRPC's server) enforces the ping policy, stay READY for two (scaled) minutes."""
    block = scaled_grpc_block()
    suite = await start_suite(
        {**base_overrides, "grpc": block}, only=("dataplatform", "cognitive", "gateway")
    )
    js_like = load_settings(
        env={},
        overrides={
            **base_overrides,
            "grpc": {**block, "keepalive_time_ms": max(1, round(GRPC_JS_KEEPALIVE_MS / SCALE))},
        },
    )
    assert suite.settings.gateway.relay
    ours = create_channel(suite.address("gateway"), suite.settings)
    grpc_js = create_channel(suite.address("gateway"), js_like)
    try:
        await asyncio.gather(_stays_ready(ours, 120 / SCALE), _stays_ready(grpc_js, 120 / SCALE))
    finally:
        await ours.close()
        await grpc_js.close()
        await suite.stop()


def test_a_server_policy_refusing_our_own_pings_is_a_config_error() -> None:
    """Servers told to refuse pings more often than the suite's own keepalive interval is
    refused at start-up, naming the keys."""
    with pytest.raises(ConfigError, match="server_min_ping_interval_ms must not exceed"):
        load_settings(env={}, overrides={"grpc": {"server_min_ping_interval_ms": 60_000}})


GRPC_JS = ROOT / ".tools/node_modules/@grpc/grpc-js"


@pytest.mark.timeout(120 / SCALE + 60)
async def test_idle_grpc_js_channel_lives_without_goaway(base_overrides) -> None:
    """A real @grpc/grpc-js channel, idle and pinging every 10 s (scaled), stays READY for
    two (scaled) minutes against a server configured by the default settings."""
    node = shutil.which("node")
    if node is None or not GRPC_JS.exists():
        pytest.skip("needs node and @grpc/grpc-js: npm install --prefix .tools @grpc/grpc-js")
    settings = load_settings(env={}, overrides={**base_overrides, "grpc": scaled_grpc_block()})
    running = await start_service(_Idle(settings), host="127.0.0.1", port=0, probe_interval=60)
    try:
        proc = await asyncio.create_subprocess_exec(
            node, str(ROOT / "tests/clients/idle_keepalive.js"), running.address,
            str(round(GRPC_JS_KEEPALIVE_MS / SCALE)), str(round(120_000 / SCALE)),
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "NODE_PATH": str(GRPC_JS.parent.parent)},
        )  # fmt: skip
        out, _ = await proc.communicate()
    finally:
        await running.stop(grace=0)
    assert (proc.returncode, out.decode().strip()) == (0, "ok")
