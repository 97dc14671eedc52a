"""Client SDK: `AsyncClient` and its blocking twin `Client` over the generated stubs.

Every call carries a deadline; idempotent RPCs (as their contract declares) are retried on
UNAVAILABLE by the channel's service config; the access token is refreshed automatically
shortly before it expires, or once after an UNAUTHENTICATED answer, when a refresh token
is held. Results are the generated messages.

    async with AsyncClient("127.0.0.1:50051") as client:
        await client.login("admin", password)
        reply = await client.embed(["hello"])
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
import jwt

from aiwfe.auth.v1 import auth_service_pb2 as auth_pb
from aiwfe.auth.v1 import auth_service_pb2_grpc as auth_grpc
from aiwfe.cognitive.v1 import cognitive_service_pb2 as cog_pb
from aiwfe.cognitive.v1 import cognitive_service_pb2_grpc as cog_grpc
from aiwfe.sdk.channel import channel_credentials, channel_options, service_config
from aiwfe.system.v1 import system_service_pb2 as sys_pb
from aiwfe.system.v1 import system_service_pb2_grpc as sys_grpc
from aiwfe.taskproc.v1 import schedule_service_pb2 as sched_pb
from aiwfe.taskproc.v1 import schedule_service_pb2_grpc as sched_grpc
from aiwfe.taskproc.v1 import workflow_service_pb2 as wf_pb
from aiwfe.taskproc.v1 import workflow_service_pb2_grpc as wf_grpc

T = TypeVar("T")
DEFAULT_GATEWAY = "127.0.0.1:50051"
GATEWAY_ENV = "AIWFE_GATEWAY"
CREDENTIALS_ENV = "AIWFE_CREDENTIALS"
# Refresh when less than this much of the access token's life remains.
REFRESH_MARGIN_SECONDS = 60.0
CONTRACTS = (
    auth_pb.DESCRIPTOR,
    cog_pb.DESCRIPTOR,
    wf_pb.DESCRIPTOR,
    sys_pb.DESCRIPTOR,
    sched_pb.DESCRIPTOR,
)


@dataclass
class Tokens:
    """A token pair and when the access token expires (Unix seconds, 0 = unknown)."""

    access_token: str
    refresh_token: str = ""
    expires_at: float = 0.0

    @classmethod
    def from_reply(cls, reply: auth_pb.LoginResponse | auth_pb.RefreshResponse) -> Tokens:
        return cls(reply.access_token, reply.refresh_token, token_expiry(reply.access_token))

    def expiring(self, margin: float = REFRESH_MARGIN_SECONDS) -> bool:
        return bool(self.expires_at) and self.expires_at - time.time() < margin


def token_expiry(access_token: str) -> float:
    """The `exp` claim of a JWT, read without verification (the gateway verifies it)."""
    try:
        claims = jwt.decode(access_token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return 0.0
    return float(claims.get("exp", 0))


class CredentialStore:
    """Tokens per gateway in one JSON file readable by its owner only (mode 0600)."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        default = Path("~/.config/aiwfe/credentials.json")
        self.path = Path(path or os.environ.get(CREDENTIALS_ENV) or default).expanduser()

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def load(self, gateway: str) -> Tokens | None:
        entry = self._read().get(gateway)
        if not isinstance(entry, dict) or not entry.get("access_token"):
            return None
        return Tokens(
            str(entry["access_token"]),
            str(entry.get("refresh_token", "")),
            float(entry.get("expires_at", 0)),
        )

    def save(self, gateway: str, tokens: Tokens | None) -> None:
        """Stores (or with None removes) the gateway's tokens, atomically, as 0600."""
        data = self._read()
        if tokens is None:
            data.pop(gateway, None)
        else:
            data[gateway] = asdict(tokens)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)


