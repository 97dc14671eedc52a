"""The full RBAC matrix: every RPC the gateway knows by admin, user, readonly and no token,
each cell asserting the exact outcome written out by hand from the seed's roles."""

from __future__ import annotations

import asyncio

import grpc

from gateway.policies import method_table
from tests.conftest import bearer
from tests.gateway.conftest import Gateway

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
INVALID = grpc.StatusCode.INVALID_ARGUMENT
OK = grpc.StatusCode.OK
# A permitted call whose outcome is the back end's business (empty request): anything but
# an authentication or authorization refusal.
REACHED = "reached"

A, U, R, N = "admin", "user", "readonly", "none"
_AUTH = "/aiwfe.auth.v1.AuthService/"
_ADMIN = "/aiwfe.auth.v1.UserAdminService/"
_COG = "/aiwfe.cognitive.v1.CognitiveService/"
_WF = "/aiwfe.taskproc.v1.WorkflowService/"
_WORKER = "/aiwfe.taskproc.v1.WorkerService/"
_SCHED = "/aiwfe.taskproc.v1.ScheduleService/"


def _row(admin, user, readonly, none) -> dict[str, object]:
    return {A: admin, U: user, R: readonly, N: none}


EXPECTED: dict[str, dict[str, object]] = {
    _AUTH + "Login": _row(INVALID, INVALID, INVALID, INVALID),
    _AUTH + "Refresh": _row(INVALID, INVALID, INVALID, INVALID),
    _AUTH + "Logout": _row(OK, OK, OK, UNAUTH),
    _AUTH + "WhoAmI": _row(OK, OK, OK, UNAUTH),
    _ADMIN + "CreateUser": _row(INVALID, DENIED, DENIED, UNAUTH),
    _ADMIN + "ListUsers": _row(OK, DENIED, DENIED, UNAUTH),
    _ADMIN + "SetUserRoles": _row(INVALID, DENIED, DENIED, UNAUTH),
    _ADMIN + "DisableUser": _row(INVALID, DENIED, DENIED, UNAUTH),
    _ADMIN + "CreateServiceAccount": _row(INVALID, DENIED, DENIED, UNAUTH),
    _ADMIN + "ListServiceAccounts": _row(OK, DENIED, DENIED, UNAUTH),
    _ADMIN + "CreateApiKey": _row(INVALID, DENIED, DENIED, UNAUTH),
    _ADMIN + "ListApiKeys": _row(INVALID, DENIED, DENIED, UNAUTH),
    _ADMIN + "RevokeApiKey": _row(INVALID, DENIED, DENIED, UNAUTH),
    _COG + "Embed": _row(INVALID, INVALID, DENIED, UNAUTH),
    _COG + "IndexDocuments": _row(REACHED, DENIED, DENIED, UNAUTH),
    _COG + "Search": _row(REACHED, REACHED, DENIED, UNAUTH),
    _COG + "Classify": _row(REACHED, REACHED, DENIED, UNAUTH),
    _COG + "Generate": _row(REACHED, REACHED, DENIED, UNAUTH),
    _COG + "ListCollections": _row(OK, OK, DENIED, UNAUTH),
    _COG + "ShareCollection": _row(INVALID, DENIED, DENIED, UNAUTH),
    _COG + "UnshareCollection": _row(INVALID, DENIED, DENIED, UNAUTH),
    _COG + "DeleteCollection": _row(INVALID, DENIED, DENIED, UNAUTH),
    _WF + "SubmitWorkflow": _row(REACHED, REACHED, DENIED, UNAUTH),
    _WF + "GetWorkflow": _row(REACHED, REACHED, REACHED, UNAUTH),
    _WF + "ListWorkflows": _row(REACHED, REACHED, REACHED, UNAUTH),
    _WF + "CancelWorkflow": _row(REACHED, REACHED, DENIED, UNAUTH),
    _WF + "RetryWorkflow": _row(REACHED, REACHED, DENIED, UNAUTH),
    _WF + "WatchWorkflow": _row(REACHED, REACHED, REACHED, UNAUTH),
    _WF + "WatchWorkflows": _row(REACHED, REACHED, REACHED, UNAUTH),
    _WF + "RunWorkflow": _row(REACHED, REACHED, DENIED, UNAUTH),
    _WF + "SignalWorkflow": _row(REACHED, REACHED, DENIED, UNAUTH),
    # Schedules: changes need api:workflow:schedule (user has api:workflow:*), reads
    # api:read; an empty request names no schedule (INVALID_ARGUMENT from taskproc).
    _SCHED + "CreateSchedule": _row(INVALID, INVALID, DENIED, UNAUTH),
    _SCHED + "GetSchedule": _row(INVALID, INVALID, INVALID, UNAUTH),
    _SCHED + "ListSchedules": _row(OK, OK, OK, UNAUTH),
    _SCHED + "PauseSchedule": _row(INVALID, INVALID, DENIED, UNAUTH),
    _SCHED + "DeleteSchedule": _row(INVALID, INVALID, DENIED, UNAUTH),
    _SCHED + "TriggerSchedule": _row(INVALID, INVALID, DENIED, UNAUTH),
    "/aiwfe.system.v1.SystemService/ListCircuitBreakers": _row(REACHED, DENIED, DENIED, UNAUTH),
    # worker:queue:<queue> needs the queue: an empty request names none (the gateway says
    # so); tests/taskproc/test_worker_service.py checks the permission per queue. The token
    # calls need any identity and a token sealed for it (taskproc refuses an empty one).
    _WORKER + "PollTask": _row(INVALID, INVALID, INVALID, UNAUTH),
    _WORKER + "HeartbeatTask": _row(INVALID, INVALID, INVALID, UNAUTH),
    _WORKER + "CompleteTask": _row(INVALID, INVALID, INVALID, UNAUTH),
    _WORKER + "FailTask": _row(INVALID, INVALID, INVALID, UNAUTH),
    _WORKER + "ShutdownWorker": _row(INVALID, INVALID, INVALID, UNAUTH),
}
# Internal data-platform RPCs declare no permission: denied to everyone, token or not.
for _path, _info in method_table().items():
    if _info.package == "aiwfe.data.v1":
        EXPECTED[_path] = _row(DENIED, DENIED, DENIED, DENIED)


