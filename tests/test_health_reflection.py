"""grpc.health.v1 and server reflection as the ecosystem's clients use them, on every
service: Health/List, reflection v1 (a client that knows only v1), member symbol lookup."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2 as refl

from aiwfe.app.suite import SERVICE_ORDER, Suite
from tests.conftest import ADMIN_PASSWORD, login
from tests.test_up import ROOT, buf_binary

V1_METHOD = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


async def reflect_v1(channel: grpc.aio.Channel, *requests: refl.ServerReflectionRequest) -> list:
    """Asks grpc.reflection.v1 only (its messages are wire-identical to v1alpha's)."""
    call = channel.stream_stream(
        V1_METHOD,
        request_serializer=refl.ServerReflectionRequest.SerializeToString,
        response_deserializer=refl.ServerReflectionResponse.FromString,
    )(iter(requests), timeout=10)
    return [reply async for reply in call]


def files_of(reply: refl.ServerReflectionResponse) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    assert reply.WhichOneof("message_response") == "file_descriptor_response", reply
    out = {}
    for raw in reply.file_descriptor_response.file_descriptor_proto:
        proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
        out[proto.name] = proto
    return out


@pytest.fixture
async def channels(suite: Suite) -> AsyncIterator[dict[str, grpc.aio.Channel]]:
    opened = {name: grpc.aio.insecure_channel(suite.address(name)) for name in SERVICE_ORDER}
    yield opened
    for channel in opened.values():
        await channel.close()


async def test_health_list_answers_on_every_service_without_errors(channels, caplog) -> None:
    """Health/List (declared by health.proto, listed by reflection) answers every service's
    statuses, SERVING, and logs no ERROR."""
    caplog.set_level(logging.ERROR)
    for name, channel in channels.items():
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.List(health_pb2.HealthListRequest(), timeout=5)
        assert "" in reply.statuses, name
        assert len(reply.statuses) > 1, name
        for service, status in reply.statuses.items():
            assert status.status == health_pb2.HealthCheckResponse.SERVING, (name, service)
            check = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert check.status == status.status
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_reflection_v1_lists_and_resolves_methods_and_messages(channels) -> None:
    """A client speaking only grpc.reflection.v1 lists each service's services and resolves
    a service, a method symbol and a message symbol to the file that defines it."""
    for name, channel in channels.items():
        (listed,) = await reflect_v1(channel, refl.ServerReflectionRequest(list_services=""))
        services = {s.name for s in listed.list_services_response.service}
        assert {"grpc.reflection.v1.ServerReflection", "grpc.health.v1.Health"} <= services
        assert "grpc.reflection.v1alpha.ServerReflection" in services
        for service in sorted(services):
            (found,) = await reflect_v1(
                channel, refl.ServerReflectionRequest(file_containing_symbol=service)
            )
            files = files_of(found)
            package, _, short = service.rpartition(".")
            (home,) = [
                f for f in files.values()
                if f.package == package and short in {s.name for s in f.service}
            ]  # fmt: skip
            definition = next(s for s in home.service if s.name == short)
            method = definition.method[0]
            by_method, by_message = await reflect_v1(
                channel,
                refl.ServerReflectionRequest(file_containing_symbol=f"{service}.{method.name}"),
                refl.ServerReflectionRequest(file_containing_symbol=method.input_type.lstrip(".")),
            )
            assert home.name in files_of(by_method), (name, service, method.name)
            assert files_of(by_message), (name, method.input_type)


async def test_gateway_resolves_embed_over_both_reflection_versions(channels) -> None:
    """The gateway resolves `CognitiveService.Embed` to cognitive_service.proto over v1 and
    v1alpha alike; an unknown member is NOT_FOUND in the reflection answer."""
    gateway = channels["gateway"]
    symbol = "aiwfe.cognitive.v1.CognitiveService.Embed"
    (v1,) = await reflect_v1(gateway, refl.ServerReflectionRequest(file_containing_symbol=symbol))
    assert "aiwfe/cognitive/v1/cognitive_service.proto" in files_of(v1)
    alpha = gateway.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=refl.ServerReflectionRequest.SerializeToString,
        response_deserializer=refl.ServerReflectionResponse.FromString,
    )
    request = refl.ServerReflectionRequest(file_containing_symbol=symbol)
    replies = [r async for r in alpha(iter([request]), timeout=10)]
    assert "aiwfe/cognitive/v1/cognitive_service.proto" in files_of(replies[0])
    (missing,) = await reflect_v1(
        gateway,
        refl.ServerReflectionRequest(file_containing_symbol=f"{symbol}Nope"),
    )
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


async def _run(*argv: str, stdin: bytes = b"") -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out, err


@pytest.fixture
def buf() -> str:
    found = buf_binary()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("buf is required in CI (.ci/run installs @bufbuild/buf)")
        pytest.skip("buf not installed: npm install --prefix .tools @bufbuild/buf@1.75.0")
    return found