class AsyncClient:
    """The aiwfe API through the gateway, with auth, deadlines, retries and refresh.

    Args:
        gateway: host:port of the gateway.
        tls: use TLS (verifying against `ca_file`, or the system roots).
        ca_file, cert_file, key_file: PEM paths; cert/key present a client certificate.
        tokens: tokens to start with (e.g. from a CredentialStore).
        timeout: deadline in seconds of every unary call.
        stream_timeout: deadline in seconds of every streaming call.
        on_tokens: called with the new Tokens after every login and refresh.
    """

    def __init__(
        self,
        gateway: str = DEFAULT_GATEWAY,
        *,
        tls: bool = False,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        tokens: Tokens | None = None,
        timeout: float = 30.0,
        stream_timeout: float = 3600.0,
        retry_attempts: int = 3,
        on_tokens: Callable[[Tokens], None] | None = None,
    ) -> None:
        self.gateway = gateway
        self.tokens = tokens
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self.on_tokens = on_tokens
        options = [
            *channel_options(),
            ("grpc.service_config", service_config(CONTRACTS, retry_attempts)),
            ("grpc.enable_retries", 1),
        ]
        if tls or ca_file or cert_file:
            creds = channel_credentials(ca_file, cert_file, key_file)
            self.channel = grpc.aio.secure_channel(gateway, creds, options=options)
        else:
            self.channel = grpc.aio.insecure_channel(gateway, options=options)
        self.auth = auth_grpc.AuthServiceStub(self.channel)
        self.users = auth_grpc.UserAdminServiceStub(self.channel)
        self.cognitive = cog_grpc.CognitiveServiceStub(self.channel)
        self.workflows = wf_grpc.WorkflowServiceStub(self.channel)
        self.system = sys_grpc.SystemServiceStub(self.channel)
        self.schedules = sched_grpc.ScheduleServiceStub(self.channel)
        self._refresh_lock = asyncio.Lock()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    # --- tokens ---------------------------------------------------------------------------

    def _set_tokens(self, tokens: Tokens) -> None:
        self.tokens = tokens
        if self.on_tokens is not None:
            self.on_tokens(tokens)

    async def _metadata(self) -> tuple[tuple[str, str], ...]:
        if self.tokens is None:
            return ()
        if self.tokens.refresh_token and self.tokens.expiring():
            await self._refresh_quietly(self.tokens.access_token)
        return (("authorization", f"Bearer {self.tokens.access_token}"),)

    async def _refresh_quietly(self, stale: str) -> bool:
        """Refreshes unless another task already did; False when refresh is impossible."""
        async with self._refresh_lock:
            if self.tokens is None or not self.tokens.refresh_token:
                return False
            if self.tokens.access_token != stale:
                return True
            try:
                await self.refresh()
            except grpc.aio.AioRpcError:
                return False
        return True

    async def _unary(self, rpc: Callable[..., Awaitable[T]], request: Any) -> T:
        """One unary call with deadline and bearer; one retry after a refresh on
        UNAUTHENTICATED (the gateway rejected it before any back end saw it)."""
        metadata = await self._metadata()
        try:
            return await rpc(request, timeout=self.timeout, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAUTHENTICATED or self.tokens is None:
                raise
            if not await self._refresh_quietly(self.tokens.access_token):
                raise
        return await rpc(request, timeout=self.timeout, metadata=await self._metadata())

    async def _stream(self, rpc: Callable[..., Any], request: Any) -> AsyncIterator[Any]:
        call = rpc(request, timeout=self.stream_timeout, metadata=await self._metadata())
        try:
            async for reply in call:
                yield reply
        finally:
            call.cancel()

    # --- AuthService ----------------------------------------------------------------------

    async def login(self, username: str, password: str) -> auth_pb.LoginResponse:
        """Logs in and keeps the returned tokens for later calls."""
        reply = await self.auth.Login(
            auth_pb.LoginRequest(username=username, password=password), timeout=self.timeout
        )
        self._set_tokens(Tokens.from_reply(reply))
        return reply

    async def refresh(self) -> auth_pb.RefreshResponse:
        """Spends the refresh token for a new pair (refresh tokens are single use)."""
        if self.tokens is None or not self.tokens.refresh_token:
            raise ValueError("no refresh token: log in first")
        reply = await self.auth.Refresh(
            auth_pb.RefreshRequest(refresh_token=self.tokens.refresh_token), timeout=self.timeout
        )
        self._set_tokens(Tokens.from_reply(reply))
        return reply

    async def logout(self) -> auth_pb.LogoutResponse:
        reply = await self._unary(self.auth.Logout, auth_pb.LogoutRequest())
        self.tokens = None
        return reply

    async def whoami(self) -> auth_pb.WhoAmIResponse:
        return await self._unary(self.auth.WhoAmI, auth_pb.WhoAmIRequest())

    # --- UserAdminService -----------------------------------------------------------------

    async def create_user(
        self, username: str, password: str, roles: Iterable[str] = ("user",)
    ) -> auth_pb.CreateUserResponse:
        request = auth_pb.CreateUserRequest(username=username, password=password, roles=roles)
        return await self._unary(self.users.CreateUser, request)

    async def list_users(
        self, page_size: int = 0, page_token: str = ""
    ) -> auth_pb.ListUsersResponse:
        request = auth_pb.ListUsersRequest(page_size=page_size, page_token=page_token)
        return await self._unary(self.users.ListUsers, request)

    async def set_user_roles(
        self, username: str, roles: Iterable[str]
    ) -> auth_pb.SetUserRolesResponse:
        request = auth_pb.SetUserRolesRequest(username=username, roles=roles)
        return await self._unary(self.users.SetUserRoles, request)

    async def disable_user(self, username: str) -> auth_pb.DisableUserResponse:
        request = auth_pb.DisableUserRequest(username=username)
        return await self._unary(self.users.DisableUser, request)

    async def create_service_account(
        self, name: str, roles: Iterable[str]
    ) -> auth_pb.CreateServiceAccountResponse:
        request = auth_pb.CreateServiceAccountRequest(name=name, roles=roles)
        return await self._unary(self.users.CreateServiceAccount, request)

    async def list_service_accounts(
        self, page_size: int = 0, page_token: str = ""
    ) -> auth_pb.ListServiceAccountsResponse:
        request = auth_pb.ListServiceAccountsRequest(page_size=page_size, page_token=page_token)
        return await self._unary(self.users.ListServiceAccounts, request)

    async def create_api_key(
        self, service_account: str, name: str = "", ttl_seconds: float | None = None
    ) -> auth_pb.CreateApiKeyResponse:
        """A new API key for `service_account`; `.key` is shown only in this answer."""
        request = auth_pb.CreateApiKeyRequest(service_account=service_account, name=name)
        if ttl_seconds is not None:
            request.ttl.FromMicroseconds(int(ttl_seconds * 1e6))
        return await self._unary(self.users.CreateApiKey, request)

    async def list_api_keys(
        self, service_account: str, page_size: int = 0, page_token: str = ""
    ) -> auth_pb.ListApiKeysResponse:
        request = auth_pb.ListApiKeysRequest(
            service_account=service_account, page_size=page_size, page_token=page_token
        )
        return await self._unary(self.users.ListApiKeys, request)

    async def revoke_api_key(self, key_id: str) -> auth_pb.RevokeApiKeyResponse:
        request = auth_pb.RevokeApiKeyRequest(key_id=key_id)
        return await self._unary(self.users.RevokeApiKey, request)

    # --- CognitiveService -----------------------------------------------------------------

    async def embed(
        self, texts: Iterable[str], model: str = "", bypass_cache: bool = False
    ) -> cog_pb.EmbedResponse:
        request = cog_pb.EmbedRequest(texts=texts, model=model, bypass_cache=bypass_cache)
        return await self._unary(self.cognitive.Embed, request)

    async def index_documents(
        self, collection: str, documents: Iterable[cog_pb.Document], model: str = ""
    ) -> cog_pb.IndexDocumentsResponse:
        request = cog_pb.IndexDocumentsRequest(
            collection=collection, documents=documents, model=model
        )
        return await self._unary(self.cognitive.IndexDocuments, request)

    async def search(
        self,
        collection: str,
        query: str,
        top_k: int = 10,
        filter: Mapping[str, str] | None = None,
        score_threshold: float = 0.0,
        model: str = "",
    ) -> cog_pb.SearchResponse:
        request = cog_pb.SearchRequest(
            collection=collection,
            query=query,
            top_k=top_k,
            filter=dict(filter or {}),
            score_threshold=score_threshold,
            model=model,
        )
        return await self._unary(self.cognitive.Search, request)

    async def classify(
        self, text: str, labels: Iterable[str], examples: Iterable[cog_pb.LabelExample] = ()
    ) -> cog_pb.ClassifyResponse:
        request = cog_pb.ClassifyRequest(text=text, labels=labels, examples=examples)
        return await self._unary(self.cognitive.Classify, request)

    async def list_collections(self) -> cog_pb.ListCollectionsResponse:
        request = cog_pb.ListCollectionsRequest()
        return await self._unary(self.cognitive.ListCollections, request)

    async def share_collection(
        self, collection: str, *, username: str = "", role: str = "", write: bool = False
    ) -> cog_pb.ShareCollectionResponse:
        grant = cog_pb.CollectionGrant(write=write)
        if role:
            grant.role = role
        else:
            grant.username = username
        request = cog_pb.ShareCollectionRequest(collection=collection, grant=grant)
        return await self._unary(self.cognitive.ShareCollection, request)

    async def unshare_collection(
        self, collection: str, *, username: str = "", role: str = ""
    ) -> cog_pb.UnshareCollectionResponse:
        request = cog_pb.UnshareCollectionRequest(collection=collection)
        if role:
            request.role = role
        else:
            request.username = username
        return await self._unary(self.cognitive.UnshareCollection, request)

    async def delete_collection(self, collection: str) -> cog_pb.DeleteCollectionResponse:
        request = cog_pb.DeleteCollectionRequest(collection=collection)
        return await self._unary(self.cognitive.DeleteCollection, request)

    def generate(self, request: cog_pb.GenerateRequest) -> AsyncIterator[cog_pb.GenerateResponse]:
        """Streams the completion piece by piece."""
        return self._stream(self.cognitive.Generate, request)

    # --- WorkflowService ------------------------------------------------------------------

    async def submit_workflow(
        self, spec: wf_pb.WorkflowSpec, idempotency_key: str = ""
    ) -> wf_pb.SubmitWorkflowResponse:
        request = wf_pb.SubmitWorkflowRequest(spec=spec, idempotency_key=idempotency_key)
        return await self._unary(self.workflows.SubmitWorkflow, request)

    async def get_workflow(self, workflow_id: str) -> wf_pb.GetWorkflowResponse:
        request = wf_pb.GetWorkflowRequest(workflow_id=workflow_id)
        return await self._unary(self.workflows.GetWorkflow, request)

    async def list_workflows(
        self,
        state: wf_pb.WorkflowState = wf_pb.WORKFLOW_STATE_UNSPECIFIED,
        page_size: int = 0,
        page_token: str = "",
        *,
        name: str = "",
        schedule_id: str = "",
        create_after: datetime | None = None,
        create_before: datetime | None = None,
    ) -> wf_pb.ListWorkflowsResponse:
        """A page of your workflows, newest first, filtered by state, spec name, the
        schedule that started them and a create-time range [create_after, create_before)."""
        request = wf_pb.ListWorkflowsRequest(
            state=state,
            page_size=page_size,
            page_token=page_token,
            name=name,
            schedule_id=schedule_id,
        )
        if create_after is not None:
            request.create_after.FromDatetime(create_after)
        if create_before is not None:
            request.create_before.FromDatetime(create_before)
        return await self._unary(self.workflows.ListWorkflows, request)

    async def retry_workflow(self, workflow_id: str) -> wf_pb.RetryWorkflowResponse:
        """Re-runs a FAILED, CANCELLED or TIMED_OUT workflow from its unfinished steps."""
        request = wf_pb.RetryWorkflowRequest(workflow_id=workflow_id)
        return await self._unary(self.workflows.RetryWorkflow, request)

    async def cancel_workflow(self, workflow_id: str) -> wf_pb.CancelWorkflowResponse:
        request = wf_pb.CancelWorkflowRequest(workflow_id=workflow_id)
        return await self._unary(self.workflows.CancelWorkflow, request)

    async def signal_workflow(
        self,
        workflow_id: str,
        name: str,
        payload: dict[str, Any] | None = None,
        signal_id: str = "",
    ) -> wf_pb.SignalWorkflowResponse:
        """Sends signal `name` (its payload becomes a wait_for_signal step's output)."""
        request = wf_pb.SignalWorkflowRequest(
            workflow_id=workflow_id, name=name, signal_id=signal_id
        )
        request.payload.update(payload or {})
        return await self._unary(self.workflows.SignalWorkflow, request)

    def watch_workflow(
        self, workflow_id: str, after_sequence: int = 0
    ) -> AsyncIterator[wf_pb.WatchWorkflowResponse]:
        """Streams the workflow's state changes until it is terminal."""
        request = wf_pb.WatchWorkflowRequest(workflow_id=workflow_id, after_sequence=after_sequence)
        return self._stream(self.workflows.WatchWorkflow, request)

    def run_workflow(
        self, spec: wf_pb.WorkflowSpec, idempotency_key: str = ""
    ) -> AsyncIterator[wf_pb.RunWorkflowResponse]:
        """Submits and follows in one call: the workflow first, then each event to the end."""
        request = wf_pb.RunWorkflowRequest(spec=spec, idempotency_key=idempotency_key)
        return self._stream(self.workflows.RunWorkflow, request)

    # --- ScheduleService ------------------------------------------------------------------

    async def create_schedule(
        self, request: sched_pb.CreateScheduleRequest
    ) -> sched_pb.CreateScheduleResponse:
        return await self._unary(self.schedules.CreateSchedule, request)

    async def get_schedule(self, schedule_id: str) -> sched_pb.GetScheduleResponse:
        request = sched_pb.GetScheduleRequest(schedule_id=schedule_id)
        return await self._unary(self.schedules.GetSchedule, request)

    async def list_schedules(
        self, page_size: int = 0, page_token: str = ""
    ) -> sched_pb.ListSchedulesResponse:
        request = sched_pb.ListSchedulesRequest(page_size=page_size, page_token=page_token)
        return await self._unary(self.schedules.ListSchedules, request)

    async def pause_schedule(
        self, schedule_id: str, paused: bool = True
    ) -> sched_pb.PauseScheduleResponse:
        """Pauses (or with paused=False resumes) a schedule."""
        request = sched_pb.PauseScheduleRequest(schedule_id=schedule_id, paused=paused)
        return await self._unary(self.schedules.PauseSchedule, request)

    async def delete_schedule(self, schedule_id: str) -> sched_pb.DeleteScheduleResponse:
        request = sched_pb.DeleteScheduleRequest(schedule_id=schedule_id)
        return await self._unary(self.schedules.DeleteSchedule, request)

    async def trigger_schedule(self, schedule_id: str) -> sched_pb.TriggerScheduleResponse:
        request = sched_pb.TriggerScheduleRequest(schedule_id=schedule_id)
        return await self._unary(self.schedules.TriggerSchedule, request)

    # --- SystemService --------------------------------------------------------------------

    async def list_circuit_breakers(self) -> sys_pb.ListCircuitBreakersResponse:
        """Every service's circuit breakers (admins: `system:read`)."""
        request = sys_pb.ListCircuitBreakersRequest()
        return await self._unary(self.system.ListCircuitBreakers, request)


class Client:
    """Blocking twin of AsyncClient (same arguments and methods), on a private event loop.

    Not thread-safe: use one Client per thread.
    """

    def __init__(self, gateway: str = DEFAULT_GATEWAY, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()

        async def build() -> AsyncClient:
            # grpc.aio channels bind to the loop running when they are created.
            return AsyncClient(gateway, **kwargs)

        self.aio = self._loop.run_until_complete(build())

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.run_until_complete(self.aio.close())
            self._loop.close()

    @property
    def tokens(self) -> Tokens | None:
        return self.aio.tokens

    def _run(self, coro: Awaitable[T]) -> T:
        return self._loop.run_until_complete(coro)

    def _iterate(self, stream: AsyncIterator[T]) -> Iterator[T]:
        try:
            while True:
                try:
                    yield self._run(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            with contextlib.suppress(Exception):
                self._run(stream.aclose())  # type: ignore[attr-defined]

    def login(self, username: str, password: str) -> auth_pb.LoginResponse:
        return self._run(self.aio.login(username, password))

    def refresh(self) -> auth_pb.RefreshResponse:
        return self._run(self.aio.refresh())

    def logout(self) -> auth_pb.LogoutResponse:
        return self._run(self.aio.logout())

    def whoami(self) -> auth_pb.WhoAmIResponse:
        return self._run(self.aio.whoami())

    def create_user(self, *args: Any, **kwargs: Any) -> auth_pb.CreateUserResponse:
        return self._run(self.aio.create_user(*args, **kwargs))

    def list_users(self, *args: Any, **kwargs: Any) -> auth_pb.ListUsersResponse:
        return self._run(self.aio.list_users(*args, **kwargs))

    def set_user_roles(self, *args: Any, **kwargs: Any) -> auth_pb.SetUserRolesResponse:
        return self._run(self.aio.set_user_roles(*args, **kwargs))

    def disable_user(self, username: str) -> auth_pb.DisableUserResponse:
        return self._run(self.aio.disable_user(username))

    def create_service_account(
        self, *args: Any, **kwargs: Any
    ) -> auth_pb.CreateServiceAccountResponse:
        return self._run(self.aio.create_service_account(*args, **kwargs))

    def list_service_accounts(
        self, *args: Any, **kwargs: Any
    ) -> auth_pb.ListServiceAccountsResponse:
        return self._run(self.aio.list_service_accounts(*args, **kwargs))

    def create_api_key(self, *args: Any, **kwargs: Any) -> auth_pb.CreateApiKeyResponse:
        return self._run(self.aio.create_api_key(*args, **kwargs))

    def list_api_keys(self, *args: Any, **kwargs: Any) -> auth_pb.ListApiKeysResponse:
        return self._run(self.aio.list_api_keys(*args, **kwargs))

    def revoke_api_key(self, key_id: str) -> auth_pb.RevokeApiKeyResponse:
        return self._run(self.aio.revoke_api_key(key_id))

    def embed(self, *args: Any, **kwargs: Any) -> cog_pb.EmbedResponse:
        return self._run(self.aio.embed(*args, **kwargs))

    def index_documents(self, *args: Any, **kwargs: Any) -> cog_pb.IndexDocumentsResponse:
        return self._run(self.aio.index_documents(*args, **kwargs))

    def search(self, *args: Any, **kwargs: Any) -> cog_pb.SearchResponse:
        return self._run(self.aio.search(*args, **kwargs))

    def classify(self, *args: Any, **kwargs: Any) -> cog_pb.ClassifyResponse:
        return self._run(self.aio.classify(*args, **kwargs))

    def generate(self, request: cog_pb.GenerateRequest) -> Iterator[cog_pb.GenerateResponse]:
        return self._iterate(self.aio.generate(request))

    def submit_workflow(self, *args: Any, **kwargs: Any) -> wf_pb.SubmitWorkflowResponse:
        return self._run(self.aio.submit_workflow(*args, **kwargs))

    def get_workflow(self, workflow_id: str) -> wf_pb.GetWorkflowResponse:
        return self._run(self.aio.get_workflow(workflow_id))

    def list_workflows(self, *args: Any, **kwargs: Any) -> wf_pb.ListWorkflowsResponse:
        return self._run(self.aio.list_workflows(*args, **kwargs))

    def cancel_workflow(self, workflow_id: str) -> wf_pb.CancelWorkflowResponse:
        return self._run(self.aio.cancel_workflow(workflow_id))

    def retry_workflow(self, workflow_id: str) -> wf_pb.RetryWorkflowResponse:
        return self._run(self.aio.retry_workflow(workflow_id))

    def signal_workflow(
        self,
        workflow_id: str,
        name: str,
        payload: dict[str, Any] | None = None,
        signal_id: str = "",
    ) -> wf_pb.SignalWorkflowResponse:
        return self._run(self.aio.signal_workflow(workflow_id, name, payload, signal_id))

    def watch_workflow(
        self, workflow_id: str, after_sequence: int = 0
    ) -> Iterator[wf_pb.WatchWorkflowResponse]:
        return self._iterate(self.aio.watch_workflow(workflow_id, after_sequence))

    def run_workflow(self, *args: Any, **kwargs: Any) -> Iterator[wf_pb.RunWorkflowResponse]:
        return self._iterate(self.aio.run_workflow(*args, **kwargs))

    def create_schedule(self, *args: Any, **kwargs: Any) -> sched_pb.CreateScheduleResponse:
        return self._run(self.aio.create_schedule(*args, **kwargs))

    def get_schedule(self, schedule_id: str) -> sched_pb.GetScheduleResponse:
        return self._run(self.aio.get_schedule(schedule_id))

    def list_schedules(self, *args: Any, **kwargs: Any) -> sched_pb.ListSchedulesResponse:
        return self._run(self.aio.list_schedules(*args, **kwargs))

    def pause_schedule(self, *args: Any, **kwargs: Any) -> sched_pb.PauseScheduleResponse:
        return self._run(self.aio.pause_schedule(*args, **kwargs))

    def delete_schedule(self, schedule_id: str) -> sched_pb.DeleteScheduleResponse:
        return self._run(self.aio.delete_schedule(schedule_id))

    def trigger_schedule(self, schedule_id: str) -> sched_pb.TriggerScheduleResponse:
        return self._run(self.aio.trigger_schedule(schedule_id))

    def list_circuit_breakers(self) -> sys_pb.ListCircuitBreakersResponse:
        return self._run(self.aio.list_circuit_breakers())
