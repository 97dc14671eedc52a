"""No caller can open a circuit breaker for others: one user's bad calls of every kind,
to cognitive and to taskproc through the real gateway, while another user is served."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from aiwfe.app.suite import start_suite
from aiwfe.cognitive.v1 import cognitive_service_pb2 as cog_pb
from aiwfe.cognitive.v1 import cognitive_service_pb2_grpc as cog_grpc
from aiwfe.system.v1 import system_service_pb2 as sys_pb
from aiwfe.system.v1 import system_service_pb2_grpc as sys_grpc
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from aiwfe.taskproc.v1 import workflow_service_pb2_grpc as wf_grpc
from tests.conftest import bearer, login
from tests.gateway.conftest import Gateway, gateway_overrides
from tests.gateway.test_forwarding import grpc_headers, h2_call
from tests.taskproc.helpers import spec

TIMES = 50
COGNITIVE = "/aiwfe.cognitive.v1.CognitiveService/"
WORKFLOWS = "/aiwfe.taskproc.v1.WorkflowService/"
NO_STORE = ("cache-control", "no-store")
BIG_HEADER = ("x-oversized", "a" * 20_000)  # over a gRPC server's metadata limit (16 KiB)


@pytest.fixture(params=["relay", "no_relay"])
async def gw_unlimited(
    request: pytest.FixtureRequest, base_overrides: dict[str, Any], redis_url: str
) -> AsyncIterator[Gateway]:
    """The suite with API limits high enough for hundreds of calls by one user, with the
    gateway's relay (bad calls take its fast path once the token is cached), then without
    (every call through the gRPC proxy)."""
    overrides = gateway_overrides(base_overrides, redis_url)
    overrides["authentication"] = {
        **overrides["authentication"],
        "rate_limiting": {"api_requests": 100_000},
    }
    overrides["gateway"] = {"relay": request.param == "relay"}
    suite = await start_suite(overrides)
    try:
        async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
            yield Gateway(suite, channel, await login(channel))
    finally:
        await suite.stop()


def _raw(channel: grpc.aio.Channel, path: str) -> grpc.aio.UnaryUnaryMultiCallable:
    return channel.unary_unary(path)  # bytes in, bytes out


async def _status(call: Awaitable[dict]) -> None:
    """Raises the raw call's gRPC status as a client library would (reset: INTERNAL)."""
    fields = await call
    code = int(fields.get(b"grpc-status", b"13"))
    if code:
        status = next(c for c in grpc.StatusCode if c.value[0] == code)
        raise grpc.aio.AioRpcError(status, grpc.aio.Metadata(), grpc.aio.Metadata())


async def _cancelled(call: Any) -> None:
    """Cancels `call` once it is on its way (CancelledError, as the client sees it)."""
    await asyncio.sleep(0.002)
    call.cancel()
    await call