async def test_buf_curl_lists_methods_over_reflection_v1(suite, buf) -> None:
    """`buf curl --list-methods` with reflection v1 only lists every RPC on the gateway
    (routed ones included) and on each back end."""
    for name in SERVICE_ORDER:
        code, out, err = await _run(
            buf, "curl", "--protocol", "grpc", "--http2-prior-knowledge",
            "--reflect-protocol", "grpc-v1", "--list-methods",
            f"http://{suite.address(name)}",
        )  # fmt: skip
        assert code == 0, (name, err.decode())
        methods = set(out.decode().split())
        assert "grpc.health.v1.Health/List" in methods, name
        if name == "gateway":
            assert {
                "aiwfe.cognitive.v1.CognitiveService/Embed",
                "aiwfe.taskproc.v1.WorkflowService/ListWorkflows",
                "aiwfe.auth.v1.AuthService/Login",
            } <= methods


async def test_readme_recipe_decodes_error_details_with_shipped_protos(
    suite, gateway_channel, buf
) -> None:
    """The README's recipe: buf curl -v shows the grpc-status-details-bin trailer, and
    `buf convert protos --type google.rpc.Status` (the google/rpc protos shipped under
    protos/third_party) decodes it with its ErrorInfo and BadRequest."""
    token = await login(gateway_channel)
    code, _, err = await _run(
        buf, "curl", "-v", "--protocol", "grpc", "--http2-prior-knowledge",
        "-H", f"authorization: Bearer {token}", "-d", '{"page_size": 5000}',
        f"http://{suite.address('gateway')}/aiwfe.taskproc.v1.WorkflowService/ListWorkflows",
    )  # fmt: skip
    assert code != 0
    marker = "grpc-status-details-bin: "
    (trailer,) = [
        line[line.lower().index(marker) + len(marker) :].strip()
        for line in err.decode().splitlines()
        if marker in line.lower()
    ]
    raw = base64.b64decode(trailer + "=" * (-len(trailer) % 4))
    code, out, err = await _run(
        buf, "convert", str(ROOT / "protos"), "--type", "google.rpc.Status",
        "--from", "-#format=binpb", "--to", "-#format=json", stdin=raw,
    )  # fmt: skip
    assert code == 0, err.decode()
    status = json.loads(out)
    assert status["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    kinds = {d["@type"]: d for d in status["details"]}
    bad = kinds["type.googleapis.com/google.rpc.BadRequest"]
    assert bad["fieldViolations"][0]["field"] == "page_size"
    assert kinds["type.googleapis.com/google.rpc.ErrorInfo"]["domain"] == "aiwfe.dev"


async def test_readme_tour_runs_verbatim(suite) -> None:
    """The tour's two shell blocks run as printed (but for the npm install, which `.ci/run`
    does, and the gateway's address): methods listed, login, Embed, WhoAmI, and the
    decoded google.rpc.Status of a refused ListWorkflows."""
    if not (ROOT / ".tools/node_modules/.bin/buf").exists():  # what `npx --prefix .tools` runs
        if os.environ.get("CI"):
            pytest.fail("the tour needs buf in .tools (.ci/run installs @bufbuild/buf)")
        pytest.skip("buf not in .tools: npm install --prefix .tools @bufbuild/buf@1.75.0")
    text = (ROOT / "README.md").read_text()
    tour = text[text.index("## Five-minute tour") : text.index("From Python, use the")]
    blocks = re.findall(r"^```sh\n(.*?)^```", tour, re.MULTILINE | re.DOTALL)
    assert len(blocks) == 2, blocks
    lines = []
    for line in "".join(blocks).splitlines():
        if line.startswith("npm install --prefix .tools @bufbuild/buf@"):
            continue  # needs the registry; the test's `buf` fixture is that same install
        if line.startswith("export AIWFE_ADMIN_PASSWORD="):
            continue  # the suite's admin password comes in the environment
        lines.append(re.sub(r"^GW=http://127\.0\.0\.1:50051$", "GW=http://$TOUR_GW", line))
    assert "GW=http://$TOUR_GW" in lines
    env = {
        **os.environ,
        "AIWFE_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "TOUR_GW": suite.address("gateway"),
    }
    proc = await asyncio.create_subprocess_exec(
        "sh", "-euc", "\n".join(lines), cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, err.decode()
    printed = out.decode()
    assert "aiwfe.cognitive.v1.CognitiveService/Embed" in printed
    assert '"embeddings"' in printed and '"username": "admin"' in printed
    status = json.loads(printed[printed.rindex('{"code"') :])
    assert status["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    info = next(d for d in status["details"] if d["@type"].endswith("ErrorInfo"))
    assert (info["reason"], info["domain"]) == ("REQUEST_INVALID", "aiwfe.dev")
