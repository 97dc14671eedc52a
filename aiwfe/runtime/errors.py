"""The one table from domain exceptions to gRPC status codes, with google.rpc details.

Each exception class carries its code (grpc-interceptor style); each raise names its cause
with a reason from `REASONS`, the contract clients branch on (AIP-193): an `ErrorInfo` in
domain `aiwfe.dev` with that reason and its metadata. Where they apply, `BadRequest` field
violations or `RetryInfo`/`QuotaFailure` details are added. The README's "Error reasons"
table is this registry (a test keeps the two equal and checks every raise site).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "aiwfe.dev"
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


@dataclass(frozen=True, slots=True)
class Reason:
    """One cause a caller can branch on: its status code, when it happens, and the
    `ErrorInfo.metadata` keys it may carry."""

    code: grpc.StatusCode
    when: str
    metadata: tuple[str, ...] = ()


_C = grpc.StatusCode
_BACKEND = ("backend", "httpStatus")

# Every ErrorInfo.reason the suite sends. Stable: a reason, once published, keeps its
# meaning; a new cause gets a new name. Metadata keys are lowerCamelCase (google.rpc's
# ErrorInfo asks for that).
REASONS: Mapping[str, Reason] = MappingProxyType({
    "REQUEST_INVALID": Reason(
        _C.INVALID_ARGUMENT, "fields of the request break its rules (BadRequest lists each)",
        ("fields",),
    ),
    "BACKEND_REJECTED_REQUEST": Reason(
        _C.INVALID_ARGUMENT, "a model backend refused the input (HTTP 400, 413 or 422)",
        ("fields", *_BACKEND),
    ),
    "AUTHORIZATION_MALFORMED": Reason(
        _C.UNAUTHENTICATED, "the authorization metadata is not 'Bearer <token>'"
    ),
    "TOKEN_MISSING": Reason(_C.UNAUTHENTICATED, "no bearer token on a call that needs one"),
    "TOKEN_INVALID": Reason(
        _C.UNAUTHENTICATED,
        "the access token is malformed, forged, for another issuer or audience, or signed "
        "with an unknown key or algorithm",
    ),
    "TOKEN_EXPIRED": Reason(_C.UNAUTHENTICATED, "the access token has expired: refresh it"),
    "TOKEN_NOT_YET_VALID": Reason(_C.UNAUTHENTICATED, "the access token's nbf/iat is ahead"),
    "TOKEN_REVOKED": Reason(
        _C.UNAUTHENTICATED, "the access token was revoked (logout, role change, disabled user)"
    ),
    "REFRESH_TOKEN_INVALID": Reason(
        _C.UNAUTHENTICATED, "the refresh token is unknown, expired or revoked"
    ),
    "REFRESH_TOKEN_REUSED": Reason(
        _C.UNAUTHENTICATED, "a spent refresh token was presented again: its session is revoked"
    ),
    "CREDENTIALS_INVALID": Reason(
        _C.UNAUTHENTICATED, "login with a wrong username or password, or a disabled user"
    ),
    "API_KEY_INVALID": Reason(
        _C.UNAUTHENTICATED, "the API key is malformed or unknown, or its secret is wrong"
    ),
    "API_KEY_EXPIRED": Reason(_C.UNAUTHENTICATED, "the API key has expired"),
    "API_KEY_REVOKED": Reason(
        _C.UNAUTHENTICATED, "the API key was revoked, or its service account disabled"
    ),
    "IDENTITY_MISSING": Reason(
        _C.UNAUTHENTICATED, "a back end was called without the gateway's identity assertion"
    ),
    "IDENTITY_INVALID": Reason(
        _C.UNAUTHENTICATED, "the identity assertion is forged, expired or for another audience"
    ),
    "PERMISSION_MISSING": Reason(
        _C.PERMISSION_DENIED, "the caller's roles lack the permission the RPC declares",
        ("permission", "method"),
    ),
    "COLLECTION_ACCESS_DENIED": Reason(
        _C.PERMISSION_DENIED,
        "the caller may read the collection but not write or manage it (`access` says which)",
        ("collection", "access"),
    ),
    "METHOD_NOT_EXPOSED": Reason(
        _C.PERMISSION_DENIED, "the RPC is internal: the gateway does not route it"
    ),
    "USER_PRINCIPAL_REQUIRED": Reason(
        _C.PERMISSION_DENIED, "a workflow RPC called on behalf of no user"
    ),
    "WORKFLOW_NOT_FOUND": Reason(
        _C.NOT_FOUND, "no such workflow, or it belongs to another user", ("workflowId",)
    ),
    "SCHEDULE_NOT_FOUND": Reason(
        _C.NOT_FOUND, "no such schedule, or it belongs to another user", ("scheduleId",)
    ),
    "USER_NOT_FOUND": Reason(_C.NOT_FOUND, "no such user", ("username", "userId")),
    "SERVICE_ACCOUNT_NOT_FOUND": Reason(
        _C.NOT_FOUND, "no such service account (a user's account holds no API keys)",
        ("serviceAccount", "userId"),
    ),
    "API_KEY_NOT_FOUND": Reason(_C.NOT_FOUND, "no such API key", ("keyId",)),
    "COLLECTION_NOT_FOUND": Reason(
        _C.NOT_FOUND, "no such vector collection", ("collection", "field")
    ),
    "USER_ALREADY_EXISTS": Reason(_C.ALREADY_EXISTS, "the username is taken", ("username",)),
    "SESSION_ALREADY_EXISTS": Reason(_C.ALREADY_EXISTS, "the refresh token is already stored"),
    "API_KEY_ALREADY_EXISTS": Reason(_C.ALREADY_EXISTS, "the API key id is already stored"),
    "COLLECTION_ALREADY_EXISTS": Reason(
        _C.ALREADY_EXISTS, "a vector collection of that name exists", ("collection",)
    ),
    "DIMENSION_MISMATCH": Reason(
        _C.FAILED_PRECONDITION,
        "the embedding model's vectors do not fit the collection's dimension",
        ("collection", "collectionDimension", "model", "modelDimension"),
    ),
    "WORKFLOW_FINISHED": Reason(
        _C.FAILED_PRECONDITION, "the workflow has finished: it takes no more signals",
        ("workflowId",),
    ),
    "WORKFLOW_NOT_RETRYABLE": Reason(
        _C.FAILED_PRECONDITION,
        "only a FAILED, CANCELLED or TIMED_OUT workflow can be retried (it is running or"
        " succeeded)",
        ("workflowId", "state"),
    ),
    "TASK_TOKEN_STALE": Reason(
        _C.FAILED_PRECONDITION,
        "the task's lease expired (it was dispatched again) or its workflow ended: drop it",
        ("workflowId", "stepName", "attempt"),
    ),
    "SCHEDULE_OWNER_NOT_ALLOWED": Reason(
        _C.FAILED_PRECONDITION,
        "the schedule's owner is disabled, deleted or no longer granted api:workflow:schedule",
        ("scheduleId",),
    ),
    "NO_LLM_CONFIGURED": Reason(_C.FAILED_PRECONDITION, "Generate with no LLM configured"),
    "NO_DEFAULT_LLM": Reason(
        _C.FAILED_PRECONDITION, "several LLMs are configured, none is the default or named"
    ),
    "BACKEND_MISCONFIGURED": Reason(
        _C.FAILED_PRECONDITION, "a model backend answered HTTP 401, 403 or 404", _BACKEND
    ),
    "SERVICE_ACCOUNT_DISABLED": Reason(
        _C.FAILED_PRECONDITION, "an API key was asked for a disabled service account",
        ("serviceAccount",),
    ),
    "API_KEY_NOT_A_SESSION": Reason(
        _C.FAILED_PRECONDITION, "Logout called with an API key: revoke it with RevokeApiKey"
    ),
    "RATE_LIMITED": Reason(
        _C.RESOURCE_EXHAUSTED,
        "a rate limit is spent (RetryInfo, QuotaFailure, retry-after say when it resets)",
        ("quota", "limit"),
    ),
    "OVERLOADED": Reason(
        _C.RESOURCE_EXHAUSTED,
        "a service is at its adaptive concurrency limit and sheds the call (RetryInfo)",
        ("limit",),
    ),
    "WATCH_STREAMS_EXHAUSTED": Reason(
        _C.RESOURCE_EXHAUSTED,
        "a taskproc replica serves its limit of watch streams (RetryInfo, QuotaFailure)",
        ("limit",),
    ),
    "STREAM_WATCHES_EXHAUSTED": Reason(
        _C.RESOURCE_EXHAUSTED,
        "a WatchWorkflowEventsMany or WatchWorkflows stream was sent more open watches than"
        " its bound (QuotaFailure)",
        ("limit",),
    ),
    "TASK_POLLS_EXHAUSTED": Reason(
        _C.RESOURCE_EXHAUSTED,
        "a taskproc replica holds its limit of waiting PollTask calls (RetryInfo, QuotaFailure)",
        ("limit",),
    ),
    "BACKEND_RATE_LIMITED": Reason(
        _C.RESOURCE_EXHAUSTED, "a model backend answered HTTP 429", _BACKEND
    ),
    "DEPENDENCY_UNAVAILABLE": Reason(
        _C.UNAVAILABLE,
        "a live service's dependency is down or its breaker open (RetryInfo says when)",
        ("dependency", "circuit"),
    ),
    "DATABASE_UNAVAILABLE": Reason(
        _C.UNAVAILABLE, "the data platform's PostgreSQL is unreachable", ("dependency",)
    ),
    "VECTOR_STORE_UNAVAILABLE": Reason(
        _C.UNAVAILABLE,
        "the vector store (a Qdrant server, or the embedded engine's process) failed transiently",
        ("dependency",),
    ),
    "COLLECTION_ACCESS_UNAVAILABLE": Reason(
        _C.UNAVAILABLE, "the data platform runs without its collection access store"
    ),
    "BACKEND_UNREACHABLE": Reason(
        _C.UNAVAILABLE, "a model backend could not be reached", ("backend",)
    ),
    "BACKEND_FAILED": Reason(
        _C.UNAVAILABLE, "a model backend answered a 5xx or failed mid-stream", _BACKEND
    ),
    "BACKEND_REPLY_INVALID": Reason(
        _C.UNAVAILABLE, "a model backend's reply was malformed (wrong count or shape)",
        ("backend",),
    ),
    "BACKEND_TIMEOUT": Reason(
        _C.DEADLINE_EXCEEDED, "a model backend did not answer in time", ("backend",)
    ),
    "DEPENDENCY_DEADLINE_EXCEEDED": Reason(
        _C.DEADLINE_EXCEEDED, "a dependency did not answer within our deadline for it",
        ("dependency",),
    ),
    "INTERNAL_ERROR": Reason(
        _C.INTERNAL, "an unexpected failure; the log holds it under the reference",
        ("reference",),
    ),
})  # fmt: skip


class AiwfeError(Exception):
    """Base of every error a caller may see: `code` decides the gRPC status, `reason` (a
    key of `REASONS` for that code) the ErrorInfo; empty metadata values are left out."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(
        self, message: str, *, reason: str, metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        spec = REASONS.get(reason)
        # A programming error, refused where the error is built (tests/test_error_reasons.py
        # finds literal ones before they ship): the contract never carries an unlisted reason.
        if spec is None or spec.code is not self.code:
            raise ValueError(f"{reason!r} is not a registered reason for {self.code.name}")
        self.message = message
        self.reason = reason
        self.error_metadata = {k: str(v) for k, v in (metadata or {}).items() if v != ""}
        if unknown := set(self.error_metadata) - set(spec.metadata):
            raise ValueError(f"metadata {sorted(unknown)} not declared for {reason}")

    def details(self) -> list[Message]:
        """google.rpc detail messages attached to the status."""
        return [
            error_details_pb2.ErrorInfo(
                reason=self.reason, domain=ERROR_DOMAIN, metadata=self.error_metadata
            )
        ]

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """Extra plain-text trailers (e.g. retry-after) besides the status details."""
        return ()

    def to_status(self) -> grpc.Status:
        """The full gRPC status, details packed into `grpc-status-details-bin`."""
        packed = []
        for detail in self.details():
            any_msg = any_pb2.Any()
            any_msg.Pack(detail)
            packed.append(any_msg)
        status = rpc_status.to_status(
            status_pb2.Status(code=self.code.value[0], message=self.message, details=packed)
        )
        if extra := self.trailing_metadata():
            return Status(status.code, status.details, tuple(status.trailing_metadata) + extra)
        return status