async def test_one_users_bad_calls_never_open_a_breaker_for_another(gw_unlimited) -> None:
    """A user sends each kind of bad call 50 times at once to cognitive and to taskproc (malformed
    bytes, unknown method, no permission, another user's workflow, invalid arguments, a
    1 ms deadline, cancelled calls, a header the back end refuses) while another user is
    served throughout without a single UNAVAILABLE; afterwards every breaker is closed."""
    gw = gw_unlimited
    attacker_token = (await gw.login(await gw.create_user(["user"], "bad"))).access_token
    attacker = bearer(attacker_token)
    victim = bearer((await gw.login(await gw.create_user(["user"], "good"))).access_token)
    channel = gw.channel
    cognitive = cog_grpc.CognitiveServiceStub(channel)
    workflows = wf_grpc.WorkflowServiceStub(channel)
    theirs = await workflows.SubmitWorkflow(
        wf_pb.SubmitWorkflowRequest(spec=spec({"name": "a", "op": "noop"})),
        metadata=victim,
        timeout=10,
    )
    other_id = theirs.workflow.workflow_id
    embed = cog_pb.EmbedRequest(texts=["bad caller"])

    def fresh() -> cog_pb.EmbedRequest:
        return cog_pb.EmbedRequest(texts=[f"never cached {uuid.uuid4().hex}"])

    address = gw.suite.address("gateway")

    def raw_h2(path: str, header: tuple[str, str], message: bytes) -> Awaitable[Any]:
        """A header only a raw HTTP/2 client sends (the case of issue #16, item 1)."""
        headers = [*grpc_headers(address, path, attacker_token), NO_STORE, header]
        return _status(h2_call(address, headers, message))

    def heavy() -> cog_pb.EmbedRequest:
        return cog_pb.EmbedRequest(texts=[f"{uuid.uuid4().hex} " * 20 for _ in range(100)])

    bad: dict[str, Callable[[], Awaitable[Any]]] = {
        "cognitive malformed": lambda: _raw(channel, COGNITIVE + "Embed")(
            b"\x0a\xff\xff\xff\xff", metadata=(*attacker, NO_STORE), timeout=10
        ),
        "cognitive unknown method": lambda: _raw(channel, COGNITIVE + "Nope")(
            b"", metadata=attacker, timeout=10
        ),
        "cognitive no permission": lambda: cognitive.IndexDocuments(
            cog_pb.IndexDocumentsRequest(), metadata=attacker, timeout=10
        ),
        "cognitive invalid argument": lambda: cognitive.Embed(
            cog_pb.EmbedRequest(texts=[]), metadata=(*attacker, NO_STORE), timeout=10
        ),
        "cognitive 1 ms deadline": lambda: cognitive.Embed(
            fresh(), metadata=(*attacker, NO_STORE), timeout=0.001
        ),
        "cognitive short deadline": lambda: cognitive.Embed(
            heavy(), metadata=(*attacker, NO_STORE), timeout=0.03
        ),
        "cognitive cancelled": lambda: _cancelled(
            cognitive.Embed(fresh(), metadata=(*attacker, NO_STORE), timeout=10)
        ),
        "cognitive refused header": lambda: cognitive.Embed(
            embed, metadata=(*attacker, NO_STORE, BIG_HEADER), timeout=10
        ),
        "cognitive upper-case header name": lambda: raw_h2(
            COGNITIVE + "Embed", ("X-Upper", "1"), fresh().SerializeToString()
        ),
        "cognitive malformed grpc-timeout": lambda: raw_h2(
            COGNITIVE + "Embed", ("grpc-timeout", "-1S"), embed.SerializeToString()
        ),
        "taskproc malformed": lambda: _raw(channel, WORKFLOWS + "GetWorkflow")(
            b"\x0a\xff\xff\xff\xff", metadata=attacker, timeout=10
        ),
        "taskproc unknown method": lambda: _raw(channel, WORKFLOWS + "Nope")(
            b"", metadata=attacker, timeout=10
        ),
        "taskproc another user's workflow": lambda: workflows.GetWorkflow(
            wf_pb.GetWorkflowRequest(workflow_id=other_id), metadata=attacker, timeout=10
        ),
        "taskproc cancel another user's workflow": lambda: workflows.CancelWorkflow(
            wf_pb.CancelWorkflowRequest(workflow_id=other_id), metadata=attacker, timeout=10
        ),
        "taskproc invalid argument": lambda: workflows.SubmitWorkflow(
            wf_pb.SubmitWorkflowRequest(), metadata=attacker, timeout=10
        ),
        "taskproc 1 ms deadline": lambda: workflows.ListWorkflows(
            wf_pb.ListWorkflowsRequest(), metadata=attacker, timeout=0.001
        ),
        "taskproc short deadline": lambda: workflows.ListWorkflows(
            wf_pb.ListWorkflowsRequest(page_size=100), metadata=attacker, timeout=0.005
        ),
        "taskproc upper-case header name": lambda: raw_h2(
            WORKFLOWS + "ListWorkflows", ("X-Upper", "1"), b""
        ),
        "taskproc cancelled": lambda: _cancelled(
            workflows.ListWorkflows(wf_pb.ListWorkflowsRequest(), metadata=attacker, timeout=10)
        ),
        "taskproc refused header": lambda: workflows.ListWorkflows(
            wf_pb.ListWorkflowsRequest(), metadata=(*attacker, BIG_HEADER), timeout=10
        ),
    }
    outcomes: dict[str, Counter[str]] = {kind: Counter() for kind in bad}
    served: Counter[str] = Counter()
    refused: list[str] = []
    attacking = True

    async def once(kind: str) -> None:
        try:
            await bad[kind]()
            outcomes[kind]["OK"] += 1
        except grpc.aio.AioRpcError as exc:
            outcomes[kind][exc.code().name] += 1
        except asyncio.CancelledError:
            outcomes[kind]["CANCELLED"] += 1

    async def attack() -> None:
        for kind in bad:  # each kind as one burst: its failures reach a breaker back to back
            await asyncio.gather(*(once(kind) for _ in range(TIMES)))

    async def serve() -> None:
        while attacking or not served:
            for name, call in (
                ("embed", lambda: cognitive.Embed(fresh(), metadata=victim, timeout=10)),
                (
                    "workflow",
                    lambda: workflows.GetWorkflow(
                        wf_pb.GetWorkflowRequest(workflow_id=other_id),
                        metadata=victim,
                        timeout=10,
                    ),
                ),
            ):
                try:
                    await call()
                    served[name] += 1
                except grpc.aio.AioRpcError as exc:
                    refused.append(f"{name}: {exc.code().name} {exc.details()}")

    server = asyncio.create_task(serve())
    try:
        await attack()
    finally:
        attacking = False
        await server
    assert not [r for r in refused if "UNAVAILABLE" in r], refused
    assert served["embed"] >= 5 and served["workflow"] >= 5, served
    print(outcomes)
    for kind, codes in outcomes.items():
        assert "UNAVAILABLE" not in codes, (kind, codes)
        # 1 ms may be enough; a malformed grpc-timeout counts as none
        assert "deadline" in kind or "grpc-timeout" in kind or "OK" not in codes, (kind, codes)

    reply = await sys_grpc.SystemServiceStub(channel).ListCircuitBreakers(
        sys_pb.ListCircuitBreakersRequest(), metadata=bearer(gw.admin_token), timeout=10
    )
    states = {(b.service, b.downstream): b.state for b in reply.breakers}
    assert ("gateway", "cognitive") in states and ("gateway", "taskproc") in states
    assert set(states.values()) == {sys_pb.BREAKER_STATE_CLOSED}, states