async def _call(channel: grpc.aio.Channel, path: str, metadata) -> grpc.StatusCode:
    info = method_table()[path]
    if info.server_streaming:
        call = channel.unary_stream(path)(b"", metadata=metadata, timeout=5)
        try:
            return await asyncio.wait_for(call.code(), 3)
        except TimeoutError:
            call.cancel()
            return grpc.StatusCode.DEADLINE_EXCEEDED  # streaming happily: it got through
    try:
        await channel.unary_unary(path)(b"", metadata=metadata, timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return OK


async def test_every_rpc_for_every_role(gw: Gateway) -> None:
    """Each (RPC, role) cell ends exactly as the table says; the table covers every RPC."""
    assert set(EXPECTED) == set(method_table()), "a new RPC needs its row in the matrix"
    tokens = {A: gw.admin_token}
    for role in (U, R):
        name = await gw.create_user([role], f"matrix-{role}")
        tokens[role] = (await gw.login(name)).access_token
    results: dict[tuple[str, str], object] = {}
    wanted: dict[tuple[str, str], object] = {}
    for path, row in EXPECTED.items():
        for role, want in row.items():
            if path.endswith("/Logout") and role != N:
                # Logout revokes its token: use a throwaway session of the same role.
                name = await gw.create_user([role], "matrix-logout")
                token = (await gw.login(name)).access_token
            else:
                token = tokens.get(role)
            code = await _call(gw.channel, path, bearer(token) if token else ())
            results[path, role] = REACHED if want == REACHED and code not in (
                UNAUTH, DENIED
            ) else code  # fmt: skip
            wanted[path, role] = want
    mismatches = {k: (results[k], wanted[k]) for k in wanted if results[k] != wanted[k]}
    assert mismatches == {}