class Status(grpc.Status):
    """A plain grpc.Status value (the grpc package defines only the interface)."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


class InvalidArgument(AiwfeError):
    """The caller's request is malformed; lists every offending field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(
        self,
        violations: Sequence[tuple[str, str]],
        message: str | None = None,
        *,
        reason: str = "REQUEST_INVALID",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.violations = list(violations)
        summary = "; ".join(f"{f}: {d}" for f, d in self.violations)
        fields = ",".join(dict.fromkeys(f for f, _ in self.violations))
        super().__init__(
            message or f"invalid request: {summary}",
            reason=reason,
            metadata={"fields": fields, **(metadata or {})},
        )

    def details(self) -> list[Message]:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                for f, d in self.violations
            ]
        )
        return [*super().details(), bad]


class Unauthenticated(AiwfeError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(AiwfeError):
    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(AiwfeError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(AiwfeError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(AiwfeError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(AiwfeError):
    """A live server saying something it needs is down. Tells gRPC clients not to retry
    at once (`grpc-retry-pushback-ms: -1`): retrying would only multiply the load on a
    failing dependency or an open circuit."""

    code = grpc.StatusCode.UNAVAILABLE

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((RETRY_PUSHBACK_KEY, "-1"),)


class DependencyUnavailable(Unavailable):
    """A live service whose own dependency is down (unreachable, or its breaker open): the
    ErrorInfo names the dependency, so callers and their breakers know who failed, and
    RetryInfo says when to try again."""

    def __init__(
        self, dependency: str, message: str, *, circuit: str = "", retry_after: float = 1.0
    ) -> None:
        super().__init__(
            message,
            reason="DEPENDENCY_UNAVAILABLE",
            metadata={"dependency": dependency, "circuit": circuit},
        )
        self.retry_after = retry_after

    def details(self) -> list[Message]:
        return [*super().details(), retry_info(self.retry_after)]


def retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    """google.rpc.RetryInfo asking the caller to wait `seconds` before retrying."""
    secs = max(0.0, seconds)
    return error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=int(secs), nanos=int((secs % 1) * 1e9))
    )


class DeadlineExceeded(AiwfeError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhausted(AiwfeError):
    """A limit was hit; tells the caller when to retry and which quota it exceeded."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        quota_violations: Iterable[tuple[str, str]] = (),
        reason: str,
        metadata: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.retry_after = retry_after
        self.quota_violations = list(quota_violations)
        self.headers = dict(headers or {})

    def details(self) -> list[Message]:
        out = super().details()
        if self.retry_after is not None:
            out.append(retry_info(self.retry_after))
        if self.quota_violations:
            out.append(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(subject=s, description=d)
                        for s, d in self.quota_violations
                    ]
                )
            )
        return out

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        extra = dict(self.headers)
        if self.retry_after is not None:
            # Whole seconds rounded up (RFC 9110 delay-seconds): never earlier than RetryInfo.
            extra.setdefault("retry-after", str(max(1, math.ceil(self.retry_after))))
        return tuple(extra.items())


_DEPENDENCY_ATTR = "_aiwfe_dependency"


def attribute(error: grpc.aio.AioRpcError, dependency: str) -> grpc.aio.AioRpcError:
    """Marks `error` as the failure of a call to `dependency` (an `Upstream` does this), so
    passing it on names who failed."""
    setattr(error, _DEPENDENCY_ATTR, dependency)
    return error


def status_from_rpc_error(error: grpc.aio.AioRpcError) -> grpc.Status:
    """Re-raisable status of a downstream failure, keeping its google.rpc details.

    A bare UNAVAILABLE or DEADLINE_EXCEEDED of a call to a named dependency (transport
    failure, the dependency's own refusal or our deadline for it) gets an ErrorInfo naming
    that dependency: this service is alive and answering, so our caller's breaker must not
    count it against us. The code stays what it was.
    """
    trailers = tuple(error.trailing_metadata() or ())
    dependency = getattr(error, _DEPENDENCY_ATTR, None)
    code = error.code()
    message = error.details() or ""
    if dependency and not any(k == rpc_status.GRPC_DETAILS_METADATA_KEY for k, _ in trailers):
        if code is grpc.StatusCode.UNAVAILABLE:
            return DependencyUnavailable(dependency, f"{dependency}: {message}").to_status()
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded(
                f"{dependency}: {message}",
                reason="DEPENDENCY_DEADLINE_EXCEEDED",
                metadata={"dependency": dependency},
            ).to_status()
    keep = (rpc_status.GRPC_DETAILS_METADATA_KEY, RETRY_PUSHBACK_KEY)
    return Status(code, message, tuple((k, v) for k, v in trailers if k in keep))


def internal_status(reference: str) -> grpc.Status:
    """Generic status for an unexpected failure: never leaks the exception, only a reference."""
    return AiwfeError(
        f"internal error (reference {reference}); the failure is logged",
        reason="INTERNAL_ERROR",
        metadata={"reference": reference},
    ).to_status()


def rpc_status_of(status: grpc.Status) -> status_pb2.Status:
    """`status` as one google.rpc.Status message (code, message, details), for a stream
    that carries the end of many watches, each with its own status. Trailers other than the
    details (retry-after, retry pushback) do not fit in it and are dropped."""
    for key, value in status.trailing_metadata or ():
        if key == rpc_status.GRPC_DETAILS_METADATA_KEY:
            return status_pb2.Status.FromString(value)
    return status_pb2.Status(code=status.code.value[0], message=status.details or "")


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def rpc_error_of(status: status_pb2.Status) -> grpc.aio.AioRpcError:
    """The `AioRpcError` a call of its own would have raised with `status` (from
    `rpc_status_of`): the same code, message and details, which `status_from_rpc_error`
    passes on unchanged. An UNAVAILABLE gets back the pushback every `Unavailable` sends."""
    code = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
    trailers: list[tuple[str, str | bytes]] = []
    if status.details:
        trailers.append((rpc_status.GRPC_DETAILS_METADATA_KEY, status.SerializeToString()))
    if code is grpc.StatusCode.UNAVAILABLE:
        trailers.append((RETRY_PUSHBACK_KEY, "-1"))
    return grpc.aio.AioRpcError(
        code,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*trailers),
        details=status.message,
    )
