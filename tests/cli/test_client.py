"""The client SDK against a running suite: typed results, deadlines on every call, the
contract's idempotent RPCs retried, refresh before expiry and after UNAUTHENTICATED (once,
even with concurrent callers), and the blocking Client."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from pathlib import Path

import grpc
import pytest

from aiwfe.app.suite import Suite
from aiwfe.cognitive.v1 import cognitive_service_pb2 as cog_pb
from aiwfe.sdk.channel import idempotent_methods
from aiwfe.sdk.client import CONTRACTS, AsyncClient, Client, CredentialStore, Tokens
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from tests.conftest import ADMIN_PASSWORD


async def test_typed_results(suite: Suite) -> None:
    """Results are the generated messages and login keeps the tokens."""
    async with AsyncClient(suite.address("gateway"), timeout=10) as client:
        login = await client.login("admin", ADMIN_PASSWORD)
        assert login.token_type == "Bearer" and client.tokens is not None
        reply = await client.embed(["typed"])
        assert isinstance(reply, cog_pb.EmbedResponse) and reply.dimension == 768


async def test_every_call_has_a_deadline() -> None:
    """Against a server that accepts TCP but never answers, unary and streaming calls end
    with DEADLINE_EXCEEDED instead of hanging."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with AsyncClient(
            f"127.0.0.1:{port}", timeout=0.5, stream_timeout=0.5, tokens=Tokens("t")
        ) as client:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.whoami()
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in client.watch_workflow("wf"):
                    pass
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


def test_retry_policy_covers_exactly_the_idempotent_rpcs() -> None:
    """The channel retries the RPCs whose contract says idempotent, never the others."""
    names = {(m["service"].rsplit(".", 1)[1], m["method"]) for m in idempotent_methods(CONTRACTS)}
    assert {("AuthService", "WhoAmI"), ("CognitiveService", "Embed")} <= names
    assert {("WorkflowService", "GetWorkflow"), ("UserAdminService", "ListUsers")} <= names
    for not_idempotent in (
        ("AuthService", "Login"),
        ("AuthService", "Refresh"),
        ("CognitiveService", "Generate"),
        ("WorkflowService", "SubmitWorkflow"),
        ("UserAdminService", "CreateUser"),
    ):
        assert not_idempotent not in names


async def test_unauthenticated_call_refreshes_and_retries_once(suite: Suite) -> None:
    """A rejected access token with a valid refresh token: the client refreshes, retries,
    succeeds and reports the rotated pair."""
    seen: list[Tokens] = []
    async with AsyncClient(suite.address("gateway"), timeout=10) as client:
        await client.login("admin", ADMIN_PASSWORD)
        assert client.tokens is not None and client.tokens.refresh_token
        client.tokens = Tokens("not-a-jwt", client.tokens.refresh_token, 0.0)
        client.on_tokens = seen.append
        who = await client.whoami()
    assert who.username == "admin"
    assert len(seen) == 1 and seen[0].access_token != "not-a-jwt"


async def test_concurrent_callers_share_one_refresh(suite: Suite) -> None:
    """Refresh tokens are single use: ten concurrent calls with an expiring token trigger
    exactly one Refresh and all succeed."""
    seen: list[Tokens] = []
    async with AsyncClient(suite.address("gateway"), timeout=10) as client:
        await client.login("admin", ADMIN_PASSWORD)
        assert client.tokens is not None
        client.tokens.expires_at = 1.0
        client.on_tokens = seen.append
        replies = await asyncio.gather(*(client.whoami() for _ in range(10)))
    assert {r.username for r in replies} == {"admin"}
    assert len(seen) == 1


def test_credential_store_is_owner_only(tmp_path) -> None:
    """The store creates its file 0600 (and its directory 0700), keeps one entry per
    gateway, and removes an entry on logout."""
    store = CredentialStore(tmp_path / "dir" / "credentials.json")
    store.save("a:1", Tokens("access-a", "refresh-a", 123.0))
    store.save("b:2", Tokens("access-b"))
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700
    assert store.load("a:1") == Tokens("access-a", "refresh-a", 123.0)
    store.save("a:1", None)
    assert store.load("a:1") is None and store.load("b:2") is not None
    assert set(json.loads(store.path.read_text())) == {"b:2"}


def test_credential_store_honours_the_environment(tmp_path, monkeypatch) -> None:
    """$AIWFE_CREDENTIALS chooses the file."""
    monkeypatch.setenv("AIWFE_CREDENTIALS", str(tmp_path / "c.json"))
    assert CredentialStore().path == Path(os.environ["AIWFE_CREDENTIALS"])


def blocking_session(
    gateway: str, spec: wf_pb.WorkflowSpec
) -> tuple[str, int, list[int], list[int]]:
    """The README's blocking example: login, embed, submit and watch a workflow; then the
    same in one call with run_workflow."""
    with Client(gateway, timeout=10) as client:
        client.login("admin", ADMIN_PASSWORD)
        who = client.whoami().username
        dimension = client.embed(["from the blocking client"]).dimension
        workflow = client.submit_workflow(spec).workflow
        states = [event.workflow_state for event in client.watch_workflow(workflow.workflow_id)]
        ran = [u.event.workflow_state for u in client.run_workflow(spec) if u.HasField("event")]
    return who, dimension, states, ran


async def test_blocking_client(suite: Suite) -> None:
    """Client (sync) logs in, embeds, and streams a workflow's events to the end, by
    submit + watch and by run_workflow."""
    spec = wf_pb.WorkflowSpec(name="sdk", steps=[wf_pb.StepSpec(name="only", op="noop")])
    who, dimension, states, ran = await asyncio.to_thread(
        blocking_session, suite.address("gateway"), spec
    )
    assert (who, dimension) == ("admin", 768)
    assert states and states[-1] == wf_pb.WORKFLOW_STATE_SUCCEEDED
    assert ran == states  # the same transitions, submitted and followed in one call


def readme_sdk_example() -> str:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("### Client SDK (`aiwfe.sdk.client`)", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


async def test_readme_sdk_example_runs(suite: Suite) -> None:
    """The README's SDK example runs as written (against this suite's gateway address)."""
    code = readme_sdk_example().replace("127.0.0.1:50051", suite.address("gateway"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        env={**os.environ, "AIWFE_ADMIN_PASSWORD": ADMIN_PASSWORD},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[0].endswith(" 768 2")
    assert "WORKFLOW_STATE_SUCCEEDED" in out.decode()
    assert "system:*" in lines[-1]
