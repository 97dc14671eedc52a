"""Error reasons through the real gateway: each common cause answers its own ErrorInfo
reason in domain aiwfe.dev, with the metadata a client needs to act on it."""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import jwt
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aiwfe.app.suite import start_suite
from aiwfe.auth.v1 import auth_service_pb2 as auth_pb
from aiwfe.auth.v1 import auth_service_pb2_grpc as auth_grpc
from aiwfe.runtime.errors import ERROR_DOMAIN
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from aiwfe.taskproc.v1 import workflow_service_pb2_grpc as wf_grpc
from tests.conftest import ADMIN_PASSWORD, bearer, login
from tests.gateway.conftest import PASSWORD, gateway_overrides, unique
from tests.gateway.test_token_attacks import claims

READONLY_LIMIT = 6  # API requests per window for the readonly role in this suite


@pytest.fixture
async def suite_and_channel(base_overrides: dict[str, Any], redis_url: str) -> AsyncIterator[tuple]:
    """The full suite (Redis on) with a small API limit for the readonly role."""
    overrides = copy.deepcopy(gateway_overrides(base_overrides, redis_url))
    overrides["authentication"]["rate_limiting"] = {
        "api_requests_per_role": {"readonly": READONLY_LIMIT}
    }
    suite = await start_suite(overrides)
    try:
        async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
            yield suite, channel
    finally:
        await suite.stop()


def error_info(err: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    """(code, ErrorInfo reason, ErrorInfo metadata) of a failed call; exactly one ErrorInfo."""
    status = rpc_status.from_call(err)
    assert status is not None, f"no status details on {err.code()}: {err.details()}"
    infos = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
    assert len(infos) == 1 and infos[0].domain == ERROR_DOMAIN
    return err.code(), infos[0].reason, dict(infos[0].metadata)


async def failure(call, *args: Any, **kwargs: Any) -> tuple[grpc.StatusCode, str, dict]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(*args, timeout=10, **kwargs)
    return error_info(err.value)


async def test_authentication_failures_have_distinct_reasons(suite_and_channel) -> None:
    """No token, a malformed header, garbage, an expired token and a revoked one each get
    UNAUTHENTICATED with their own reason, as do a wrong password and a reused or unknown
    refresh token."""
    suite, channel = suite_and_channel
    auth = auth_grpc.AuthServiceStub(channel)
    whoami = auth.WhoAmI
    request = auth_pb.WhoAmIRequest()
    secret = suite.settings.authentication.jwt.secret_key
    now = int(time.time())
    expired = jwt.encode(claims(iat=now - 7200, exp=now - 3600), secret, headers={"kid": "k1"})
    unauth = grpc.StatusCode.UNAUTHENTICATED
    assert await failure(whoami, request) == (unauth, "TOKEN_MISSING", {})
    basic = (("authorization", "Basic YWRtaW46eA=="),)
    assert await failure(whoami, request, metadata=basic) == (
        unauth, "AUTHORIZATION_MALFORMED", {}
    )  # fmt: skip
    assert await failure(whoami, request, metadata=bearer("not.a.jwt")) == (
        unauth, "TOKEN_INVALID", {}
    )  # fmt: skip
    assert await failure(whoami, request, metadata=bearer(expired)) == (
        unauth, "TOKEN_EXPIRED", {}
    )  # fmt: skip
    bad_login = auth_pb.LoginRequest(username="admin", password="wrong-password-1234")
    assert await failure(auth.Login, bad_login) == (unauth, "CREDENTIALS_INVALID", {})
    pair = await auth.Login(
        auth_pb.LoginRequest(username="admin", password=ADMIN_PASSWORD), timeout=10
    )
    spent = auth_pb.RefreshRequest(refresh_token=pair.refresh_token)
    await auth.Refresh(spent, timeout=10)
    assert await failure(auth.Refresh, spent) == (unauth, "REFRESH_TOKEN_REUSED", {})
    garbage = auth_pb.RefreshRequest(refresh_token="rt_not-a-token")
    assert await failure(auth.Refresh, garbage) == (unauth, "REFRESH_TOKEN_INVALID", {})
    token = await login(channel)
    await auth.Logout(auth_pb.LogoutRequest(), metadata=bearer(token), timeout=10)
    assert await failure(whoami, request, metadata=bearer(token)) == (
        unauth, "TOKEN_REVOKED", {}
    )  # fmt: skip


async def test_denied_missing_and_limited_calls_name_what_applies(suite_and_channel) -> None:
    """A readonly user submitting gets PERMISSION_MISSING naming api:workflow:submit, an
    unknown workflow WORKFLOW_NOT_FOUND with its id, an unknown user USER_NOT_FOUND, and
    the call past the readonly limit RATE_LIMITED with the limit and quota."""
    _, channel = suite_and_channel
    admin = await login(channel)
    users = auth_grpc.UserAdminServiceStub(channel)
    name = unique("ro")
    await users.CreateUser(
        auth_pb.CreateUserRequest(username=name, password=PASSWORD, roles=["readonly"]),
        metadata=bearer(admin),
        timeout=10,
    )
    reader = bearer(await login(channel, name, PASSWORD))
    workflows = wf_grpc.WorkflowServiceStub(channel)

    submit = await failure(workflows.SubmitWorkflow, wf_pb.SubmitWorkflowRequest(), metadata=reader)
    assert submit == (
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_MISSING",
        {
            "permission": "api:workflow:submit",
            "method": "/aiwfe.taskproc.v1.WorkflowService/SubmitWorkflow",
        },
    )
    missing = str(uuid.uuid4())
    assert await failure(
        workflows.GetWorkflow, wf_pb.GetWorkflowRequest(workflow_id=missing), metadata=reader
    ) == (grpc.StatusCode.NOT_FOUND, "WORKFLOW_NOT_FOUND", {"workflowId": missing})
    ghost = unique("ghost")
    assert await failure(
        users.DisableUser, auth_pb.DisableUserRequest(username=ghost), metadata=bearer(admin)
    ) == (grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND", {"username": ghost})

    spent = 2  # the two calls above (the denied Submit counts too)
    for _ in range(READONLY_LIMIT - spent):
        await auth_grpc.AuthServiceStub(channel).WhoAmI(
            auth_pb.WhoAmIRequest(), metadata=reader, timeout=10
        )
    assert await failure(
        auth_grpc.AuthServiceStub(channel).WhoAmI, auth_pb.WhoAmIRequest(), metadata=reader
    ) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "RATE_LIMITED",
        {"quota": "api:user", "limit": str(READONLY_LIMIT)},
    )
